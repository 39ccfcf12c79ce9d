"""The one file format: a directory with ``steerlab.json`` and ``weights.safetensors``.

Everything steerlab saves (a run graph, a set of interventions, a
``Subspace``, a DAS result, a ReFT model) is written by :func:`save` and read
by :func:`load`::

    out/
      steerlab.json         {"format": "steerlab", "version": 1, "kind": ...,
                             "fingerprint": {model_type, width, n_layers, vocab_size},
                             "config": {...}, "tensors": {name: {dtype, shape}}}
      weights.safetensors

Writes go to a temporary directory that is renamed into place. The loader
refuses, each with a named error: a missing or malformed ``steerlab.json``, a
wrong format or version, another kind, a fingerprint that does not match the
model, a truncated or garbage weights file, tensors missing, extra, or of
another dtype or shape than the manifest says. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from steerlab.interventions.errors import FileFormatError, FingerprintMismatch

__all__ = ["FORMAT_VERSION", "save", "load", "CONFIG_NAME", "WEIGHTS_NAME"]

FORMAT_VERSION = 1
CONFIG_NAME = "steerlab.json"
WEIGHTS_NAME = "weights.safetensors"
_PICKLES = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt")


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def save(
    directory: str | Path,
    *,
    kind: str,
    config: dict[str, Any],
    tensors: dict[str, Tensor],
    fingerprint: dict[str, Any] | None = None,
) -> Path:
    """Write ``directory`` atomically (an existing one is replaced)."""
    from steerlab.cache import atomic_dir

    directory = Path(directory)
    manifest = {k: {"dtype": _dtype_name(v.dtype), "shape": list(v.shape)} for k, v in tensors.items()}
    meta = {
        "format": "steerlab",
        "version": FORMAT_VERSION,
        "kind": kind,
        "fingerprint": fingerprint,
        "config": config,
        "tensors": manifest,
    }
    try:
        text = json.dumps(meta, indent=2, sort_keys=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise FileFormatError(f"the {kind} configuration is not plain JSON data: {e}") from None
    with atomic_dir(directory) as tmp:
        (tmp / CONFIG_NAME).write_text(text + "\n")
        save_file({k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS_NAME), metadata={"format": "steerlab"})
    return directory


def _not_json(name: str):
    raise ValueError(f"holds {name}, which is not JSON (the format has no NaN or Infinity)")


def _check_fingerprint(saved: dict | None, model: dict | None, where: Path) -> None:
    if not saved or not model:
        return
    diffs = [f"{k}: file {saved.get(k)!r} vs model {model.get(k)!r}" for k in sorted(set(saved) | set(model))
             if saved.get(k) is not None and model.get(k) is not None and saved.get(k) != model.get(k)]
    if diffs:
        raise FingerprintMismatch(f"{where} was saved for another model ({'; '.join(diffs)})")


def load(
    directory: str | Path,
    *,
    kind: str | Sequence[str] | None = None,
    fingerprint: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Read and validate ``directory``; return ``(meta, tensors)``.

    ``kind`` (one or several accepted kinds) and ``fingerprint`` (of the model
    the file will be used with) are checked when given.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileFormatError(f"{directory} is not a steerlab directory (expected a folder holding {CONFIG_NAME} and {WEIGHTS_NAME})")
    cfg_path = directory / CONFIG_NAME
    if not cfg_path.is_file():
        pickles = [p.name for pat in _PICKLES for p in directory.glob(pat)]
        hint = f"; found {pickles}, which steerlab never loads (pickle files can run code)" if pickles else ""
        raise FileFormatError(f"{directory} has no {CONFIG_NAME}{hint}")
    try:
        meta = json.loads(cfg_path.read_text(), parse_constant=_not_json)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FileFormatError(f"{cfg_path} is not valid JSON: {e}") from None
    except RecursionError:
        raise FileFormatError(f"{cfg_path} is not valid JSON: nested too deeply") from None
    except ValueError as e:  # NaN / Infinity
        raise FileFormatError(f"{cfg_path} {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != "steerlab":
        raise FileFormatError(f"{cfg_path} is not a steerlab file (no \"format\": \"steerlab\")")
    version = meta.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise FileFormatError(f"{cfg_path} has no format version")
    if version > FORMAT_VERSION:
        raise FileFormatError(f"{cfg_path} has format version {version}, made by a newer steerlab; this one reads up to {FORMAT_VERSION}")
    if version < 1:
        raise FileFormatError(f"{cfg_path} has an invalid format version {version}")
    kinds = (kind,) if isinstance(kind, str) else tuple(kind) if kind else ()
    if "kind" not in meta or not isinstance(meta["kind"], str):
        raise FileFormatError(f"{cfg_path} does not say what it holds (no \"kind\")")
    if kinds and meta["kind"] not in kinds:
        raise FileFormatError(f"{directory} holds a {meta['kind']!r}; expected {' or '.join(repr(k) for k in kinds)}")
    if not isinstance(meta.get("config"), dict) or not isinstance(meta.get("tensors"), dict):
        raise FileFormatError(f"{cfg_path} lacks its \"config\" or \"tensors\" section")
    _check_fingerprint(meta.get("fingerprint"), fingerprint, directory)
    w_path = directory / WEIGHTS_NAME
    if not w_path.is_file():
        raise FileFormatError(f"{directory} has no {WEIGHTS_NAME}")
    try:
        tensors = load_file(str(w_path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise FileFormatError(f"{w_path} is corrupt or truncated: {e}") from None
    manifest: dict = meta["tensors"]
    missing = sorted(set(manifest) - set(tensors))
    extra = sorted(set(tensors) - set(manifest))
    if missing or extra:
        raise FileFormatError(f"{w_path} does not match {CONFIG_NAME}: missing tensors {missing}, extra tensors {extra}")
    for name, spec in manifest.items():
        t = tensors[name]
        if not isinstance(spec, dict) or spec.get("dtype") != _dtype_name(t.dtype) or list(spec.get("shape", [])) != list(t.shape):
            raise FileFormatError(
                f"tensor {name!r} in {w_path} is {_dtype_name(t.dtype)}{list(t.shape)} but {CONFIG_NAME} says {spec}"
            )
    return meta, tensors
