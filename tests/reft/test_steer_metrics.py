"""The steering evaluation's metrics, each against a hand computation on a tiny case."""

from __future__ import annotations

import math

import pytest
import torch

import steerlab as sl
from steerlab.reft import ReFTr1
from steerlab.reft.steer_metrics import auroc, fluency, harmonic_mean, max_projection, relevance, repetition_rate, response_perplexity


def test_repetition_harmonic_mean_fluency_and_auroc_by_hand():
    # "a b c a b c": 3-grams abc, bca, cab, abc -> 4 of which 3 distinct
    assert repetition_rate("a b c a b c") == pytest.approx(0.25)
    assert repetition_rate("A b C a B c") == pytest.approx(0.25)  # case-insensitive
    assert repetition_rate("only two") == 0.0
    assert repetition_rate("one two three four") == 0.0
    assert harmonic_mean(0.5, 1.0, 1.0) == pytest.approx(3 / (2 + 1 + 1))
    assert harmonic_mean(0.5, 0.0, 1.0) == 0.0
    assert fluency(20.0, 0.25, 10.0) == pytest.approx(0.75 * 0.5)
    assert fluency(5.0, 0.0, 10.0) == 1.0  # more fluent than the reference counts as fully fluent
    # pairs: 3>1, 3>2, 2>1, 2=2 (half) -> 3.5 / 4
    assert auroc([3.0, 2.0], [1.0, 2.0]) == pytest.approx(0.875)
    assert auroc([0.0], [1.0]) == 0.0 and auroc([1.0, 1.0], [1.0]) == 0.5
    with pytest.raises(sl.DataError):
        auroc([], [1.0])
    with pytest.raises(sl.DataError):
        fluency(0.0, 0.0, 1.0)


@pytest.fixture(scope="module")
def lab(smollm):
    model, tok = smollm
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    lab = sl.wrap(model, tok)
    yield lab
    lab.unwrap()


def test_response_perplexity_is_the_hand_computed_one(lab):
    prompts = ["Question: what is two plus two?\nAnswer:", "Say hello:"]
    responses = [" Four, of course.", " Hello there, my friend!"]
    got = response_perplexity(lab, prompts, responses, batch_size=2)  # padded together
    tok = lab.tokenizer
    for p, r, value in zip(prompts, responses, got):
        pi, ri = tok(p, add_special_tokens=False)["input_ids"], tok(r, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([pi + ri])
        with torch.no_grad():
            logp = torch.log_softmax(lab.model(input_ids=ids).logits[0].double(), -1)
        nll = -sum(float(logp[len(pi) + j - 1, t]) for j, t in enumerate(ri)) / len(ri)
        assert value == pytest.approx(math.exp(nll), rel=1e-4)
    assert response_perplexity(lab, ["Hi"], [""]) == [math.inf]


def test_relevance_is_the_cosine_of_mean_pooled_minilm_embeddings(minilm):
    model, tok = minilm
    emb = sl.wrap(model, tok)
    try:
        xs, ys = ["Explain how to make tea.", "Describe a walk in a park."], ["Boil water and steep the leaves.", "Le chat dort."]
        got = relevance(emb, xs, ys)
        for x, y, value in zip(xs, ys, got):
            vecs = []
            for t in (x, y):
                enc = tok(t, return_tensors="pt")
                with torch.no_grad():
                    h = model(**enc).last_hidden_state[0]
                vecs.append(h.mean(0))
            assert value == pytest.approx(max(0.0, float(torch.nn.functional.cosine_similarity(*vecs, dim=0))), abs=1e-5)
        assert got[0] > got[1]  # the tea answer is the relevant one
    finally:
        emb.unwrap()


def test_max_projection_is_the_largest_token_projection(lab):
    d = sl.Subspace(torch.nn.functional.normalize(torch.randn(1, 576), dim=-1), "blocks.4.resid_post")
    texts = ["A short text.", "A somewhat longer text with more tokens in it."]
    got = max_projection(lab, texts, d)
    for t, value in zip(texts, got):
        ids = lab.tokenizer(t, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            h = lab.model(input_ids=ids, output_hidden_states=True).hidden_states[5][0]
        assert float(value) == pytest.approx(float((h[1:] @ d.basis[0]).max()), abs=1e-4)


def test_reft_r1_edit_is_its_formula_and_exports_its_direction():
    torch.manual_seed(0)
    iv = ReFTr1("blocks.1.resid_post", topk=2, width=8, positions="all")
    h = torch.randn(3, 5, 8)
    v = iv.weight[0].detach() / iv.weight[0].detach().norm()
    z = torch.relu(h @ v)
    strength = z.topk(2, dim=-1).values.mean(-1)
    torch.testing.assert_close(iv(h), h + strength[:, None, None] * v)
    d = iv.direction(norm=3.0)
    torch.testing.assert_close(d.basis[0], v)
    assert d.metadata == {"method": "reft_r1", "norm": 3.0} and d.site == "blocks.1.resid_post"
    with pytest.raises(sl.ConfigError, match="rank 1"):
        ReFTr1("blocks.1.resid_post", rank=2)


def test_reft_r1_trains_saves_and_reloads_exactly(tmp_path):
    from steerlab import reft
    from tests.archs import tiny_model

    m = tiny_model("llama")
    rm = reft.get_reft_model(m, reft.ReftConfig(layers=[1], rank=1, positions="f2+l2", intervention="reft_r1"))
    ids = torch.randint(3, 90, (2, 7))
    pos = reft.prompt_positions([7, 7], "f2+l2")
    labels = ids.clone()
    w0 = rm.interventions[0].weight.detach().clone()
    opt = torch.optim.AdamW([p for p in rm.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        rm(input_ids=ids, intervention_positions=pos, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    assert not torch.equal(rm.interventions[0].weight, w0)  # the language-modelling loss reaches w
    with torch.no_grad():
        before = rm(input_ids=ids, intervention_positions=pos).logits
    rm.save_pretrained(tmp_path / "r1")
    rm.unwrap()
    loaded = reft.ReftModel.from_pretrained(tmp_path / "r1", tiny_model("llama"))
    assert loaded.interventions[0].topk == 8 and type(loaded.interventions[0]).__name__ == "ReFTr1"
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, intervention_positions=pos).logits, before)
    loaded.unwrap()
