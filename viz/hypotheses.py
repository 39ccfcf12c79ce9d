"""Figure for hypothesis testing: :func:`hypothesis_comparison` of a
:class:`~steerlab.alignment.HypothesisResult` — IIA per hypothesis with
standard-error bars and chance, beside the matrix of paired IIA differences
(row minus column, hover: paired standard error, discordant counts, McNemar's p)."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

__all__ = ["hypothesis_comparison"]


def hypothesis_comparison(result, *, title: str | None = None) -> go.Figure:
    """IIA per hypothesis (bars, ± 1 s.e.) and the paired differences between them (heatmap)."""
    names = list(result.hypotheses)
    fig = make_subplots(rows=1, cols=2, column_widths=[0.45, 0.55], horizontal_spacing=0.22,
                        subplot_titles=["IIA per hypothesis (± 1 s.e.)", "paired difference: row − column"])
    iia = [result.iia[h].value for h in names]
    se = [result.iia[h].se for h in names]
    fig.add_trace(go.Bar(
        x=names, y=iia, error_y={"type": "data", "array": se, "visible": True}, name="IIA", marker_color="#1f77b4",
        customdata=[[s, result.iia[h].n] for s, h in zip(se, names)],
        hovertemplate="%{x}<br>IIA %{y:.3f} ± %{customdata[0]:.3f} (n=%{customdata[1]})<extra></extra>", showlegend=False,
    ), row=1, col=1)
    fig.add_hline(y=result.chance, line_dash="dot", line_color="grey", row=1, col=1, annotation_text="chance")
    z, text, hover = [], [], []
    for a in names:
        zr, tr, hr = [], [], []
        for b in names:
            if a == b:
                zr.append(None)
                tr.append("")
                hr.append(a)
                continue
            p = result.pair(a, b)
            zr.append(p.diff)
            tr.append(f"{p.diff:+.2f}")
            hr.append(f"{a} − {b}: {p.diff:+.3f} ± {p.se:.3f}<br>only {a}: {p.n10}, only {b}: {p.n01}, "
                      f"they differ on {p.differ} of {p.n}<br>McNemar p = {p.p_value:.2g}")
        z.append(zr)
        text.append(tr)
        hover.append(hr)
    fig.add_trace(go.Heatmap(
        z=z, x=names, y=names, text=text, texttemplate="%{text}", customdata=hover, zmid=0, colorscale="RdBu",
        hovertemplate="%{customdata}<extra></extra>", colorbar={"title": {"text": "Δ IIA"}, "x": 1.02},
    ), row=1, col=2)
    fig.update_yaxes(title_text="IIA", range=[0, 1.05], row=1, col=1)
    fig.update_xaxes(title_text="hypothesis", row=1, col=1)
    fig.update_xaxes(title_text="column hypothesis", row=1, col=2)
    fig.update_yaxes(title_text="row hypothesis", autorange="reversed", row=1, col=2)
    fig.update_layout(title=title or f"Hypotheses scored by {result.intervention} at {result.site}", height=460)
    return fig
