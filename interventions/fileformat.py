"""The one file format: a folder holding ``steerlab.json`` and the weights file it names.

Everything steerlab saves (a run graph, a set of interventions, a
``Subspace``, a DAS or search result, a ReFT model, a sweep) is written by
:func:`save` and read by :func:`read` (or :func:`load`)::

    out/
      steerlab.json      {"format": "steerlab", "version": 2, "kind": ...,
                          "fingerprint": {model_type, width, n_layers, vocab_size},
                          "config": {...}, "tensors": {name: {dtype, shape}},
                          "weights": {"file": "weights-<sha256[:16]>.safetensors",
                                      "sha256": <64 hex digits>, "bytes": <size>}}
      weights-<sha256[:16]>.safetensors

**What a save owns.** In the target folder a save writes, replaces or
removes only: ``steerlab.json``; files named ``weights-<16 hex
digits>.safetensors`` (the current save's weights, or ones left by an earlier
save that was interrupted); ``weights.safetensors`` when the save it replaces
is a version-1 save (that version's weights file); and its own temporary files
``.steerlab-*.tmp``. Every other file and folder there is left alone, so a
save into a folder of notes, checkpoints or a Trainer's files keeps them.

**Atomic.** The weights are written under a name derived from their content
(a temporary file, flushed to disk, renamed into place); then ``steerlab.json``
naming that file and its SHA-256 is renamed over the old one: that rename is
the single commit point. The old weights are removed after it. A kill at any
moment leaves either the complete old save or the complete new one (a folder
that held none holds none). A read-only folder or ``steerlab.json`` is refused
with :class:`~steerlab.interventions.errors.SaveError`, never replaced.

**Loading** checks the whole file before anything is built, each failure a
:class:`~steerlab.interventions.errors.FileFormatError` naming the value and what
was expected: the JSON (a record of at most 256 MB, no NaN or infinite number,
every section of the right type), the kind, the model's fingerprint (a file
without one is refused when a model is given), the weights file (a regular
file, never a followed symbolic link; its size and SHA-256 as recorded, so a
flipped byte is caught), its safetensors header parsed without loading a
tensor (offsets contiguous and inside the file, each tensor's bytes equal to
its dtype and shape), and the header equal to the manifest. Tensors are made
only by :meth:`SavedFile.tensors`, which refuses NaN and infinite values.
Nothing is ever unpickled.

Version 1 (``weights.safetensors``, no hash) is still read; a version-1 file
carries no checksum, so a flipped byte that leaves its values finite goes
unnoticed there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import secrets
import stat
import struct
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save
from torch import Tensor

from steerlab.interventions.errors import ConfigError, FileFormatError, FingerprintMismatch, SaveError

__all__ = [
    "FORMAT_VERSION",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "SavedFile",
    "TensorSpec",
    "save",
    "read",
    "load",
    "weights_path",
    "check_device",
    "dtype_name",
    "field_of",
    "parse_json",
    "check_fingerprint",
    "read_file",
]

FORMAT_VERSION = 2
CONFIG_NAME = "steerlab.json"
#: version 1's weights file (version 2 names a content-addressed file in ``steerlab.json``)
WEIGHTS_NAME = "weights.safetensors"
MAX_JSON_BYTES = 256 * 2**20
_WEIGHTS_RE = re.compile(r"weights-[0-9a-f]{16}\.safetensors")
_TMP_RE = re.compile(r"\.steerlab-[0-9a-f-]+\.tmp")
_SHA_RE = re.compile(r"[0-9a-f]{64}")
_PICKLES = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt")
_FINGERPRINT_KEYS = ("model_type", "width", "n_layers", "vocab_size")
_INT64 = 2**63

# safetensors dtype codes <-> torch dtypes (the ones torch can hold)
_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
_BY_NAME: dict[str, torch.dtype] = {str(d).removeprefix("torch."): d for d in _ST_DTYPES.values()}


def dtype_name(dt: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (as the manifest writes it)."""
    return str(dt).removeprefix("torch.")


@dataclass(frozen=True)
class TensorSpec:
    """A tensor as the file declares it: dtype and shape (checked against the safetensors header)."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def __str__(self) -> str:
        return f"{dtype_name(self.dtype)}{list(self.shape)}"


# --------------------------------------------------------------------------- devices
def check_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a ``torch.device`` that this machine has, or :class:`ConfigError`
    (so an absent GPU is never reported as a damaged file)."""
    try:
        dev = torch.device(device if device is not None else "cpu")
    except (RuntimeError, TypeError, ValueError) as e:
        raise ConfigError(f"device={device!r} is not a device name ({e}); expected 'cpu', 'cuda', 'cuda:1', 'mps', ...") from None
    if dev.type == "meta":
        raise ConfigError(f"device={device!r}: loaded tensors need real memory; expected 'cpu' or an accelerator")
    try:
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError, ValueError) as e:  # torch raises AssertionError for "not compiled with CUDA"
        raise ConfigError(f"device={device!r} is not available on this machine ({str(e).strip()}); expected 'cpu' or an available accelerator") from None
    return dev


# --------------------------------------------------------------------------- saving
def save(
    directory: str | Path,
    *,
    kind: str,
    config: dict[str, Any],
    tensors: dict[str, Tensor],
    fingerprint: dict[str, Any] | None = None,
    nonfinite: Collection[str] = (),
) -> Path:
    """Write a save into ``directory`` atomically, touching only the files a save owns.

    ``nonfinite`` names tensors that may hold NaN or infinity (data such as a
    sweep's empty cells); every other floating tensor must be finite, as a
    load will require. Raises :class:`SaveError` for a read-only target or a
    failed write (the old save, if any, is then still complete).
    """
    directory = Path(directory)
    payload = _weights_bytes(tensors, kind, set(nonfinite))
    sha = hashlib.sha256(payload).hexdigest()
    name = f"weights-{sha[:16]}.safetensors"
    meta = {
        "format": "steerlab",
        "version": FORMAT_VERSION,
        "kind": kind,
        "fingerprint": fingerprint,
        "config": config,
        "tensors": {k: {"dtype": dtype_name(v.dtype), "shape": list(v.shape)} for k, v in tensors.items()},
        "weights": {"file": name, "sha256": sha, "bytes": len(payload)},
    }
    _json_text(meta)  # refuse what is not JSON before touching the folder
    _check_target(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with _locked(directory) as dir_fd:
            _commit(directory, dir_fd, name, payload, meta)
    except SaveError:
        raise
    except OSError as e:
        raise SaveError(f"saving the {kind} to {directory} failed ({e}); the save that was there, if any, is unchanged") from e
    return directory


def _json_text(meta: dict[str, Any]) -> bytes:
    try:
        return (json.dumps(meta, indent=2, allow_nan=False) + "\n").encode()
    except (TypeError, ValueError) as e:
        raise FileFormatError(f"the {meta['kind']} configuration is not plain JSON data (finite numbers, strings, lists, objects): {e}") from None


def _weights_bytes(tensors: dict[str, Tensor], kind: str, nonfinite: set[str]) -> bytes:
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in tensors.items()):
        raise FileFormatError(f"the {kind} tensors must be a dict of name -> torch.Tensor")
    bad = sorted(k for k, v in tensors.items() if k not in nonfinite and _nonfinite_count(v))
    if bad:
        raise FileFormatError(
            f"cannot save the {kind}: tensor(s) {bad[:5]} hold NaN or infinite values (a load would refuse them); "
            "the training or fit that produced them diverged"
        )
    flat = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    return _st_save(flat, metadata={"format": "steerlab"})


def _nonfinite_count(t: Tensor) -> int:
    if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
        return 0
    return int((~torch.isfinite(t)).sum())


def _check_target(directory: Path) -> None:
    if directory.exists() and not directory.is_dir():
        raise SaveError(f"{directory} is a file; a steerlab save is a folder (give a folder path)")
    if not directory.is_dir():
        return
    if _read_only(directory):
        raise SaveError(f"{directory} is read-only; refusing to save into it (make it writable, or save elsewhere)")
    for p in [directory / CONFIG_NAME, *_current_weights(directory)[0]]:
        if p.exists() and not p.is_symlink() and _read_only(p):
            raise SaveError(f"{p} is read-only: the save there is protected; refusing to replace it (chmod u+w it, or save elsewhere)")


def _read_only(p: Path) -> bool:
    st = p.stat()
    return not (st.st_mode & 0o222) or not os.access(p, os.W_OK)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[int | None]:
    """An exclusive lock on the folder (``flock`` on the folder itself: no lock file), so two
    processes saving into one folder take turns; yields the folder's descriptor (for fsync)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # a platform that cannot open folders: no lock, no folder fsync
        yield None
        return
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)
        except (ImportError, OSError):
            pass
        yield fd
    finally:
        os.close(fd)


def _commit(directory: Path, dir_fd: int | None, name: str, payload: bytes, meta: dict[str, Any]) -> None:
    """Weights under their content name, then ``steerlab.json`` (the commit), then the old weights go.

    Replacing a version-1 save, the new record lists its ``weights.safetensors`` under
    ``"superseded"`` until it is gone, so a kill between the commit and its removal
    leaves it to the next save to remove (and to no one else's file of that name)."""
    old, superseded = _current_weights(directory)
    if superseded:
        meta = {**meta, "superseded": [WEIGHTS_NAME]}
    written = False
    try:
        written = not (directory / name).exists()
        _write_replace(directory, name, payload)
        _write_replace(directory, CONFIG_NAME, _json_text(meta), dir_fd=dir_fd)  # <- the commit point
    except BaseException:
        if written and not any(p.name == name for p in old):
            with contextlib.suppress(OSError):
                os.unlink(directory / name)
        raise
    _remove_stale(directory, keep=name, superseded=superseded)


def _write_replace(directory: Path, name: str, data: bytes, *, dir_fd: int | None = None) -> None:
    tmp = directory / f".steerlab-{os.getpid():x}-{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, directory / name)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if dir_fd is not None:
        with contextlib.suppress(OSError):
            os.fsync(dir_fd)


def _current_weights(directory: Path) -> tuple[list[Path], bool]:
    """The weights file(s) the folder's current ``steerlab.json`` uses, and whether a version-1
    ``weights.safetensors`` belongs to it (its own, or one its record lists as superseded)."""
    try:
        meta = json.loads(_read_regular(directory / CONFIG_NAME, MAX_JSON_BYTES))
    except (FileFormatError, FileNotFoundError, ValueError, RecursionError):
        return [], False
    if not isinstance(meta, dict) or meta.get("format") != "steerlab":
        return [], False
    if meta.get("version") == 1:
        return [directory / WEIGHTS_NAME], True
    w = meta.get("weights")
    f = w.get("file") if isinstance(w, dict) else None
    superseded = meta.get("superseded") == [WEIGHTS_NAME] and (directory / WEIGHTS_NAME).exists()
    return ([directory / f] if isinstance(f, str) and _WEIGHTS_RE.fullmatch(f) else []), superseded


def _remove_stale(directory: Path, *, keep: str, superseded: bool) -> None:
    """After the commit: old weights files, weights left by interrupted saves, stale temporaries."""
    for entry in os.scandir(directory):
        n = entry.name
        ours = (_WEIGHTS_RE.fullmatch(n) and n != keep) or _TMP_RE.fullmatch(n) or (superseded and n == WEIGHTS_NAME)
        if ours and not entry.is_dir(follow_symlinks=False):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)


# --------------------------------------------------------------------------- reading
def _read_regular(path: Path, limit: int | None = None, *, check: Callable[[int, int], Any] | None = None) -> bytes:
    """The bytes of a regular file, never through a symbolic link (``FileNotFoundError`` if absent).
    ``check(fd, size)`` runs before the file is read (it may ``pread`` a header), so a file
    whose size disagrees with what it declares is refused without reading it."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as e:
        if path.is_symlink():
            raise FileFormatError(f"{path} is a symbolic link; a steerlab save's files are regular files and links are never followed") from None
        raise FileFormatError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise FileNotFoundError(path)
        if not stat.S_ISREG(st.st_mode):
            raise FileFormatError(f"{path} is not a regular file (a device, pipe or socket); a steerlab save's files are regular files")
        if limit is not None and st.st_size > limit:
            raise FileFormatError(f"{path} is {st.st_size:,} bytes; a steerlab record is at most {limit:,}")
        if check is not None:
            check(fd, st.st_size)
        chunks, left = [], st.st_size
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 24))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_file(path: str | Path, limit: int | None = None) -> bytes:
    """A file's bytes as a save's files are read: a regular file, never through a link, at most
    ``limit`` bytes; a missing one is :class:`FileFormatError`."""
    try:
        return _read_regular(Path(path), limit)
    except FileNotFoundError:
        raise FileFormatError(f"{path} does not exist (or is a folder)") from None


def _parse_int(s: str) -> int:
    v = int(s)
    if not -_INT64 <= v < _INT64:
        raise ValueError(f"holds the integer {s[:20]}{'...' if len(s) > 20 else ''}, outside the 64-bit range the format allows")
    return v


def _parse_float(s: str) -> float:
    v = float(s)
    if not math.isfinite(v):
        raise ValueError(f"holds the number {s[:40]}, which overflows to infinity (the format has only finite numbers)")
    return v


def _not_json(name: str):
    raise ValueError(f"holds {name}, which is not JSON (the format has no NaN or Infinity)")


def parse_json(data: bytes, where: Path | str) -> Any:
    """JSON as the format allows it: UTF-8, finite numbers, integers within 64 bits."""
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_not_json, parse_int=_parse_int, parse_float=_parse_float)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FileFormatError(f"{where} is not valid JSON: {e}") from None
    except RecursionError:
        raise FileFormatError(f"{where} is not valid JSON: nested too deeply") from None
    except ValueError as e:  # NaN / Infinity / overflow / over-long integers
        raise FileFormatError(f"{where} {e}") from None


@dataclass
class SavedFile:
    """A save whose record, fingerprint and weights header have been checked; no tensor made yet.

    ``specs`` are the tensors as the header declares them (equal to the
    manifest), for checking shapes against a model before anything is built.
    """

    directory: Path
    meta: dict[str, Any]
    specs: dict[str, TensorSpec]
    weights_file: Path
    _data: bytes
    _offsets: dict[str, tuple[int, int]]

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def version(self) -> int:
        return self.meta["version"]

    @property
    def config(self) -> dict[str, Any]:
        return self.meta["config"]

    @property
    def fingerprint(self) -> dict[str, Any] | None:
        return self.meta.get("fingerprint")

    def tensors(self, device: str | torch.device = "cpu", *, nonfinite: Collection[str] = ()) -> dict[str, Tensor]:
        """Make the tensors (on ``device``); floating ones outside ``nonfinite`` must be finite."""
        dev = check_device(device)
        try:
            out = _st_load(self._data)
        except (SafetensorError, ValueError, RuntimeError) as e:
            raise FileFormatError(f"{self.weights_file} is corrupt or truncated: {e}") from None
        for k, t in out.items():
            if k not in nonfinite and (n := _nonfinite_count(t)):
                raise FileFormatError(
                    f"tensor {k!r} in {self.weights_file} holds {n} NaN or infinite value(s) of {t.numel()}; "
                    "a saved tensor must be finite (the file is damaged, or it was written from a diverged run)"
                )
        return {k: v.to(dev) for k, v in out.items()} if dev.type != "cpu" else out

    def __repr__(self) -> str:
        return f"SavedFile({self.directory}, kind={self.kind!r}, version={self.version}, {len(self.specs)} tensors)"


def read(
    directory: str | Path,
    *,
    kind: str | Sequence[str] | None = None,
    fingerprint: dict[str, Any] | None = None,
) -> SavedFile:
    """Read and check a save (see the module docstring); no tensor is made.

    ``kind``: one or several accepted kinds. ``fingerprint``: of the model the
    file will be used with; the file must carry a matching one.
    """
    directory = Path(directory)
    for _attempt in range(3):  # a save committing meanwhile may remove the weights named a moment ago
        meta = _read_meta(directory)
        _check_kind(meta, kind, directory)
        check_fingerprint(meta.get("fingerprint"), fingerprint, directory)
        w_path = directory / (WEIGHTS_NAME if meta["version"] == 1 else meta["weights"]["file"])
        parsed: dict[str, Any] = {}
        try:
            data = _read_regular(w_path, check=lambda fd, size: parsed.update(_check_weights_file(meta, fd, size, w_path)))
        except FileNotFoundError:
            if _read_meta_or_none(directory) != meta:
                continue
            raise FileFormatError(f"{directory} has no {w_path.name}, the weights file its {CONFIG_NAME} names") from None
        _check_hash(meta, data, w_path)
        _check_manifest(meta["tensors"], parsed["specs"], w_path)
        return SavedFile(directory, meta, parsed["specs"], w_path, data, parsed["offsets"])
    raise FileFormatError(f"{directory} kept changing while it was read (another process is saving there); try again")


def load(
    directory: str | Path,
    *,
    kind: str | Sequence[str] | None = None,
    fingerprint: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    nonfinite: Collection[str] = (),
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """:func:`read` and make the tensors: ``(meta, tensors)``."""
    check_device(device)
    saved = read(directory, kind=kind, fingerprint=fingerprint)
    return saved.meta, saved.tensors(device, nonfinite=nonfinite)


def weights_path(directory: str | Path) -> Path:
    """The weights file the save in ``directory`` uses (``weights-<hash>.safetensors``, or version 1's name)."""
    directory = Path(directory)
    meta = _read_meta(directory)
    return directory / (WEIGHTS_NAME if meta["version"] == 1 else meta["weights"]["file"])


def _read_meta_or_none(directory: Path) -> dict | None:
    try:
        return _read_meta(directory)
    except FileFormatError:
        return None


def _read_meta(directory: Path) -> dict[str, Any]:
    if not directory.is_dir():
        raise FileFormatError(f"{directory} is not a steerlab directory (expected a folder holding {CONFIG_NAME} and its weights file)")
    cfg_path = directory / CONFIG_NAME
    try:
        raw = _read_regular(cfg_path, MAX_JSON_BYTES)
    except FileNotFoundError:
        pickles = sorted(p.name for pat in _PICKLES for p in directory.glob(pat))
        hint = f"; found {pickles}, which steerlab never loads (pickle files can run code)" if pickles else ""
        raise FileFormatError(f"{directory} has no {CONFIG_NAME}{hint}") from None
    meta = parse_json(raw, cfg_path)
    if not isinstance(meta, dict) or meta.get("format") != "steerlab":
        raise FileFormatError(f"{cfg_path} is not a steerlab file (no \"format\": \"steerlab\")")
    version = meta.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise FileFormatError(f"{cfg_path} has no format version (\"version\" is {version!r}; expected an integer)")
    if version > FORMAT_VERSION:
        raise FileFormatError(f"{cfg_path} has format version {version}, made by a newer steerlab; this one reads up to {FORMAT_VERSION}")
    if version < 1:
        raise FileFormatError(f"{cfg_path} has an invalid format version {version}")
    if not isinstance(meta.get("kind"), str):
        raise FileFormatError(f"{cfg_path} does not say what it holds (no \"kind\"; got {meta.get('kind')!r:.60})")
    if not isinstance(meta.get("config"), dict) or not isinstance(meta.get("tensors"), dict):
        raise FileFormatError(f"{cfg_path} lacks its \"config\" or \"tensors\" section (each an object)")
    if version >= 2:
        _check_weights_entry(meta.get("weights"), cfg_path)
    return meta


def _check_weights_entry(w: Any, where: Path) -> None:
    ok = (isinstance(w, dict) and isinstance(w.get("file"), str) and _WEIGHTS_RE.fullmatch(w["file"])
          and isinstance(w.get("sha256"), str) and _SHA_RE.fullmatch(w["sha256"]) and w["file"][8:24] == w["sha256"][:16]
          and isinstance(w.get("bytes"), int) and not isinstance(w.get("bytes"), bool) and w["bytes"] >= 0)
    if not ok:
        raise FileFormatError(
            f"{where}: \"weights\" is {w!r:.200}; expected {{\"file\": \"weights-<first 16 of sha256>.safetensors\", "
            "\"sha256\": <64 lowercase hex digits>, \"bytes\": <size>}"
        )


def _check_kind(meta: dict, kind, directory: Path) -> None:
    kinds = (kind,) if isinstance(kind, str) else tuple(kind) if kind else ()
    if kinds and meta["kind"] not in kinds:
        raise FileFormatError(f"{directory} holds a {meta['kind']!r}; expected {' or '.join(repr(k) for k in kinds)}")


def check_fingerprint(saved: Any, model: dict[str, Any] | None, where: Path | str) -> None:
    """``saved`` (a file's fingerprint) against ``model``'s; when ``model`` is given the file must
    carry a fingerprint with every key, each equal."""
    if saved is not None and not (isinstance(saved, dict) and all(isinstance(v, (str, int, type(None))) for v in saved.values())):
        raise FileFormatError(f"{where}: the fingerprint is {saved!r:.120}; expected null or an object of names and numbers")
    if model is None:
        return
    if saved is None:
        raise FingerprintMismatch(
            f"{where} records no model fingerprint, so it cannot be checked against this model "
            f"(expected {model}); load it without a model to read it anyway"
        )
    missing = [k for k in model if k not in saved]
    if missing:
        raise FingerprintMismatch(f"{where}: the fingerprint lacks {missing}; expected the model's {model}")
    diffs = [f"{k}: file {saved[k]!r} vs model {model[k]!r}" for k in model if saved[k] != model[k] or type(saved[k]) is not type(model[k])]
    if diffs:
        raise FingerprintMismatch(f"{where} was saved for another model ({'; '.join(diffs)})")


def _check_hash(meta: dict, data: bytes, w_path: Path) -> None:
    if meta["version"] < 2:
        return
    got = hashlib.sha256(data).hexdigest()
    if got != meta["weights"]["sha256"]:
        raise FileFormatError(
            f"{w_path} has SHA-256 {got[:16]}..., not the {meta['weights']['sha256'][:16]}... that {CONFIG_NAME} records: "
            "its bytes changed after it was saved (damaged or edited)"
        )


_MAX_HEADER = 100 * 2**20  # safetensors' own limit


def _check_weights_file(meta: dict, fd: int, size: int, w_path: Path) -> dict[str, Any]:
    """Before the weights are read: the recorded size (version 2), then the safetensors header,
    read on its own, whose tensors must end exactly where the file does."""
    bad = lambda why: FileFormatError(f"{w_path} is corrupt or truncated: {why}")  # noqa: E731
    if meta["version"] >= 2 and size != meta["weights"]["bytes"]:
        raise FileFormatError(f"{w_path} is {size:,} bytes; {CONFIG_NAME} says {meta['weights']['bytes']:,} (the file is truncated or was replaced)")
    if size < 8:
        raise bad(f"{size} bytes, shorter than a safetensors header")
    (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
    if n < 2 or n > min(size - 8, _MAX_HEADER):
        raise bad(f"the header claims {n:,} bytes; the file has {size - 8:,} after the length (and a header is at most {_MAX_HEADER:,})")
    specs, offsets, end = _parse_header(os.pread(fd, n, 8), w_path)
    if end != size - 8 - n:
        raise bad(f"the tensors end at byte {end:,} of a {size - 8 - n:,}-byte data section")
    return {"specs": specs, "offsets": offsets}


def _parse_header(raw: bytes, w_path: Path) -> tuple[dict[str, TensorSpec], dict[str, tuple[int, int]], int]:
    """A safetensors header, checked: every tensor's dtype, shape and byte range, back to back
    from byte 0 (nothing is loaded); returns the specs, offsets and the end of the data."""
    bad = lambda why: FileFormatError(f"{w_path} is corrupt or truncated: {why}")  # noqa: E731
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_not_json)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise bad(f"the header is not JSON ({str(e)[:80]})") from None
    if not isinstance(header, dict):
        raise bad("the header is not an object")
    md = header.pop("__metadata__", None)
    if md != {"format": "steerlab"}:
        raise bad(f"the header's metadata is {md!r:.80}; steerlab writes {{'format': 'steerlab'}} (a foreign or edited file)")
    specs, offsets = {}, {}
    for name, h in header.items():
        ok = isinstance(h, dict) and h.get("dtype") in _ST_DTYPES and isinstance(h.get("shape"), list) \
            and all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < _INT64 for s in h["shape"]) \
            and isinstance(h.get("data_offsets"), list) and len(h["data_offsets"]) == 2 \
            and all(isinstance(o, int) and not isinstance(o, bool) for o in h["data_offsets"])
        if not ok:
            raise bad(f"tensor {name!r} has the header entry {h!r:.120}; expected dtype, shape and two data offsets")
        spec = TensorSpec(_ST_DTYPES[h["dtype"]], tuple(h["shape"]))
        a, b = h["data_offsets"]
        if b - a != spec.numel * spec.dtype.itemsize:
            raise bad(f"tensor {name!r} is {spec} ({spec.numel * spec.dtype.itemsize:,} bytes) but spans bytes {a}..{b}")
        specs[name], offsets[name] = spec, (a, b)
    end = 0
    for name, (a, b) in sorted(offsets.items(), key=lambda kv: kv[1]):
        if a != end:
            raise bad(f"tensor {name!r} starts at byte {a}; expected {end} (tensors are stored back to back)")
        end = b
    return specs, offsets, end


def _check_manifest(manifest: dict, specs: dict[str, TensorSpec], w_path: Path) -> None:
    missing, extra = sorted(set(manifest) - set(specs)), sorted(set(specs) - set(manifest))
    if missing or extra:
        raise FileFormatError(f"{w_path} does not match {CONFIG_NAME}: missing tensors {missing}, extra tensors {extra}")
    for name, spec in manifest.items():
        got = specs[name]
        if not isinstance(spec, dict) or spec.get("dtype") != dtype_name(got.dtype) or spec.get("shape") != list(got.shape):
            raise FileFormatError(f"tensor {name!r} in {w_path} is {got} but {CONFIG_NAME} says {spec!r:.120}")


# --------------------------------------------------------------------------- record checking
_TYPE_WORDS = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list",
               dict: "an object", type(None): "null"}


def field_of(record: Any, key: str, types: type | tuple[type, ...], where: str) -> Any:
    """``record[key]``, which must exist and be of ``types`` (``bool`` is not an ``int``; an ``int``
    is a ``float``), else :class:`FileFormatError` naming the value and what was expected."""
    types = types if isinstance(types, tuple) else (types,)
    if not isinstance(record, dict):
        raise FileFormatError(f"{where} is {record!r:.80}; expected an object")
    if key not in record:
        raise FileFormatError(f"{where} lacks the field {key!r}")
    v = record[key]
    ok = any(_is(v, t) for t in types)
    if not ok:
        want = " or ".join(_TYPE_WORDS.get(t, t.__name__) for t in types)
        raise FileFormatError(f"{where}: {key!r} is {v!r:.80}; expected {want}")
    return v


def _is(v: Any, t: type) -> bool:
    if t is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if t is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    return isinstance(v, t)
