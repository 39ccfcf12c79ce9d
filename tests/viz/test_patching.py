"""Patching heatmaps hold the numbers and labels of the real sweep they were given (SmolLM2-135M)."""

from __future__ import annotations

import json
import math
import re

import plotly.graph_objects as go
import pytest

import steerlab as sl
from steerlab.viz import patching_heatmap, save_html
from tests.interventions._helpers import wrapped

BASE = "The Eiffel Tower is in the city of"
SOURCE = "The Colosseum is in the city of"


@pytest.fixture(scope="module")
def sweeps(smollm):
    """Three real sweeps: layer × position, layer × head, and layer × position × head."""
    model, tok = smollm
    metric = sl.metrics.logit_diff(" Rome", " Paris")
    with wrapped(model, tok) as lab:
        pos = sl.sweep(lab, BASE, SOURCE, sites=["blocks.20.resid_post", "blocks.24.resid_post", "blocks.29.resid_post"], metric=metric)
        heads = sl.sweep(lab, BASE, SOURCE, sites=["blocks.26.attn.z", "blocks.28.attn.z"], heads="all", positions=-1, metric=metric)
        both = sl.sweep(lab, BASE, SOURCE, sites="blocks.28.attn.z", heads=[0, 2], positions=[3, -1], metric=metric)
    return tok, pos, heads, both


def grid_of(trace) -> list[list[float]]:
    return [[math.nan if x is None else x for x in row] for row in trace.z]


def assert_grid(trace, values) -> None:
    got = grid_of(trace)
    want = values.tolist()
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w, nan_ok=True, rel=0, abs=0)


def test_layer_by_position(sweeps):
    tok, res, _, _ = sweeps
    fig = patching_heatmap(res, value="values")
    assert isinstance(fig, go.Figure) and len(fig.data) == 1
    (hm,) = fig.data
    assert_grid(hm, res.values)
    # the tokens of the base prompt label the columns, in order, repeats kept apart, spaces made visible
    tokens = [tok.decode([i]) for i in tok(BASE).input_ids]
    assert tokens == res.tokens
    assert list(fig.layout.xaxis.ticktext) == [t.replace(" ", "·") for t in tokens]
    assert list(fig.layout.xaxis.tickvals) == list(range(len(tokens)))
    assert list(fig.layout.yaxis.ticktext) == ["20", "24", "29"]
    assert fig.layout.xaxis.title.text == "position (token)" and fig.layout.yaxis.title.text == "layer"
    assert "logit_diff(' Rome', ' Paris')" in fig.layout.title.text
    assert "layer %{text}" in hm.hovertemplate and "position %{x}: %{customdata[0]}" in hm.hovertemplate
    assert hm.customdata[0][-1][0] == repr(" of") and hm.text[2][0] == "29"
    assert hm.zmid == 0  # diverging scale centred on "no change"
    # the last block's output at the last position is all the logits read: patching it restores the source
    assert res.normalised[-1, -1].item() == pytest.approx(1.0, abs=1e-4)
    # the default: the normalised effect (0 = base, 1 = source), the raw metric beside it in the hover data
    norm = patching_heatmap(res)
    assert_grid(norm.data[0], res.normalised)
    assert [[c[1] for c in row] for row in norm.data[0].customdata] == res.values.tolist()
    assert "normalised %{z:.4g}" in norm.data[0].hovertemplate and "logit_diff(' Rome', ' Paris') %{customdata[1]:.4g}" in norm.data[0].hovertemplate
    assert "normalised logit_diff" in norm.layout.title.text and "0 = base (" in norm.layout.title.text and "1 = source (" in norm.layout.title.text


def test_layer_by_head(sweeps):
    _, _, res, _ = sweeps
    fig = patching_heatmap(res, value="effect", title="heads")
    (hm,) = fig.data
    assert res.dims == ("layer", "head")
    assert_grid(hm, res.effect)
    assert list(hm.x) == list(range(9)) and fig.layout.xaxis.title.text == "head"
    assert "head %{x}" in hm.hovertemplate and fig.layout.title.text == "heads"


def test_layer_by_position_by_head(sweeps):
    _, _, _, res = sweeps
    fig = patching_heatmap(res, value="values")
    assert res.dims == ("layer", "position", "head") and len(fig.data) == 2
    for i, trace in enumerate(fig.data):
        assert_grid(trace, res.values[:, i])
        assert list(trace.x) == [0, 2]
    titles = [a.text for a in fig.layout.annotations]
    assert titles == [f"position 0: {res.tokens[0]!r}", f"position 1: {res.tokens[1]!r}"]


def test_plot_method_and_html_export(sweeps, tmp_path):
    _, res, _, _ = sweeps
    fig = res.plot(value="values")
    assert_grid(fig.data[0], res.values)
    page = save_html(fig, tmp_path / "patching.html").read_text()
    data = json.loads(re.search(r'Plotly\.newPlot\(\s*"[^"]+",\s*(\[.*?\]),\s*\{', page, flags=re.S).group(1))
    assert data[0]["type"] == "heatmap"
    assert_grid(go.Heatmap(z=data[0]["z"]), res.values)  # the page holds the sweep's numbers
    assert all(json.dumps(repr(t)) in page for t in res.tokens)  # each token, raw, in the hover data


def test_token_labels_show_whitespace():
    assert [sl.viz.token_label(t) for t in ["\n", " Paris", "  ", "", "\t", "a b"]] == ["⏎", "·Paris", "··", "∅", "⇥", "a·b"]


def test_bad_value(sweeps):
    _, res, _, _ = sweeps
    with pytest.raises(sl.ConfigError, match=r"value='raw': expected one of \('values', 'effect', 'normalised'\)"):
        patching_heatmap(res, value="raw")
