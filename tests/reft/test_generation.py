"""Steered generation: batched and left-padded like one by one, the KV cache, prompt-only vs every new token."""

from __future__ import annotations

import pytest
import torch

from steerlab import reft
from steerlab.interventions.errors import DataError
from tests.archs import tiny_model
from tests.reliability import one_thread_fixture

_one_thread = one_thread_fixture()  # one intra-op thread: much faster on a shared 2-core machine

NEW = 5


def _rm(positions="f1+l2", tied=True):
    m = tiny_model("llama")
    torch.manual_seed(3)
    rm = reft.get_reft_model(m, reft.ReftConfig(layers=[0, 2], rank=4, positions=positions, tied=tied))
    with torch.no_grad():
        for iv in rm.interventions:
            iv.weight.mul_(8)  # a strong edit, so that steering visibly changes greedy tokens
            iv.bias.add_(2)
    return rm.eval()


def _prompts():
    g = torch.Generator().manual_seed(4)
    return [torch.randint(3, 90, (n,), generator=g).tolist() for n in (7, 4, 9)]


def _left_padded(rows):
    L = max(map(len, rows))
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, L - len(r):] = torch.tensor(r)
        mask[i, L - len(r):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _gen(rm, inputs, **kw):
    return rm.generate(inputs, max_new_tokens=NEW, do_sample=False, pad_token_id=0, **kw).new_tokens


@pytest.mark.parametrize("tied", [True, False])
def test_batch_equals_one_by_one_and_steering_changes_tokens(tied):
    rm = _rm(positions="f1+l2", tied=tied)
    rows = _prompts()
    batch = _gen(rm, _left_padded(rows))
    for i, r in enumerate(rows):
        alone = _gen(rm, _left_padded([r]))
        assert torch.equal(batch[i], alone[0]), i
    # the attached model resolves each intervention's spec from the attention mask: the same positions
    attached = rm.model.generate(**_left_padded(rows), max_new_tokens=NEW, do_sample=False, pad_token_id=0)[:, -NEW:]
    assert torch.equal(attached, batch)
    with rm.disabled():
        plain = _gen(rm, _left_padded(rows))
        base = rm.model.generate(**_left_padded(rows), max_new_tokens=NEW, do_sample=False, pad_token_id=0)[:, -NEW:]
    assert not torch.equal(plain, batch)
    assert torch.equal(plain, base)  # disabled: exactly the base model


def test_kv_cache_and_no_cache_agree_with_prompt_positions():
    rm = _rm()
    inputs = _left_padded(_prompts())
    assert torch.equal(_gen(rm, inputs), _gen(rm, inputs, use_cache=False))


def test_prompt_only_interventions_do_nothing_at_decode_steps():
    rm = _rm()
    calls = []
    handles = [iv.register_forward_hook(lambda *a: calls.append(1)) for iv in rm.interventions]
    _gen(rm, _left_padded(_prompts()))
    assert len(calls) == len(rm.interventions)  # once each, at prefill
    calls.clear()
    _gen(rm, _left_padded(_prompts()), decode=True)
    assert len(calls) == len(rm.interventions) * NEW  # prefill + every step but the last token's
    for h in handles:
        h.remove()


def test_decode_true_edits_every_new_token():
    rm = _rm()
    rows = _prompts()
    inputs = _left_padded(rows)
    ours = _gen(rm, inputs, decode=True)
    assert not torch.equal(ours, _gen(rm, inputs))
    # by hand, without a cache: every step re-runs the sequence with the prompt positions and every
    # generated token edited (what the cache holds when each new token was edited as it came)
    prompt = reft.prompt_positions([len(r) for r in rows], rm.positions)[:, 0]
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    out = []
    for step in range(NEW):
        gen_pos = torch.stack([torch.arange(len(r), len(r) + step) for r in rows]) if step else torch.empty(3, 0, dtype=torch.long)
        pos = torch.cat([prompt, gen_pos], 1)
        with torch.no_grad():
            logits = rm(input_ids=ids, attention_mask=mask, intervention_positions=pos).logits[:, -1]
        nxt = logits.argmax(-1, keepdim=True)
        out.append(nxt)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    assert torch.equal(ours, torch.cat(out, 1))


def test_generation_bad_input():
    rm = _rm()
    right = _left_padded(_prompts())
    right["attention_mask"] = right["attention_mask"].flip(1)
    with pytest.raises(DataError, match="generation needs left-padded prompts"):
        rm.generate(right, max_new_tokens=2)
    with pytest.raises(DataError, match="text prompts need a tokenizer"):
        rm.generate(["hello"], max_new_tokens=2)
