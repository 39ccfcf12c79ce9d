"""Patching-sweep heatmaps: layer × position (tokens on the x axis) and layer × head.

:func:`patching_heatmap` takes a :class:`~steerlab.interventions.SweepResult`
and draws its grid with a diverging colour scale centred on 0 (the effect's
sign matters: a patch can move the metric either way). The x axis is numeric
with the tokens as tick labels, so repeated tokens keep their own columns.
A sweep over several position slots and heads gets one panel per slot.
"""

from __future__ import annotations

import math

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from steerlab.interventions.errors import ConfigError

__all__ = ["patching_heatmap"]

_VALUES = ("values", "effect", "normalised")


def _grid(result, value: str):
    if value not in _VALUES:
        raise ConfigError(f"value={value!r}: expected one of {_VALUES}")
    return getattr(result, value)


def _hover(row_axis: str, col_axis: str) -> str:
    col = "position %{x}: %{customdata}" if col_axis == "position" else "head %{x}"
    return f"{row_axis} %{{y}}<br>{col}<br>value %{{z:.4g}}<extra></extra>"


def _heatmap(grid, result, col_axis: str, zmax: float, show_scale: bool) -> go.Heatmap:
    rows = result.row_labels
    n_cols = grid.shape[1]
    if col_axis == "position":
        cols = list(range(n_cols))
        custom = [[repr(t) for t in result.tokens] for _ in rows]
    else:
        cols = list(result.heads)
        custom = None
    z = [[None if math.isnan(float(x)) else float(x) for x in row] for row in grid]
    return go.Heatmap(
        z=z,
        x=cols,
        y=list(range(len(rows))),
        customdata=custom,
        colorscale="RdBu",
        zmid=0.0,
        zmin=-zmax,
        zmax=zmax,
        showscale=show_scale,
        hovertemplate=_hover(result.row_axis, col_axis).replace("%{y}", "%{text}"),
        text=[[r] * n_cols for r in rows],
        colorbar={"title": {"text": result.metric}},
    )


def patching_heatmap(result, *, value: str = "values", title: str | None = None) -> go.Figure:
    """A heatmap of ``result``'s grid: ``value`` is ``"values"`` (the patched
    metric), ``"effect"`` (minus the base) or ``"normalised"`` (0 = base, 1 = source)."""
    grid = _grid(result, value)
    dims = result.dims
    finite = [abs(float(x)) for x in grid.flatten() if not math.isnan(float(x))]
    zmax = max(finite + [1e-12]) if value != "normalised" else max(finite + [1.0])
    what = {"values": result.metric, "effect": f"{result.metric} − base", "normalised": f"normalised {result.metric}"}[value]
    title = title or f"Activation patching: {what} (base {result.base_value:.3g}, source {result.source_value:.3g})"
    if len(dims) == 3:
        panels = [(f"position {i}: {t!r}", grid[:, i]) for i, t in enumerate(result.tokens)]
        fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[p[0] for p in panels], shared_yaxes=True)
        for j, (_, g) in enumerate(panels):
            fig.add_trace(_heatmap(g, result, "head", zmax, j == 0), row=1, col=j + 1)
            fig.update_xaxes(title_text="head", row=1, col=j + 1)
        col_axis = "head"
    else:
        col_axis = dims[1]
        fig = go.Figure(_heatmap(grid, result, col_axis, zmax, True))
        if col_axis == "position":
            fig.update_xaxes(tickmode="array", tickvals=list(range(len(result.tokens))), ticktext=list(result.tokens), tickangle=-45)
        fig.update_xaxes(title_text="position (token)" if col_axis == "position" else "head")
    rows = result.row_labels
    fig.update_yaxes(tickmode="array", tickvals=list(range(len(rows))), ticktext=rows, title_text=result.row_axis, autorange="reversed")
    fig.update_layout(title={"text": title}, template="plotly_white")
    return fig
