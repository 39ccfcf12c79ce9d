"""Which sites a run graph touches: runs as rows, sites along the model's depth.

Each run of a :class:`~steerlab.interventions.graph.Graph` is a row (sources
above their readers, in execution order); the x axis is the model's depth:
``embed``, then each layer with its sites in forward order (``resid_pre``,
``attn.q`` … ``resid_post``), then ``final_norm`` and ``logits``. A filled
marker is an intervention applied in that run; a hollow marker is a value
read from that run by another; an arrow goes from each read to the
intervention that uses it. Plain inputs given as a ``source`` (an implicit
source run) and precomputed :class:`~steerlab.interventions.graph.SourceValue`\\ s
get rows of their own, as the engine executes them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import plotly.graph_objects as go

from steerlab.interventions.adapters import BLOCK_SITES
from steerlab.interventions.errors import ConfigError, SteerlabError, checked_first
from steerlab.interventions.graph import Graph, Run, SourceValue
from steerlab.interventions.lab import Lab
from steerlab.interventions.ops import Intervention

__all__ = ["run_graph"]

_BLOCK = re.compile(r"^blocks\.(-?\d+)\.(.+)$")
_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")


@dataclass
class _Place:
    x: float
    site: str  # canonical where a lab resolved it
    layer: int | None


def _place(site: str, n_layers: int | None, lab) -> _Place:
    """x = layer + (index of the site kind in forward order) / (number of kinds)."""
    layer = None
    if lab is not None:
        try:
            r = lab.resolve(site)
            site, layer = r.name, r.layer
        except SteerlabError:
            pass  # drawn where its name puts it; the engine will report the bad site
    m = _BLOCK.match(site)
    if m:
        layer = int(m[1]) if layer is None else layer
        if layer < 0 and n_layers:
            layer %= n_layers
        kind = m[2]
        frac = BLOCK_SITES.index(kind) / len(BLOCK_SITES) if kind in BLOCK_SITES else 0.5
        return _Place(layer + frac, site, layer)
    end = n_layers if n_layers is not None else 0
    fixed = {"embed": -1.0, "final_norm": end + 0.0, "logits": end + 0.5}
    if site in fixed:
        return _Place(fixed[site], site, None)
    # raw module sites inside a block sit in the middle of their layer; others after logits
    return _Place(layer + 0.5 if layer is not None else end + 1.0, site, layer)


def _describe(iv: Intervention) -> str:
    bits = [f"<b>{type(iv).__name__}</b> at {iv.site}"]
    pos = iv.positions.to_json()
    bits.append(f"positions: {'all' if pos is None else pos}")
    if iv.heads:
        bits.append(f"heads: {list(iv.heads)}")
    if iv.dims:
        d = list(iv.dims)
        bits.append(f"dims: {d if len(d) <= 8 else f'{d[:8]}… ({len(d)})'}")
    if iv.source_site:
        bits.append(f"source site: {iv.source_site}")
    return "<br>".join(bits)


def _preview(inputs) -> str:
    if isinstance(inputs, str):
        return repr(inputs if len(inputs) <= 40 else inputs[:37] + "...")
    if isinstance(inputs, list | tuple) and inputs and all(isinstance(s, str) for s in inputs):
        return f"{len(inputs)} texts, first {_preview(inputs[0])}"
    return type(inputs).__name__


class _Rows:
    """Row per run, plus one per implicit source (keyed like the engine: by the inputs object)."""

    def __init__(self, graph: Graph):
        order = graph.order()
        self.labels: list[str] = []
        self.hover: list[str] = []
        self._of_run: dict[int, int] = {}
        self._implicit: dict[int, int] = {}
        for run in order:  # implicit sources first, as the engine executes them
            for iv in run.interventions:
                if iv.sourced and iv.source is not None and not isinstance(iv.source, Run) and id(iv.source) not in self._implicit:
                    self._implicit[id(iv.source)] = self._add(*self._source_row(iv.source, run))
        for run in order:
            self._of_run[run.index] = self._add(run.name, f"run <b>{run.name}</b> on {_preview(run.inputs)}<br>{len(run.interventions)} interventions")

    def _add(self, label: str, hover: str) -> int:
        self.labels.append(label)
        self.hover.append(hover)
        return len(self.labels) - 1

    def _source_row(self, src, reader: Run) -> tuple[str, str]:
        n = len(self._implicit)
        if isinstance(src, SourceValue):
            return f"value {n}", f"precomputed SourceValue, shape {tuple(src.value.shape)} (first read by {reader.name})"
        return f"source {n}", f"implicit source run on {_preview(src)} (first read by {reader.name})"

    def of(self, run: Run) -> int:
        return self._of_run[run.index]

    def source(self, iv: Intervention) -> int | None:
        if isinstance(iv.source, Run):
            return self._of_run[iv.source.index]
        return self._implicit.get(id(iv.source)) if iv.source is not None else None


def _check_graph(graph: object) -> None:
    if not isinstance(graph, Graph):
        raise ConfigError(f"run_graph takes a steerlab Graph; got {type(graph).__name__}")


@checked_first(graph=_check_graph)
def run_graph(graph: Graph, lab: Lab | None = None, *, title: str | None = None) -> go.Figure:
    """A figure of which sites each run of ``graph`` touches, and the edges between runs.

    ``lab`` (optional) resolves site names to layers (``blocks.-1.…``, raw
    ``module:`` sites) and fixes the depth axis at the model's layer count.
    Hover shows each intervention's type, site, positions, heads and dims.
    The figure's traces: one ``"<Type>"`` trace of markers per intervention
    type (in the runs that apply them), ``"reads"`` (hollow markers where a
    value is read) and ``"edges"`` (a line per read → intervention), with one
    arrow annotation per edge.
    """
    if not len(graph):
        raise ConfigError("run_graph: the graph has no runs (add them with graph.run(inputs, interventions))")
    n_layers = lab.n_layers if lab is not None else None
    rows = _Rows(graph)
    places = {id(iv): _place(iv.site, n_layers, lab) for run in graph for iv in run.interventions}
    if n_layers is None:
        seen = [p.layer for p in places.values() if p.layer is not None]
        n_layers = max(seen) + 1 if seen else 0
        places = {id(iv): _place(iv.site, n_layers, lab) for run in graph for iv in run.interventions}

    fig = go.Figure()
    by_type: dict[str, list[tuple[float, int, str, str]]] = {}
    reads: list[tuple[float, int, str]] = []
    edge_x: list[float | None] = []
    edge_y: list[float | None] = []
    for run in graph.order():
        y = rows.of(run)
        for iv in run.interventions:
            p = places[id(iv)]
            src = rows.source(iv)
            text = _describe(iv) + f"<br>in run {run.name}"
            if src is not None:
                text += f"<br>source: {rows.labels[src]}"
                sp = _place(iv.source_site, n_layers, lab) if iv.source_site else p
                reads.append((sp.x, src, f"{sp.site} read from {rows.labels[src]}<br>by {type(iv).__name__} in {run.name}"))
                edge_x += [sp.x, p.x, None]
                edge_y += [src, y, None]
                fig.add_annotation(x=p.x, y=y, ax=sp.x, ay=src, xref="x", yref="y", axref="x", ayref="y",
                                   showarrow=True, arrowhead=3, arrowsize=1.2, arrowwidth=1.5, arrowcolor="#555", text="")
            by_type.setdefault(type(iv).__name__, []).append((p.x, y, text, p.site))
    if edge_x:
        fig.add_trace(go.Scatter(x=edge_x, y=edge_y, mode="lines", name="edges", line=dict(color="#999", width=1.5), hoverinfo="skip"))
    if reads:
        fig.add_trace(go.Scatter(
            x=[r[0] for r in reads], y=[r[1] for r in reads], mode="markers", name="reads",
            marker=dict(symbol="circle-open", size=14, line=dict(width=2), color="#555"),
            hovertext=[r[2] for r in reads], hoverinfo="text",
        ))
    for i, (name, pts) in enumerate(sorted(by_type.items())):
        fig.add_trace(go.Scatter(
            x=[p[0] for p in pts], y=[p[1] for p in pts], mode="markers+text", name=name,
            marker=dict(size=14, color=_PALETTE[i % len(_PALETTE)], symbol="square"),
            text=[p[3] for p in pts], textposition="top center", textfont=dict(size=10),
            hovertext=[p[2] for p in pts], hoverinfo="text",
        ))
    _layout(fig, rows, n_layers, title)
    return fig


def _layout(fig: go.Figure, rows: _Rows, n_layers: int, title: str | None) -> None:
    step = max(1, n_layers // 15)
    ticks = [(-1.0, "embed")] + [(float(L), str(L)) for L in range(0, n_layers, step)] + [(n_layers + 0.0, "final_norm"), (n_layers + 0.5, "logits")]
    # an invisible trace carries each row's description, so hovering a row's label area explains the run
    fig.add_trace(go.Scatter(
        x=[-1.0] * len(rows.labels), y=list(range(len(rows.labels))), mode="markers", name="runs",
        marker=dict(size=1, opacity=0), hovertext=rows.hover, hoverinfo="text", showlegend=False,
    ))
    fig.update_layout(
        title=title or f"Run graph: {len(rows.labels)} runs, sites by layer",
        xaxis=dict(title="layer (sites in forward order within a layer)", tickvals=[t[0] for t in ticks],
                   ticktext=[t[1] for t in ticks], range=[-1.6, n_layers + 1.2], zeroline=False),
        yaxis=dict(title="run", tickvals=list(range(len(rows.labels))), ticktext=rows.labels,
                   autorange="reversed", zeroline=False),
        height=max(300, 140 + 70 * len(rows.labels)),
        legend=dict(title="intervention"),
        margin=dict(l=90),
    )
