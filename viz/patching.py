"""Patching-sweep heatmaps: layer × position (tokens on the x axis) and layer × head.

:func:`patching_heatmap` takes a :class:`~steerlab.interventions.SweepResult`
and draws, by default, the normalised effect ``(patched − base) / (source − base)``:
0 is "the patch changed nothing", 1 is "the patch restored the source", on a
diverging colour scale centred on 0 (a patch can overshoot or move the metric
the other way); hover shows the raw metric beside it. The x axis is numeric
with the tokens as tick labels (whitespace made visible: ``⏎``, ``·``), so
repeated tokens keep their own columns. A sweep over several position slots
and heads gets one panel per slot.
"""

from __future__ import annotations

import math

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from steerlab.interventions.errors import ConfigError
from steerlab.viz.tokens import token_label

__all__ = ["patching_heatmap"]

_VALUES = ("values", "effect", "normalised")


def _grid(result, value: str):
    if value not in _VALUES:
        raise ConfigError(f"value={value!r}: expected one of {_VALUES}")
    return getattr(result, value)


def _hover(row_axis: str, col_axis: str, value: str, metric: str) -> str:
    col = "position %{x}: %{customdata[0]}" if col_axis == "position" else "head %{x}"
    what = {"values": metric, "effect": f"{metric} − base", "normalised": "normalised"}[value]
    raw = "" if value == "values" else f"<br>{metric} %{{customdata[1]:.4g}}"
    return f"{row_axis} %{{y}}<br>{col}<br>{what} %{{z:.4g}}{raw}<extra></extra>"


def _num(x) -> float | None:
    return None if math.isnan(float(x)) else float(x)


def _heatmap(grid, raw, result, col_axis: str, zmax: float, show_scale: bool, value: str) -> go.Heatmap:
    rows = result.row_labels
    n_cols = grid.shape[1]
    cols = list(range(n_cols)) if col_axis == "position" else list(result.heads)
    tokens = [repr(t) for t in result.tokens] if col_axis == "position" else [""] * n_cols
    custom = [[[tokens[j], _num(raw[i][j])] for j in range(n_cols)] for i in range(len(rows))]
    z = [[_num(x) for x in row] for row in grid]
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
        hovertemplate=_hover(result.row_axis, col_axis, value, result.metric).replace("%{y}", "%{text}"),
        text=[[r] * n_cols for r in rows],
        colorbar={"title": {"text": "normalised" if value == "normalised" else result.metric}},
    )


def patching_heatmap(result, *, value: str | None = None, title: str | None = None) -> go.Figure:
    """A heatmap of ``result``'s grid: ``value`` is ``"normalised"`` (the default:
    0 = base, 1 = source; the raw metric in the hover), ``"values"`` (the patched
    metric) or ``"effect"`` (minus the base). When base and source score the same
    the normalised effect is undefined and the default falls back to ``"values"``."""
    if value is None:
        value = "values" if result.source_value == result.base_value else "normalised"
    grid = _grid(result, value)
    raw = result.values
    dims = result.dims
    finite = [abs(float(x)) for x in grid.flatten() if not math.isnan(float(x))]
    zmax = max(finite + [1e-12]) if value != "normalised" else max(finite + [1.0])
    what = {"values": result.metric, "effect": f"{result.metric} − base", "normalised": f"normalised {result.metric}"}[value]
    scale = "0 = base" if value == "normalised" else "base"
    title = title or (f"Activation patching: {what}<br><sup>{scale} ({result.base_value:.3g}), "
                      f"{'1 = ' if value == 'normalised' else ''}source ({result.source_value:.3g})</sup>")
    if len(dims) == 3:
        panels = [(f"position {i}: {t!r}", grid[:, i]) for i, t in enumerate(result.tokens)]
        fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[p[0] for p in panels], shared_yaxes=True)
        for j, (_, g) in enumerate(panels):
            fig.add_trace(_heatmap(g, raw[:, j], result, "head", zmax, j == 0, value), row=1, col=j + 1)
            fig.update_xaxes(title_text="head", tickmode="array", tickvals=list(result.heads), row=1, col=j + 1)
        col_axis = "head"
    else:
        col_axis = dims[1]
        fig = go.Figure(_heatmap(grid, raw, result, col_axis, zmax, True, value))
        if col_axis == "position":
            fig.update_xaxes(tickmode="array", tickvals=list(range(len(result.tokens))), ticktext=[token_label(t) for t in result.tokens],
                             tickangle=-45)
        else:
            fig.update_xaxes(tickmode="array", tickvals=list(result.heads), ticktext=[str(h) for h in result.heads])
        fig.update_xaxes(title_text="position (token)" if col_axis == "position" else "head")
    rows = result.row_labels
    fig.update_yaxes(tickmode="array", tickvals=list(range(len(rows))), ticktext=rows, title_text=result.row_axis, autorange="reversed")
    fig.update_layout(title={"text": title}, template="plotly_white")
    return fig
