"""Every intervention type against a hand computation done with manual PyTorch hooks.

Interchange: run the source with a reading hook, copy the values at the
slots resolved by plain Python over the masks, run the base with a writing
hook; steerlab must give the same output with 0 difference (fp32), on 10
architectures x 7 sites x 5 position specs x both padding sides.
"""

from __future__ import annotations

import functools

import pytest
import torch

import steerlab as sl
from tests.archs import ENCODERS, tiny_model
from tests.interventions._helpers import wrapped
from tests.interventions._manual import pairs, read_site, resolve, run_edited
from tests.interventions._reference import dims

ARCHS10 = ["llama", "qwen3", "gemma2", "phi3", "olmo2", "gpt2", "gpt_neo", "gpt_neox", "gpt_neox_seq", "bert"]
SITES = {  # site -> heads (per-head sites get a subset; attn.v counts KV heads)
    "resid_pre": None,
    "attn.z": [1, 3],
    "attn.v": [1],
    "attn.out": None,
    "resid_mid": None,
    "mlp.post": None,
    "resid_post": None,
}
POSITIONS = {
    "all": None,
    "last": -1,
    "list": [0, 2],
    "f2+l2": "f2+l2",
    "tensor": torch.tensor([[0, 3], [2, -1], [-1, 1]]),
}
LAYER = 1


@functools.cache
def model_of(arch: str, dtype: torch.dtype = torch.float32):
    """One tiny model per architecture for this module (every test leaves it as it found it)."""
    return tiny_model(arch, dtype=dtype)


def make_inputs(arch: str, lengths: list[int], seq: int, side: str, seed: int) -> dict:
    """Token ids with ``lengths[i]`` real tokens each, padded on ``side`` to ``seq``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 90, (len(lengths), seq), generator=g)
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for i, n in enumerate(lengths):
        if side == "right":
            mask[i, :n] = 1
        else:
            mask[i, seq - n :] = 1
    ids[mask == 0] = 1 if arch == "roberta" else 0
    return {"input_ids": ids, "attention_mask": mask}


def _out(o):
    return o.logits if getattr(o, "logits", None) is not None else o.last_hidden_state


def manual_interchange(model, arch, site, heads, spec, base, source, src_spec=None):
    src, _ = read_site(model, arch, LAYER, site, source)
    todo = pairs(spec, base["attention_mask"], source["attention_mask"], src_spec)

    def edit(part):
        for i, bj, sj in todo:
            if heads is None:
                part[i, bj] = src[i, sj]
            else:
                part[i, bj, heads] = src[i, sj, heads]

    return _out(run_edited(model, arch, LAYER, site, base, edit)), bool(todo)


def _cases():
    """Decoders pad on the left (and, for two families, on the right too: every family's right padding
    is in test_units); encoders on the right; gpt_neox (parallel residual) has no resid_mid."""
    for arch in ARCHS10:
        for site in sorted(SITES):
            if arch == "gpt_neox" and site == "resid_mid":
                continue
            for pos in sorted(POSITIONS):
                sides = ["right"] if arch in ENCODERS else ["left"] + (["right"] if arch in ("llama", "gpt2") and pos != "all" else [])
                for side in sides:
                    yield arch, site, pos, side


@pytest.mark.parametrize("arch,site,pos,side", list(_cases()))
def test_interchange_equals_manual_hooks(arch, site, pos, side):
    model = model_of(arch)
    spec = POSITIONS[pos]
    if spec is None:  # all positions: base and source share the padding
        base, source = make_inputs(arch, [7, 5, 6], 7, side, 1), make_inputs(arch, [7, 5, 6], 7, side, 2)
    else:
        base, source = make_inputs(arch, [7, 5, 3], 7, side, 1), make_inputs(arch, [6, 7, 4], 7, side, 2)
    heads = SITES[site]
    want, nontrivial = manual_interchange(model, arch, site, heads, spec, base, source)
    with wrapped(model) as lab:
        iv = sl.Interchange(f"blocks.{LAYER}.{site}", positions=spec, heads=heads, source=source)
        got = _out(lab.run(base, [iv]).output)
        plain = _out(lab.run(base).output)
    assert nontrivial and not torch.equal(want, plain), "the interchange must change the output"
    if site == "resid_mid" and arch not in ENCODERS:
        # the manual route adds (new - old) to attn.out: rounding differs from a direct write
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    else:
        assert torch.equal(got, want), f"max diff {(got - want).abs().max():.3e}"


@pytest.mark.parametrize(
    "site,heads,spec,src_spec",
    [
        ("resid_post", None, -1, -1),
        ("attn.z", [2, 5], [0, -1], [0, -1]),
        ("mlp.post", None, [1, -1], [0, -2]),
        ("resid_mid", None, "f1+l2", "f1+l2"),
        ("attn.v", [0], -1, -1),
    ],
)
def test_interchange_smollm_equals_manual_hooks(smollm, site, heads, spec, src_spec):
    model, tok = smollm
    base = dict(tok(["The cat sat on the mat and", "Paris is in"], return_tensors="pt", padding=True, padding_side="left"))
    source = dict(tok(["A dog ran", "Rome is the capital city of"], return_tensors="pt", padding=True, padding_side="left"))
    global LAYER
    old, LAYER = LAYER, 10
    try:
        src, _ = read_site(model, "llama", 10, site, source)
        todo = pairs(spec, base["attention_mask"], source["attention_mask"], src_spec)

        def edit(part):
            for i, bj, sj in todo:
                part[i, bj] = src[i, sj] if heads is None else part[i, bj]
                if heads is not None:
                    part[i, bj, heads] = src[i, sj, heads]

        want = run_edited(model, "llama", 10, site, base, edit).logits
    finally:
        LAYER = old
    with wrapped(model, tok) as lab:
        iv = sl.Interchange(f"blocks.10.{site}", positions=spec, source_positions=src_spec, heads=heads, source=source)
        got = lab.run(base, [iv]).logits
        plain = lab.run(base).logits
    assert not torch.equal(want, plain)
    if site == "resid_mid":
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    else:
        assert torch.equal(got, want), f"max diff {(got - want).abs().max():.3e}"


# -- the other intervention types, by their formulas ------------------------------------------

SPEC = [1, -1]


def _io(seed_base=1, seed_src=2):
    return make_inputs("llama", [7, 5, 6], 7, "left", seed_base), make_inputs("llama", [6, 7, 4], 7, "left", seed_src)


def _manual_at(model, site, base, spec, f, heads=None, source=None):
    """Apply ``f(h, s, example, slot)`` at every selected slot by a manual hook (``s`` from the source run)."""
    src = read_site(model, "llama", LAYER, site, source)[0] if source is not None else None
    slots = resolve(spec, base["attention_mask"])
    sslots = resolve(spec, source["attention_mask"]) if source is not None else slots

    def edit(part):
        for i in range(part.shape[0]):
            for k, (bj, sj) in enumerate(zip(slots[i], sslots[i])):
                h = part[i, bj] if heads is None else part[i, bj, heads]
                s = None if src is None else (src[i, sj] if heads is None else src[i, sj, heads])
                new = f(h.clone(), s, i, k)
                if heads is None:
                    part[i, bj] = new
                else:
                    part[i, bj, heads] = new

    return run_edited(model, "llama", LAYER, site, base, edit).logits


def _rotation(k, d, seed=3):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed)))
    return q[:, :k].T.contiguous()  # [k, d], orthonormal rows


@pytest.mark.parametrize("site,heads", [("resid_post", None), ("attn.z", [0, 2])])
def test_subspace_interchange_known_rotation_equals_closed_form(site, heads):
    model = model_of("llama")
    base, source = _io()
    d = 32 if heads is None else 8
    R = _rotation(5 if heads is None else 3, d)
    want = _manual_at(model, site, base, SPEC, lambda h, s, i, k: h + ((s - h) @ R.T) @ R, heads, source)
    with wrapped(model) as lab:
        iv = sl.SubspaceInterchange(f"blocks.{LAYER}.{site}", size=R.shape[0], init=R, positions=SPEC, heads=heads, source=source)
        got = lab.run(base, [iv]).logits
        assert torch.allclose(iv.R, R, atol=1e-6)  # the rotation used is the one given
        plain = lab.run(base).logits
    assert not torch.allclose(want, plain, atol=1e-3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("site,heads", [("resid_post", None), ("mlp.post", None), ("attn.z", [1])])
def test_full_space_subspace_interchange_equals_interchange(site, heads):
    """size == width: h + Rᵀ R (s - h) = s for orthonormal square R, up to fp32 rounding (tolerance 1e-5)."""
    model = model_of("llama")
    base, source = _io()
    with wrapped(model) as lab:
        width = lab.sites[f"blocks.{LAYER}.{site}"]["shape"][-1]
        full = sl.SubspaceInterchange(f"blocks.{LAYER}.{site}", size=width, positions=SPEC, heads=heads, source=source)
        swap = sl.Interchange(f"blocks.{LAYER}.{site}", positions=SPEC, heads=heads, source=source)
        a = lab.run(base, [full]).logits
        b = lab.run(base, [swap]).logits
        plain = lab.run(base).logits
    assert not torch.allclose(b, plain, atol=1e-3)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_boundless_subspace_interchange_formula():
    model = model_of("llama")
    base, source = _io()
    d, tau, b = 32, 0.7, 0.3
    R = _rotation(d, d, seed=4)
    iv = sl.BoundlessSubspaceInterchange(f"blocks.{LAYER}.resid_post", width=d, init_boundary=b, temperature=tau, positions=SPEC, source=source)
    with torch.no_grad():
        iv.rotation.weight.copy_(R.T)  # orthonormal columns: QR returns them unchanged
    assert torch.allclose(iv.rotation(), R, atol=1e-6)
    m = torch.sigmoid((b * d - torch.arange(d, dtype=torch.float32)) / tau)
    want = _manual_at(model, "resid_post", base, SPEC, lambda h, s, i, k: h + (m * (R @ (s - h))) @ R, source=source)
    with wrapped(model) as lab:
        got = lab.run(base, [iv]).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert iv.size == round(b * d)


def test_sigmoid_mask_formula():
    model = model_of("llama")
    base, source = _io()
    iv = sl.SigmoidMask(f"blocks.{LAYER}.mlp.post", width=64, temperature=0.5, positions=SPEC, source=source)
    logits = torch.randn(64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        iv.logits.copy_(logits)
    m = torch.sigmoid(logits / 0.5)
    want = _manual_at(model, "mlp.post", base, SPEC, lambda h, s, i, k: (1 - m) * h + m * s, source=source)
    with wrapped(model) as lab:
        got = lab.run(base, [iv]).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _sourceless_cases():
    v = torch.randn(32, generator=torch.Generator().manual_seed(6))
    mu = torch.randn(32, generator=torch.Generator().manual_seed(7))
    site = f"blocks.{LAYER}.resid_post"

    def noise(h, s, i, k):
        eps = torch.randn((3, len(SPEC), 32), generator=torch.Generator().manual_seed(11))
        return h + 0.5 * eps[i, k]

    return {
        "add": (sl.Add(site, v, alpha=2.5, positions=SPEC), lambda h, s, i, k: h + 2.5 * v),
        "zero": (sl.Zero(site, positions=SPEC), lambda h, s, i, k: torch.zeros_like(h)),
        "mean": (sl.Mean(site, mu, positions=SPEC), lambda h, s, i, k: mu.clone()),
        "scale": (sl.Scale(site, factor=-0.5, positions=SPEC), lambda h, s, i, k: -0.5 * h),
        "lambda": (sl.Lambda(site, lambda h: torch.tanh(h) * 3, positions=SPEC), lambda h, s, i, k: torch.tanh(h) * 3),
        "noise": (sl.Noise(site, std=0.5, seed=11, positions=SPEC), noise),
    }


@pytest.mark.parametrize("kind", ["add", "zero", "mean", "scale", "lambda", "noise"])
def test_sourceless_interventions_equal_formulas(kind):
    model = model_of("llama")
    base, _ = _io()
    iv, f = _sourceless_cases()[kind]
    want = _manual_at(model, "resid_post", base, SPEC, f)
    with wrapped(model) as lab:
        got = lab.run(base, [iv]).logits
        again = lab.run(base, [iv]).logits
        plain = lab.run(base).logits
    assert not torch.allclose(want, plain, atol=1e-3)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert torch.equal(got, again)  # Noise too: the same seed gives the same noise


def test_noise_statistics_and_seed():
    model = model_of("llama")
    base, _ = _io()
    with wrapped(model) as lab:
        coll = sl.Collect(f"blocks.{LAYER}.resid_post")
        h = lab.run(base, [coll]).cache[coll.name]
        n1 = sl.Noise(f"blocks.{LAYER}.mlp.post", std=2.0, seed=1)
        seen = {}
        probe = sl.Lambda(f"blocks.{LAYER}.mlp.post", lambda x: seen.setdefault("x", x))
        lab.run(base, [probe])
        noisy = {}
        after = sl.Lambda(f"blocks.{LAYER}.mlp.post", lambda x: noisy.setdefault("x", x))
        lab.run(base, [n1, after])
    delta = noisy["x"] - seen["x"]
    assert abs(float(delta.std()) - 2.0) < 0.1 and abs(float(delta.mean())) < 0.1
    assert h.shape == (3, 7, 32)


def test_collect_reads_manual_hook_values_and_changes_nothing():
    model = model_of("llama")
    base, _ = _io()
    full, _ = read_site(model, "llama", LAYER, "attn.z", base)
    slots = resolve(SPEC, base["attention_mask"])
    want = torch.stack([full[i, slots[i]][:, [1, 3]] for i in range(3)])
    with wrapped(model) as lab:
        res = lab.run(base, [sl.Collect(f"blocks.{LAYER}.attn.z", positions=SPEC, heads=[1, 3])])
        plain = lab.run(base).logits
        cache = lab.collect(base, f"blocks.{LAYER}.attn.z", positions=SPEC, heads=[1, 3])
    assert torch.equal(res.cache[f"blocks.{LAYER}.attn.z"], want)
    assert torch.equal(cache[f"blocks.{LAYER}.attn.z"], want)
    assert torch.equal(res.logits, plain)
    H, KV, dh = dims(model)
    assert want.shape == (3, 2, 2, dh)


# -- dtype ---------------------------------------------------------------------------------------


def test_bf16_subspace_interchange_and_add():
    model = model_of("llama", torch.bfloat16)
    base, source = _io()
    R = _rotation(4, 32)
    v = torch.randn(32, generator=torch.Generator().manual_seed(8))

    def closed_form(h, s, i, k):  # the maths in fp32, the result cast back to bf16
        h32, s32 = h.float(), s.float()
        return (h32 + ((s32 - h32) @ R.T) @ R).to(torch.bfloat16)

    want = _manual_at(model, "resid_post", base, SPEC, closed_form, source=source)
    want_add = _manual_at(model, "resid_post", base, SPEC, lambda h, s, i, k: h + v.to(torch.bfloat16))
    with wrapped(model) as lab:
        iv = sl.SubspaceInterchange(f"blocks.{LAYER}.resid_post", size=4, init=R, positions=SPEC, source=source)
        seen = {}
        spy = sl.Lambda(f"blocks.{LAYER}.resid_post", lambda x: seen.setdefault("x", x))
        got = lab.run(base, [iv, spy]).logits
        got_add = lab.run(base, [sl.Add(f"blocks.{LAYER}.resid_post", v, positions=SPEC)]).logits
    assert iv.R.dtype == torch.float32 and iv.rotation.weight.dtype == torch.float32
    assert seen["x"].dtype == torch.bfloat16 and got.dtype == torch.bfloat16 and got_add.dtype == torch.bfloat16
    assert torch.equal(got, want)
    assert torch.equal(got_add, want_add)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "bert"])
def test_root_sites_embed_final_norm_logits(arch):
    """Interchange at ``embed``, Add at ``final_norm``, Scale at ``logits``: manual hooks on the embedding,
    the final norm and the head (found here by hand, not through steerlab)."""
    model = model_of(arch)
    base, source = make_inputs(arch, [7, 5, 3], 7, "right", 1), make_inputs(arch, [6, 7, 4], 7, "right", 2)
    emb = model.get_input_embeddings()
    store = {}
    h = emb.register_forward_hook(lambda m, a, o: store.update(s=o.detach().clone()))
    with torch.no_grad():
        model(**source)
    h.remove()
    todo = pairs(-1, base["attention_mask"], source["attention_mask"])
    v = torch.randn(32, generator=torch.Generator().manual_seed(9))

    def swap(m, a, o):
        o = o.clone()
        for i, bj, sj in todo:
            o[i, bj] = store["s"][i, sj]
        return o

    def add(m, a, o):
        o = o.clone()
        for i, bj, _ in todo:
            o[i, bj] = o[i, bj] + v
        return o

    handles = [emb.register_forward_hook(swap)]
    if arch not in ENCODERS:
        norm = model.transformer.ln_f if arch == "gpt2" else model.model.norm
        handles += [norm.register_forward_hook(add), model.lm_head.register_forward_hook(lambda m, a, o: o * 0.5)]
    try:
        with torch.no_grad():
            want = _out(model(**base))
    finally:
        for hd in handles:
            hd.remove()
    ivs = [sl.Interchange("embed", positions=-1, source=source)]
    if arch not in ENCODERS:
        ivs += [sl.Add("final_norm", v, positions=-1), sl.Scale("logits", factor=0.5)]
    with wrapped(model) as lab:
        got = _out(lab.run(base, ivs).output)
    assert torch.equal(got, want)
