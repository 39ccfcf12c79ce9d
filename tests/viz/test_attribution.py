"""The attribution figures hold their results' numbers: heatmap cells, scatter points, bars and lines
equal the result's grids; every trace has hover text; whitespace tokens get visible labels; they go
into one HTML report."""

from __future__ import annotations

import math

import pytest
import torch

import steerlab as sl
from steerlab.interventions.errors import ConfigError
from tests.archs import tiny_model
from tests.interventions._helpers import wrapped
from tests.interventions.test_attribution import METRIC, padded
from tests.interventions.test_subspace_attribution import basis


def _z(trace) -> torch.Tensor:
    return torch.tensor([[math.nan if v is None else v for v in row] for row in trace.z])


@pytest.fixture(scope="module")
def results():
    model = tiny_model("llama")
    base, source = padded([6, 6], 6, "left", 1), padded([6, 6], 6, "left", 2)
    S = sl.Subspace(basis(2, 32, 0), "blocks.1.resid_post", positions=-1)
    with wrapped(model) as lab:
        out = {
            "sites": sl.attribution_patching(lab, base, source, metric=METRIC, sites="blocks.*.resid_post", grad_drop=True),
            "exact": sl.sweep(lab, base, source, metric=METRIC, sites="blocks.*.resid_post"),
            "heads3": sl.attribution_patching(lab, base, source, metric=METRIC, sites="blocks.*.attn.z", heads="all", positions=[0, -1]),
            "neurons": sl.attribution_patching(lab, base, source, metric=METRIC, sites="blocks.*.mlp.post", neurons=[1, 2, 3], positions=[-1]),
            "split": sl.subspace_attribution(lab, base, S, metric=METRIC, source=source),
            "ig": sl.integrated_gradients(lab, base, source, S, metric=METRIC, steps=4),
            "lens": sl.logit_lens(lab, base, metric=METRIC),
            "dla": sl.head_logit_attribution(lab, base, metric=METRIC),
            "writes": sl.direction_logits(lab, S, k=3),
            "travel": sl.direction_effects(lab, base, S, source=source),
        }
    return out


def test_heatmaps_hold_the_grids(results):
    r = results["sites"]
    fig = r.plot()  # site grids: the sweep heatmap, drawing the estimate
    torch.testing.assert_close(_z(fig.data[0]), r.effect, equal_nan=True)
    score = r.plot(value="score")
    torch.testing.assert_close(_z(score.data[0]), r.ranking, equal_nan=True)
    assert "GradDrop" in score.layout.title.text and score.data[0].zmin == 0
    n = results["neurons"].plot()
    torch.testing.assert_close(_z(n.data[0]), results["neurons"].effect.reshape(3, -1), equal_nan=True)
    assert list(n.layout.xaxis.ticktext) == ["n1", "n2", "n3"] and n.layout.xaxis.title.text == "neuron"
    h = results["heads3"].plot()
    assert len(h.data) == 2  # one panel per position slot
    with pytest.raises(ConfigError, match="GradDrop"):
        results["heads3"].plot(value="score")
    with pytest.raises(ConfigError, match="value="):
        r.plot(value="bogus")


def test_comparison_panels_and_scatter(results):
    c = results["sites"].compare(results["exact"])
    fig = c.plot()
    est, ex, scatter, line = fig.data
    torch.testing.assert_close(_z(est), results["sites"].effect, equal_nan=True)
    torch.testing.assert_close(_z(ex), results["exact"].effect, equal_nan=True)
    assert est.zmax == ex.zmax and est.zmin == -est.zmax  # one colour scale for both
    assert list(scatter.x) == [float(x) for x in results["exact"].effect.flatten()]
    assert list(scatter.y) == [float(x) for x in results["sites"].effect.flatten()]
    assert len(scatter.text) == len(scatter.x) and all(scatter.text)
    assert f"{c.spearman:.2f}" in fig.layout.title.text and "hovertemplate" in est.to_plotly_json()


def test_subspace_and_direction_figures(results):
    split, ig, lens, dla, writes, travel = (results[k] for k in ("split", "ig", "lens", "dla", "writes", "travel"))
    f = split.plot(example=1)
    torch.testing.assert_close(_z(f.data[0]), split.inside[:, :, 1], equal_nan=True)
    torch.testing.assert_close(_z(f.data[1]), split.outside[:, :, 1], equal_nan=True)
    b = ig.plot()
    assert [float(v) for v in b.data[0].y] == pytest.approx([float(v) for v in ig.per_direction])
    assert list(b.data[1].y) == pytest.approx([float(ig.total.mean()), float(ig.exact.mean())])
    lf = lens.plot()
    torch.testing.assert_close(_z(lf.data[0]), lens.metric_values[:, :, 0], equal_nan=True)
    assert all(t.strip() for row in lf.data[0].text for t in row) and all(t.strip() for t in lf.layout.xaxis.ticktext)
    d = dla.plot()
    torch.testing.assert_close(_z(d.data[0])[:, :-1], dla.heads.mean(-1))
    torch.testing.assert_close(_z(d.data[0])[:, -1], dla.mlp.mean(-1))
    w = writes.plot()
    assert len(w.data) == 2 and sorted(w.data[0].x) == sorted([v for _, v in writes.promoted[0] + writes.suppressed[0]])
    t = travel.plot()
    assert list(t.data[0].y) == pytest.approx([float(v) for v in travel.along[0].mean(-1)])
    for fig in (f, b, lf, d, w, t):
        assert fig.layout.title.text
        assert all(getattr(tr, "hovertemplate", None) or getattr(tr, "hoverinfo", None) == "skip" for tr in fig.data)


def test_whitespace_tokens_get_visible_labels():
    from steerlab.viz.attribution import _label

    for tok in (" ", "\n", "\t", "  ", "\n\n"):
        assert _label(tok).strip(), repr(tok)
    assert _label("Paris") == "Paris" and _label(" Paris").strip() == "Paris"


def test_every_figure_goes_into_one_report(results, tmp_path):
    figs = {"estimate": results["sites"].plot(), "comparison": results["sites"].compare(results["exact"]).plot(),
            "inside": results["split"].plot(), "ig": results["ig"].plot(), "lens": results["lens"].plot(),
            "heads": results["dla"].plot(), "tokens": results["writes"].plot(), "downstream": results["travel"].plot()}
    path = sl.viz.report(figs, tmp_path / "attribution.html", title="attribution")
    text = path.read_text()
    assert text.count('class="plotly-graph-div"') == len(figs) and "attribution" in text
