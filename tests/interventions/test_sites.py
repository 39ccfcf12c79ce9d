"""Every canonical site's value, on every architecture, against a hand computation.

The reference (``tests/interventions/_reference.py``) starts from Hugging
Face's hidden states and the modules' weights; nothing in it comes from
steerlab except the per-head ``z`` it pushes through the output projection
(and that is checked twice: the chain must land on the next hidden state, and
:func:`attention_z` recomputes it head by head).

Tolerance: 1e-5 (absolute and relative) on the fp32 tiny models; hand-written
matrix products and the model's fused kernels round differently.
"""

from __future__ import annotations

import pytest
import torch

import steerlab as sl
from tests.archs import ARCHS, ENCODERS, tiny_inputs, tiny_model
from tests.interventions._helpers import wrapped
from tests.interventions._reference import attention_z, dims, reference

BLOCK = ("resid_pre", "attn.q", "attn.k", "attn.v", "attn.z", "attn.out", "resid_mid", "mlp.pre", "mlp.post", "mlp.out", "resid_post")


def _close(a, b, tol=1e-5):
    return torch.allclose(a, b, atol=tol, rtol=tol)


def _check_all_sites(model, arch: str, inputs: dict, tol: float = 1e-5) -> None:
    with wrapped(model) as lab:
        names = lab.sites.names()
        got = lab.collect(inputs, names)
        n = lab.n_layers
    ref, hs = reference(model, arch, inputs, lambda L: got[f"blocks.{L}.attn.z"])
    H, KV, dh = dims(model)
    b, t = inputs["input_ids"].shape

    # the chain lands on Hugging Face's own hidden states
    for L in range(n):
        assert torch.equal(got[f"blocks.{L}.resid_pre"], hs[L]), f"{arch} resid_pre[{L}] != hidden_states[{L}]"
        if L < n - 1 or arch in ENCODERS:  # decoders apply their final norm to the last entry
            assert torch.equal(got[f"blocks.{L}.resid_post"], hs[L + 1]), f"{arch} resid_post[{L}] != hidden_states[{L + 1}]"
            assert _close(ref[f"blocks.{L}.resid_post"], hs[L + 1], tol), f"{arch} hand chain misses hidden_states[{L + 1}]"
    if "final_norm" in ref:
        assert _close(ref["final_norm"], hs[-1], tol)

    # every site equals its hand computation, with the documented shape
    assert set(ref) == set(names), f"{arch}: catalog {sorted(set(names) ^ set(ref))} differ from the reference"
    for name in names:
        value, want = got[name], ref[name]
        short = name.split(".", 2)[2] if name.startswith("blocks.") else name
        if short in ("attn.q", "attn.z"):
            assert value.shape == (b, t, H, dh), (name, value.shape)
        elif short in ("attn.k", "attn.v"):
            assert value.shape == (b, t, KV, dh), (name, value.shape)  # the KV-head count under GQA
        else:
            assert value.shape == want.shape, (name, value.shape, want.shape)
        assert _close(value.flatten(2) if value.dim() == 4 else value, want, tol), f"{arch} {name}: max err {(value.flatten(2) if value.dim() == 4 else value).sub(want).abs().max():.2e}"

    # the residual identities, on steerlab's own values
    for L in range(n):
        g = lambda s: got[f"blocks.{L}.{s}"]  # noqa: E731
        if arch in ENCODERS:
            blk = model.encoder.layer[L]
            assert _close(g("resid_mid"), blk.attention.output.LayerNorm(g("attn.out") + g("resid_pre")), tol)
            assert _close(g("resid_post"), blk.output.LayerNorm(g("mlp.out") + g("resid_mid")), tol)
        elif arch == "gpt_neox":
            assert _close(g("resid_pre") + g("attn.out") + g("mlp.out"), g("resid_post"), tol)
        else:
            assert _close(g("resid_pre") + g("attn.out"), g("resid_mid"), tol)
            assert _close(g("resid_mid") + g("mlp.out"), g("resid_post"), tol)


# encoders pad on the right only
ARCH_SIDES = [(a, s) for a in sorted(ARCHS) for s in (("right",) if a in ENCODERS else ("right", "left"))]


@pytest.mark.parametrize("arch,side", ARCH_SIDES)
def test_every_site_equals_hand_computation(arch, side):
    inputs = tiny_inputs(arch, batch=2, seq=7, pad=2, side=side)
    _check_all_sites(tiny_model(arch), arch, inputs)


def test_catalog_lists_shapes_and_missing_sites(arch, tiny):
    lab = sl.wrap(tiny)
    cat = lab.sites
    H, KV, dh = dims(tiny)
    d = tiny.config.hidden_size if hasattr(tiny.config, "hidden_size") else tiny.config.n_embd
    n = len(lab.layers)
    assert n == 3
    expect_missing = set()
    if arch == "gpt_neox":
        expect_missing = {"blocks.*.resid_mid"}
    if arch in ENCODERS:
        expect_missing = {"final_norm", "logits"}
    assert set(cat.missing) == expect_missing, cat.missing
    for k in expect_missing:
        assert cat.missing[k]  # a reason is given
    want = {"embed": ("batch", "pos", d)}
    for L in range(n):
        want |= {
            f"blocks.{L}.resid_pre": ("batch", "pos", d),
            f"blocks.{L}.attn.q": ("batch", "pos", H, dh),
            f"blocks.{L}.attn.k": ("batch", "pos", KV, dh),
            f"blocks.{L}.attn.v": ("batch", "pos", KV, dh),
            f"blocks.{L}.attn.z": ("batch", "pos", H, dh),
            f"blocks.{L}.attn.out": ("batch", "pos", d),
            f"blocks.{L}.resid_mid": ("batch", "pos", d),
            f"blocks.{L}.mlp.out": ("batch", "pos", d),
            f"blocks.{L}.resid_post": ("batch", "pos", d),
        }
    if arch == "gpt_neox":
        want = {k: v for k, v in want.items() if "resid_mid" not in k}
    if arch not in ENCODERS:
        want |= {"final_norm": ("batch", "pos", d), "logits": ("batch", "pos", 96)}
    for name, shape in want.items():
        assert name in cat, name
        assert tuple(cat[name]["shape"]) == shape, (name, cat[name]["shape"], shape)
    ff = getattr(tiny.config, "intermediate_size", None) or 4 * d
    assert tuple(cat["blocks.0.mlp.post"]["shape"]) == ("batch", "pos", ff)
    assert len(cat) == len(want) + 2 * n  # + mlp.pre and mlp.post
    text = cat.table()
    assert "blocks.2.attn.z" in text and (not expect_missing or "missing" in text)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gpt2", "bert", "roberta"])
def test_attn_z_heads_match_attention_by_hand(arch):
    """z[:, :, h] is head h's attention output (GQA: its KV group), computed by hand."""
    model = tiny_model(arch)
    inputs = tiny_inputs(arch, batch=2, seq=7, pad=2, side="right")
    lab = sl.wrap(model)
    got = lab.collect(inputs, ["blocks.*.resid_pre", "blocks.*.attn.z"])
    mask = inputs["attention_mask"]
    for L in range(3):
        want = attention_z(model, arch, L, got[f"blocks.{L}.resid_pre"], mask)
        real = mask.bool()  # padded query rows have no defined attention; compare real tokens
        assert torch.allclose(got[f"blocks.{L}.attn.z"][real], want[real], atol=1e-5, rtol=1e-5), arch


def test_smollm_sites_equal_hand_computation(smollm):
    model, tok = smollm
    enc = tok(["The cat sat on the mat", "Hi"], return_tensors="pt", padding=True)
    _check_all_sites(model, "llama", dict(enc), tol=1e-4)


def test_smollm_attn_z_by_hand(smollm):
    model, tok = smollm
    enc = tok(["Paris is the capital of"], return_tensors="pt")
    with wrapped(model) as lab:
        got = lab.collect(enc, ["blocks.7.resid_pre", "blocks.7.attn.z"])
        k = lab.collect(enc, "blocks.7.attn.k")["blocks.7.attn.k"]
    want = attention_z(model, "llama", 7, got["blocks.7.resid_pre"], enc["attention_mask"])
    assert torch.allclose(got["blocks.7.attn.z"], want, atol=1e-4, rtol=1e-4)
    assert got["blocks.7.attn.z"].shape == (1, enc["input_ids"].shape[1], 9, 64)
    assert k.shape[2] == 3  # SmolLM2-135M: 9 query heads, 3 KV heads


def test_minilm_sites_equal_hand_computation(minilm):
    model, tok = minilm
    enc = tok(["a short one", "a somewhat longer sentence here"], return_tensors="pt", padding=True)
    _check_all_sites(model, "bert", dict(enc), tol=1e-4)
    with wrapped(model) as lab:
        cat = lab.sites
    assert set(cat.missing) == {"final_norm", "logits"}
    assert tuple(cat["blocks.5.attn.z"]["shape"]) == ("batch", "pos", 12, 32)


def test_every_arch_is_covered():
    assert len(ARCHS) == 16
