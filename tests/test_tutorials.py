"""Every tutorial notebook runs top to bottom in fast mode (``STEERLAB_FAST=1``), its assertion
cells passing; each notebook is the build of its readable ``.py`` source.

New notebooks in ``tutorials/`` are picked up automatically.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))


def _build():
    spec = importlib.util.spec_from_file_location("tutorials_build", TUTORIALS / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_tutorial_is_built_from_its_source():
    build = _build()
    sources = build.sources(TUTORIALS)
    assert sources, "tutorials/ holds no NN_name.py source"
    assert sorted(p.with_suffix(".ipynb") for p in sources) == NOTEBOOKS, "a notebook without a source, or a source without a notebook"
    assert build.stale(TUTORIALS) == [], "run: python tutorials/build.py"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_tutorial_runs_in_fast_mode(path, tmp_path, monkeypatch):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert any("assert " in c.source for c in code), f"{path.name} checks nothing: a tutorial has assertion cells"
    assert any(c.cell_type == "markdown" for c in nb.cells)
    monkeypatch.setenv("STEERLAB_FAST", "1")  # the kernel inherits this process's environment
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    start = time.perf_counter()
    try:
        client.execute()
    except CellExecutionError as e:  # the failing cell and its traceback, without the ANSI noise
        pytest.fail(f"{path.name} failed:\n{e}", pytrace=False)
    elapsed = time.perf_counter() - start
    outputs = [o for c in code for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    print(f"{path.name}: {elapsed:.1f} s in fast mode, {len(code)} code cells, cwd {tmp_path} ({os.listdir(tmp_path)})")
