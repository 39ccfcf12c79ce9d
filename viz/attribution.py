"""Figures for attributions: estimate vs exact, subspace attributions, what a direction writes.

* :func:`attribution_heatmap` — an :class:`~steerlab.interventions.AttributionResult`
  (site and head grids as :func:`~steerlab.viz.patching_heatmap` draws a sweep;
  neuron grids as layer × neuron), or GradDrop's score.
* :func:`attribution_comparison` — a :class:`~steerlab.interventions.Comparison`:
  the estimated and the exact effect side by side on one colour scale, and a
  scatter of the two (one point per cell, hover names it) against ``y = x``.
* :func:`subspace_attribution_heatmap` — layer × token, inside the subspace and
  in its complement, the prompt's tokens on the x axis.
* :func:`integrated_gradients_bars` — attribution per direction, the exact
  interchange effect beside their sum.
* :func:`logit_lens_heatmap`, :func:`head_logit_heatmap`,
  :func:`direction_tokens`, :func:`direction_effects_lines` — the logit lens,
  per-head direct effects, the tokens a direction promotes and suppresses,
  and how a patched direction travels downstream.
"""

from __future__ import annotations

import math

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from steerlab.interventions.errors import ConfigError

__all__ = [
    "attribution_heatmap",
    "attribution_comparison",
    "subspace_attribution_heatmap",
    "integrated_gradients_bars",
    "logit_lens_heatmap",
    "head_logit_heatmap",
    "direction_tokens",
    "direction_effects_lines",
]

_UP, _DOWN, _LINE = "#2ca02c", "#d62728", "#7f7f7f"
_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]


def _label(t: str) -> str:
    """A token as a visible tick label (whitespace shown, never blank)."""
    shown = repr(t)[1:-1] if t.strip() == "" or t != t.strip() else t
    return shown.replace(" ", "·") if shown.strip() == "" else shown


def _z(grid) -> list[list[float | None]]:
    return [[None if math.isnan(float(x)) else float(x) for x in row] for row in grid]


def _zmax(*grids) -> float:
    vals = [abs(float(x)) for g in grids for x in g.flatten() if not math.isnan(float(x))]
    return max(vals + [1e-12])


def _flat(result, grid):
    """A 2-D view ``[row, column]`` of a grid of ``result``'s cells, with column names."""
    return (grid.reshape(grid.shape[0], -1) if grid.dim() == 3 else grid), result.cell_names


def attribution_heatmap(result, *, value: str = "effect", title: str | None = None) -> go.Figure:
    """The estimate as a heatmap: ``value`` is ``"effect"`` (the estimated change of the metric),
    ``"values"`` (base + estimate), ``"normalised"`` (0 = base, 1 = source) or ``"score"``
    (GradDrop's unsigned score)."""
    from steerlab.viz.patching import patching_heatmap

    if value not in ("effect", "values", "normalised", "score"):
        raise ConfigError(f"value={value!r}: expected 'effect', 'values', 'normalised' or 'score'")
    if value == "score" and result.score is None:
        raise ConfigError("this result has no GradDrop score: run attribution_patching(..., grad_drop=True)")
    what = {"effect": "estimated effect", "values": "estimated metric", "normalised": "normalised estimate", "score": "GradDrop score"}[value]
    title = title or f"{result.method}: {what} on {result.metric} (base {result.base_value:.3g}, source {result.source_value:.3g})"
    if result.unit == "head" and value != "score":
        return patching_heatmap(result, value=value, title=title)
    grid = result.ranking if value == "score" else getattr(result, value)
    z, cols = _flat(result, grid)
    zmax = _zmax(z)
    fig = go.Figure(go.Heatmap(
        z=_z(z), x=list(range(len(cols))), y=list(range(len(result.row_labels))), customdata=[cols] * len(result.row_labels),
        text=[[r] * len(cols) for r in result.row_labels], colorscale="Viridis" if value == "score" else "RdBu",
        zmid=None if value == "score" else 0.0, zmin=0.0 if value == "score" else -zmax, zmax=zmax,
        colorbar={"title": {"text": what}},
        hovertemplate=f"{result.row_axis} %{{text}}<br>%{{customdata}}<br>{what} %{{z:.4g}}<extra></extra>",
    ))
    if len(cols) <= 60:
        fig.update_xaxes(tickmode="array", tickvals=list(range(len(cols))), ticktext=cols, tickangle=-45)
    fig.update_xaxes(title_text=result.dims[-1] if result.unit != "neuron" else "neuron")
    fig.update_yaxes(tickmode="array", tickvals=list(range(len(result.row_labels))), ticktext=result.row_labels,
                     title_text=result.row_axis, autorange="reversed")
    fig.update_layout(title={"text": title}, template="plotly_white")
    return fig


def attribution_comparison(comparison, *, title: str | None = None) -> go.Figure:
    """Estimate and exact effects side by side (one colour scale) and their scatter."""
    est, ex = comparison.estimate, comparison.exact
    ge, cols = _flat(est, est.effect)
    gx, _ = _flat(est, ex.effect)
    zmax = _zmax(ge, gx)
    rows = est.row_labels
    fig = make_subplots(rows=1, cols=3, column_widths=[0.36, 0.36, 0.28], horizontal_spacing=0.07,
                        subplot_titles=[f"{est.method} estimate", "exact patching", "estimate vs exact"])
    for j, (g, name) in enumerate(((ge, est.method), (gx, "exact"))):
        fig.add_trace(go.Heatmap(
            z=_z(g), x=list(range(len(cols))), y=list(range(len(rows))), customdata=[cols] * len(rows), text=[[r] * len(cols) for r in rows],
            colorscale="RdBu", zmid=0.0, zmin=-zmax, zmax=zmax, showscale=j == 1, name=name,
            colorbar={"title": {"text": f"{est.metric} − base"}, "x": 0.70, "len": 0.9},
            hovertemplate=f"{name}<br>{est.row_axis} %{{text}}<br>%{{customdata}}<br>effect %{{z:.4g}}<extra></extra>",
        ), row=1, col=j + 1)
        fig.update_yaxes(tickmode="array", tickvals=list(range(len(rows))), ticktext=rows, autorange="reversed",
                         title_text=est.row_axis if j == 0 else None, showticklabels=j == 0, row=1, col=j + 1)
        if len(cols) <= 40:
            fig.update_xaxes(tickmode="array", tickvals=list(range(len(cols))), ticktext=[_label(c) for c in cols], tickangle=-45, row=1, col=j + 1)
    xs, ys, names = [], [], []
    for i, r in enumerate(rows):
        for c, name in enumerate(cols):
            a, b = float(gx[i, c]), float(ge[i, c])
            if not (math.isnan(a) or math.isnan(b)):
                xs.append(a)
                ys.append(b)
                names.append(f"{r} {name}")
    fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers", text=names, marker={"color": _COLOURS[0], "size": 6}, name="cells",
                             hovertemplate="%{text}<br>exact %{x:.4g}<br>estimate %{y:.4g}<extra></extra>"), row=1, col=3)
    lo, hi = (min(xs + ys), max(xs + ys)) if xs else (0.0, 1.0)
    fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line={"color": _LINE, "dash": "dash"}, name="y = x",
                             hoverinfo="skip"), row=1, col=3)
    fig.update_xaxes(title_text="exact effect", row=1, col=3)
    fig.update_yaxes(title_text="estimated effect", row=1, col=3)
    title = title or (f"{est.method} vs exact patching on {est.metric}: Spearman {comparison.spearman:.2f}, "
                      f"top-{comparison.k} overlap {comparison.overlap:.2f}")
    fig.update_layout(title={"text": title}, template="plotly_white", showlegend=False)
    return fig


def subspace_attribution_heatmap(result, *, example: int = 0, title: str | None = None) -> go.Figure:
    """Layer × token inside the subspace and in its complement (one colour scale), one example."""
    toks = result.tokens[example]
    n = len(toks)
    inside, outside = result.inside[:, :n, example], result.outside[:, :n, example]
    zmax = _zmax(inside, outside)
    rows = [str(x) for x in result.layers]
    labels = [_label(t) for t in toks]
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.05,
                        subplot_titles=[f"inside the subspace ({result.subspace.get('size')} dims)", "in its complement"])
    for j, g in enumerate((inside, outside)):
        fig.add_trace(go.Heatmap(
            z=_z(g), x=list(range(n)), y=list(range(len(rows))), customdata=[[repr(t) for t in toks]] * len(rows),
            text=[[r] * n for r in rows], colorscale="RdBu", zmid=0.0, zmin=-zmax, zmax=zmax, showscale=j == 1,
            colorbar={"title": {"text": "attribution"}},
            hovertemplate="layer %{text}<br>token %{x}: %{customdata}<br>%{z:.4g}<extra></extra>",
        ), row=1, col=j + 1)
        fig.update_xaxes(tickmode="array", tickvals=list(range(n)), ticktext=labels, tickangle=-45, title_text="token", row=1, col=j + 1)
    fig.update_yaxes(tickmode="array", tickvals=list(range(len(rows))), ticktext=rows, autorange="reversed", title_text="layer", row=1, col=1)
    title = title or (f"{result.mode} attribution of {result.metric} inside the subspace at {result.subspace.get('site')} and outside it")
    fig.update_layout(title={"text": title}, template="plotly_white")
    return fig


def integrated_gradients_bars(ig, *, title: str | None = None) -> go.Figure:
    """IG per subspace direction (summed over positions, mean over examples), and the exact
    interchange effect beside the attributions' sum (completeness)."""
    per = [float(v) for v in ig.per_direction]
    names = [f"direction {i}" for i in range(len(per))]
    fig = go.Figure(go.Bar(x=names, y=per, name="attribution", marker={"color": [_UP if v >= 0 else _DOWN for v in per]},
                           hovertemplate="%{x}<br>attribution %{y:.4g}<extra></extra>"))
    fig.add_trace(go.Bar(x=["sum of attributions", "exact interchange effect"], y=[float(ig.total.mean()), float(ig.exact.mean())],
                         name="completeness", marker={"color": [_COLOURS[0], _LINE]},
                         hovertemplate="%{x}<br>%{y:.4g}<extra></extra>"))
    fig.update_layout(title={"text": title or f"Integrated gradients inside the subspace at {ig.site} ({ig.metric}; "
                                              f"completeness error {ig.completeness():.1e})"},
                      template="plotly_white", yaxis_title=f"{ig.metric} change", showlegend=False)
    return fig


def logit_lens_heatmap(lens, *, example: int = 0, title: str | None = None) -> go.Figure:
    """Layer × token: colour = the metric read there (or the top-1 probability), text = the top token."""
    toks = lens.tokens[example]
    n = len(toks)
    rows = [str(x) if x is not None else s for x, s in zip(lens.layers, lens.sites, strict=True)]
    top = [[_label(lens.top_tokens[i][example][p][0]) for p in range(n)] for i in range(len(rows))]
    hover = [["<br>".join(f"{t!r} {float(lens.top_probs[i, example, p, j]):.3f}" for j, t in enumerate(lens.top_tokens[i][example][p]))
              for p in range(n)] for i in range(len(rows))]
    if lens.metric_values is not None:
        z, scale, what = lens.metric_values[:, :n, example], "RdBu", lens.metric
        zmax = _zmax(z)
        extra = {"zmid": 0.0, "zmin": -zmax, "zmax": zmax}
    else:
        z, scale, what, extra = lens.top_probs[:, example, :n, 0], "Blues", "top-1 probability", {"zmin": 0.0, "zmax": 1.0}
    fig = go.Figure(go.Heatmap(
        z=_z(z), x=list(range(n)), y=list(range(len(rows))), text=top, texttemplate="%{text}", textfont={"size": 9},
        customdata=hover, colorscale=scale, colorbar={"title": {"text": what}}, **extra,
        hovertemplate="layer %{y}<br>token %{x}<br>%{customdata}<br>" + what + " %{z:.4g}<extra></extra>",
    ))
    fig.update_xaxes(tickmode="array", tickvals=list(range(n)), ticktext=[_label(t) for t in toks], tickangle=-45, title_text="token")
    fig.update_yaxes(tickmode="array", tickvals=list(range(len(rows))), ticktext=rows, autorange="reversed", title_text="layer")
    fig.update_layout(title={"text": title or "Logit lens: top token per layer and position" + (f", colour = {what}" if lens.metric else "")},
                      template="plotly_white", height=max(400, 18 * len(rows) + 150))
    return fig


def head_logit_heatmap(result, *, title: str | None = None) -> go.Figure:
    """Layer × head direct effects on the metric, with each layer's MLP as a last column."""
    g = result.heads.mean(-1)
    mlp = result.mlp.mean(-1)
    L, H = g.shape
    cols = [f"h{h}" for h in range(H)] + ["MLP"]
    z = [[float(g[i, h]) for h in range(H)] + [float(mlp[i])] for i in range(L)]
    zmax = _zmax(g, mlp)
    fig = go.Figure(go.Heatmap(
        z=z, x=cols, y=list(range(L)), colorscale="RdBu", zmid=0.0, zmin=-zmax, zmax=zmax,
        colorbar={"title": {"text": "direct effect"}},
        hovertemplate="layer %{y}, %{x}<br>direct effect %{z:.4g}<extra></extra>",
    ))
    fig.update_yaxes(autorange="reversed", title_text="layer", dtick=1 if L <= 40 else None)
    fig.update_xaxes(title_text="head (last column: the layer's MLP)")
    fig.update_layout(title={"text": title or f"Direct effect of each head on {result.metric} at {result.token!r} "
                                              f"(metric {float(result.metric_values.mean()):.3g})"}, template="plotly_white")
    return fig


def direction_tokens(result, *, title: str | None = None) -> go.Figure:
    """Per direction: the tokens it promotes (green) and suppresses (red), as horizontal bars."""
    k = len(result.promoted)
    if k == 0:
        raise ConfigError("direction_tokens: the result holds no direction")
    fig = make_subplots(rows=1, cols=k, subplot_titles=[f"direction {i}" for i in range(k)], horizontal_spacing=0.08)
    for i in range(k):
        pairs = list(reversed(result.suppressed[i])) + list(reversed(result.promoted[i]))
        pairs = sorted(pairs, key=lambda p: p[1])
        fig.add_trace(go.Bar(
            x=[v for _, v in pairs], y=[f"{_label(t)} " for t, _ in pairs], orientation="h",
            marker={"color": [_UP if v >= 0 else _DOWN for _, v in pairs]}, customdata=[repr(t) for t, _ in pairs],
            hovertemplate="%{customdata}<br>logit %{x:.4g}<extra></extra>", showlegend=False,
        ), row=1, col=i + 1)
        fig.update_xaxes(title_text="direct logit", row=1, col=i + 1)
    fig.update_layout(title={"text": title or f"Tokens each direction at {result.site} promotes and suppresses (direct logit attribution)"},
                      template="plotly_white", height=max(400, 22 * 2 * len(result.promoted[0]) + 150))
    return fig


def direction_effects_lines(result, *, title: str | None = None) -> go.Figure:
    """Per direction, over later sites: the change along the direction (solid) and in norm (dotted)."""
    along, norm = result.along.mean(-1), result.norm.mean(-1)
    x = [str(layer) if layer is not None else s for layer, s in zip(result.layers, result.sites, strict=True)]
    fig = go.Figure()
    for i in range(along.shape[0]):
        c = _COLOURS[i % len(_COLOURS)]
        fig.add_trace(go.Scatter(x=x, y=[float(v) for v in along[i]], mode="lines+markers", name=f"direction {i}: along it",
                                 line={"color": c}, hovertemplate="site %{x}<br>change along the direction %{y:.4g}<extra></extra>"))
        fig.add_trace(go.Scatter(x=x, y=[float(v) for v in norm[i]], mode="lines", name=f"direction {i}: norm of the change",
                                 line={"color": c, "dash": "dot"}, hovertemplate="site %{x}<br>|change| %{y:.4g}<extra></extra>"))
    fig.update_xaxes(title_text="layer", type="category")
    fig.update_yaxes(title_text="change at the patched positions")
    fig.update_layout(title={"text": title or f"Each direction patched alone ({result.mode}): how it travels downstream"},
                      template="plotly_white", legend={"orientation": "h", "y": -0.2})
    return fig
