"""What the peer-equivalence tests share: padded batches, position maps, and plain-torch references
of steerlab's orthonormal parametrisation (written here from its documented maths, not imported).

steerlab counts positions in *real* tokens (position 0 is an example's first real token whichever side
the batch is padded on); pyvene and pyreft index the padded sequence. :func:`padded_positions` maps one
onto the other by hand, so a test that agrees with a peer on a padded batch checks steerlab's mapping.

steerlab's ``R`` (``[k, d]``) is ``Q(A)ᵀ`` for its parameter ``A`` (``[d, k]``, reduced QR with
``diag(U) > 0``). Its gradient therefore reaches ``A``, not ``R``: :func:`qr_pullback` turns a peer's
gradient with respect to a plain ``R`` into the gradient steerlab must report for ``A``, and
:func:`group_gradient` compares gradients of maps parametrised differently (a full rotation in pyvene,
``k`` orthonormal rows in steerlab) where only their tangent components are defined by the maths.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: unit roundoff of bfloat16 (8 significant bits): rounding to bf16 moves a value by at most this much relative
BF16_U = 2.0**-8


def ulp(x: Tensor) -> float:
    """One bf16 unit in the last place at the largest magnitude of ``x``."""
    return 2.0 ** (math.floor(math.log2(float(x.detach().abs().max()))) - 7)


def padded_batch(lengths: list[int], side: str, *, seed: int, vocab: int = 90) -> dict[str, Tensor]:
    """Random token ids (avoiding the special ids 0-2) of the given lengths, padded with 0 on ``side``."""
    g = torch.Generator().manual_seed(seed)
    seq = max(lengths)
    ids = torch.zeros(len(lengths), seq, dtype=torch.long)
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for i, n in enumerate(lengths):
        cols = slice(0, n) if side == "right" else slice(seq - n, seq)
        ids[i, cols] = torch.randint(3, vocab, (n,), generator=g)
        mask[i, cols] = 1
    return {"input_ids": ids, "attention_mask": mask}


def padded_positions(real: Tensor, mask: Tensor) -> list[list[int]]:
    """Real-token indices ``[batch, k]`` as indices into the padded rows of ``mask`` (a peer's convention)."""
    first = mask.long().argmax(-1)  # the column of each row's first real token
    return (real + first[:, None]).tolist()


def qr_rows(a: Tensor) -> Tensor:
    """``Q(a)ᵀ`` (``[k, d]``) for ``a`` (``[d, k]``): reduced QR, signs fixed so ``diag(U) > 0``."""
    q, u = torch.linalg.qr(a)
    sign = torch.where(torch.diagonal(u) < 0, -1.0, 1.0)
    return (q * sign).T


def qr_pullback(a: Tensor, grad_r: Tensor) -> Tensor:
    """``∂L/∂A`` given ``∂L/∂R`` (``[k, d]``) where ``R = qr_rows(A)``, by autograd through plain torch."""
    a = a.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(qr_rows(a), a, grad_outputs=grad_r)
    return g


def group_gradient(w: Tensor, grad: Tensor) -> Tensor:
    """``skew(Wᵀ G)`` (``[d, d]``): the derivative of ``t ↦ L(W exp(tΩ))`` as a function of skew ``Ω``.

    ``W`` is an orthogonal ``[d, d]``; ``G`` is ``∂L/∂W`` (``[d, d]``, a peer's full rotation), or
    ``∂L/∂A`` (``[d, k]``) for a map ``A`` that holds ``W``'s first ``k`` columns (steerlab's low-rank
    map: the curve moves them to ``(W exp(tΩ))[:, :k]``; the other columns only complete ``W``). At an
    ``A`` with orthonormal columns, the QR map's derivative along such a tangent direction is the
    direction itself, so steerlab's ``∂L/∂A`` enters as it is. Two parametrisations of the same
    rotation agree on this even where their plain gradients differ (by a part normal to the manifold).
    """
    d, k = grad.shape
    m = torch.zeros(d, d, dtype=grad.dtype)
    m[:, :k] = w.T @ grad
    return (m - m.T) / 2
