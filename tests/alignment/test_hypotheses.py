"""Hypothesis testing on a network whose algorithm is known by construction: the xor network of
test_controls (coordinate 2 of its hidden layer carries A, coordinate 0 carries B)."""

from __future__ import annotations

import math

import pytest
import torch

import steerlab as sl
from steerlab.alignment import CausalModel, Hypothesis, compare_hypotheses
from steerlab.alignment.hypotheses import NULL, mcnemar_p
from steerlab.interventions.errors import CausalModelError, ConfigError
from tests.alignment.test_controls import _xor_task
from tests.reliability import one_thread_fixture

_one_thread = one_thread_fixture()
SITE = "module:layer:output"


@pytest.fixture(scope="module")
def xor():
    cm, data, lab = _xor_task()
    hyps = [Hypothesis("A is there", cm, "VA"), Hypothesis("B is there", cm, "VB"), Hypothesis("the output is there", cm, "O")]
    e2 = torch.zeros(1, 5)
    e2[0, 2] = 1.0
    sub = sl.Subspace(e2, SITE)
    return cm, data, lab, hyps, sub


def test_a_subspace_follows_its_hypothesis(xor):
    cm, data, lab, hyps, sub = xor
    res = compare_hypotheses(lab, hyps, data.encoder, site=SITE, subspace=sub, n=400, seed=1)
    assert res.hypotheses == ["A is there", "B is there", "the output is there", NULL]
    # by hand, from the input settings alone: swapping coordinate 2 answers a_source xor b_base
    bases, sources = _draws(cm, 400, 1)
    answer = torch.tensor([s["A"] ^ b["B"] for b, s in zip(bases, sources)])
    assert torch.equal(res.answers, answer)
    want = {
        "A is there": answer == answer,
        "B is there": torch.tensor([b["A"] ^ s["B"] for b, s in zip(bases, sources)]) == answer,
        "the output is there": torch.tensor([s["A"] ^ s["B"] for b, s in zip(bases, sources)]) == answer,
        NULL: torch.tensor([b["A"] ^ b["B"] for b, s in zip(bases, sources)]) == answer,
    }
    for h, c in want.items():
        assert res.iia[h].value == pytest.approx(c.float().mean().item()) and res.iia[h].n == 400
    assert res.best() == "A is there" and res.iia["A is there"].value == 1.0
    # the paired comparison with the null: only the examples whose source changes A can tell them apart
    p = res.pair("A is there", NULL)
    differ = sum(b["A"] != s["A"] for b, s in zip(bases, sources))
    assert (p.n10, p.n01, p.differ) == (differ, 0, differ)
    assert p.diff == pytest.approx(differ / 400)
    d = (want["A is there"].float() - want[NULL].float())
    assert p.se == pytest.approx(d.std().item() / 20)
    assert p.p_value == pytest.approx(2 * 0.5**differ) and p.significant
    back = res.pair(NULL, "A is there")
    assert back.diff == -p.diff and (back.n10, back.n01) == (0, differ)
    text = str(res)
    assert "a 1-dimensional subspace interchange" in text and "paired comparisons:" in text


def test_the_whole_vector_follows_the_output_hypothesis(xor):
    cm, data, lab, hyps, _ = xor
    res = compare_hypotheses(lab, hyps, data.encoder, site=SITE, n=300, seed=2, null=False)
    assert res.hypotheses == [h.name for h in hyps]
    assert res.best() == "the output is there" and res.iia["the output is there"].value == 1.0
    assert res.iia["A is there"].value < 0.9 and res.intervention == "the full-vector interchange"


def test_given_inputs_and_the_figure(xor):
    cm, data, lab, hyps, sub = xor
    bases = [{"A": a, "B": b} for a in (0, 1) for b in (0, 1)] * 2
    sources = [{"A": 1 - x["A"], "B": x["B"]} for x in bases]
    res = compare_hypotheses(lab, hyps[:2], data.encoder, site=SITE, subspace=sub, bases=bases, sources=sources)
    assert res.iia["A is there"].value == 1.0 and res.iia[NULL].value == 0.0
    fig = res.plot()
    bars = next(t for t in fig.data if t.type == "bar")
    assert list(bars.x) == res.hypotheses and list(bars.y) == [res.iia[h].value for h in res.hypotheses]
    heat = next(t for t in fig.data if t.type == "heatmap")
    assert heat.z[0][2] == pytest.approx(res.pair("A is there", NULL).diff) and heat.z[0][0] is None
    rows, pairs = res.to_pandas()
    assert list(rows["hypothesis"]) == res.hypotheses and len(pairs) == 3


def test_mcnemar_exact():
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(5, 0) == pytest.approx(2 / 32)
    # 7 against 2 in 9 discordant pairs: 2 * P(X <= 2), X ~ Binomial(9, 1/2)
    assert mcnemar_p(7, 2) == pytest.approx(2 * sum(math.comb(9, i) for i in range(3)) / 512)
    assert mcnemar_p(3, 3) == 1.0


def test_bad_hypotheses_are_refused_before_compute(xor):
    cm, data, lab, hyps, _ = xor
    other = CausalModel({"A": (0, 1), "C": (0, 1), "O": (0, 1)}, {"O": ["A", "C"]}, {"O": lambda a, c: a & c})
    calls = []
    h = lab.model.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        with pytest.raises(CausalModelError, match=r"hypothesis 'other': its inputs \['A', 'C'\] differ from \['A', 'B'\]"):
            compare_hypotheses(lab, [hyps[0], Hypothesis("other", other, "O")], data.encoder, site=SITE)
        with pytest.raises(ConfigError, match=r"hypothesis names must be distinct"):
            compare_hypotheses(lab, [hyps[0], hyps[0]], data.encoder, site=SITE)
        with pytest.raises(CausalModelError, match=r"variable 'Q' is not in causal model"):
            compare_hypotheses(lab, [Hypothesis("q", cm, "Q")], data.encoder, site=SITE)
    finally:
        h.remove()
    assert not calls


def _draws(cm, n, seed):
    import random

    rng = random.Random(seed)
    bases, sources = [], []
    for _ in range(n):
        bases.append(cm.sample_input(rng))
        sources.append(cm.sample_input(rng))
    return bases, sources
