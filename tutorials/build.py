"""Build the tutorial notebooks from their readable sources, executed, with figures that render anywhere.

Each tutorial is written as ``tutorials/NN_name.py`` in the "percent" format (as jupytext and VS
Code read it): a line ``# %% [markdown]`` starts a markdown cell whose lines are comments, a line
``# %%`` starts a code cell. This script writes ``NN_name.ipynb`` next to it and executes it in
fast mode (``STEERLAB_FAST=1``, progress bars off, in a scratch folder), so the committed notebook
shows its results where notebooks are read without running them. Every plotly figure is stored
twice: the interactive figure (Jupyter draws it) and a static PNG beside it (GitHub and
``nbconvert --to html`` show that; they drop plotly's own output). PNGs need kaleido and a
Chrome/Chromium, as ``steerlab.viz.save_png`` does.

Each source states its full-mode run time on 2 CPU cores in its first cell, on a line starting
``**Run time.**``; ``--full-times`` measures it (full mode, two torch threads) and rewrites that line.

    python tutorials/build.py                 # build and execute every notebook (fast mode)
    python tutorials/build.py 03 11           # only these (by number or name)
    python tutorials/build.py --no-execute    # rewrite the cells only (the outputs are dropped)
    python tutorials/build.py --check         # exit 1 if a notebook is missing, stale or unexecuted
    python tutorials/build.py --full-times 03 # measure full mode and write it into the source
"""

from __future__ import annotations

import datetime
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
_KERNEL = {"display_name": "Python 3", "language": "python", "name": "python3"}
PLOTLY = "application/vnd.plotly.v1+json"
RUN_TIME = re.compile(r"^# \*\*Run time\.\*\*.*$", flags=re.M)


def sources(folder: Path = HERE) -> list[Path]:
    """Every tutorial source: ``NN_*.py`` files."""
    return sorted(p for p in folder.glob("[0-9][0-9]_*.py"))


def _markdown(lines: list[str]) -> str:
    out = []
    for line in lines:
        if line.startswith("# "):
            out.append(line[2:])
        elif line.rstrip() in ("#", ""):
            out.append("")
        else:
            raise ValueError(f"markdown cell line is not a comment: {line!r}")
    return "\n".join(out).strip("\n")


def notebook(source: Path) -> nbformat.NotebookNode:
    """The notebook of one percent-format source (no outputs)."""
    cells: list[tuple[str, list[str]]] = []
    for line in source.read_text().splitlines():
        if line.startswith("# %%"):
            cells.append(("markdown" if "[markdown]" in line else "code", []))
        elif not cells:
            if line.strip():
                raise ValueError(f"{source.name}: text before the first '# %%' cell marker: {line!r}")
        else:
            cells[-1][1].append(line)
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = _KERNEL
    nb.metadata["language_info"] = {"name": "python"}
    for i, (kind, lines) in enumerate(cells):
        if kind == "markdown":
            cell = nbformat.v4.new_markdown_cell(_markdown(lines))
        else:
            cell = nbformat.v4.new_code_cell("\n".join(lines).strip("\n"))
        cell["id"] = f"{source.stem[:2]}-{i:02d}"  # stable ids: rebuilding changes nothing
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def _cells(nb: nbformat.NotebookNode) -> list[tuple[str, str, str]]:
    return [(c.cell_type, c.get("id", ""), c.source) for c in nb.cells]


def figures(nb: nbformat.NotebookNode) -> list[dict]:
    """The plotly figures among a notebook's outputs (each a display bundle)."""
    return [o["data"] for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") in ("display_data", "execute_result") and PLOTLY in o.get("data", {})]


def environment(*, fast: bool = True, png: bool = True) -> dict[str, str]:
    """The kernel's environment: fast mode, offline, progress bars off, figures as plotly JSON (+ PNG)."""
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "STEERLAB_PROGRESS": "0", "TQDM_DISABLE": "1",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "PLOTLY_RENDERER": "plotly_mimetype+png" if png else "plotly_mimetype", "STEERLAB_FAST": "1" if fast else "0"}
    if not fast:
        env.pop("STEERLAB_FAST")
    return env


def execute(nb: nbformat.NotebookNode, *, env: dict[str, str], cwd: Path, timeout: int = 1800) -> float:
    """Run ``nb`` in place in a fresh kernel (``env`` added to this process's environment); return the seconds taken."""
    from nbclient import NotebookClient

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                                resources={"metadata": {"path": str(cwd)}})
        start = time.perf_counter()
        client.execute()
        return time.perf_counter() - start
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _clean(nb: nbformat.NotebookNode, scratch: Path) -> None:
    """Drop what changes from run to run and says nothing: the scratch folder's path, kernel metadata."""
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if "text" in o:
                o["text"] = o["text"].replace(str(scratch), ".")
    nb.metadata.pop("widgets", None)
    nb.metadata["language_info"] = {"name": "python"}


def build(source: Path, *, run: bool = True) -> nbformat.NotebookNode:
    """The notebook of ``source``, executed in fast mode (figures with PNGs) when ``run``."""
    nb = notebook(source)
    if run:
        with tempfile.TemporaryDirectory(prefix=f"tutorial-{source.stem[:2]}-") as tmp:
            seconds = execute(nb, env=environment(), cwd=Path(tmp))
            _clean(nb, Path(tmp))
        missing = [i for i, f in enumerate(figures(nb)) if "image/png" not in f]
        if missing:
            raise RuntimeError(f"{source.name}: figures {missing} have no PNG (kaleido and Chrome/Chromium are needed to build)")
        print(f"{source.name}: executed in {seconds:.0f} s (fast mode), {len(figures(nb))} figures")
    return nb


def render(nb: nbformat.NotebookNode) -> str:
    return nbformat.writes(nb) + "\n"


def stale(folder: Path = HERE) -> list[str]:
    """Sources whose notebook is missing, differs in its cells from a fresh build, or was not executed."""
    out = []
    for src in sources(folder):
        target = src.with_suffix(".ipynb")
        if not target.exists():
            out.append(f"{src.name}: no notebook")
            continue
        committed = nbformat.read(target, as_version=4)
        if _cells(committed) != _cells(notebook(src)):
            out.append(f"{src.name}: the notebook's cells differ from the source")
        elif any(c.cell_type == "code" and c.get("execution_count") is None for c in committed.cells):
            out.append(f"{src.name}: the notebook was not executed")
    return out


def run_time_line(source: Path) -> str | None:
    m = RUN_TIME.search(source.read_text())
    return m[0] if m else None


def measure_full(source: Path) -> float:
    """Run ``source``'s notebook in full mode (two torch threads: a 2-core machine) and write the time into its run-time line."""
    nb = notebook(source)
    env = {**environment(fast=False, png=False), "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    with tempfile.TemporaryDirectory(prefix=f"tutorial-{source.stem[:2]}-full-") as tmp:
        seconds = execute(nb, env=env, cwd=Path(tmp), timeout=4 * 3600)
    text = source.read_text()
    found = RUN_TIME.search(text)
    if not found:
        raise ValueError(f"{source.name} has no '# **Run time.** ...' line in its first cell to update")
    fast = found[0].split(";", 1)[1].strip() if ";" in found[0] else "fast mode (`STEERLAB_FAST=1`, what the tests run) is shorter."
    line = (f"# **Run time.** Full mode about {max(1, round(seconds / 60))} min on 2 CPU cores (measured "
            f"{datetime.date.today().isoformat()}); {fast}")
    source.write_text(RUN_TIME.sub(line, text, count=1))
    refresh_markdown(source)
    print(f"{source.name}: full mode {seconds:.0f} s")
    return seconds


def refresh_markdown(source: Path) -> bool:
    """Copy the source's markdown into its executed notebook, keeping the outputs, when no code cell changed."""
    target = source.with_suffix(".ipynb")
    if not target.exists():
        return False
    fresh, committed = notebook(source), nbformat.read(target, as_version=4)
    code = lambda nb: [c for c in _cells(nb) if c[0] == "code"]  # noqa: E731
    if code(fresh) != code(committed) or len(fresh.cells) != len(committed.cells):
        return False
    for new, old in zip(fresh.cells, committed.cells, strict=True):
        if new.cell_type == "markdown":
            old.source = new.source
    target.write_text(render(committed))
    return True


def _selected(names: list[str]) -> list[Path]:
    every = sources()
    if not names:
        return every
    picked = [s for s in every if any(s.stem == n or s.stem.startswith(f"{n}_") or s.name == n for n in names)]
    unknown = [n for n in names if not any(s.stem == n or s.stem.startswith(f"{n}_") or s.name == n for s in every)]
    if unknown:
        raise SystemExit(f"no tutorial {unknown}; have {[s.stem for s in every]}")
    return picked


def main(argv: list[str]) -> int:
    flags = {a for a in argv if a.startswith("--")}
    names = [a for a in argv if not a.startswith("--")]
    if "--check" in flags:
        bad = stale()
        for line in bad:
            print(f"{line}; run python tutorials/build.py", file=sys.stderr)
        return 1 if bad else 0
    if "--full-times" in flags:
        for src in _selected(names):
            measure_full(src)
        return 0
    for src in _selected(names):
        try:
            nb = build(src, run="--no-execute" not in flags)
        except Exception as e:  # noqa: BLE001 - only a PNG renderer's failure is retried
            # kaleido's headless Chromium sometimes fails to start its page on a loaded machine
            # ("kaleido_scopes is not defined"): a renderer's hiccup, not the tutorial's; once more
            if "kaleido" not in str(e) and "JavascriptError" not in str(e):
                raise
            print(f"{src.name}: the PNG renderer failed ({type(e).__name__}); building it once more", file=sys.stderr)
            nb = build(src, run="--no-execute" not in flags)
        src.with_suffix(".ipynb").write_text(render(nb))
        print(f"wrote {src.with_suffix('.ipynb').name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
