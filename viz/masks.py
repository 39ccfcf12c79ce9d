"""Figures for desiderata-based masking: :func:`mask_units` (a
:class:`~steerlab.alignment.MaskResult`'s soft mask per unit, the hard selection
marked) and :func:`mask_tradeoff_curve` (a :class:`~steerlab.alignment.MaskTradeoff`:
held-out IIA against the number of units kept, the random-mask control beside it)."""

from __future__ import annotations

import plotly.graph_objects as go

__all__ = ["mask_units", "mask_tradeoff_curve"]

_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"]


def mask_units(result, *, title: str | None = None) -> go.Figure:
    """The final soft mask ``σ(ℓ/T)`` per unit, one bar series per variable; selected units outlined."""
    fig = go.Figure()
    for i, v in enumerate(result.variables):
        soft = result.soft[v]
        chosen = set(result.units[v])
        fig.add_trace(go.Bar(
            x=list(range(len(soft))), y=soft, name=f"{v} ({len(chosen)} kept)", marker_color=_COLOURS[i % len(_COLOURS)],
            marker_line_width=[2 if j in chosen else 0 for j in range(len(soft))], marker_line_color="black",
            hovertemplate=f"{v}<br>{result.kind[:-1]} %{{x}}: mask %{{y:.3f}}<extra></extra>",
        ))
    fig.add_hline(y=0.5, line_dash="dot", line_color="grey", annotation_text="kept above 0.5")
    fig.update_layout(title=title or f"DBM mask over the {result.kind} of {result.site} (IIA {result.iia['all'].value:.3f})",
                      xaxis_title=result.kind[:-1], yaxis_title="mask value", yaxis_range=[0, 1.02], barmode="group",
                      legend={"title": {"text": "variable"}})
    return fig


def mask_tradeoff_curve(tradeoff, *, title: str | None = None) -> go.Figure:
    """Held-out IIA (± 1 s.e.) against units kept, one point per sparsity weight."""
    rows = sorted(tradeoff.rows(), key=lambda r: r["units"])
    fig = go.Figure()
    fig.add_trace(go.Scatter(
        x=[r["units"] for r in rows], y=[r["iia"] for r in rows], mode="lines+markers", name="DBM (hard mask)",
        error_y={"type": "data", "array": [r["se"] for r in rows], "visible": True}, line={"color": "#1f77b4"},
        customdata=[r["sparsity"] for r in rows], hovertemplate="%{x} units, sparsity %{customdata:g}: IIA %{y:.3f}<extra></extra>",
    ))
    if all(r["random_mask"] is not None for r in rows):
        fig.add_trace(go.Scatter(x=[r["units"] for r in rows], y=[r["random_mask"] for r in rows], mode="lines+markers",
                                 name="random mask, same size", line={"color": "#7f7f7f", "dash": "dash"},
                                 hovertemplate="%{x} random units: IIA %{y:.3f}<extra></extra>"))
    first = tradeoff.results[0]
    fig.add_hline(y=first.iia["all"].chance, line_dash="dot", line_color="grey", annotation_text="chance")
    fig.update_layout(title=title or f"DBM sparsity–IIA trade-off over the {first.kind} of {first.site}",
                      xaxis_title=f"{first.kind} kept", yaxis_title="held-out IIA", yaxis_range=[0, 1.02],
                      legend={"title": {"text": "series"}})
    return fig
