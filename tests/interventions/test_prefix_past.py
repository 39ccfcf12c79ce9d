"""Prefix.past: a forward resumed after cached positions equals the full forward (7 architectures)."""

from __future__ import annotations

import pytest
import torch

import steerlab as sl
from steerlab.interventions.errors import ConfigError, ShapeMismatch, UnitError
from tests.archs import tiny_inputs, tiny_model
from tests.reliability import assert_unchanged, one_thread_fixture, snapshot

_one_thread = one_thread_fixture()

ARCHS = ["llama", "qwen2", "gpt2", "gemma", "phi3", "olmo2", "gpt_neox"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("layer", [1, 2])
def test_resumed_suffix_equals_the_full_forward(arch, layer):
    model = tiny_model(arch)
    lab = sl.wrap(model)
    base = tiny_inputs(arch, batch=3, seq=7, pad=2, side="left", seed=1)
    src = tiny_inputs(arch, batch=3, seq=7, pad=1, side="left", seed=2)
    site = f"blocks.{layer}.resid_post"
    sv = lab.source_value(sl.Interchange(site, positions=[-2, -1], source=src))
    full = lab.run(base, [sl.Interchange(site, positions=[-2, -1], source=sv)]).logits[:, -2:]
    before = snapshot(model)
    for start, from_prefix in ((5, False), (4, True)):
        prefix = lab.prefix(base, layer)
        past = lab.past(base, start, prefix=prefix if from_prefix else None)
        resumed = prefix.after(past)
        assert resumed.start == start and resumed.hidden.shape[1] == 7 - start
        suffix = {"input_ids": base["input_ids"][:, start:], "attention_mask": base["attention_mask"]}
        out = lab.run(suffix, [sl.Interchange(site, positions=[-2, -1], source=sv)], prefix=resumed).logits[:, -2:]
        torch.testing.assert_close(out, full, atol=2e-6, rtol=0)
        # a selected / repeated prefix keeps its cache rows aligned with the hidden rows
        rows = torch.tensor([2, 0])
        sub = lab.run({k: v[rows] for k, v in suffix.items()}, [sl.Interchange(site, positions=[-2, -1], source=sl.SourceValue(sv.value[rows]))],
                      prefix=resumed.select(rows)).logits[:, -2:]
        torch.testing.assert_close(sub, full[rows], atol=2e-6, rtol=0)
        rep = lab.run({k: v.repeat(2, 1) for k, v in suffix.items()}, [sl.Interchange(site, positions=[-2, -1], source=sl.SourceValue(sv.value.repeat(2, 1, 1)))],
                      prefix=resumed.repeat(2)).logits[:, -2:]
        torch.testing.assert_close(rep, full.repeat(2, 1, 1), atol=2e-6, rtol=0)
    assert_unchanged(model, before, what="runs resumed from a KV-cache prefix")


def test_training_step_gradients_match():
    model = tiny_model("llama")
    lab = sl.wrap(model)
    base = tiny_inputs("llama", batch=3, seq=7, pad=2, side="left", seed=1)
    src = tiny_inputs("llama", batch=3, seq=7, pad=1, side="left", seed=2)
    site = "blocks.1.resid_post"
    sv = lab.source_value(sl.SubspaceInterchange(site, size=4, positions=-1, source=src))
    grads = []
    for resumed in (False, True):
        torch.manual_seed(0)
        das = sl.SubspaceInterchange(site, size=4, width=lab.d_model, positions=-1, source=sv)
        prefix = lab.prefix(base, 1)
        inputs = base
        if resumed:
            prefix = prefix.after(lab.past(base, 6, prefix=prefix))
            inputs = {"input_ids": base["input_ids"][:, 6:], "attention_mask": base["attention_mask"]}
        logits = lab.run(inputs, [das], prefix=prefix).logits[:, -1]
        torch.nn.functional.cross_entropy(logits, torch.tensor([3, 5, 7])).backward()
        grads.append(das.rotation.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-4)


def test_errors():
    lab = sl.wrap(tiny_model("llama"))
    base = tiny_inputs("llama", batch=2, seq=6, pad=1, side="left")
    with pytest.raises(UnitError, match=r"start=6: expected 0 < start < 6 \(the inputs' length\)"):
        lab.past(base, 6)
    prefix = lab.prefix(base, 1)
    resumed = prefix.after(lab.past(base, 4))
    with pytest.raises(ShapeMismatch, match=r"the prefix caches the first 4 positions, so base takes the remaining 2 tokens with an attention mask over all 6; got a mask over 2"):
        lab.run({"input_ids": base["input_ids"][:, 4:], "attention_mask": base["attention_mask"][:, 4:]}, [], prefix=resumed)
    with pytest.raises(ShapeMismatch, match=r"does not fit a prefix of 1 rows x 6 positions"):
        prefix.select([0]).after(lab.past(base, 4))
    mistral = sl.wrap(tiny_model("mistral"))
    with pytest.raises(ConfigError, match=r"MistralForCausalLM's cache has sliding-window layers; a KV-cache prefix supports full-attention caches only"):
        mistral.past(base, 3)
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ConfigError, match=r"a KV-cache prefix needs a Hugging Face model run on input_ids"):
        sl.wrap(mlp, example_input=torch.zeros(1, 4)).past(torch.zeros(2, 4), 1)
