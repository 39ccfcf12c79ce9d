"""The IOI task's data: templates, roles, the ABC corruption and the name split (tokenizer only)."""

from __future__ import annotations

import functools

import pytest
import torch
import transformers as T

import steerlab as sl
from steerlab.alignment.tasks import IOIDataset, IOIPrompt, ioi
from steerlab.alignment.tasks.ioi import NAMES, TEMPLATES
from steerlab.models import embedded_path


@functools.cache
def tokenizer():
    return T.AutoTokenizer.from_pretrained(embedded_path("smollm2-135m"))


def test_prompts_roles_and_corruption():
    tok = tokenizer()
    task = ioi(test_names=30, seed=3)
    assert not set(task.splits["train"]) & set(task.splits["test"]) and len(task.splits["test"]) == 30
    data = task.prompts(2 * len(TEMPLATES), tok, split="test", seed=4)
    assert {p.template for p in data.prompts} == set(range(len(TEMPLATES)))
    assert [p.order for p in data.prompts[:4]] == ["BABA", "ABBA", "BABA", "ABBA"]
    enc, bad = data.encode(), data.encode(corrupted=True)
    assert torch.equal(enc["attention_mask"], bad["attention_mask"])  # the ABC prompts keep the layout
    seq = enc["input_ids"].shape[1]
    for i, p in enumerate(data.prompts):
        assert {p.io, p.s} <= set(task.splits["test"]) and set(p.abc) <= set(task.splits["test"])
        assert len({p.io, p.s, *p.abc}) == 5  # ABC: three names, none of them the IO or S
        ids = tok(p.text).input_ids
        word = lambda role: tok.decode([ids[int(data.positions(role)[i])]])  # noqa: E731
        assert (word("IO"), word("S1"), word("S2")) == (" " + p.io, " " + p.s, " " + p.s)
        assert int(data.positions("END")[i]) == len(ids) - 1 and p.text.endswith(" to")
        first = min(int(data.positions("IO")[i]), int(data.positions("S1")[i]))
        assert first == int(data.positions("IO")[i] if p.order == "ABBA" else data.positions("S1")[i])
        assert p.text.count(p.s) == 2 and p.text.count(p.io) == 1
        assert not any(name in p.corrupted for name in (p.io, p.s))
        assert enc["input_ids"][i, seq - len(ids) :].tolist() == ids  # left-padded
    assert torch.equal(data.io_ids, torch.tensor([tok(" " + p.io).input_ids[0] for p in data.prompts]))
    assert torch.equal(data.templates, torch.tensor([p.template for p in data.prompts]))


def test_metric_reads_io_minus_s_at_the_last_token():
    tok = tokenizer()
    data = ioi().prompts(3, tok, seed=5)
    logits = torch.randn(3, 7, len(tok))
    want = logits[torch.arange(3), -1, data.io_ids] - logits[torch.arange(3), -1, data.s_ids]
    torch.testing.assert_close(data.metric(logits, None), want)
    torch.testing.assert_close(data.metric(logits.repeat(2, 1, 1), None), want.repeat(2))  # packed copies


def test_bad_settings_are_refused():
    tok = tokenizer()
    with pytest.raises(sl.ConfigError, match="test_names"):
        ioi(test_names=len(NAMES))
    with pytest.raises(sl.ConfigError, match="split"):
        ioi().prompts(2, tok, split="dev")
    with pytest.raises(sl.ConfigError, match="templates"):
        ioi(templates=(0, 99))
    with pytest.raises(sl.DataError, match="one token"):
        IOIDataset([IOIPrompt(0, "BABA", "Brittany", "John", "store", "drink", ("Mary", "Paul", "Sara"))], tok)
    with pytest.raises(sl.ConfigError, match="role"):
        ioi().prompts(2, tok).positions("S3")
