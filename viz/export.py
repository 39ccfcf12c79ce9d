"""Writing figures: HTML always, PNG through kaleido, and one self-contained HTML report.

Every file is written atomically (a temporary file in the target directory,
renamed into place), so a reader never sees half a figure. HTML embeds the
plotly.js bundle (``include_plotlyjs=True``): the file opens offline, years
later, with no CDN. PNG needs the optional ``kaleido`` package (the ``png``
extra) and a Chrome or Chromium browser for it to drive; without either,
:func:`save_png` raises :class:`~steerlab.interventions.errors.ConfigError`
saying what to install, and HTML export still works.

:func:`report` puts several figures, paragraphs and tables in one HTML file,
with plotly.js embedded once.
"""

from __future__ import annotations

import html
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

from steerlab.interventions.errors import ConfigError, checked_first

__all__ = ["save_html", "save_png", "check_png", "save", "report", "Section", "Pre", "find_browser"]


def _write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a figure is as readable as any file the user writes
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _check_figure(fig: object, what: str = "fig") -> go.Figure:
    if not isinstance(fig, go.Figure):
        raise ConfigError(f"{what}: expected a plotly.graph_objects.Figure; got {type(fig).__name__}")
    return fig


@checked_first(fig=_check_figure)
def save_html(fig: go.Figure, path: str | os.PathLike) -> Path:
    """Write ``fig`` as a standalone HTML page (plotly.js embedded: works offline)."""
    return _write_atomic(path, fig.to_html(full_html=True, include_plotlyjs=True))


def find_browser() -> str | None:
    """The Chrome/Chromium executable kaleido would drive, or ``None``.

    Uses choreographer's own search (``BROWSER_PATH``, then ``PATH``, then the
    usual install locations), and keeps the answer only if it is an executable file.
    """
    try:
        from choreographer.browsers.chromium import Chromium
    except ImportError:
        return None
    path = Chromium.find_browser(skip_local=False)
    return path if path and os.path.isfile(path) and os.access(path, os.X_OK) else None


def check_png(path: str | os.PathLike = "figure.png") -> None:
    """Raise :class:`~steerlab.interventions.errors.ConfigError` now if a PNG cannot be written:
    kaleido missing, or no Chrome/Chromium for it to drive. Commands call it before any compute,
    so a long run never ends in "cannot write the PNG"."""
    try:
        import kaleido  # noqa: F401 - only to say what is missing
    except ImportError:
        raise ConfigError(
            f"PNG export of {str(path)!r} needs the 'kaleido' package: pip install 'kaleido>=1.0' (in a clone of steerlab: "
            "pip install -e '.[png]'); or write HTML, which always works"
        ) from None
    if find_browser() is None:
        hint = f" (BROWSER_PATH={os.environ['BROWSER_PATH']!r} is not an executable)" if os.environ.get("BROWSER_PATH") else ""
        raise ConfigError(
            f"PNG export of {str(path)!r} needs a Chrome or Chromium browser for kaleido, and none was found{hint}: "
            "install one (Debian: apt-get install chromium; or run plotly_get_chrome), or save HTML instead"
        )


@checked_first(fig=_check_figure)
def save_png(fig: go.Figure, path: str | os.PathLike, *, width: int | None = None, height: int | None = None, scale: float = 2.0) -> Path:
    """Write ``fig`` as a PNG through kaleido (needs the ``kaleido`` package and Chrome/Chromium; see :func:`check_png`)."""
    check_png(path)
    try:
        data = fig.to_image(format="png", width=width, height=height, scale=scale)
    except Exception as e:  # kaleido's errors come from the browser process; name the cause in one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"PNG export of {str(path)!r} failed in kaleido's browser: {first}") from e
    return _write_atomic(path, data)


@checked_first(fig=_check_figure)
def save(fig: go.Figure, path: str | os.PathLike, **kwargs) -> Path:
    """Write ``fig`` by the suffix of ``path``: ``.html`` or ``.png``."""
    suffix = Path(path).suffix.lower()
    if suffix in (".html", ".htm"):
        return save_html(fig, path)
    if suffix == ".png":
        return save_png(fig, path, **kwargs)
    raise ConfigError(f"cannot write a figure to {str(path)!r}: expected a .html or .png file name")


# -- the report -----------------------------------------------------------------


@dataclass
class Section:
    """A report section: a heading and its blocks, in order.

    A block is a ``str`` (paragraphs, separated by blank lines; shown as
    text, never as HTML), a plotly ``Figure``, a table (a list of dicts with
    the same keys, or any object with ``_repr_html_`` such as a
    :class:`~steerlab.interventions.sites.SiteCatalog` or a sweep result), or
    :class:`Pre` (preformatted text: generations, a plain-text table).
    """

    heading: str
    blocks: Sequence[Any] = field(default_factory=list)


@dataclass
class Pre:
    """Preformatted text in a report (kept verbatim, monospaced)."""

    text: str


_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3em; }
h2 { margin-top: 2em; border-bottom: 1px solid #eee; }
table { border-collapse: collapse; margin: 1em 0; font-size: 90%; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; }
th { background: #f5f5f5; }
pre { background: #f7f7f7; padding: .8em; overflow-x: auto; }
.figure { margin: 1.5em 0; }
"""


def _table_html(rows: Sequence[Mapping[str, Any]]) -> str:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(r.get(k, '')))}</td>" for k in keys) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def _block_html(block: Any, n_fig: list[int]) -> str:
    if isinstance(block, go.Figure):
        n_fig[0] += 1
        div = block.to_html(full_html=False, include_plotlyjs=False, div_id=f"steerlab-figure-{n_fig[0]}")
        return f'<div class="figure">{div}</div>'
    if isinstance(block, Pre):
        return f"<pre>{html.escape(block.text)}</pre>"
    if isinstance(block, str):
        return "".join(f"<p>{html.escape(p.strip())}</p>" for p in block.split("\n\n") if p.strip())
    if isinstance(block, Sequence) and block and all(isinstance(r, Mapping) for r in block):
        return _table_html(block)
    if hasattr(block, "_repr_html_"):
        return str(block._repr_html_())
    raise ConfigError(
        f"a report block of type {type(block).__name__} cannot be shown: expected text, a plotly Figure, "
        "a list of dicts (a table), Pre(text), or an object with _repr_html_"
    )


def _sections(figures, sections) -> list[Section]:
    out: list[Section] = []
    for i, s in enumerate(sections):
        if isinstance(s, Section):
            out.append(s)
        elif isinstance(s, tuple) and len(s) == 2 and isinstance(s[0], str):
            blocks = s[1] if isinstance(s[1], list | tuple) and not _is_table(s[1]) else [s[1]]
            out.append(Section(s[0], list(blocks)))
        else:
            raise ConfigError(f"sections[{i}]: expected Section(heading, blocks) or a (heading, blocks) pair; got {type(s).__name__}")
    if isinstance(figures, go.Figure):
        figures = [figures]
    if isinstance(figures, Mapping):
        figs = [Section(str(k), [_check_figure(v, f"figures[{k!r}]")]) for k, v in figures.items()]
    else:
        figs = [Section("", [_check_figure(f, f"figures[{i}]") for i, f in enumerate(figures)])] if figures else []
    return out + figs


def _is_table(x: Any) -> bool:
    return isinstance(x, list | tuple) and bool(x) and all(isinstance(r, Mapping) for r in x)


def _check_report_sections(sections: object) -> None:
    if isinstance(sections, Sequence):  # an iterator is checked as the body reads it (checking would consume it)
        _sections([], sections)


@checked_first(figures=lambda figures: _sections(figures, []), sections=_check_report_sections)
def report(
    figures: go.Figure | Sequence[go.Figure] | Mapping[str, go.Figure],
    path: str | os.PathLike,
    *,
    title: str = "steerlab report",
    sections: Iterable[Section | tuple[str, Any]] = (),
    intro: str | None = None,
) -> Path:
    """Write one self-contained HTML report: ``title``, ``intro``, the ``sections`` in
    order, then ``figures`` (a mapping gives each figure a heading; ``[]`` for none).
    plotly.js is embedded once, so the file works offline; the write is atomic.

    A section is :class:`Section` or a ``(heading, blocks)`` pair, where blocks is
    one block or a list of them (see :class:`Section` for what a block can be)."""
    from plotly.offline import get_plotlyjs

    parts = [f"<h1>{html.escape(title)}</h1>"]
    if intro:
        parts.append(_block_html(intro, [0]))
    n_fig = [0]
    for s in _sections(figures, list(sections)):
        if s.heading:
            parts.append(f"<h2>{html.escape(s.heading)}</h2>")
        parts += [_block_html(b, n_fig) for b in s.blocks]
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style>"
        f'<script type="text/javascript">{get_plotlyjs()}</script></head>'
        f"<body>{''.join(parts)}</body></html>\n"
    )
    return _write_atomic(path, page)
