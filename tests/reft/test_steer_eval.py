"""The evaluation loop on SmolLM2 with tiny generations: factor chosen on validation, scores recomputed by hand."""

from __future__ import annotations

import math

import pytest
import torch

import steerlab as sl
from steerlab.alignment import directions
from steerlab.reft import ConceptSplit, Contender, GenerationSettings, JudgeCheck, SteerEvalResult, evaluate
from steerlab.reft.judges import LanguageJudge
from steerlab.reft.steer_metrics import auroc, harmonic_mean, max_projection

FR = ["Le chat dort sur le canapé.", "Nous partons demain matin.", "Il fait très beau aujourd'hui.", "Je lis un livre le soir."]
EN = ["The cat sleeps on the sofa.", "We leave tomorrow morning.", "The weather is lovely today.", "I read a book at night."]
SPLIT = ConceptSplit(FR, EN, ["Elle boit un café chaud.", "Les enfants jouent dehors."], ["She drinks a hot coffee.", "The children play outside."],
                     ["Describe a walk."], ["Describe your ideal weekend.", "Explain how to make tea."], ["Write a note to a friend.", "Describe a market."])
SETTINGS = GenerationSettings(max_new_tokens=6, batch_size=8)


@pytest.fixture(scope="module")
def labs(smollm, minilm):
    model, tok = smollm
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    lab, emb = sl.wrap(model, tok), sl.wrap(*minilm)
    yield lab, emb
    lab.unwrap()
    emb.unwrap()


@pytest.fixture(scope="module")
def run(labs):
    lab, emb = labs
    judge = LanguageJudge("fr")
    check = judge.check(FR + EN, [1] * 4 + [0] * 4, "tiny French vs English")
    d = directions.diff_mean(lab, "blocks.8.resid_post", FR, EN)
    contenders = [
        Contender.direction(lab, "diffmean", d, (0.0, 0.6), positions="both"),
        Contender.direction(lab, "zero", d, (0.0,), positions="both"),
        Contender.direction(lab, "prompt-only", d, (0.6,), positions="prompt"),
        Contender.prompt(lab, "Always answer in French."),
    ]
    before = _hooks(lab.model)
    result = evaluate(lab, "french", SPLIT, contenders, judge, embedder=emb, judge_checks=[check], settings=SETTINGS, progress=False)
    assert _hooks(lab.model) == before  # every generation, scoring and detection call removed its hooks
    return result, d


def _hooks(model) -> dict:
    return {n: (list(m._forward_hooks), list(m._forward_pre_hooks)) for n, m in model.named_modules()}


def _rows(result, **match):
    return [r for r in result.rows if all(r[k] == v for k, v in match.items())]


def test_the_factor_is_chosen_on_validation_and_reported_on_test(run):
    result, _ = run
    val = {f: [r["hm"] for r in _rows(result, method="diffmean", split="val", factor=f)] for f in (0.0, 0.6)}
    assert all(len(v) == 2 for v in val.values())
    means = {f: sum(v) / len(v) for f, v in val.items()}
    chosen = 0.6 if means[0.6] > means[0.0] else 0.0  # ties go to the smaller factor
    test = _rows(result, method="diffmean", split="test")
    assert [r["factor"] for r in test] == [chosen, chosen] and all(r["selected"] for r in test)
    assert {r["instruction"] for r in test} == set(SPLIT.test_instructions)  # never the validation ones
    for r in result.rows:
        assert r["hm"] == pytest.approx(harmonic_mean(r["concept_score"], r["relevance"], r["fluency"]))
        assert r["concept"] == "french" and 0.0 <= r["concept_score"] <= 1 and 0.0 <= r["relevance"] <= 1 and 0.0 <= r["fluency"] <= 1


def test_factor_zero_generates_the_unsteered_text_and_a_factor_changes_it(run):
    result, _ = run
    none = [r["response"] for r in _rows(result, method="none", split="test")]
    assert [r["response"] for r in _rows(result, method="zero", split="test")] == none
    assert [r["response"] for r in _rows(result, method="prompt-only", split="test")] != none
    # the unsteered responses' own fluency is relative to their geometric mean perplexity
    ppl = [r["perplexity"] for r in _rows(result, method="none", split="test")]
    ref = math.exp(sum(map(math.log, ppl)) / len(ppl))
    for r in _rows(result, method="none", split="test"):
        assert r["fluency"] == pytest.approx((1 - r["repetition"]) * min(1.0, ref / r["perplexity"]))


def test_detection_auroc_is_recomputed_from_max_pooled_projections(run, labs):
    result, d = run
    lab, _ = labs
    rec = [x for x in result.detection if x["method"] == "diffmean"][0]
    want = auroc(max_projection(lab, SPLIT.test_positives, d), max_projection(lab, SPLIT.test_negatives, d))
    assert rec["auroc"] == pytest.approx(want) and rec["n_pos"] == 2
    assert not [x for x in result.detection if x["method"] == "prompt"]  # prompting has no direction


def test_result_views_figures_and_file_round_trip(run, tmp_path):
    result, _ = run
    table = result.table()
    assert "diffmean" in table and "judges: french 1.000" in table
    cells = {c["method"]: c for c in result.cells()}
    test_hm = [r["hm"] for r in _rows(result, method="prompt", split="test")]
    assert cells["prompt"]["hm"] == pytest.approx(sum(test_hm) / len(test_hm))
    assert "| french (1.00) | diffmean |" in result.markdown()
    figs = [result.plot("table"), result.plot("sweep"), result.plot("auroc")]
    assert len(figs[0].data[0].y) == len(result.methods)
    assert {t.name for t in figs[1].data} == {"diffmean"}  # only swept methods have curves
    result.save(tmp_path / "r")
    again = SteerEvalResult.load(tmp_path / "r")
    assert again.table() == table and again.rows == result.rows
    split = result.time_split()
    assert split["generation_s"] > 0 and split["judging_s"] > 0


def test_a_judge_below_the_floor_drops_the_concept(labs):
    lab, emb = labs
    weak = JudgeCheck("coin", "labelled text", 6, 10)
    calls = []
    c = Contender.custom("spy", lambda xs, s: calls.append(xs) or ["x"] * len(xs))
    result = evaluate(lab, "french", SPLIT, [c], LanguageJudge("fr"), embedder=emb, judge_checks=[weak], settings=SETTINGS, progress=False)
    assert "french" in result.dropped and "0.600" in result.dropped["french"] and not calls and not result.rows
    assert "dropped french" in result.table()


def test_bad_input_and_a_clean_model_after(labs):
    lab, emb = labs
    before = _hooks(lab.model)
    with pytest.raises(sl.ConfigError, match="positions"):
        Contender.interventions(lab, "x", lambda f: [], (1.0,), positions="everywhere")
    with pytest.raises(sl.ConfigError, match="factors"):
        Contender("x", lambda *a: [], ())
    c = Contender.custom("dup", lambda xs, s: xs)
    with pytest.raises(sl.ConfigError, match="repeat"):
        evaluate(lab, "french", SPLIT, [c, c], LanguageJudge("fr"), embedder=emb, settings=SETTINGS, progress=False)
    assert _hooks(lab.model) == before
    ids = lab.tokenizer(["Hello there"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(lab.model(input_ids=ids).logits, lab.run(ids).logits)


def test_the_comparison_trains_reft_methods_on_the_model_its_lab_holds():
    """``steering.compare`` keeps one lab for the whole run and trains ReFT-r1 / LoReFT on the same model:
    each ReftModel stacks on the lab (the benchmark's full run raised AlreadyWrapped before), and unwrapping
    it gives the model back to the lab exactly as it was."""
    from steerlab.reft import LoReFT
    from steerlab.steering import _reft_model
    from tests.archs import tiny_model
    from tests.reliability import snapshot

    model = tiny_model("llama")
    before = snapshot(model)
    lab = sl.wrap(model)
    ids = torch.tensor([[3, 5, 7, 9]])
    plain = lab.run({"input_ids": ids}).logits
    rm = _reft_model(lab, [LoReFT("blocks.1.resid_post", rank=2, positions="l1")])
    with torch.no_grad():
        for p in rm.interventions[0].parameters():
            p.normal_()
    assert not torch.equal(rm(input_ids=ids).logits, plain)
    rm.unwrap()
    assert torch.equal(lab.run({"input_ids": ids}).logits, plain)
    lab.unwrap()
    from tests.reliability import assert_unchanged

    assert_unchanged(model, before, what="a ReftModel stacked on the comparison's lab, then both unwrapped")
