"""The run-graph figure holds the graph it was given: runs as rows, each intervention at its
site's depth, one edge per read, hover text naming type, site, positions and heads."""

from __future__ import annotations

import math

import pytest
import torch

import steerlab as sl
from steerlab.viz import run_graph

# forward order of a block's sites, written out here independently of the adapters
ORDER = ["resid_pre", "attn.q", "attn.k", "attn.v", "attn.z", "attn.out", "resid_mid", "mlp.pre", "mlp.post", "mlp.out", "resid_post"]
CLEAN, CORRUPT = "The capital of France is", "The capital of Italy is"


def trace(fig, name):
    (t,) = [t for t in fig.data if t.name == name]
    return t


def depth(site: str, n_layers: int) -> tuple[int, int]:
    """(layer, rank of the site kind) — what the x axis must order by."""
    _, layer, kind = site.split(".", 2)
    return int(layer) % n_layers, ORDER.index(kind)


@pytest.fixture(scope="module")
def lab(smollm):
    lab = sl.wrap(*smollm)
    yield lab
    lab.unwrap()


def path_patching_graph():
    g = sl.Graph()
    clean = g.run(CLEAN, name="clean")
    x = g.run(CORRUPT, [sl.Interchange("blocks.3.attn.z", heads=[5], positions=-1, source=clean)], name="x")
    y = g.run(CORRUPT, [sl.Interchange("blocks.-1.resid_post", positions=-1, source=x), sl.Zero("blocks.1.mlp.out")], name="y")
    return g, clean, x, y


def test_path_patching_graph_figure_holds_runs_sites_and_edges(lab):
    g, clean, x, y = path_patching_graph()
    res = lab.execute(g)  # the graph the figure shows is one that runs
    assert torch.isfinite(res[y].logits).all()
    fig = run_graph(g, lab)

    assert list(fig.layout.yaxis.ticktext) == ["clean", "x", "y"]
    assert "Run graph: 3 runs" in fig.layout.title.text
    assert fig.layout.xaxis.title.text.startswith("layer") and fig.layout.yaxis.title.text == "run"

    inter, zero, reads, edges = trace(fig, "Interchange"), trace(fig, "Zero"), trace(fig, "reads"), trace(fig, "edges")
    # each intervention sits in its run's row, at its layer, ordered by site kind within the layer
    assert list(inter.text) == ["blocks.3.attn.z", "blocks.29.resid_post"]  # -1 resolved to the last of 30 layers
    assert list(inter.y) == [1, 2] and list(zero.y) == [2] and list(zero.text) == ["blocks.1.mlp.out"]
    xs = {name: xv for name, xv in zip([*inter.text, *zero.text], [*inter.x, *zero.x], strict=True)}
    for name, xv in xs.items():
        layer, rank = depth(name, 30)
        assert math.floor(xv) == layer
    assert sorted(xs, key=xs.get) == sorted(xs, key=lambda n: depth(n, 30))
    # hover names type, site, positions, heads, run and source
    assert "<b>Interchange</b> at blocks.3.attn.z" in inter.hovertext[0]
    assert "positions: [-1]" in inter.hovertext[0] and "heads: [5]" in inter.hovertext[0] and "source: clean" in inter.hovertext[0]
    assert "in run y" in inter.hovertext[1] and "source: x" in inter.hovertext[1]
    assert "positions: all" in zero.hovertext[0] and "source" not in zero.hovertext[0]
    # one read and one edge per sourced intervention: clean -> x at layer 3, x -> y at layer 29
    assert list(reads.y) == [0, 1] and list(reads.x) == [xs["blocks.3.attn.z"], xs["blocks.29.resid_post"]]
    assert list(edges.y) == [0, 1, None, 1, 2, None]
    arrows = [(a.ax, a.ay, a.x, a.y) for a in fig.layout.annotations]
    assert arrows == [(xs["blocks.3.attn.z"], 0, xs["blocks.3.attn.z"], 1), (xs["blocks.29.resid_post"], 1, xs["blocks.29.resid_post"], 2)]


def test_implicit_sources_and_source_values_get_rows(lab):
    cached = lab.source_value(sl.Interchange("blocks.4.resid_post", positions=-1, source=CLEAN))
    g = sl.Graph()
    g.run(CORRUPT, [
        sl.Interchange("blocks.2.resid_post", positions=-1, source=CLEAN),
        sl.Interchange("blocks.4.resid_post", positions=-1, source=cached),
        sl.Interchange("blocks.6.attn.out", source_site="blocks.5.attn.out", positions=-1, source=CLEAN),
    ], name="patched")
    fig = run_graph(g, lab)
    # the two reads of the same text object share one implicit source run, as in the engine
    assert list(fig.layout.yaxis.ticktext) == ["source 0", "value 1", "patched"]
    runs = trace(fig, "runs")
    assert "implicit source run on 'The capital of France is'" in runs.hovertext[0]
    assert f"SourceValue, shape {tuple(cached.value.shape)}" in runs.hovertext[1]
    reads = trace(fig, "reads")
    assert list(reads.y) == [0, 1, 0]
    # a source_site read sits at the source site's depth, the edit at its own
    assert math.floor(reads.x[2]) == 5 and "blocks.5.attn.out read from source 0" in reads.hovertext[2]
    inter = trace(fig, "Interchange")
    assert math.floor(inter.x[2]) == 6 and "source site: blocks.5.attn.out" in inter.hovertext[2]


def test_without_a_lab_the_depth_axis_comes_from_the_names():
    g, *_ = path_patching_graph()
    g.runs[2].interventions[0].site = "blocks.9.resid_post"
    fig = run_graph(g)
    inter = trace(fig, "Interchange")
    assert list(inter.text) == ["blocks.3.attn.z", "blocks.9.resid_post"]
    ticks = dict(zip(fig.layout.xaxis.ticktext, fig.layout.xaxis.tickvals, strict=True))
    assert ticks["embed"] == -1 and ticks["final_norm"] == 10 and ticks["logits"] == 10.5  # 10 layers seen: 0..9


def test_bad_input_is_refused_with_a_message():
    with pytest.raises(sl.ConfigError, match="run_graph takes a steerlab Graph; got list"):
        run_graph([])
    with pytest.raises(sl.ConfigError, match=r"run_graph: the graph has no runs \(add them with graph.run"):
        run_graph(sl.Graph())
    g = sl.Graph()
    a = g.run(CLEAN, name="a")
    b = g.run(CORRUPT, [sl.Interchange("blocks.1.resid_post", source=a)], name="b")
    a.interventions.append(sl.Interchange("blocks.1.resid_post", source=b))
    with pytest.raises(sl.GraphError, match="the run graph has a cycle: a -> b -> a"):
        run_graph(g)
