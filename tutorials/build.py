"""Build the tutorial notebooks from their readable sources.

Each tutorial is written as ``tutorials/NN_name.py`` in the "percent" format
(as jupytext and VS Code read it): a line ``# %% [markdown]`` starts a
markdown cell whose lines are comments, a line ``# %%`` starts a code cell.
This script writes ``NN_name.ipynb`` next to it (no outputs), so the notebooks
open in Jupyter while diffs stay readable. ``tests/test_tutorials.py`` runs
every notebook and checks that each one matches its source.

    python tutorials/build.py          # (re)write every notebook
    python tutorials/build.py --check  # exit 1 if a notebook is missing or stale
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
_KERNEL = {"display_name": "Python 3", "language": "python", "name": "python3"}


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
    """The notebook of one percent-format source."""
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


def render(source: Path) -> str:
    return nbformat.writes(notebook(source)) + "\n"


def stale(folder: Path = HERE) -> list[str]:
    """Sources whose notebook is missing or differs from a fresh build."""
    out = []
    for src in sources(folder):
        target = src.with_suffix(".ipynb")
        if not target.exists() or target.read_text() != render(src):
            out.append(src.name)
    return out


def main(argv: list[str]) -> int:
    if "--check" in argv:
        bad = stale()
        for name in bad:
            print(f"{name}: its notebook is missing or stale; run python tutorials/build.py", file=sys.stderr)
        return 1 if bad else 0
    for src in sources():
        src.with_suffix(".ipynb").write_text(render(src))
        print(f"wrote {src.with_suffix('.ipynb').name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
