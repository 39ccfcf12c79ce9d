"""steerlab's LoReFT equals pyreft's ``LoreftIntervention`` given the same R, W, b (forward and gradients)."""

from __future__ import annotations

import pyreft  # the test environment installs it with --no-deps (README)
import torch

from steerlab import reft
from tests.archs import tiny_model
from tests.reliability import one_thread_fixture

_one_thread = one_thread_fixture()  # one intra-op thread: much faster on a shared 2-core machine

LAYER, RANK, D = 1, 4, 32
POS = [[1, 4], [2, 5]]  # per-example positions, no padding: pyvene's indices are the real-token ones


def _pair():
    ours_model, theirs_model = tiny_model("llama"), tiny_model("llama")
    ours = reft.LoReFT(f"blocks.{LAYER}.resid_post", rank=RANK, positions="per-call")
    rm = reft.get_reft_model(ours_model, ours)
    R, W, b = ours.R.detach().clone(), ours.weight.detach().clone(), ours.bias.detach().clone()
    piv = pyreft.LoreftIntervention(embed_dim=D, low_rank_dimension=RANK, dtype=torch.float32)
    cfg = pyreft.ReftConfig(representations={"layer": LAYER, "component": "block_output", "low_rank_dimension": RANK, "intervention": piv})
    prm = pyreft.get_reft_model(theirs_model, cfg, set_device=False)
    with torch.no_grad():
        piv.learned_source.weight.copy_(W)
        piv.learned_source.bias.copy_(b)
    return rm, prm, piv, (R, W, b)


def _inputs():
    ids = torch.randint(3, 90, (2, 7), generator=torch.Generator().manual_seed(5))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _theirs(prm, inputs):
    return prm(inputs, unit_locations={"sources->base": (None, [POS])})[1].logits


def test_forward_equals_pyreft_with_its_orthogonal_parametrisation():
    rm, prm, piv, (R, _, _) = _pair()
    with torch.no_grad():
        piv.rotate_layer.weight = R.T  # through torch's orthogonal parametrisation (right inverse)
    assert torch.allclose(piv.rotate_layer.weight, R.T, atol=1e-6)
    inputs = _inputs()
    with torch.no_grad():
        ours = rm(**inputs, intervention_positions=torch.tensor(POS)).logits
        theirs = _theirs(prm, inputs)
    with rm.disabled(), torch.no_grad():
        base = rm.model(**inputs).logits
    assert (ours - base).abs().max() > 1e-2  # the intervention does something
    torch.testing.assert_close(ours, theirs, atol=2e-6, rtol=1e-5)


def test_gradients_equal_pyreft():
    rm, prm, piv, (R, _, _) = _pair()
    leaf = pyreft.interventions.LowRankRotateLayer(D, RANK, init_orth=False)
    with torch.no_grad():
        leaf.weight.copy_(R.T)
    piv.rotate_layer = leaf  # the same maths with R a plain leaf, so dL/dR is comparable
    inputs = _inputs()
    probe = torch.randn(2, 7, 96, generator=torch.Generator().manual_seed(7))
    emb_o = rm.model.get_input_embeddings()(inputs["input_ids"]).detach().requires_grad_(True)
    emb_t = emb_o.detach().clone().requires_grad_(True)
    iv = rm.interventions[0]
    used = []  # the R materialised for this forward (a forward hook on the map sees each R it hands out)
    handle = iv.rotation.register_forward_hook(lambda m, a, r: used.append(r))
    out = rm(inputs_embeds=emb_o, attention_mask=inputs["attention_mask"], intervention_positions=torch.tensor(POS)).logits
    handle.remove()
    assert len({id(r) for r in used}) == 1  # one R for the whole forward
    R_used = used[0]
    R_used.retain_grad()
    (out * probe).sum().backward()
    theirs = prm({"inputs_embeds": emb_t, "attention_mask": inputs["attention_mask"]},
                 unit_locations={"sources->base": (None, [POS])})[1].logits
    (theirs * probe).sum().backward()
    torch.testing.assert_close(out, theirs, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(iv.weight.grad, piv.learned_source.weight.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(iv.bias.grad, piv.learned_source.bias.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(R_used.grad, leaf.weight.grad.T, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(emb_o.grad, emb_t.grad, atol=1e-5, rtol=1e-4)
    assert iv.weight.grad.abs().max() > 1e-4 and emb_o.grad.abs().max() > 1e-4
