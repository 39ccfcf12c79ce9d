"""generate() with the KV cache: prompt-only and every-step interventions against manual hooks.

The manual hooks tell prefill from a decode step by the length of what the
layer sees (the whole prompt, or one new token).
"""

from __future__ import annotations

import pytest
import torch

import steerlab as sl
from tests.archs import tiny_model
from tests.interventions._helpers import real_index, wrapped
from tests.interventions._manual import read_site, resolve
from tests.interventions.test_interchange import make_inputs

KW = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)


def _manual_generate(model, inputs, layer: int, f_prefill, f_decode=None, scores: bool = False):
    """Greedy generation with a manual hook on block ``layer``'s output."""
    T = inputs["input_ids"].shape[1]

    def hook(m, a, out):
        y = out.clone()
        if y.shape[1] == T:
            f_prefill(y)
        elif f_decode is not None:
            f_decode(y)
        return y

    h = model.model.layers[layer].register_forward_hook(hook)
    try:
        return model.generate(**inputs, **KW, output_scores=scores, return_dict_in_generate=scores)
    finally:
        h.remove()


def _at(slots, f):
    def edit(y):
        for i, row in enumerate(slots):
            for j in row:
                if j is not None:
                    y[i, j] = f(y[i, j])

    return edit


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_prompt_only_intervention_equals_prefill_hook(arch):
    model = tiny_model(arch)
    inputs = make_inputs(arch, [6, 3], 6, "left", 1)
    v = torch.randn(32, generator=torch.Generator().manual_seed(1)) * 4
    pos = [0, -1]
    want = _manual_generate(model, inputs, 1, _at(resolve(pos, inputs["attention_mask"]), lambda h: h + v), scores=True)
    plain = model.generate(**inputs, **KW)
    with wrapped(model) as lab:
        gen = lab.generate(inputs, [sl.Add("blocks.1.resid_post", v, positions=pos)], **KW)
        with lab.attach(sl.Add("blocks.1.resid_post", v, positions=pos)):  # the same, attached by hand
            out = model.generate(**inputs, **KW, output_scores=True, return_dict_in_generate=True)
    assert not torch.equal(gen.sequences, plain)
    assert torch.equal(gen.sequences, want.sequences)
    # every step's logits; CPU matmuls can round differently (~3e-8) with the input's memory alignment
    for a, b in zip(out.scores, want.scores):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_decode_true_applies_at_every_new_token():
    model = tiny_model("llama")
    inputs = make_inputs("llama", [6, 4], 6, "left", 2)
    v = torch.randn(32, generator=torch.Generator().manual_seed(2)) * 4

    def every_new(y):
        y[:, -1] += v  # a decode step: the new token is the position

    want = _manual_generate(model, inputs, 1, _at(resolve(-1, inputs["attention_mask"]), lambda h: h + v), every_new, scores=True)
    prompt_only = _manual_generate(model, inputs, 1, _at(resolve(-1, inputs["attention_mask"]), lambda h: h + v))
    with wrapped(model) as lab:
        gen = lab.generate(inputs, [sl.Add("blocks.1.resid_post", v, positions=-1)], decode=True, **KW)
        with lab.attach(sl.Add("blocks.1.resid_post", v, positions=-1), decode=True):
            out = model.generate(**inputs, **KW, output_scores=True, return_dict_in_generate=True)
    assert not torch.equal(want.sequences, prompt_only)
    assert torch.equal(gen.sequences, want.sequences)
    for a, b in zip(out.scores, want.scores):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_generate_per_example_positions_left_padding():
    model = tiny_model("llama")
    inputs = make_inputs("llama", [6, 2, 4], 6, "left", 3)
    pos = torch.tensor([[0, 5], [1, -1], [-1, -1]])
    want = _manual_generate(model, inputs, 0, _at(resolve(pos, inputs["attention_mask"]), lambda h: -3 * h))
    with wrapped(model) as lab:
        gen = lab.generate(inputs, [sl.Scale("blocks.0.resid_post", factor=-3.0, positions="per-call")], positions=pos, **KW)
        gen2 = lab.generate(inputs, [sl.Scale("blocks.0.resid_post", factor=-3.0, positions=pos)], **KW)
    assert torch.equal(gen.sequences, want)
    assert torch.equal(gen2.sequences, want)
    assert torch.equal(gen.sequences[2], model.generate(**{k: v[2:] for k, v in inputs.items()}, **KW)[0])  # row 2: no slot


def test_subspace_interchange_with_a_source_in_generate():
    model = tiny_model("llama")
    base = make_inputs("llama", [6, 4], 6, "left", 4)
    src = make_inputs("llama", [3, 5], 5, "left", 5)
    R = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(6)))[0][:6]
    s, _ = read_site(model, "llama", 1, "resid_post", src)
    sm, bm = src["attention_mask"], base["attention_mask"]

    def prefill(y):
        for i in range(2):
            bj, sj = real_index(bm, i, -1), real_index(sm, i, -1)
            h = y[i, bj]
            y[i, bj] = h + ((s[i, sj] - h) @ R.T) @ R

    want = _manual_generate(model, base, 1, prefill)
    with wrapped(model) as lab:
        iv = sl.SubspaceInterchange("blocks.1.resid_post", size=6, init=R, positions=-1, source=src)
        gen = lab.generate(base, [iv], **KW)
    assert not torch.equal(want, model.generate(**base, **KW))
    assert torch.equal(gen.sequences, want)


def test_smollm_generate_steered_equals_manual(smollm):
    model, tok = smollm
    prompts = ["The weather today is", "My favourite food"]
    enc = dict(tok(prompts, return_tensors="pt", padding=True, padding_side="left"))
    v = torch.randn(576, generator=torch.Generator().manual_seed(7)) * 8
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    T = enc["input_ids"].shape[1]
    slots = resolve(-1, enc["attention_mask"])

    def hook(m, a, out):
        y = out.clone()
        if y.shape[1] == T:
            _at(slots, lambda h: h + v)(y)
        else:
            y[:, -1] += v
        return y

    h = model.model.layers[12].register_forward_hook(hook)
    try:
        want = model.generate(**enc, **kw)
    finally:
        h.remove()
    with wrapped(model, tok) as lab:
        gen = lab.generate(prompts, [sl.Add("blocks.12.resid_post", v, positions=-1)], decode=True, **kw)
    assert torch.equal(gen.sequences, want)
