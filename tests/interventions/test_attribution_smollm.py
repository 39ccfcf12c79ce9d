"""Attribution on SmolLM2-135M: attribution patching against exact patching per site family (France →
Paris, name mover prompts, review polarity), AtP*'s QK fix against plain AtP at the keys, and the
completeness of integrated gradients inside a DAS subspace, a random direction and a trained
LoReFT's R.

The floors are set from a measurement (CPU, fp32, this repository's code at the time of writing):
each assertion's comment gives the measured value; the floor leaves room for a different BLAS, not
for a different method. Cells that no patch changes (before the first differing token) are left out
of every correlation (see ``Comparison``).
"""

from __future__ import annotations

import pytest
import torch

import steerlab as sl
from steerlab import reft
from steerlab.alignment import DAS, tasks
from tests.reliability import one_thread_fixture

_one_thread = one_thread_fixture()

pytestmark = pytest.mark.slow

ITALY, FRANCE = "The capital of Italy is", "The capital of France is"


@pytest.fixture(scope="module")
def lab(smollm):
    model, tok = smollm
    lab = sl.wrap(model, tok)
    yield lab
    lab.unwrap()


def family(c: sl.Comparison, name: str) -> dict:
    return next(r for r in c.rows() if r["family"].startswith(name))


def test_atp_tracks_exact_patching_on_the_capital_prompts(lab):
    """France → Paris: residual stream, attention and MLP outputs (every 4th layer × every token), and
    heads at the last token; the residual stream is where the linear estimate is weakest (whole-state
    patches move far from the base), the sub-layer outputs and heads are ranked almost perfectly."""
    m = sl.metrics.logit_diff(" Paris", " Rome")
    sites = [f"blocks.{layer}.{s}" for s in ("resid_post", "attn.out", "mlp.out") for layer in range(0, 30, 4)]
    atp = sl.attribution_patching(lab, ITALY, FRANCE, metric=m, sites=sites, refine=3)
    exact = sl.sweep(lab, ITALY, FRANCE, metric=m, sites=sites)
    c = atp.compare(exact, k=5)
    print(c.table())
    assert family(c, "resid_post")["spearman"] > 0.75  # measured 0.835
    assert family(c, "attn.out")["spearman"] > 0.95  # measured 1.000
    assert family(c, "mlp.out")["spearman"] > 0.95  # measured 0.997
    assert family(c, "attn.out")["overlap"] >= 0.8 and family(c, "mlp.out")["overlap"] >= 0.8  # measured 1.0 and 1.0
    assert family(c, "resid_post")["overlap"] >= 0.2  # measured 0.4: many whole-state cells restore ~all of it (ties)
    assert c.trivial > 0 and c.cells + c.trivial == atp.effect.numel()  # the tokens before "Italy"/"France"
    for r in atp.refined():  # refine=3 patched the top cells exactly: the sweep's own numbers
        i = atp.sites.index(r["site"])
        j = [f"{k}:{t!r}" for k, t in enumerate(atp.tokens)].index(r["column"])
        assert r["exact"] == pytest.approx(float(exact.effect[i, j]), abs=1e-4)
    heads = sl.attribution_patching(lab, ITALY, FRANCE, metric=m, sites="blocks.*.attn.z", heads="all", positions=[-1])
    hx = sl.sweep(lab, ITALY, FRANCE, metric=m, sites="blocks.*.attn.z", heads="all", positions=[-1])
    ch = heads.compare(hx, k=5)
    print(ch.table())
    assert ch.spearman > 0.95 and ch.pearson > 0.95  # measured 0.996, 0.998
    assert ch.overlap >= 0.8  # measured 1.0


def test_qk_fix_corrects_key_patches_on_smollm(lab):
    """Keys of every head (all positions at once): plain AtP's Pearson correlation with the exact effects
    is 0.890 (its linear step through the softmax misjudges the largest cells); recomputing the softmax
    brings it to 0.996."""
    m = sl.metrics.logit_diff(" Paris", " Rome")
    kw = dict(metric=m, sites="blocks.*.attn.k", heads="all")
    plain = sl.attribution_patching(lab, ITALY, FRANCE, **kw)
    fixed = sl.attribution_patching(lab, ITALY, FRANCE, qk_fix=True, **kw)
    exact = sl.sweep(lab, ITALY, FRANCE, metric=m, sites="blocks.*.attn.k", heads="all")
    cp, cf = plain.compare(exact, k=5), fixed.compare(exact, k=5)
    print(cp.table(), cf.table(), sep="\n")
    assert cf.pearson > 0.98 and cf.spearman > 0.98  # measured 0.996, 0.999
    assert cf.pearson > cp.pearson + 0.05  # measured 0.890 without the fix
    assert cf.overlap >= 0.8 >= cp.overlap  # measured 1.0 vs 0.6
    assert (fixed.effect - exact.effect).abs().max() < 0.5 * (plain.effect - exact.effect).abs().max()


def test_atp_on_name_movers_and_review_polarity(lab):
    """Two other behaviours: which late heads move the indirect object's name (two prompts, the subject
    repeated vs the object repeated), and which attention and MLP outputs carry a review's polarity to
    the answer (the last four tokens)."""
    names = [("Mary", "John"), ("Anna", "David")]
    base = [f"When {a} and {b} went to the store, {b} gave a drink to" for a, b in names]
    source = [f"When {a} and {b} went to the store, {a} gave a drink to" for a, b in names]
    m = sl.metrics.logit_diff([f" {a}" for a, _ in names], [f" {b}" for _, b in names])
    sites = [f"blocks.{layer}.attn.z" for layer in range(16, 30)]
    c = sl.attribution_patching(lab, base, source, metric=m, sites=sites, heads="all", positions=[-1]).compare(
        sl.sweep(lab, base, source, metric=m, sites=sites, heads="all", positions=[-1]), k=5)
    print(c.table())
    assert c.spearman > 0.9 and c.overlap >= 0.6  # measured on layers 0-29: 0.998, 0.8
    task = tasks.sentiment(seed=0)
    pm = sl.metrics.logit_diff(task.label_tokens["positive"], task.label_tokens["negative"])
    neg = [task.template.format(noun="movie", adjective="terrible"), task.template.format(noun="food", adjective="awful")]
    pos = [task.template.format(noun="movie", adjective="wonderful"), task.template.format(noun="food", adjective="great")]
    sites = [f"blocks.{layer}.{s}" for s in ("attn.out", "mlp.out") for layer in range(0, 30, 3)]
    c = sl.attribution_patching(lab, neg, pos, metric=pm, sites=sites, positions="l4").compare(
        sl.sweep(lab, neg, pos, metric=pm, sites=sites, positions="l4"), k=5)
    print(c.table())
    assert family(c, "attn.out")["spearman"] > 0.95 and family(c, "mlp.out")["spearman"] > 0.95  # measured 0.987, 0.998
    assert family(c, "attn.out")["overlap"] >= 0.6 and family(c, "mlp.out")["overlap"] >= 0.6  # measured 0.8, 0.8


def _loreft_R(lab, task, layer: int) -> torch.Tensor:
    """The R of a rank-4 LoReFT at ``layer``'s last token, trained to answer " negative" to positive reviews."""
    model, tok = lab.model, lab.tokenizer
    torch.manual_seed(0)
    rm = reft.get_reft_model(model, reft.ReftConfig(layers=[layer], rank=4, positions="l1"), tokenizer=tok, stack=True)  # on the lab's model
    try:
        prompts = [task.template.format(noun=n, adjective=a) for n, a in
                   [("movie", "wonderful"), ("book", "great"), ("meal", "lovely"), ("show", "superb"), ("hotel", "amazing"), ("game", "brilliant")]]
        data = reft.InstructionDataset(tok, prompts, [task.label_tokens["negative"]] * len(prompts), positions="l1",
                                       chat_template=False, add_eos=False)
        res = reft.train(rm, data, epochs=10, lr=2e-2, batch_size=len(data), cache_prefix=True)
        assert res.losses[-1] < 0.1 * res.losses[0]  # measured 6.16 -> 0.026: it learned the steer
        return rm.interventions[0].R.detach().clone()
    finally:
        rm.unwrap()


def test_integrated_gradients_are_complete_inside_learned_and_random_subspaces(smollm):
    """Σ IG = metric(interchange) − metric(base) within 1e-3 of the effect (+5e-5 absolute, fp32 noise),
    with 8 Gauss-Legendre nodes, for a DAS subspace of the polarity task, a random direction and a
    LoReFT's R (measured relative errors 1.0e-5, 7e-6 absolute on an effect of 0.012, 2.4e-4)."""
    model, tok = smollm
    task = tasks.sentiment(seed=0)
    layer = 14
    pm = sl.metrics.logit_diff(task.label_tokens["positive"], task.label_tokens["negative"])
    neg = [task.template.format(noun="movie", adjective="terrible"), task.template.format(noun="food", adjective="awful")]
    pos = [task.template.format(noun="movie", adjective="wonderful"), task.template.format(noun="food", adjective="great")]
    lab = sl.wrap(model, tok, stack=True)  # the module's `lab` fixture holds the shared model too
    try:
        train, test = task.datasets(lab, n_train=32, n_test=32, seed=0)
        das = DAS(lab, site=f"blocks.{layer}.resid_post", size=4, positions="last", epochs=2, batch_size=16, controls=False).fit(train, test)
        g = torch.Generator().manual_seed(0)
        v = torch.randn(576, generator=g)
        subspaces = {
            "DAS": das.subspaces["POLARITY"],
            "random direction": sl.Subspace((v / v.norm())[None], f"blocks.{layer}.resid_post", positions=-1),
            "LoReFT R": sl.Subspace(_loreft_R(lab, task, layer), f"blocks.{layer}.resid_post", positions=-1),
        }
        for name, S in subspaces.items():
            ig = sl.integrated_gradients(lab, neg, pos, S, metric=pm, steps=8)
            print(name, ig.table())
            assert ig.exact.abs().max() > 1e-3, name  # the interchange moves the metric
            assert (ig.residual.abs() <= 1e-3 * ig.exact.abs() + 5e-5).all(), (name, ig.residual, ig.exact)
    finally:
        lab.unwrap()
