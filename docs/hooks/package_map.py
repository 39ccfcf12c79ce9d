"""mkdocs hook: lay out the ``steerlab`` package as it installs, for the API reference.

The layer folders at the repository root (``interventions/``, ``alignment/``, ...) install as
``steerlab.interventions`` and so on through setuptools' ``package-dir`` mapping, which static
analysis (griffe, under mkdocstrings) cannot follow. Before the build this hook makes
``build/docs-packages/steerlab/``: a copy of ``steerlab/`` (griffe resolves links, so the package
itself cannot be one) with a copy of each mapped folder under its installed name, read from
``pyproject.toml``; ``mkdocs.yml`` points the handler there. Copies, not links: griffe resolves a
link to its real path, which lies outside the search path on some checkouts (CI found no
``steerlab.alignment`` through one).
"""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

from mkdocs.plugins import event_priority

ROOT = Path(__file__).resolve().parents[2]
TARGET = ROOT / "build" / "docs-packages"


@event_priority(100)  # before mkdocstrings' own on_config, which drops a search path that does not exist yet
def on_config(config, **kwargs):
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    shutil.rmtree(TARGET, ignore_errors=True)
    shutil.copytree(ROOT / mapping["steerlab"], TARGET / "steerlab", ignore=shutil.ignore_patterns("__pycache__"))
    for name, folder in mapping.items():
        if name != "steerlab":
            shutil.copytree(ROOT / folder, TARGET / name.replace(".", "/"), ignore=shutil.ignore_patterns("__pycache__"))
    return config
