"""steerlab's one cache directory, and atomic writes into it.

``~/.cache/steerlab`` unless ``STEERLAB_CACHE`` names another directory. It
holds the safetensors copy of each embedded model (converted once) under
``models/`` and fetched dataset archives under ``data/``;
``STEERLAB_MODEL_CACHE`` puts the models elsewhere (the README's test command
points it at an empty folder, so every CI run converts SmolLM2 from scratch
while reusing the fetched data). Every write goes to a temporary name in the same
directory and is renamed into place, so two processes filling the cache at
once each see either nothing or a whole file or directory. (Saves of steerlab
objects are not cache writes: they go into the user's folder, owning only
their own files there; see ``steerlab.interventions.fileformat``.)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["cache_dir", "fill_once"]


def cache_dir(*parts: str) -> Path:
    root = Path(os.environ.get("STEERLAB_CACHE") or Path.home() / ".cache" / "steerlab")
    if parts and parts[0] == "models" and os.environ.get("STEERLAB_MODEL_CACHE"):
        root, parts = Path(os.environ["STEERLAB_MODEL_CACHE"]), parts[1:]
    path = root.joinpath(*parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def fill_once(target: Path, fill: Callable[[Path], None], *, marker: str = ".complete") -> Path:
    """Make ``target`` (a directory) with ``fill(tmpdir)`` unless a complete copy exists.

    Safe when two processes race: each fills its own temporary directory; the
    first rename wins and the other process's copy is discarded.
    """
    target = Path(target)
    if (target / marker).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))  # beside it: the rename never crosses a filesystem
    try:
        fill(tmp)
        (tmp / marker).write_text("ok\n")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / marker).exists():  # a stale, incomplete copy: replace it
                shutil.rmtree(target, ignore_errors=True)
                os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
