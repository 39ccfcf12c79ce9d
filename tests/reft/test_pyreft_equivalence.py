"""steerlab's ReFT family equals pyreft 0.1.0's interventions given the same parameters:
forward and gradients, every type both libraries have, padded batches (left and right) with
per-example positions, several layers at once; bf16 within the bound its rounding allows; and
one check on SmolLM2 (real weights).

Type by type (steerlab ↔ pyreft): LoReFT ↔ ``LoreftIntervention`` (without and with an
activation), NoReFT ↔ ``NoreftIntervention(add_bias=False)``, DiReFT ↔ ``NodireftIntervention``,
``DiReFT(orthogonal=True)`` ↔ ``DireftIntervention``, ConsReFT ↔ ``ConsreftIntervention``,
LobiReFT ↔ ``LobireftIntervention``. steerlab's ``R`` is ``[rank, d]``; pyreft's rotate layer
holds ``Rᵀ`` (``[d, rank]``); projections ``W`` are ``[rank, d]`` in both.
"""

from __future__ import annotations

import copy

import pyreft  # the test environment installs it with --no-deps (README)
import pytest
import torch
from torch import Tensor, nn

from steerlab import reft
from tests.archs import tiny_model
from tests.peers import BF16_U, padded_batch, padded_positions, qr_pullback, qr_rows, ulp
from tests.reliability import one_thread_fixture

_one_thread = one_thread_fixture()  # one intra-op thread: much faster on a shared 2-core machine

RANK, D, VOCAB = 4, 32, 96
LAYERS = (0, 2)  # two of the tiny model's three blocks, edited in one forward
LENGTHS = [7, 4, 6]  # per example: the batch is padded
REAL = torch.tensor([[0, 6], [1, 3], [2, 5]])  # per-example positions, in real tokens (steerlab's convention)

# name -> (steerlab intervention, pyreft intervention): the pairs whose maths coincide
TYPES = {
    "loreft": (lambda site, dt: reft.LoReFT(site, rank=RANK, dtype=dt, positions="per-call"),
               lambda dt: pyreft.LoreftIntervention(embed_dim=D, low_rank_dimension=RANK, dtype=dt)),
    "loreft_gelu": (lambda site, dt: reft.LoReFT(site, rank=RANK, act_fn="gelu", dtype=dt, positions="per-call"),
                    lambda dt: pyreft.LoreftIntervention(embed_dim=D, low_rank_dimension=RANK, dtype=dt, act_fn="gelu")),
    "noreft": (lambda site, dt: reft.NoReFT(site, rank=RANK, dtype=dt, positions="per-call"),
               lambda dt: pyreft.NoreftIntervention(embed_dim=D, low_rank_dimension=RANK, dtype=dt, add_bias=False)),
    "direft": (lambda site, dt: reft.DiReFT(site, rank=RANK, dtype=dt, positions="per-call"),
               lambda dt: pyreft.NodireftIntervention(embed_dim=D, low_rank_dimension=RANK, dtype=dt, add_bias=False)),
    "direft_orthogonal": (lambda site, dt: reft.DiReFT(site, rank=RANK, orthogonal=True, dtype=dt, positions="per-call"),
                          lambda dt: pyreft.DireftIntervention(embed_dim=D, low_rank_dimension=RANK, dtype=dt)),
    "consreft": (lambda site, dt: reft.ConsReFT(site, rank=RANK, dtype=dt, positions="per-call"),
                 lambda dt: pyreft.ConsreftIntervention(embed_dim=D, low_rank_dimension=RANK)),
    "lobireft": (lambda site, dt: reft.LobiReFT(site, rank=RANK, dtype=dt, positions="per-call"),
                 lambda dt: pyreft.LobireftIntervention(embed_dim=D, low_rank_dimension=RANK)),
}


def theirs_of(piv: nn.Module, name: str) -> Tensor:
    """pyreft's tensor for steerlab's parameter ``name`` (other than ``rotation.weight``)."""
    if name == "bias":
        src = piv.learned_source
        return src if isinstance(src, nn.Parameter) else src.bias
    return piv.learned_source.weight if name == "weight" else piv.proj_layer.weight  # proj_weight, out_weight: W2


def copy_into(iv, piv: nn.Module, *, leaf: bool) -> Tensor | None:
    """Give ``piv`` ``iv``'s parameters. ``R`` goes through pyreft's own orthogonal parametrisation
    (``leaf=False``) or replaces it by a plain ``[d, rank]`` leaf holding ``Rᵀ`` (``leaf=True``: then
    ``∂L/∂R`` is readable); returns that leaf."""
    rotate = None
    with torch.no_grad():
        for name, p in iv.named_parameters():
            if name == "rotation.weight":
                r = qr_rows(p)
                if leaf:
                    rotate = pyreft.interventions.LowRankRotateLayer(D, RANK, init_orth=False)
                    rotate.weight.copy_(r.T)
                    piv.rotate_layer = rotate
                else:
                    piv.rotate_layer.weight = r.T  # the parametrisation's right inverse
            else:
                theirs_of(piv, name).copy_(p)
    return rotate


def build(kind: str, *, dtype=torch.float32, iv_dtype=torch.float32, leaf: bool = False, layers=LAYERS):
    """steerlab's and pyreft's models (two copies of the same tiny LLaMA in ``dtype``) with equal
    interventions (learned projections in ``iv_dtype``; ``None``: fp32, where pyreft has no choice)."""
    make_ours, make_theirs = TYPES[kind]
    ivs = [make_ours(f"blocks.{layer}.resid_post", iv_dtype) for layer in layers]
    rm = reft.get_reft_model(tiny_model("llama", dtype=dtype), ivs)
    pivs = [make_theirs(iv_dtype) for _ in layers]
    leaves = [copy_into(iv, piv, leaf=leaf) for iv, piv in zip(rm.interventions, pivs)]
    reps = [{"layer": layer, "component": "block_output", "low_rank_dimension": RANK, "intervention": piv}
            for layer, piv in zip(layers, pivs)]
    prm = pyreft.get_reft_model(tiny_model("llama", dtype=dtype), pyreft.ReftConfig(representations=reps), set_device=False)
    return rm, prm, pivs, leaves


def run_theirs(prm, inputs: dict, positions: list, n: int = len(LAYERS)):
    return prm(inputs, unit_locations={"sources->base": (None, [positions] * n)})[1].logits


@pytest.mark.parametrize("kind", sorted(TYPES))
def test_forward_equals_pyreft_with_its_orthogonal_parametrisation(kind):
    """pyreft as its users run it (R through torch's orthogonal parametrisation), left-padded batch."""
    rm, prm, pivs, _ = build(kind)
    for iv, piv in zip(rm.interventions, pivs):
        if hasattr(piv, "rotate_layer"):  # the right inverse reproduces R (to fp32 rounding)
            torch.testing.assert_close(piv.rotate_layer.weight, qr_rows(iv.rotation.weight).T, atol=1e-6, rtol=0)
    inputs = padded_batch(LENGTHS, "left", seed=5)
    with torch.no_grad():
        ours = rm(**inputs, intervention_positions=REAL).logits
        theirs = run_theirs(prm, inputs, padded_positions(REAL, inputs["attention_mask"]))
        with rm.disabled():
            base = rm.model(**inputs).logits
    assert (ours - base).abs().max() > 1e-2  # the interventions do something
    torch.testing.assert_close(ours, theirs, atol=5e-6, rtol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("kind", sorted(TYPES))
def test_forward_and_gradients_equal_pyreft(kind, side):
    """Outputs, every parameter's gradient and the input gradient, with R a plain leaf on pyreft's side.

    steerlab trains ``A`` (``R = Q(A)ᵀ``): its gradient is pyreft's ``∂L/∂R`` pulled back through
    a plain-torch QR (:func:`tests.peers.qr_pullback`)."""
    rm, prm, pivs, leaves = build(kind, leaf=True)
    inputs = padded_batch(LENGTHS, side, seed=5)
    mask = inputs["attention_mask"]
    probe = torch.randn(len(LENGTHS), mask.shape[1], VOCAB, generator=torch.Generator().manual_seed(7)) * mask[..., None]
    emb_o = rm.model.get_input_embeddings()(inputs["input_ids"]).detach().requires_grad_(True)
    emb_t = emb_o.detach().clone().requires_grad_(True)
    ours = rm(inputs_embeds=emb_o, attention_mask=mask, intervention_positions=REAL).logits
    (ours * probe).sum().backward()
    theirs = run_theirs(prm, {"inputs_embeds": emb_t, "attention_mask": mask}, padded_positions(REAL, mask))
    (theirs * probe).sum().backward()

    torch.testing.assert_close(ours, theirs, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(emb_o.grad, emb_t.grad, atol=1e-5, rtol=1e-4)
    for iv, piv, leaf in zip(rm.interventions, pivs, leaves):
        for name, p in iv.named_parameters():
            if name == "rotation.weight":
                expected = qr_pullback(p, leaf.weight.grad.T)
            else:
                expected = theirs_of(piv, name).grad
            assert p.grad.abs().max() > 1e-5, name  # every parameter is reached
            torch.testing.assert_close(p.grad, expected, atol=1e-5, rtol=1e-4, msg=f"{kind}: d/d{name}")


# -- bf16 -------------------------------------------------------------------------------------------
# steerlab computes every edit in fp32 from the bf16 input and its parameters upcast, and rounds once
# to bf16 at the end. pyreft computes in the dtype of each piece: its rotate layer stays fp32 (built in
# the default dtype; pyreft never casts it), its Linear layers are bf16 (``dtype=``), so it rounds
# these intermediates to bf16 before the last cast (counted from pyreft 0.1.0's interventions.py):
ROUNDINGS = {
    "loreft": 1,  # W h + b
    "loreft_gelu": 2,  # W h + b, then the activation
    "noreft": 4,  # W1 h + b, W2 h, their difference, the product with W2 (all bf16)
    "direft": 2,  # W1 h + b, the product with W2
    "direft_orthogonal": 1,  # W h + b (R and the product are fp32)
    "consreft": 0,  # b and R are fp32 parameters: all fp32
    "lobireft": 0,
}


def exact_edit(kind: str, iv, h: Tensor) -> tuple[Tensor, Tensor]:
    """The type's formula in fp64 on ``h`` and ``iv``'s parameters (written here from the paper's
    equations), and the magnitude of its terms ``|h| + (|t| + |h| |P|ᵀ) |P|`` (a bound for rounding)."""
    p = {name: t.detach().double() for name, t in iv.named_parameters()}
    h = h.double()
    proj = qr_rows(p["rotation.weight"]) if "rotation.weight" in p else p.get("proj_weight", p.get("out_weight"))
    if "weight" in p:
        t = h @ p["weight"].T + p["bias"]
        t = torch.nn.functional.gelu(t) if kind == "loreft_gelu" else t
    else:
        t = p["bias"].expand(*h.shape[:-1], RANK)
    keep = h - h @ proj.T @ proj if kind in ("loreft", "loreft_gelu", "noreft", "consreft") else h
    out = keep + t @ proj
    return out, h.abs() + (t.abs() + h.abs() @ proj.abs().T) @ proj.abs()


@pytest.mark.parametrize("kind", sorted(TYPES))
def test_bf16_edit_is_the_exact_edit_rounded_once_and_pyreft_within_its_roundings(kind):
    """On bf16 activations: steerlab's edit is the fp64 formula rounded once to bf16 (plus fp32
    noise), and pyreft's differs from it by at most its own bf16 roundings of intermediates:
    ``|ours - pyreft| <= 2 u |exact| + n u M`` with ``u = 2⁻⁸``, ``n`` = :data:`ROUNDINGS`, ``M`` the
    magnitude of the formula's terms."""
    make_ours, make_theirs = TYPES[kind]
    torch.manual_seed(3)
    dt = torch.bfloat16 if ROUNDINGS[kind] else None  # pyreft's Cons/LobiReFT keep fp32 parameters; so does steerlab then
    iv = make_ours("blocks.0.resid_post", dt)
    iv.build(D)
    piv = make_theirs(torch.bfloat16)
    copy_into(iv, piv, leaf=False)
    h = (torch.randn(6, 5, D) * 4).bfloat16()
    with torch.no_grad():
        ours, theirs = iv(h), piv(h)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    exact, size = exact_edit(kind, iv, h)
    err = (ours.double() - exact).abs()
    assert (err <= BF16_U * exact.abs() + 1e-6 * size).all(), float((err / (BF16_U * exact.abs() + 1e-6 * size)).max())
    gap = (ours.double() - theirs.double()).abs()
    bound = 2 * BF16_U * exact.abs() + ROUNDINGS[kind] * BF16_U * size + 1e-6 * size
    assert (gap <= bound).all(), float((gap / bound).max())
    if ROUNDINGS[kind]:  # where pyreft rounds more, the two really differ: the bound is not vacuous
        assert gap.max() > 0


@pytest.mark.parametrize("kind,ulps", [("loreft", 4), ("consreft", 2)])
def test_bf16_model_equals_pyreft_within_a_few_ulps(kind, ulps):
    """A bf16 model, two layers, left-padded batch. Where pyreft's edit is all fp32 (ConsReFT) only the
    order of fp32 operations differs, which can move a site value by one bf16 ulp; where it rounds
    ``W h + b`` to bf16 (LoReFT) a site value moves by one or two ulps. Every later bf16 operation
    rounds again, so the logits may differ by a few ulps of their magnitude (measured: 1); a
    misplaced position moves them by more than the interventions' whole effect."""
    rm, prm, pivs, _ = build(kind, dtype=torch.bfloat16, iv_dtype=torch.bfloat16 if kind == "loreft" else None)
    inputs = padded_batch(LENGTHS, "left", seed=5)
    mask = inputs["attention_mask"].bool()
    pos = padded_positions(REAL, inputs["attention_mask"])
    with torch.no_grad():
        ours = rm(**inputs, intervention_positions=REAL).logits
        theirs = run_theirs(prm, inputs, pos)
        with rm.disabled():
            base = rm.model(**inputs).logits
    assert ours.dtype == torch.bfloat16
    gap = (ours.float() - theirs.float())[mask].abs().max()
    effect = (ours.float() - base.float())[mask].abs().max()
    assert gap <= ulps * ulp(ours), (float(gap), ulp(ours))
    assert effect > 20 * ulps * ulp(ours)  # the tolerance is far below what the interventions do


# -- a real model ------------------------------------------------------------------------------------
def test_smollm2_loreft_two_layers_left_padded_equals_pyreft(smollm):
    """SmolLM2-135M-Instruct (real weights): LoReFT at layers 4 and 20 from a ReftConfig, the first
    and last prompt tokens, a left-padded batch of real prompts; outputs and W's gradient."""
    model, tok = smollm
    theirs_model = copy.deepcopy(model)  # pyvene removes every hook of a model it runs: keep it off ours
    rm = reft.get_reft_model(model, reft.ReftConfig(layers=[4, 20], rank=4, positions="f1+l1"), tokenizer=tok)
    try:
        prompts = ["The capital of France is", "Two plus two equals", "Review: The movie was great.\nSentiment:"]
        side, tok.padding_side = tok.padding_side, "left"
        try:
            inputs = dict(tok(prompts, return_tensors="pt", padding=True))
        finally:
            tok.padding_side = side
        lengths = inputs["attention_mask"].sum(-1)
        real = torch.stack([torch.zeros_like(lengths), lengths - 1], 1)
        pivs = [pyreft.LoreftIntervention(embed_dim=576, low_rank_dimension=4, dtype=torch.float32) for _ in range(2)]
        for iv, piv in zip(rm.interventions, pivs):
            with torch.no_grad():
                piv.rotate_layer.weight = qr_rows(iv.rotation.weight).T
                piv.learned_source.weight.copy_(iv.weight)
                piv.learned_source.bias.copy_(iv.bias)
        reps = [{"layer": layer, "component": "block_output", "low_rank_dimension": 4, "intervention": piv}
                for layer, piv in zip([4, 20], pivs)]
        prm = pyreft.get_reft_model(theirs_model, pyreft.ReftConfig(representations=reps), set_device=False)
        ours = rm(**inputs, intervention_positions=real).logits
        theirs = run_theirs(prm, inputs, padded_positions(real, inputs["attention_mask"]), 2)
        mask = inputs["attention_mask"].bool()
        ours[mask][:, :64].sum().backward()
        theirs[mask][:, :64].sum().backward()
        torch.testing.assert_close(ours[mask], theirs[mask], atol=1e-4, rtol=1e-5)
        for iv, piv in zip(rm.interventions, pivs):
            scale = float(iv.weight.grad.abs().max())  # thirty fp32 layers: compare at fp32 noise of the largest entry
            torch.testing.assert_close(iv.weight.grad, piv.learned_source.weight.grad, atol=1e-5 * scale, rtol=1e-4)
        with rm.disabled(), torch.no_grad():
            assert (ours[mask].detach() - model(**inputs).logits[mask]).abs().max() > 1e-2
    finally:
        rm.unwrap()
