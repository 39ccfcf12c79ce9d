"""Counterfactual datasets, encoders and the collator; their bad-input errors."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from steerlab.alignment import CausalModel, CounterfactualDataset, PromptEncoder, VectorEncoder, tasks
from steerlab.interventions.errors import BatchMismatch, CausalModelError, ConfigError, DataError


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from steerlab.models import embedded_path

    return AutoTokenizer.from_pretrained(embedded_path("smollm2-135m"))


@pytest.fixture(scope="module")
def equality():
    return tasks.hierarchical_equality(n_entities=64)


def rule(base, sources):
    """The hierarchical-equality counterfactual label, written out by hand."""
    wx = sources["WX"]["W"] == sources["WX"]["X"] if "WX" in sources else base["W"] == base["X"]
    yz = sources["YZ"]["Y"] == sources["YZ"]["Z"] if "YZ" in sources else base["Y"] == base["Z"]
    return wx == yz


def test_sampled_labels_follow_the_rule_and_are_balanced(equality):
    ds = equality.counterfactuals(600, seed=3)
    assert len(ds) == 600
    for ex in ds:
        assert ex.label == rule(ex.base, ex.sources)
        assert ex.base_label == ((ex.base["W"] == ex.base["X"]) == (ex.base["Y"] == ex.base["Z"]))
    sets = Counter(ex.intervened for ex in ds)
    assert sets == {("WX",): 200, ("YZ",): 200, ("WX", "YZ"): 200}
    for s in sets:  # balanced within each intervention set
        assert Counter(ex.label for ex in ds if ex.intervened == s) == {True: 100, False: 100}
    assert ds.variables == ("WX", "YZ")


def test_splits_use_disjoint_entities(equality):
    train = equality.counterfactuals(200, split="train")
    test = equality.counterfactuals(200, split="test", seed=1)

    def entities(ds):
        return {e for ex in ds for s in [ex.base, *ex.sources.values()] for e in s.values()}

    assert entities(train) <= set(equality.splits["train"])
    assert entities(test) <= set(equality.splits["test"])
    assert not entities(train) & entities(test)


def test_table_indexes_distinct_inputs(equality):
    ds = equality.counterfactuals(300, seed=5)
    t = ds.table()
    keys = [tuple(sorted(s.items())) for s in t.inputs]
    assert len(keys) == len(set(keys))
    for i, ex in enumerate(ds):
        assert t.inputs[t.base[i]] == ex.base
        for j, v in enumerate(t.variables):
            if v in ex.sources:
                assert t.inputs[t.sources[i, j]] == ex.sources[v]
            else:
                assert t.sources[i, j] == -1
        assert equality.encoder.labels[t.labels[i]] == ex.label


def test_vector_collate_rows(equality):
    ds = equality.counterfactuals(12, seed=2)
    batch = ds.collate(range(12))
    for i, ex in enumerate(ds):
        assert torch.equal(batch.base[i], equality.encoder.fn(ex.base))
        for j, v in enumerate(batch.variables):
            want = ex.sources.get(v, ex.base)  # a variable not intervened reads the base again
            assert torch.equal(batch.sources[v][i], equality.encoder.fn(want))
            assert bool(batch.intervened[i, j]) == (v in ex.sources)
    assert batch.positions is None


def test_from_pairs_length_mismatch(equality):
    cm, enc = equality.causal_model, equality.encoder
    bases = [{"W": 0, "X": 0, "Y": 1, "Z": 2}] * 3
    with pytest.raises(BatchMismatch, match=r"3 bases but 2 sources for 'WX'; expected one source \(or None\) per base"):
        CounterfactualDataset.from_pairs(cm, enc, bases, {"WX": bases[:2]})
    with pytest.raises(DataError, match=r"example 1 intervenes no variable"):
        CounterfactualDataset.from_pairs(cm, enc, bases, {"WX": [bases[0], None, bases[0]]})
    ds = CounterfactualDataset.from_pairs(cm, enc, bases, {"WX": [{"W": 3, "X": 4, "Y": 0, "Z": 0}] * 3})
    assert [ex.label for ex in ds] == [True, True, True]  # (3 = 4) = (1 = 2)


def test_intervened_variable_the_model_lacks(equality):
    with pytest.raises(CausalModelError, match=r"intervened variable 'XY' is not in hierarchical equality \(its variables: \['W', 'X', 'Y', 'Z', 'WX', 'YZ', 'O'\]\)"):
        equality.counterfactuals(10, intervene="XY")


def test_unreachable_label_raises(equality):
    # intervening O itself from a source whose O is always True: label False is unreachable
    cm = CausalModel({"A": (0, 1), "O": (True, False)}, {"O": ["A"]}, {"O": lambda a: True})
    enc = VectorEncoder(lambda s: torch.tensor([float(s["A"])]), labels=(False, True))
    with pytest.raises(CausalModelError, match=r"could not draw 10 counterfactuals intervening \['O'\] with balanced labels in 300 draws"):
        CounterfactualDataset.sample(cm, enc, 10, intervene="O", max_draws=300)


def test_prompt_collate_pads_base_and_sources_together(tokenizer):
    task = tasks.sentiment()
    ds = task.counterfactuals(16, tokenizer, seed=0)
    batch = ds.collate(range(16), positions="adjective")
    ids = batch.base["input_ids"]
    assert ids.shape == batch.sources["POLARITY"]["input_ids"].shape  # one padded length for both
    assert (batch.base["attention_mask"][:, -1] == 1).all()  # left padded: the last column is real
    for i, ex in enumerate(ds):
        lengths = batch.base["attention_mask"][i].sum()
        start = ids.shape[1] - lengths
        tok = tokenizer.decode(ids[i, start + batch.positions[i, 0]])
        assert tok.strip() == ex.base["ADJECTIVE"]
        s_ids = batch.sources["POLARITY"]["input_ids"][i]
        s_start = ids.shape[1] - batch.sources["POLARITY"]["attention_mask"][i].sum()
        assert tokenizer.decode(s_ids[s_start + batch.source_positions["POLARITY"][i, 0]]).strip() == ex.sources["POLARITY"]["ADJECTIVE"]
        assert ex.label == task.polarity[ex.sources["POLARITY"]["ADJECTIVE"]]


def test_prompt_positions_last_and_int(tokenizer):
    task = tasks.sentiment()
    enc = task.encoder(tokenizer)
    settings = [{"NOUN": "movie", "ADJECTIVE": "great"}, {"NOUN": "food", "ADJECTIVE": "awful"}]
    encoded = enc.encode(settings)
    n = int(encoded["attention_mask"][0].sum())
    assert enc.positions("last", settings, encoded).tolist() == [[n - 1], [n - 1]]
    assert enc.positions([0, -2], settings, encoded).tolist() == [[0, n - 2], [0, n - 2]]
    with pytest.raises(DataError, match=r"positions=40 are beyond example 0, which has 11 tokens"):
        enc.positions(40, settings, encoded)
    with pytest.raises(ConfigError, match=r"unknown position 'verb'; this encoder names \['last', 'adjective'\]"):
        enc.positions("verb", settings, encoded)


def test_label_tokens_must_be_single_tokens(tokenizer):
    with pytest.raises(DataError, match=r"label 'good' has token string ' mediocre', which the tokenizer splits into 3 tokens \['Ġmedi', 'oc', 're'\]; a label must be a single token"):
        PromptEncoder(tokenizer, "The {x} was", {"good": " mediocre", "bad": " bad"})
    with pytest.raises(DataError, match=r"are not distinct token ids"):
        PromptEncoder(tokenizer, "The {x} was", {"good": " bad", "bad": " bad"})


def test_position_field_must_exist(tokenizer):
    with pytest.raises(ConfigError, match=r"position 'p' = '\{nope\}' names no field of the template"):
        PromptEncoder(tokenizer, "The {x} was", {"a": " good", "b": " bad"}, positions={"p": "{nope}"})


def test_all_positions_need_equal_lengths(tokenizer):
    task = tasks.sentiment()
    cm, enc = task.causal_model, task.encoder(tokenizer)
    base = {"NOUN": "movie", "ADJECTIVE": "great"}
    ds = CounterfactualDataset.from_pairs(cm, enc, [base], {"POLARITY": [base]})
    ds.collate([0])  # equal lengths: fine
    # a template whose filled length differs between base and source
    enc2 = PromptEncoder(tokenizer, "Review: {noun} was {adjective}.", task.label_tokens,
                         fields=lambda s: {"noun": s["NOUN"], "adjective": s["ADJECTIVE"]})
    src = {"NOUN": "movie theatre long name", "ADJECTIVE": "awful"}
    cm2 = CausalModel({"NOUN": ("movie", "movie theatre long name"), "ADJECTIVE": ("great", "awful"), "POLARITY": ("positive", "negative")},
                      {"POLARITY": ["ADJECTIVE"]}, {"POLARITY": lambda a: "positive" if a == "great" else "negative"})
    ds2 = CounterfactualDataset.from_pairs(cm2, enc2, [base], {"POLARITY": [src]})
    nb = len(tokenizer("Review: movie was great.")["input_ids"])
    ns = len(tokenizer("Review: movie theatre long name was awful.")["input_ids"])
    assert nb != ns
    with pytest.raises(DataError, match=rf"example 0: the base has {nb} tokens but its source for 'POLARITY' has {ns}; an interchange at all positions"):
        ds2.collate([0])
    ds2.collate([0], positions="last")  # aligned by named positions instead: fine


def test_labels_outside_the_encoder(equality):
    enc = VectorEncoder(equality.encoder.fn, labels=("yes", "no"))
    with pytest.raises(DataError, match=r"labels \['False', 'True'\] of 'O' are not among the encoder's labels \['yes', 'no'\]"):
        CounterfactualDataset.sample(equality.causal_model, enc, 4, intervene="WX", balance=False, sampler=equality.sampler())
