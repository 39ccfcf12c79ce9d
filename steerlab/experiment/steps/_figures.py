"""Figure files of the step tables: each figure as a self-contained HTML page named from its title."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any


def slug(title: str) -> str:
    """``"AtP* vs exact patching"`` -> ``"atp_vs_exact_patching"``: a file name any file system takes."""
    return re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_") or "figure"


def save_figures(figures: dict[str, Any], folder: Path) -> list[Path]:
    """Write every plotly figure of ``figures`` to ``folder/<slug of its title>.html``; return the paths."""
    import plotly.graph_objects as go

    from steerlab.viz import save_html

    return [save_html(fig, folder / f"{slug(title)}.html") for title, fig in figures.items() if isinstance(fig, go.Figure)]
