"""Figures of a steering evaluation (:class:`~steerlab.reft.SteerEvalResult`).

* :func:`steer_table` — method × concept heatmap of the harmonic mean at the
  chosen factor (hover: concept score, relevance, fluency, factor, seeds).
* :func:`steer_sweep` — per method, concept score against fluency along its
  factors on the validation instructions (the factor-selection curves).
* :func:`steer_auroc` — concept-detection AUROC per method and concept, with
  the spread over seeds and the chance line.
"""

from __future__ import annotations

import math

import plotly.graph_objects as go

from steerlab.interventions.errors import ConfigError

__all__ = ["steer_table", "steer_sweep", "steer_auroc"]

_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#ff7f0e"]


def steer_table(result, *, title: str = "Steering: harmonic mean of concept, relevance and fluency (test, chosen factor)") -> go.Figure:
    cells = {(r["concept"], r["method"]): r for r in result.cells()}
    if not cells:
        raise ConfigError("steer_table: the result holds no test scores")
    concepts = [c for c in result.concepts if c not in result.dropped]
    methods = result.methods
    z, text, hover = [], [], []
    for m in methods:
        zr, tr, hr = [], [], []
        for c in concepts:
            r = cells.get((c, m))
            zr.append(None if r is None else r["hm"])
            tr.append("" if r is None else f"{r['hm']:.2f}")
            hr.append("" if r is None else (f"{m} on {c}<br>harmonic mean {r['hm']:.3f} ± {r['hm_sd']:.3f} ({r['seeds']} seed(s))"
                                            f"<br>concept score {r['concept_score']:.3f}, relevance {r['relevance']:.3f}, fluency {r['fluency']:.3f}"
                                            f"<br>factor {r['factor']:g}; judge accuracy {r['judge_accuracy']:.3f}"))
        z.append(zr)
        text.append(tr)
        hover.append(hr)
    labels = [f"{c}<br>(judge {result.judge_accuracy(c):.2f})" for c in concepts]
    fig = go.Figure(go.Heatmap(z=z, x=labels, y=methods, text=text, texttemplate="%{text}", hovertext=hover, hoverinfo="text",
                               colorscale="Viridis", zmin=0, zmax=max(0.01, max((v for row in z for v in row if v is not None), default=1)),
                               colorbar={"title": "harmonic<br>mean"}))
    fig.update_layout(title=title, xaxis_title="concept (judge accuracy on held-out text)", yaxis_title="method",
                      yaxis={"autorange": "reversed"}, height=120 + 40 * len(methods))
    return fig


def steer_sweep(result, *, concept: str | None = None, title: str | None = None) -> go.Figure:
    rows = result.sweep(concept)
    if not rows:
        raise ConfigError(f"steer_sweep: no validation sweep{' for ' + repr(concept) if concept else ''} in the result")
    concept = concept or rows[0]["concept"]
    rows = [r for r in rows if r["concept"] == concept]
    fig = go.Figure()
    for i, m in enumerate(dict.fromkeys(r["method"] for r in rows)):
        pts = sorted((r for r in rows if r["method"] == m), key=lambda r: r["factor"])
        fig.add_trace(go.Scatter(
            x=[r["fluency"] for r in pts], y=[r["concept_score"] for r in pts], mode="lines+markers+text", name=m,
            text=[f"×{r['factor']:g}" for r in pts], textposition="top center", line={"color": _COLOURS[i % len(_COLOURS)]},
            hovertext=[f"{m} ×{r['factor']:g}: concept score {r['concept_score']:.3f}, fluency {r['fluency']:.3f}, relevance {r['relevance']:.3f}, "
                       f"harmonic mean {r['hm']:.3f}" for r in pts], hoverinfo="text"))
    fig.update_layout(title=title or f"{concept}: concept score vs fluency along the steering factor (validation)",
                      xaxis_title="fluency (1 = as fluent as the unsteered model)", yaxis_title="concept score (judge)",
                      xaxis={"range": [0, 1.05]}, yaxis={"range": [0, 1.05]}, legend={"title": "method"})
    return fig


def steer_auroc(result, *, title: str = "Concept detection: ROC AUC of max-pooled projections (held-out examples)") -> go.Figure:
    by: dict[tuple[str, str], list[float]] = {}
    for d in result.detection:
        by.setdefault((d["concept"], d["method"]), []).append(d["auroc"])
    if not by:
        raise ConfigError("steer_auroc: the result holds no detection scores (no contender had a direction)")
    concepts = list(dict.fromkeys(c for c, _ in by))
    methods = list(dict.fromkeys(m for _, m in by))
    fig = go.Figure()
    for i, c in enumerate(concepts):
        vals = [by.get((c, m), []) for m in methods]
        means = [sum(v) / len(v) if v else None for v in vals]
        sds = [math.sqrt(sum((x - mu) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0 for v, mu in zip(vals, means)]
        fig.add_trace(go.Bar(x=methods, y=means, name=c, marker_color=_COLOURS[i % len(_COLOURS)],
                             error_y={"type": "data", "array": sds, "visible": True},
                             hovertext=[f"{c}, {m}: AUROC {mu:.3f}" if mu is not None else "" for m, mu in zip(methods, means)], hoverinfo="text"))
    fig.add_hline(y=0.5, line_dash="dot", annotation_text="chance")
    fig.update_layout(title=title, barmode="group", xaxis_title="method", yaxis_title="ROC AUC", yaxis={"range": [0, 1.02]},
                      legend={"title": "concept"})
    return fig
