"""Attribution inside a subspace, integrated gradients along the interchange path, the logit lens and
direct logit attribution, on tiny models, each against a computation written here by hand."""

from __future__ import annotations

import pytest
import torch

import steerlab as sl
from steerlab.interventions.errors import ConfigError, SubspaceSizeError
from tests.archs import tiny_model
from tests.interventions._helpers import hook_counts, hooks, real_index, replace_output, wrapped
from tests.interventions.test_attribution import METRIC, padded


def basis(k: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, k, generator=g))[0].T.contiguous()


def test_subspace_split_adds_up_to_attribution_patching_and_to_hand_gradient_times_activation():
    """inside + outside = the AtP estimate of each layer × position; Σ directions = inside; and without a
    source, inside = (R h)·(R g) with h and g taken by hand."""
    model = tiny_model("llama")
    base, source = padded([6, 4], 6, "left", 1), padded([6, 4], 6, "right", 2)
    S = sl.Subspace(basis(3, 32, 0), "blocks.1.resid_post", positions=-1)
    with wrapped(model) as lab:
        patch = sl.subspace_attribution(lab, base, S, metric=METRIC, source=source)
        atp = sl.attribution_patching(lab, base, source, metric=METRIC, sites="blocks.*.resid_post", positions=list(range(4)))
        gxa = sl.subspace_attribution(lab, base, S, metric=METRIC, layers=[2])
    torch.testing.assert_close(patch.total[:, :4].permute(0, 1, 2), atp.per_example[:, :, 0] - atp.base_metric, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(patch.directions.sum(2), patch.inside, equal_nan=True)
    assert patch.inside[:, 4:, 1].isnan().all() and not patch.inside[:, :, 0].isnan().any()  # past example 1's end
    assert patch.mode == "patch" and gxa.mode == "gradient×activation" and gxa.layers == [2]
    for p in model.parameters():
        p.requires_grad_(False)
    leaf = {}

    def add(x):
        leaf["g"] = torch.zeros_like(x, requires_grad=True)
        leaf["h"] = x.detach()
        return x + leaf["g"]

    try:
        with hooks(replace_output(model.model.layers[2], add)):
            (g,) = torch.autograd.grad(METRIC(model(**base).logits, base).sum(), leaf["g"])
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
    R = S.basis
    for i in range(2):
        for q in range(4 if i else 6):
            j = real_index(base["attention_mask"], i, q)
            h, gg = leaf["h"][i, j], g[i, j]
            torch.testing.assert_close(gxa.inside[0, q, i], (R @ h) @ (R @ gg), atol=1e-7, rtol=1e-5)
            torch.testing.assert_close(gxa.total[0, q, i], h @ gg, atol=1e-7, rtol=1e-5)
    fig = patch.plot(example=1)
    assert [len(t.x) for t in fig.data] == [4, 4] and "complement" in fig.layout.annotations[1].text
    assert "'" in patch.table(example=1)


@pytest.mark.parametrize("case", ["resid", "heads", "kl"])
def test_integrated_gradients_are_complete(case):
    """Σ IG = metric(full interchange) − metric(base) within the quadrature error, for a residual
    subspace, a per-head subspace at attn.z (two heads, two positions) and the KL to the base run;
    the endpoint is the SubspaceInterchange itself; chunking does not change the numbers."""
    model = tiny_model("llama")
    base, source = padded([6, 4], 6, "left", 1), padded([6, 5], 6, "right", 2)
    if case == "heads":
        S = sl.Subspace(basis(2, 8, 1), "blocks.1.attn.z", positions=[0, -1], heads=[1, 3])
    else:
        S = sl.Subspace(basis(4, 32, 2), "blocks.0.resid_post", positions=[1, -1])
    metric = sl.metrics.kl_to_base() if case == "kl" else METRIC
    with wrapped(model) as lab:
        ig = sl.integrated_gradients(lab, base, source, S, metric=metric, steps=12)
        chunked = sl.integrated_gradients(lab, base, source, S, metric=metric, steps=12, chunk=5)
        iv = S.intervention(source=source)
        base_out = lab.run(base).output
        full = lab.run(base, [iv]).output
    m = metric.against(base_out, base) if case == "kl" else metric
    want = m(full, base) - m(base_out, base)
    torch.testing.assert_close(ig.exact, want, atol=1e-6, rtol=1e-4)
    assert ig.exact.abs().min() > 1e-4
    assert ig.residual.abs().max() <= 1e-3 * ig.exact.abs().max(), (ig.residual, ig.exact)
    assert ig.completeness() < 1e-3
    torch.testing.assert_close(chunked.attributions, ig.attributions, atol=1e-7, rtol=1e-5)
    assert ig.attributions.shape == (2, 2, S.size)
    assert "completeness" in ig.table() and len(ig.plot().data) == 2


def test_integrated_gradients_converge_and_beat_the_gradient_at_the_base():
    """More Gauss-Legendre nodes never make completeness worse here, and with one node IG is the
    midpoint rule; bad steps are refused."""
    model = tiny_model("llama")
    base, source = padded([6, 6], 6, "left", 1), padded([6, 6], 6, "left", 2)
    S = sl.Subspace(basis(4, 32, 3), "blocks.0.resid_post", positions=[-1])
    with wrapped(model) as lab:
        errs = [sl.integrated_gradients(lab, base, source, S, metric=METRIC, steps=n).residual.abs().max() for n in (1, 2, 8)]
        with pytest.raises(ConfigError, match="steps"):
            sl.integrated_gradients(lab, base, source, S, metric=METRIC, steps=0)
        with pytest.raises(SubspaceSizeError, match="width"):
            sl.integrated_gradients(lab, base, source, sl.Subspace(basis(2, 48, 0), "blocks.0.mlp.post"), metric=METRIC)
    assert errs[2] <= errs[1] + 1e-7 and errs[2] < errs[0]


def test_logit_lens_matches_the_model_and_a_hand_read_out():
    model = tiny_model("llama")
    base = padded([6, 4], 6, "left", 1)
    with wrapped(model) as lab:
        lens = sl.logit_lens(lab, base, metric=METRIC, k=3)
        logits = lab.run(base).logits
        h1 = lab.collect(base, "blocks.1.resid_post")["blocks.1.resid_post"]
    with torch.no_grad():
        hand = model.lm_head(model.model.norm(h1))
    for i in range(2):
        for q in range(4 if i else 6):
            j = real_index(base["attention_mask"], i, q)
            top = logits[i, j].topk(3)
            assert lens.top_ids[-1, i, q].tolist() == top.indices.tolist()
            torch.testing.assert_close(lens.metric_values[-1, q, i], logits[i, j, 5] - logits[i, j, 7], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(lens.metric_values[1, q, i], hand[i, j, 5] - hand[i, j, 7], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(lens.top_probs[1, i, q], hand[i, j].softmax(-1).topk(3).values, atol=1e-6, rtol=1e-5)
    assert lens.metric_values[:, 4:, 1].isnan().all()
    fig = lens.plot(example=1)
    assert len(fig.data[0].x) == 4 and all(t for row in fig.data[0].text for t in row)
    with pytest.raises(ConfigError, match="residual-stream"):
        sl.logit_lens(sl.wrap(model), base, sites="blocks.*.mlp.post")


def test_direct_logit_attribution_adds_up_and_matches_by_hand():
    """Per-head direct effects sum with the MLPs' and the embedding's to the logit difference itself
    (LLaMA has no biases); a head's part is its slice of o_proj; a direction's logits are
    W_U (γ ⊙ r / σ) by hand; a patched direction moves the site by exactly its coefficient."""
    model = tiny_model("llama")
    base, source = padded([6, 4], 6, "left", 1), padded([6, 4], 6, "left", 2)
    S = sl.Subspace(basis(2, 32, 4), "blocks.1.resid_post", positions=-1)
    before = hook_counts(model)
    with wrapped(model) as lab:
        dla = sl.head_logit_attribution(lab, base, metric=METRIC)
        z = lab.collect(base, "blocks.2.attn.z", positions=-1)["blocks.2.attn.z"][:, 0]
        last = lab.collect(base, "blocks.2.resid_post", positions=-1)["blocks.2.resid_post"][:, 0]
        dirs = sl.direction_logits(lab, S, inputs=base, k=4)
        eff = sl.direction_effects(lab, base, S, source=source, metric=METRIC)
        add = sl.direction_effects(lab, base, S, scale=2.0)
        first = lab.run(base, [sl.Add("blocks.1.resid_post", eff.coefficient[0, 0] * S.basis[0], positions=-1)])
    assert hook_counts(model) == before
    torch.testing.assert_close(dla.rest, torch.zeros(2), atol=2e-5, rtol=0)
    assert dla.heads.abs().max() > 1e-3
    W, g = model.lm_head.weight, model.model.norm.weight
    eps = model.model.norm.variance_epsilon
    sigma = (last.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    u = W[5] - W[7]
    o = model.model.layers[2].self_attn.o_proj.weight  # [d, heads*d_head]
    for h in range(4):
        c = z[:, h] @ o[:, h * 8 : (h + 1) * 8].T
        torch.testing.assert_close(dla.heads[2, h], ((u * g) * c / sigma).sum(-1), atol=1e-6, rtol=1e-4)
    want = (W @ (g * S.basis[0] / sigma.mean())).detach()
    assert [t for t, _ in dirs.promoted[0]] == [str(int(i)) for i in want.topk(4).indices]
    assert dirs.promoted[0][0][1] == pytest.approx(float(want.max()), rel=1e-4)
    assert dirs.suppressed[0][0][1] == pytest.approx(float(want.min()), rel=1e-4)
    torch.testing.assert_close(eff.along[:, 0], eff.coefficient, atol=1e-5, rtol=1e-4)  # at the site itself
    torch.testing.assert_close(eff.norm[:, 0], eff.coefficient.abs(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(add.along[:, 0], torch.full((2, 2), 2.0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eff.metric_change[0, 0], METRIC(first, base)[0] - METRIC(model(**base).logits, base)[0], atol=1e-5, rtol=1e-4)
    assert eff.layers == [1, 2] and len(eff.plot().data) == 4 and len(dirs.plot().data) == 2 and dla.plot().data[0].z
    assert len(dla.top(3)) == 3 and "rest" in dla.table()
