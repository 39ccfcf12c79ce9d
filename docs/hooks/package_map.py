"""mkdocs hook: lay out the ``steerlab`` package as it installs, for the API reference.

The layer folders at the repository root (``interventions/``, ``alignment/``, ...) install as
``steerlab.interventions`` and so on through setuptools' ``package-dir`` mapping, which static
analysis (griffe, under mkdocstrings) cannot follow. Before the build this hook makes
``build/docs-packages/steerlab/``: a copy of ``steerlab/`` (griffe resolves links, so the package
itself cannot be one) with a link to each mapped folder under its installed name, read from
``pyproject.toml``; ``mkdocs.yml`` points the handler there.
"""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TARGET = ROOT / "build" / "docs-packages"


def on_config(config, **kwargs):
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    shutil.rmtree(TARGET, ignore_errors=True)
    shutil.copytree(ROOT / mapping["steerlab"], TARGET / "steerlab", ignore=shutil.ignore_patterns("__pycache__"))
    for name, folder in mapping.items():
        if name != "steerlab":
            (TARGET / name.replace(".", "/")).symlink_to(ROOT / folder, target_is_directory=True)
    return config
