"""Circuit figures: path-patching effects per layer × head, and faithfulness against random circuits.

* :func:`path_patching_heatmap` — a :class:`~steerlab.alignment.circuits.PathPatching`:
  each sender head's relative effect (ΔF / F), a diverging scale centred on 0
  (blue: the head's path carries the clean behaviour).
* :func:`faithfulness_chart` — a :class:`~steerlab.alignment.circuits.Faithfulness`:
  the circuit's share of the metric beside each random circuit of the same size,
  the empty circuit (0 heads kept) and the whole model (1).
"""

from __future__ import annotations

import math

import plotly.graph_objects as go

__all__ = ["path_patching_heatmap", "faithfulness_chart"]


def path_patching_heatmap(result, *, title: str | None = None) -> go.Figure:
    """Layer × head heatmap of ``result.relative`` (NaN cells: heads that were not senders)."""
    grid = result.relative
    finite = [abs(float(x)) for x in grid.flatten() if not math.isnan(float(x))]
    zmax = max(finite + [1e-9])
    z = [[None if math.isnan(float(x)) else float(x) for x in row] for row in grid]
    fig = go.Figure(
        go.Heatmap(
            z=z, x=list(range(result.n_heads)), y=list(range(result.n_layers)), colorscale="RdBu", zmid=0.0,
            zmin=-zmax, zmax=zmax, colorbar={"title": {"text": "ΔF / F"}},
            hovertemplate="head %{y}.%{x}<br>ΔF / F %{z:.2%}<extra></extra>",
        )
    )
    fig.update_xaxes(title_text="head", dtick=1)
    fig.update_yaxes(title_text="layer", autorange="reversed")
    title = title or f"Path patching to {', '.join(result.receivers)} ({result.metric}, clean {result.clean_value:.3g})"
    fig.update_layout(title={"text": title}, template="plotly_white")
    return fig


def faithfulness_chart(result, *, title: str | None = None) -> go.Figure:
    """Bars: the circuit, each random circuit of its size, no head; a line at the whole model (1)."""
    names = [result.circuit.name] + [c.name for c in result.random_circuits] + ["no head"]
    values = [result.score] + result.random_scores + [result.empty_score]
    colours = ["#2ca02c"] + ["#aaaaaa"] * len(result.random_circuits) + ["#d62728"]
    fig = go.Figure(go.Bar(x=names, y=values, marker_color=colours, hovertemplate="%{x}<br>%{y:.1%}<extra></extra>"))
    fig.add_hline(y=1.0, line_dash="dash", annotation_text="whole model")
    fig.update_yaxes(title_text=f"mean {result.metric} ÷ the model's", tickformat=".0%")
    title = title or f"Faithfulness under mean ablation: {result.circuit.name} ({len(result.circuit)} heads) {result.score:.1%}"
    fig.update_layout(title={"text": title}, template="plotly_white")
    return fig
