"""Wrapping changes nothing: with no intervention, outputs and greedy generations equal plain transformers bit for bit."""

from __future__ import annotations

import pytest
import torch

import steerlab as sl
from tests.archs import ARCHS, ENCODERS, tiny_inputs, tiny_model
from tests.interventions._helpers import hook_counts, wrapped

DECODERS = sorted(set(ARCHS) - ENCODERS)


def _main(out):
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


@pytest.mark.parametrize("arch,side", [(a, s) for a in sorted(ARCHS) for s in (("right",) if a in ENCODERS else ("right", "left"))])
def test_wrapped_outputs_equal_plain(arch, side):
    model = tiny_model(arch)
    inputs = tiny_inputs(arch, batch=3, seq=7, pad=3, side=side)
    with torch.no_grad():
        plain = model(**inputs, output_hidden_states=True)
    before = hook_counts(model)
    lab = sl.wrap(model)
    res = lab.run(inputs, output_hidden_states=True)
    assert torch.equal(_main(res.output), _main(plain))
    for a, b in zip(res.output.hidden_states, plain.hidden_states):
        assert torch.equal(a, b)
    # the model called directly after wrapping and after a collect is unchanged too
    lab.collect(inputs, ["blocks.*.resid_post", "blocks.1.attn.z"])
    with torch.no_grad():
        assert torch.equal(_main(model(**inputs)), _main(plain))
    assert hook_counts(model) == before
    lab.unwrap()
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("arch", DECODERS)
def test_wrapped_greedy_generation_equals_plain(arch):
    model = tiny_model(arch)
    inputs = tiny_inputs(arch, batch=2, seq=6, pad=2, side="left")
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    plain = model.generate(**inputs, **kw)
    with wrapped(model) as lab:
        gen = lab.generate(inputs, **kw)
        attached = lab.attach([])
        via_model = model.generate(**inputs, **kw)  # hooks installed, no intervention
        attached.detach()
    assert torch.equal(gen.sequences, plain)
    assert torch.equal(via_model, plain)
    assert torch.equal(gen.new_tokens, plain[:, 6:])


def test_smollm_wrapped_outputs_and_generation_equal_plain(smollm):
    model, tok = smollm
    prompts = ["The capital of France is", "Hi"]
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        plain = model(**enc).logits
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    plain_gen = model.generate(**enc, **kw)
    with wrapped(model, tok) as lab:
        assert torch.equal(lab.run(dict(enc)).logits, plain)
        gen = lab.generate(prompts, **kw)
    assert torch.equal(gen.sequences, plain_gen)
    assert gen.texts == tok.batch_decode(plain_gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
