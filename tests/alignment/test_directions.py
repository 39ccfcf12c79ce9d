"""Direction finders on SmolLM2 against hand-run forwards (``output_hidden_states``, one text at a time, no padding)."""

from __future__ import annotations

import random

import pytest
import torch

import steerlab as sl
from steerlab.alignment import directions
from steerlab.reft import steering_add
from steerlab.reft.steer_metrics import auroc, max_projection

LAYER = 6
SITE = f"blocks.{LAYER}.resid_post"
POS = ["Le chat dort sur le canapé.", "Nous partons demain matin.", "Il fait très beau aujourd'hui.", "Je lis un livre le soir."]
NEG = ["The cat sleeps on the sofa.", "We leave tomorrow morning.", "The weather is lovely today.", "I read a book at night."]
HELD_POS = ["Elle boit un café chaud.", "Les enfants jouent dans le jardin.", "Mon frère habite à Paris depuis longtemps."]
HELD_NEG = ["She drinks a hot coffee.", "The children play in the garden.", "My brother has lived in London for years."]


@pytest.fixture(scope="module")
def lab(smollm):
    model, tok = smollm
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    lab = sl.wrap(model, tok)
    yield lab
    lab.unwrap()


def _hidden(lab, text: str) -> torch.Tensor:
    """The block-LAYER output for every token of ``text``, by a plain forward (no hooks, no padding)."""
    ids = lab.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hs = lab.model(input_ids=ids, output_hidden_states=True).hidden_states
    return hs[LAYER + 1][0].float()  # hidden_states[0] is the embedding output


def test_diff_mean_is_the_hand_computed_mean_difference(lab):
    d = directions.diff_mean(lab, SITE, POS, NEG)
    pos = torch.cat([_hidden(lab, t)[1:] for t in POS])
    neg = torch.cat([_hidden(lab, t)[1:] for t in NEG])
    diff = pos.mean(0) - neg.mean(0)
    assert d.site == SITE and d.size == 1 and d.metadata["method"] == "diffmean"
    torch.testing.assert_close(d.basis[0], diff / diff.norm(), atol=2e-5, rtol=1e-4)
    assert d.metadata["scale"] == pytest.approx(float(diff.norm()), rel=1e-4)
    assert d.metadata["norm"] == pytest.approx(float(torch.cat([pos, neg]).norm(dim=-1).median()), rel=1e-4)


def test_caa_and_actadd_are_hand_run_activation_differences(lab):
    items = directions.ab_questions("Which text is in French?", POS, NEG, seed=3)
    assert {m for _, m, _ in items} == {"A", "B"} or len(items) < 3  # the letter carries no signal
    for prompt, match, other in items:
        chosen = prompt.split(f"({match}) ")[1].split("\n")[0]
        assert chosen in POS  # the matching letter names the positive example
    v = directions.caa(lab, SITE, items)
    hand = torch.stack([_hidden(lab, p + m)[-1] - _hidden(lab, p + o)[-1] for p, m, o in items]).mean(0)
    torch.testing.assert_close(v.basis[0], hand / hand.norm(), atol=2e-5, rtol=1e-4)
    a = directions.actadd(lab, SITE, "Love", "Hate")
    hand = _hidden(lab, "Love")[-1] - _hidden(lab, "Hate")[-1]
    torch.testing.assert_close(a.basis[0], hand / hand.norm(), atol=2e-5, rtol=1e-4)
    assert a.metadata["scale"] == pytest.approx(float(hand.norm()), rel=1e-4)


def test_pca_is_the_first_component_of_the_sign_flipped_paired_differences(lab):
    d = directions.pca(lab, SITE, POS, NEG, seed=5)
    pos = torch.stack([_hidden(lab, t)[1:].mean(0) for t in POS]).double()
    neg = torch.stack([_hidden(lab, t)[1:].mean(0) for t in NEG]).double()
    rng = random.Random(5)
    diffs = (pos - neg) * torch.tensor([rng.choice((-1.0, 1.0)) for _ in POS], dtype=torch.float64)[:, None]
    diffs = diffs - diffs.mean(0)
    # the top eigenvector of the scatter matrix, by power iteration (independent of the SVD the code uses)
    scatter = diffs.T @ diffs
    v = torch.ones(scatter.shape[0], dtype=torch.float64)
    for _ in range(500):
        v = scatter @ v
        v = v / v.norm()
    assert abs(float(v.float() @ d.basis[0])) > 0.999
    assert float(pos.float().mean(0) @ d.basis[0]) > float(neg.float().mean(0) @ d.basis[0])  # oriented to the positives


def test_probe_separates_held_out_texts_and_every_direction_detects(lab):
    found = {
        "probe": directions.probe(lab, SITE, POS, NEG),
        "diffmean": directions.diff_mean(lab, SITE, POS, NEG),
    }
    assert found["probe"].metadata["train_accuracy"] == 1.0
    for name, d in found.items():
        score = auroc(max_projection(lab, HELD_POS, d), max_projection(lab, HELD_NEG, d))
        assert score >= 0.8, (name, score)  # French vs English at layer 6 is easy; a wrong sign would give ~0


def test_add_at_factor_zero_is_the_unsteered_model_exactly(lab):
    d = directions.diff_mean(lab, SITE, POS, NEG)
    prompts = ["The weather today is", "My favourite food is"]
    plain = lab.generate(prompts, max_new_tokens=6, do_sample=False)
    zero = lab.generate(prompts, [steering_add(d, 0.0)], decode=True, max_new_tokens=6, do_sample=False)
    assert torch.equal(plain.sequences, zero.sequences)
    enc = dict(lab.tokenizer(prompts, return_tensors="pt", padding=True))
    assert torch.equal(lab.run(enc).logits, lab.run(enc, [steering_add(d, 0.0)]).logits)
    steered = lab.run(enc, [steering_add(d, 0.8)]).logits
    assert not torch.allclose(steered, lab.run(enc).logits)  # and a non-zero factor does change it
    iv = steering_add(d, 0.5)
    torch.testing.assert_close(iv.vector * iv.alpha, 0.5 * d.metadata["norm"] * d.basis[0])


def _hooks(model) -> dict:
    return {n: (list(m._forward_hooks), list(m._forward_pre_hooks)) for n, m in model.named_modules()}


def test_bad_input_is_refused_before_compute(lab):
    before = _hooks(lab.model)  # transformers keeps its own hooks once output_hidden_states was asked for
    with pytest.raises(sl.DataError, match="positives"):
        directions.diff_mean(lab, SITE, [], NEG)
    with pytest.raises(sl.SiteNotFound):
        directions.diff_mean(lab, "blocks.99.resid_post", POS, NEG)
    with pytest.raises(sl.DataError, match="at least 2 pairs"):
        directions.pca(lab, SITE, POS[:1], NEG[:1])
    with pytest.raises(sl.DataError, match="caa items"):
        directions.caa(lab, SITE, [("only a prompt",)])
    two = sl.Subspace(torch.eye(2, 576), SITE)
    with pytest.raises(sl.ConfigError, match="size 1"):
        steering_add(two, 1.0)
    assert _hooks(lab.model) == before
