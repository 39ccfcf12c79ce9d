"""Causal tracing against hand-run restorations, and the facts it runs on.

A tiny random LLaMA with SmolLM2's vocabulary (so the real tokenizer and the shipped facts
apply) is traced; every cell of every grid must equal a restoration done by hand with plain
PyTorch hooks: the noised embeddings the trace used (read at block 0's input in its first
forward) written into the embedding output, and the clean run's value of the component(s)
at one token written into that run. Probabilities of a random model are ~1e-5, so cells are
compared relatively (fp32 packed rows may sum in another order: <= 1e-4 relative).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import transformers as T

import steerlab as sl
from steerlab.alignment import CausalTrace, noise_scale, trace
from steerlab.alignment.causal_tracing import TOKEN_CLASSES
from steerlab.alignment.tasks import FACTS, Fact, facts, known_facts
from steerlab.models import embedded_path
from tests.interventions._helpers import hooks, read_output, replace_output, wrapped
from tests.reliability import assert_unchanged, one_thread_fixture, snapshot

_one_thread = one_thread_fixture()

FACTS3 = [
    Fact("capital", "France", "The capital of France is", "Paris"),
    Fact("x", "Eiffel Tower", "The Eiffel Tower is in the city of", "Paris"),  # a 3-token subject
    Fact("capital", "Italy", "The capital of Italy is", "Rome"),  # batched with France
]


@functools.cache
def tokenizer():
    return T.AutoTokenizer.from_pretrained(embedded_path("smollm2-135m"))


@functools.cache
def tiny_llama():
    torch.manual_seed(0)
    cfg = T.LlamaConfig(
        vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.2,
    )
    return T.AutoModelForCausalLM.from_config(cfg).eval()


def modules(model, kind: str, layer: int):
    block = model.model.layers[layer]
    return {"hidden": block, "mlp": block.mlp, "attn": block.self_attn}[kind]


def clean_outputs(model, ids) -> dict:
    """Every block's, MLP's and attention's output in the clean run."""
    store: dict = {}
    handles = [read_output(modules(model, k, L), store, (k, L)) for k in ("hidden", "mlp", "attn") for L in range(3)]
    with torch.no_grad(), hooks(*handles):
        model(input_ids=ids)
    return store


def hand_restore(model, ids, noised, target, clean: dict, restore: list[tuple[str, int]], t: int) -> torch.Tensor:
    """p(target) per noise draw (rows of ``noised``) with the embeddings replaced by ``noised``
    and each (kind, layer) output at token ``t`` taken from the clean run."""

    def splice(key):
        def fn(y):
            y = y.clone()
            y[:, t] = clean[key][:, t]
            return y

        return fn

    handles = [replace_output(model.model.embed_tokens, lambda y: noised)]
    handles += [replace_output(modules(model, k, L), splice((k, L))) for k, L in restore]
    with torch.no_grad(), hooks(*handles):
        logits = model(input_ids=ids.repeat(noised.shape[0], 1)).logits
    return logits[:, -1].softmax(-1)[:, target]


def noised_embeddings(model, lab, run) -> list[torch.Tensor]:
    """Block 0's input in every forward ``run()`` makes, first the noised base run of each batch."""
    seen: list[torch.Tensor] = []

    def grab(mod, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        seen.append(x.detach().clone())

    h = model.model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        result = run()
    finally:
        h.remove()
    return result, seen


def test_trace_equals_hand_run_restorations():
    model, tok = tiny_llama(), tokenizer()
    before = snapshot(model)
    with wrapped(model, tok) as lab:
        samples = 2
        res, seen = noised_embeddings(model, lab, lambda: trace(lab, FACTS3, window=2, samples=samples, seed=4))
    assert_unchanged(model, before, what="trace")
    assert res.kinds == ["hidden", "mlp", "attn", "mlp window", "attn window"] and res.layers == [0, 1, 2]
    # two batches (France+Italy, Eiffel): each begins with its noised base run of facts x draws rows
    pair = next(x for x in seen if x.shape[:2] == (2 * samples, 5))  # France and Italy x draws
    eiffel = next(x for x in seen if x.shape[:2] == (samples, 9))
    by_fact = {0: pair[0:2], 2: pair[2:4], 1: eiffel}
    window = {0: [0], 1: [0, 1], 2: [1, 2]}  # [L - 1, L + 1) clipped, for a 2-layer window
    checked = 0
    for i, f in enumerate(FACTS3):
        ids = torch.tensor([tok(f.prompt).input_ids])
        target = tok(f.target).input_ids[0]
        clean_values = clean_outputs(model, ids)
        for kind in res.kinds:
            base = kind.split()[0]
            for j, L in enumerate(res.layers):
                restore = [(base, l) for l in (window[L] if kind.endswith("window") else [L])]
                for t in range(ids.shape[1]):
                    want = hand_restore(model, ids, by_fact[i], target, clean_values, restore, t).mean()  # over the draws
                    torch.testing.assert_close(res.scores[kind][i][j, t], want, rtol=1e-4, atol=0)
                    checked += 1
        corrupted = hand_restore(model, ids, by_fact[i], target, clean_values, [], 0).mean()
        torch.testing.assert_close(res.corrupted[i], corrupted, rtol=1e-4, atol=0)
        with torch.no_grad():
            clean = model(input_ids=ids).logits[0, -1].softmax(-1)[target]
        torch.testing.assert_close(res.clean[i], clean, rtol=1e-5, atol=0)
    assert checked == 5 * 3 * (5 + 9 + 5)
    assert (res.clean - res.corrupted).abs().min() > 1e-7  # the noise does move the answer


def test_noise_sits_on_the_subject_at_three_embedding_stds():
    model, tok = tiny_llama(), tokenizer()
    with wrapped(model, tok) as lab:
        f = FACTS3[1]
        res, seen = noised_embeddings(model, lab, lambda: trace(lab, [f], kinds=["hidden"], window=None, layers=[2], samples=64))
        ids = torch.tensor([tok(f.prompt).input_ids])
        emb = model.model.embed_tokens(ids)[0].detach()
        scale = noise_scale(lab, [f])
    subject = f.subject_tokens(tok)
    assert [tok.decode([ids[0, i]]) for i in subject] == [" E", "iffel", " Tower"]
    eps = next(x for x in seen if x.shape[0] == 64) - emb  # the base run: 64 draws
    outside = [i for i in range(ids.shape[1]) if i not in subject]
    assert eps[:, outside].abs().max() == 0
    sigma = float(emb[subject].std())  # by hand: the std of the subject tokens' embeddings
    assert scale == pytest.approx(sigma, rel=1e-6)
    assert res.noise_std == pytest.approx(3 * sigma, rel=1e-6)
    assert float(eps[:, subject].std()) == pytest.approx(3 * sigma, rel=0.05)  # 64 x 3 x 32 draws
    assert float(eps[:, subject].mean()).__abs__() < 0.05 * 3 * sigma
    assert not torch.equal(eps[0], eps[1])  # each draw its own noise


def test_token_classes_of_the_average():
    """ROME's classes on a known layout: subject tokens 1..3 of 7 (middle = 2; further = 5), and
    a one-token subject right before the last token (first = last subject; first after = last)."""
    fs = [Fact("r", "a b c", "x a b c d e f", "y"), Fact("r", "a", "x a z", "y")]
    ie0 = torch.arange(14, dtype=torch.float).view(2, 7)  # [layer, pos]
    ie1 = torch.tensor([[100.0, 200.0, 300.0], [400.0, 500.0, 600.0]])
    res = CausalTrace(
        facts=fs, tokens=[list("xabcdef"), list("xaz")], subjects=[[1, 2, 3], [1]], layers=[0, 1], window=None,
        clean=torch.tensor([1.0, 1.0]), corrupted=torch.tensor([0.0, 0.0]), scores={"hidden": [ie0, ie1]}, noise_std=1.0,
        samples=1,
    )
    avg = res.average("hidden")
    want = torch.tensor([
        [(1 + 200) / 2, (8 + 500) / 2],  # first subject token
        [2, 9],  # middle: fact 0 only
        [(3 + 200) / 2, (10 + 500) / 2],  # last subject token
        [(4 + 300) / 2, (11 + 600) / 2],  # first subsequent (fact 1: the last token)
        [5, 12],  # further tokens
        [(6 + 300) / 2, (13 + 600) / 2],  # last token
    ])
    torch.testing.assert_close(avg, want)
    assert res.peak("hidden", "last token") == (1, pytest.approx(306.5))
    assert res.ate == 1.0
    text = res.table()
    assert "last subj" in text and len(text.splitlines()) == 3 + 2  # a header, the kind, the columns, two layers
    fig = res.plot()
    assert [list(map(float, r)) for r in fig.data[0].z] == avg.tolist()
    one = res.plot(fact=0)
    assert list(one.data[0].z[2]) == ie0[:, 2].tolist() and one.layout.yaxis.ticktext[1] == "'a'*"


def test_bad_arguments_are_refused_before_compute():
    model, tok = tiny_llama(), tokenizer()
    before = snapshot(model)
    calls = []
    h = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        with wrapped(model, tok) as lab:
            for kwargs, err, match in [
                ({"kinds": ["mlp", "resid"]}, sl.ConfigError, "kinds"),
                ({"window": 0}, sl.ConfigError, "window"),
                ({"layers": [0, 3]}, sl.ConfigError, "layers"),
                ({"samples": 0}, sl.ConfigError, "samples"),
                ({"noise": -1.0}, sl.ConfigError, "noise"),
            ]:
                with pytest.raises(err, match=match):
                    trace(lab, FACTS3, **kwargs)
            with pytest.raises(sl.DataError, match="Fact"):
                trace(lab, [])
            with pytest.raises(sl.DataError, match="not one token"):
                trace(lab, [Fact("r", "France", "The capital of France is", "Parisian metropolis")])
            with pytest.raises(sl.DataError, match="covers its subject"):
                Fact("r", "", "The capital", "x").subject_tokens(tok)
        assert calls == []
    finally:
        h.remove()
    assert_unchanged(model, before, what="refused traces")


def test_shipped_facts_are_well_formed():
    tok = tokenizer()
    assert len(FACTS) >= 300 and len(set((f.prompt, f.answer) for f in FACTS)) == len(FACTS)
    for f in FACTS:
        assert len(tok(f.target).input_ids) == 1, f  # one-token answers
        covered = tok.decode([tok(f.prompt).input_ids[i] for i in f.subject_tokens(tok)])
        assert f.subject in covered, f
    assert facts("capital") and all(f.relation == "capital" for f in facts("capital"))
    with pytest.raises(sl.ConfigError, match="unknown"):
        facts("capitals")


@pytest.mark.slow
def test_known_facts_match_greedy_decoding(smollm):
    """SmolLM2 on one relation, the prompts padded in one batch: kept = the prompts whose greedy
    first token is the answer, checked one prompt at a time with plain transformers (no padding)."""
    model, tok = smollm
    cands = facts("creator")
    with wrapped(model, tok) as lab:
        known = known_facts(lab, cands)
    want = []
    with torch.no_grad():
        for f in cands:
            logits = model(**tok(f.prompt, return_tensors="pt")).logits[0, -1]
            want.append(tok.decode([int(logits.argmax())]) == f.target)
    assert known.correct == want
    assert 0.5 < known.rate < 1.0 and not known.skipped  # SmolLM2 knows most of these authors, not all
    assert known.by_relation() == {"creator": (sum(want), len(cands))}
    assert math.isclose(sum(known.correct) / len(cands), known.rate) and len(known.kept) == sum(want)
    i = want.index(True)
    assert known.probabilities[i] > 1 / 49152 and known.predictions[i] == cands[i].target
