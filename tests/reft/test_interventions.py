"""The ReFT family's maths, options and constraints, each against a hand-written formula."""

from __future__ import annotations

import pytest
import torch

import steerlab as sl
from steerlab.interventions.errors import ConfigError, SubspaceSizeError
from steerlab.interventions.serialize import build_intervention, intervention_record
from steerlab.reft import ConsReFT, DiReFT, LobiReFT, LoReFT, NoReFT
from tests.reliability import one_thread_fixture

_one_thread = one_thread_fixture()  # one intra-op thread: much faster on a shared 2-core machine

D, K = 16, 4
SITE = "blocks.0.resid_post"


def _h(*shape, dtype=torch.float32):
    return torch.randn(*shape, D, generator=torch.Generator().manual_seed(3)).to(dtype)


def test_loreft_formula_and_orthonormal_R():
    iv = LoReFT(SITE, rank=K, width=D)
    h = _h(3, 5)
    R, W, b = iv.R.detach(), iv.weight.detach(), iv.bias.detach()
    assert torch.allclose(R @ R.T, torch.eye(K), atol=1e-6)
    expected = h + (h @ W.T + b - h @ R.T) @ R  # h + Rᵀ(Wh + b − Rh), row-vector form
    assert torch.allclose(iv(h), expected, atol=1e-6)
    assert not torch.allclose(iv(h), h, atol=1e-3)  # a random init edits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_loreft_equals_the_subspace_edit(dtype):
    """Without an activation LoReFT evaluates the edit fused; it is subspace_edit(h, R, W h + b)."""
    iv = LoReFT(SITE, rank=K, width=D, dtype=dtype)
    h = _h(3, 5, dtype=dtype)
    reference = sl.subspace_edit(h, iv.R, (h.float() @ iv.weight.float().T + iv.bias.float()))
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(iv(h).float(), reference.float(), atol=tol, rtol=tol)
    assert iv(h).dtype == dtype


def test_other_types_match_their_formulas():
    h = _h(2, 3)
    di = DiReFT(SITE, rank=K, width=D)
    assert torch.allclose(di(h), h + (h @ di.weight.T + di.bias) @ di.out_weight, atol=1e-6)
    dio = DiReFT(SITE, rank=K, width=D, orthogonal=True)
    assert torch.allclose(dio(h), h + (h @ dio.weight.T + dio.bias) @ dio.rotation(), atol=1e-6)
    no = NoReFT(SITE, rank=K, width=D)
    W2 = no.proj_weight
    assert torch.allclose(no(h), h + (h @ no.weight.T + no.bias - h @ W2.T) @ W2, atol=1e-5)
    co = ConsReFT(SITE, rank=K, width=D)
    R = co.rotation()
    out = co(h)
    assert torch.allclose(out, h + (co.bias - h @ R.T) @ R, atol=1e-6)
    assert torch.allclose(out @ R.T, co.bias.expand(2, 3, K), atol=1e-5)  # every output has coordinates b
    lo = LobiReFT(SITE, rank=K, width=D)
    assert torch.allclose(lo(h), h + lo.bias @ lo.rotation(), atol=1e-6)


def test_activation_applies_to_the_learned_source():
    iv = LoReFT(SITE, rank=K, width=D, act_fn="relu")
    h = _h(4)
    R = iv.R
    expected = h + (torch.relu(h @ iv.weight.T + iv.bias) - h @ R.T) @ R
    assert torch.allclose(iv(h), expected, atol=1e-6)
    with pytest.raises(ConfigError, match="act_fn='nope': expected None or one of"):
        LoReFT(SITE, rank=K, act_fn="nope")


def test_dropout_only_in_training_mode():
    iv = LoReFT(SITE, rank=K, width=D, dropout=0.5)
    h = _h(64)
    iv.eval()
    assert torch.equal(iv(h), iv(h))
    iv.train()
    torch.manual_seed(1)
    a = iv(h)
    iv.eval()
    clean = iv(h)
    zeroed = (a == 0) & (clean != 0)
    assert 0.3 < zeroed.float().mean() < 0.7  # about half the coordinates dropped
    kept = ~zeroed
    assert torch.allclose(a[kept], 2 * clean[kept], atol=1e-5)  # the rest scaled by 1/(1-p)


def test_rank_larger_than_width_is_refused():
    with pytest.raises(SubspaceSizeError, match=r"rank=20 does not fit site 'blocks.0.resid_post' of width 16; expected rank <= 16"):
        LoReFT(SITE, rank=20, width=D)
    with pytest.raises(SubspaceSizeError, match="rank=0: expected a positive int"):
        LoReFT(SITE, rank=0)
    with pytest.raises(ConfigError, match=r"dropout=1.5: expected a probability in \[0, 1\)"):
        LoReFT(SITE, rank=2, dropout=1.5)


def test_dtype_follows_request_and_R_maths_stay_fp32():
    iv = LoReFT(SITE, rank=K, width=D, dtype=torch.bfloat16)
    assert iv.weight.dtype == iv.bias.dtype == torch.bfloat16
    assert iv.rotation.weight.dtype == torch.float32 and iv.R.dtype == torch.float32
    h = _h(2, 3, dtype=torch.bfloat16)
    out = iv(h)
    assert out.dtype == torch.bfloat16
    h32 = h.float()
    t = (h @ iv.weight.T + iv.bias).float()  # the projection runs in its own dtype
    expected = (h32 + (t - h32 @ iv.R.T) @ iv.R).to(torch.bfloat16)
    assert torch.allclose(out.float(), expected.float(), atol=1e-2)
    # an fp32 input with bf16 weights does not crash (pyreft's bf16 default does)
    assert iv(h.float()).dtype == torch.float32


def test_weight_decay_never_reaches_R():
    """R's parameter A is marked out of weight decay, and optimiser groups built from that mark leave A
    exactly where it was under heavy decay (a decayed A shrinks every step: the control shows it would)."""
    from steerlab.interventions.orthonormal import is_no_decay

    def run(groups_of) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        iv = LoReFT(SITE, rank=K, width=D)
        a0 = iv.rotation.weight.detach().clone()
        opt = torch.optim.AdamW(groups_of(iv), lr=0.05)
        h = _h(8)
        for _ in range(5):
            opt.zero_grad()
            (iv(h) - 1).pow(2).mean().backward()
            iv.rotation.weight.grad = torch.zeros_like(a0)  # A's gradient is zero: only decay could move it
            opt.step()
        return a0, iv.rotation.weight.detach()

    def marked(iv):
        decay = [p for p in iv.parameters() if not is_no_decay(p)]
        keep = [p for p in iv.parameters() if is_no_decay(p)]
        return [{"params": decay, "weight_decay": 10.0}, {"params": keep, "weight_decay": 0.0}]

    a0, a = run(marked)
    assert torch.equal(a, a0)
    a0, decayed = run(lambda iv: [{"params": list(iv.parameters()), "weight_decay": 10.0}])
    assert decayed.norm() < 0.5 * a0.norm()  # without the mark, decay shrinks A (R itself is scale-invariant)


@pytest.mark.parametrize("cls,extra", [(LoReFT, {"act_fn": "gelu", "train_rotation": False}), (DiReFT, {"orthogonal": True, "act_fn": "tanh"}),
                                       (NoReFT, {"act_fn": "relu"}), (ConsReFT, {"train_rotation": False}), (LobiReFT, {})])
def test_every_constructor_argument_round_trips(cls, extra):
    iv = cls(SITE, rank=3, width=D, dropout=0.1, dtype="bfloat16", positions="f2+l2", **extra)
    rec, tensors = intervention_record(iv, "0.")
    again = build_intervention(rec, tensors, "0.")
    assert type(again) is cls and again.arguments() == iv.arguments()
    assert again.positions == iv.positions and again.dropout == 0.1
    for (n1, p1), (n2, p2) in zip(iv.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and p1.dtype == p2.dtype and torch.equal(p1, p2)
    for n, p in iv.named_parameters():
        assert dict(again.named_parameters())[n].requires_grad == p.requires_grad
    iv.eval(), again.eval()
    h = _h(2, 4, dtype=torch.bfloat16)
    assert torch.equal(iv(h), again(h))


def test_from_subspace_seeds_R_and_trains_the_rest():
    q, _ = torch.linalg.qr(torch.randn(D, K))
    sub = sl.Subspace(q.T.contiguous(), SITE, positions=-1, metadata={"variable": "X"})
    iv = LoReFT.from_subspace(sub)
    assert iv.site == SITE and iv.rank == K and iv.positions == sl.Positions(-1)
    assert torch.allclose(iv.R, sub.basis, atol=1e-6)
    assert not iv.rotation.weight.requires_grad and iv.weight.requires_grad and iv.bias.requires_grad
    h = _h(6)
    opt = torch.optim.AdamW([p for p in iv.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        (iv(h) - 1).pow(2).mean().backward()
        opt.step()
    assert torch.allclose(iv.R, sub.basis, atol=1e-6)  # R fixed
    full = LoReFT.from_subspace(sub, train_rotation=True, positions="l2")
    assert full.rotation.weight.requires_grad and full.positions == sl.Positions("l2")
    with pytest.raises(SubspaceSizeError, match="rank=2 but the subspace has size 4"):
        LoReFT.from_subspace(sub, rank=2)
    with pytest.raises(ConfigError, match="from_subspace takes a steerlab Subspace; got Tensor"):
        LoReFT.from_subspace(q)
