"""The tutorials: every notebook is the build of its readable ``.py`` source, committed executed (fast
mode) with a static PNG beside each interactive figure, and states its full-mode run time; in the
suite each one runs once, top to bottom, in fast mode (``STEERLAB_FAST=1``), its assertion cells
passing and drawing as many figures as the committed notebook shows.

New tutorials (``tutorials/NN_name.py``) are picked up automatically.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import nbformat
import pytest
from nbclient.exceptions import CellExecutionError

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
SOURCES = sorted(TUTORIALS.glob("[0-9][0-9]_*.py"))


def _build():
    spec = importlib.util.spec_from_file_location("tutorials_build", TUTORIALS / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _build()


def test_every_tutorial_is_built_executed_and_readable_without_running():
    assert SOURCES, "tutorials/ holds no NN_name.py source"
    assert sorted(TUTORIALS.glob("*.ipynb")) == [p.with_suffix(".ipynb") for p in SOURCES], "a notebook without a source, or a source without one"
    assert build.stale(TUTORIALS) == [], "run: python tutorials/build.py"
    for src in SOURCES:
        line = build.run_time_line(src)
        assert line and "Full mode" in line, f"{src.name} does not state its full-mode run time at the top"
        nb = nbformat.read(src.with_suffix(".ipynb"), as_version=4)
        outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
        assert not [o for o in outputs if o.get("output_type") == "error"], f"{src.name}: the committed run failed"
        assert not [o for o in outputs if "Loading weights" in o.get("text", "") or "it/s]" in o.get("text", "")], \
            f"{src.name}: a progress bar in the committed outputs"
        figs = build.figures(nb)
        assert all("image/png" in f and len(f["image/png"]) > 1000 for f in figs), f"{src.name}: a figure without its static PNG"


def test_the_your_own_concept_file_is_the_one_the_tutorial_runs():
    """``tutorials/11_your_own_concept.toml`` is, byte for byte, the file tutorial 11 writes and runs."""
    source = (TUTORIALS / "11_your_own_concept.py").read_text()
    tree = ast.parse(source)
    text = next(node.value.value for node in ast.walk(tree)
                if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "TOML")
    assert (TUTORIALS / "11_your_own_concept.toml").read_text() == text


@pytest.mark.slow
@pytest.mark.timeout(1200)  # above the notebook's own 900 s cell limit: a loaded machine ran tutorial 03 past the suite's 600 s
@pytest.mark.parametrize("src", SOURCES, ids=[p.stem for p in SOURCES])
def test_tutorial_runs_in_fast_mode(src, tmp_path):
    nb = build.notebook(src)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert any("assert " in c.source for c in code), f"{src.name} checks nothing: a tutorial has assertion cells"
    try:
        seconds = build.execute(nb, env=build.environment(png=False), cwd=tmp_path, timeout=900)
    except CellExecutionError as e:  # the failing cell and its traceback, without the ANSI noise
        pytest.fail(f"{src.name} failed:\n{e}", pytrace=False)
    outputs = [o for c in code for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    committed = nbformat.read(src.with_suffix(".ipynb"), as_version=4)
    assert len(build.figures(nb)) == len(build.figures(committed)), "the committed outputs are stale: run python tutorials/build.py"
    print(f"{src.name}: {seconds:.1f} s in fast mode, {len(code)} code cells, {len(build.figures(nb))} figures")
