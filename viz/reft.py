"""Figures for steering results: ReFT training curves and per-token steering effects.

* :func:`reft_training_curve` — a :class:`~steerlab.reft.TrainResult`: the loss
  of every optimiser step, its per-epoch mean, and the epoch boundaries.
* :func:`token_effects` — one or several
  :class:`~steerlab.reft.effects.SteeringEffect`: for each continuation token
  (the tokens label the x axis), the change in log-probability the steering
  causes as bars, and the base and steered log-probabilities as lines.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from steerlab.interventions.errors import ConfigError
from steerlab.viz.alignment import integer_axis
from steerlab.viz.tokens import token_label

__all__ = ["reft_training_curve", "token_effects"]

_UP, _DOWN = "#2ca02c", "#d62728"
_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b"]


def _epoch_ends(steps: int, epochs: int) -> list[int]:
    """The last step of each epoch, assuming equal epochs (how :func:`steerlab.reft.train` counts)."""
    if epochs < 1 or steps < epochs or steps % epochs:
        return []
    per = steps // epochs
    return [per * (e + 1) for e in range(epochs)]


def reft_training_curve(result, *, title: str | None = None) -> go.Figure:
    """Loss per optimiser step (x: step, from 1) and, when the steps divide into equal
    epochs, the mean loss of each epoch drawn at its last step.

    ``result``: a :class:`~steerlab.reft.TrainResult`, or a mapping ``{name: TrainResult}``
    to compare runs (one loss line each, e.g. a seeded run and its control).
    """
    runs = dict(result) if isinstance(result, Mapping) else {"": result}
    if not runs:
        raise ConfigError("reft_training_curve: no training result to plot")
    fig = go.Figure()
    longest = max(len(list(getattr(r, "losses", None) or [])) for r in runs.values())
    for i, (name, res) in enumerate(runs.items()):
        losses = list(getattr(res, "losses", None) or [])
        if not losses:
            raise ConfigError(f"reft_training_curve: the result{f' {name!r}' if name else ''} holds no losses (did training run any step?)")
        colour = _COLOURS[i % len(_COLOURS)]
        label = f"{name}: " if name else ""
        steps = list(range(1, len(losses) + 1))
        fig.add_trace(go.Scatter(x=steps, y=losses, name=f"{label}loss per step", mode="lines+markers" if len(losses) <= 60 else "lines",
                                 line={"color": colour}, hovertemplate=f"{label}step %{{x}}<br>loss %{{y:.4f}}<extra></extra>"))
        ends = _epoch_ends(len(losses), int(getattr(res, "epochs", 0) or 0))
        if len(ends) > 1 and len(runs) == 1:
            per = ends[0]
            means = [sum(losses[e - per : e]) / per for e in ends]
            fig.add_trace(go.Scatter(x=ends, y=means, name="epoch mean", mode="markers+lines", line={"color": "#ff7f0e", "dash": "dot"},
                                     customdata=list(range(1, len(ends) + 1)),
                                     hovertemplate="epoch %{customdata} (to step %{x})<br>mean loss %{y:.4f}<extra></extra>"))
    if title is None:
        parts = []
        for name, res in runs.items():
            took = f", {res.seconds:.1f} s" if getattr(res, "seconds", None) else ""
            parts.append(f"{f'{name} ' if name else ''}{res.losses[0]:.3f} → {res.losses[-1]:.3f} over {len(res.losses)} steps{took}")
        title = "ReFT training loss: " + "; ".join(parts)
    fig.update_layout(title=title, xaxis_title="optimiser step", yaxis_title="loss (cross-entropy on the targets)",
                      legend={"title": {"text": "series"}})
    fig.update_xaxes(**integer_axis(longest))
    return fig


def _effects(effects) -> list:
    items = [effects] if not isinstance(effects, Sequence) else list(effects)
    if not items:
        raise ConfigError("token_effects: no steering effect to plot")
    for i, e in enumerate(items):
        if not all(hasattr(e, a) for a in ("tokens", "base_logprob", "steered_logprob")):
            raise ConfigError(f"token_effects: item {i} is a {type(e).__name__}; expected a SteeringEffect (steerlab.reft.steering_effect)")
    return items


def token_effects(effects, *, title: str | None = None) -> go.Figure:
    """Per-token change in log-probability (steered − base) of each effect's continuation.

    One panel per effect, its prompt and continuation in the panel title. Bars:
    ``delta`` (green up, red down); lines: the base and the steered
    log-probabilities. Hover gives the token and all three numbers.
    """
    items = _effects(effects)
    titles = [f"{e.prompt!r} → {e.continuation!r} ({getattr(e, 'origin', 'given')}; Σ {e.total:+.2f} nats)" for e in items]
    fig = make_subplots(rows=len(items), cols=1, subplot_titles=[t if len(t) < 110 else t[:107] + "…" for t in titles],
                        vertical_spacing=min(0.12, 0.35 / max(len(items) - 1, 1)))
    for r, e in enumerate(items, start=1):
        x = list(range(len(e.tokens)))
        delta = e.delta
        hover = [f"token {i}: {t!r}<br>base {b:.3f}<br>steered {s:.3f}<br>Δ {d:+.3f}"
                 for i, (t, b, s, d) in enumerate(zip(e.tokens, e.base_logprob, e.steered_logprob, delta, strict=True))]
        first = r == 1
        fig.add_trace(go.Bar(x=x, y=delta, name="Δ log-prob (steered − base)", marker_color=[_UP if d >= 0 else _DOWN for d in delta],
                             customdata=hover, hovertemplate="%{customdata}<extra></extra>", legendgroup="delta", showlegend=first),
                      row=r, col=1)
        fig.add_trace(go.Scatter(x=x, y=e.base_logprob, name="base log-prob", mode="lines+markers", line={"color": "grey", "dash": "dot"},
                                 customdata=hover, hovertemplate="%{customdata}<extra></extra>", legendgroup="base", showlegend=first),
                      row=r, col=1)
        fig.add_trace(go.Scatter(x=x, y=e.steered_logprob, name="steered log-prob", mode="lines+markers", line={"color": "#1f77b4"},
                                 customdata=hover, hovertemplate="%{customdata}<extra></extra>", legendgroup="steered", showlegend=first),
                      row=r, col=1)
        fig.update_xaxes(tickmode="array", tickvals=x, ticktext=[token_label(t) for t in e.tokens], tickangle=-45,
                         title_text="continuation token", row=r, col=1)
        fig.update_yaxes(title_text="log-prob (nats)", row=r, col=1)
    fig.update_layout(
        title=title or "Per-token effect of the steering intervention (teacher-forced log-probabilities)",
        height=max(420, 330 * len(items)), legend={"title": {"text": "series"}}, bargap=0.3,
    )
    return fig
