"""Causal-tracing heatmaps (Meng et al. 2022, Fig. 1 and Fig. 2).

:func:`causal_trace` takes a :class:`~steerlab.alignment.causal_tracing.CausalTrace`:
by default one panel per component kind, the average indirect effect per token
class (rows) and layer (columns), as the paper's Fig. 2; with ``fact=i``, that
fact's restored answer probability per token (rows, subject tokens starred) and
layer, as its Fig. 1, the corrupted run's probability as the scale's floor.
"""

from __future__ import annotations

import math

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from steerlab.interventions.errors import ConfigError

__all__ = ["causal_trace"]

_SCALES = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds", "mlp window": "Greens", "attn window": "Reds"}


def _z(grid) -> list[list[float | None]]:
    return [[None if math.isnan(float(x)) else float(x) for x in row] for row in grid]


def causal_trace(result, *, kind: str | None = None, fact: int | None = None, title: str | None = None) -> go.Figure:
    """Heatmaps of ``result`` (see the module docstring); ``kind`` restricts to one component kind."""
    from steerlab.alignment.causal_tracing import TOKEN_CLASSES

    kinds = result.kinds if kind is None else [result._kind(kind)]
    if fact is not None and not (isinstance(fact, int) and 0 <= fact < len(result.facts)):
        raise ConfigError(f"fact={fact!r}: expected an index in 0..{len(result.facts) - 1}")
    fig = make_subplots(rows=1, cols=len(kinds), subplot_titles=kinds, shared_yaxes=True, horizontal_spacing=0.04)
    for j, k in enumerate(kinds):
        if fact is None:
            grid, rows, floor = result.average(k), list(TOKEN_CLASSES), None
            label = "AIE"
        else:
            grid = result.scores[k][fact].T  # [pos, layer]
            subject = set(result.subjects[fact])
            rows = [f"{t!r}{'*' if i in subject else ''}" for i, t in enumerate(result.tokens[fact])]
            floor, label = float(result.corrupted[fact]), "p(answer)"
        fig.add_trace(
            go.Heatmap(
                z=_z(grid), x=list(result.layers), y=list(range(len(rows))), colorscale=_SCALES.get(k, "Blues"),
                zmin=floor, showscale=j == len(kinds) - 1, colorbar={"title": {"text": label}},
                text=[[r] * len(result.layers) for r in rows],
                hovertemplate=f"{k}<br>%{{text}}<br>layer %{{x}}<br>{label} %{{z:.4f}}<extra></extra>",
            ),
            row=1, col=j + 1,
        )
        fig.update_xaxes(title_text="layer" if not k.endswith("window") else f"centre of a {result.window}-layer window", row=1, col=j + 1)
    fig.update_yaxes(tickmode="array", tickvals=list(range(len(rows))), ticktext=rows, autorange="reversed", row=1, col=1)
    if title is None:
        if fact is None:
            title = f"Causal tracing: average indirect effect over {len(result.facts)} facts (ATE {result.ate:.3f})"
        else:
            f = result.facts[fact]
            title = f"Causal tracing: {f.prompt!r} → {f.target!r} (clean {float(result.clean[fact]):.3f}, corrupted {float(result.corrupted[fact]):.3f})"
    fig.update_layout(title={"text": title}, template="plotly_white")
    return fig
