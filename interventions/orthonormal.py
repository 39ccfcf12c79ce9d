"""A ``k × d`` matrix with orthonormal rows, exact, cheap, immune to weight decay.

.. math::

    R = Q(A)^\\top \\in \\mathbb{R}^{k \\times d}, \\qquad A = Q(A)\\,U,\\;
    \\operatorname{diag}(U) > 0 \\qquad (A \\in \\mathbb{R}^{d \\times k}\\text{, reduced QR})

so :math:`R R^\\top = I_k` to the precision of fp32 whatever ``A`` is. ``Q`` is
unchanged when ``A`` is scaled by any ``c > 0``, so weight decay on ``A`` can
never shrink ``R`` (the trap of ``parametrizations.orthogonal`` + AdamW, where
``R`` collapses to zero); steerlab's optimisers also leave ``A`` out of decay
(:func:`no_decay`). ``A`` is kept in fp32 whatever the model's dtype, and the
maths runs in fp32.

``R`` is materialised once per forward, not once per site call: the engine
calls :func:`materialise` at the start of every forward with all the maps in
use, which groups maps of the same shape into one batched QR. Under
``no_grad`` a materialised ``R`` is reused until ``A`` changes (so steered
generation pays for it once); with gradients it is reused only within the
forward that built it (and the backward's gradient-checkpointing replay).
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable

import torch
from jaxtyping import Float
from torch import Tensor, nn

from steerlab.interventions.errors import SubspaceSizeError

__all__ = ["Orthonormal", "materialise", "no_decay", "is_no_decay"]

_EPOCH = itertools.count(1)
_current_epoch = 0


def _orthonormal_rows(a: Float[Tensor, "*n d k"]) -> Float[Tensor, "*n k d"]:
    q, u = torch.linalg.qr(a, mode="reduced")
    sign = torch.sign(torch.diagonal(u, dim1=-2, dim2=-1))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return (q * sign.unsqueeze(-2)).transpose(-1, -2)


def no_decay(param: nn.Parameter) -> nn.Parameter:
    """Mark a parameter so steerlab's optimisers and trainers never decay it."""
    param._steerlab_no_decay = True  # type: ignore[attr-defined]
    return param


def is_no_decay(param: Tensor) -> bool:
    return bool(getattr(param, "_steerlab_no_decay", False))


class Orthonormal(nn.Module):
    """``k × d`` with orthonormal rows; call it to get ``R``.

    Args:
        width: ``d``, the size of the space.
        rank: ``k <= d``, the number of orthonormal rows.
        init: optional ``[k, d]`` initial ``R`` (orthonormal rows; made so by QR
            otherwise). Default: a random orthonormal basis.

    Example::

        >>> rot = Orthonormal(16, 4)
        >>> R = rot()
        >>> torch.allclose(R @ R.T, torch.eye(4), atol=1e-6)
        True
    """

    def __init__(self, width: int, rank: int, init: Tensor | None = None, *, generator: torch.Generator | None = None):
        super().__init__()
        if not (isinstance(width, int) and isinstance(rank, int)) or rank < 1 or rank > width:
            raise SubspaceSizeError(f"a subspace of size {rank} does not fit a space of width {width}; expected 1 <= size <= {width}")
        self.width, self.rank = width, rank
        if init is None:
            a = torch.randn(width, rank, generator=generator)
            a = _orthonormal_rows(a).T.contiguous()
        else:
            if tuple(init.shape) != (rank, width):
                raise SubspaceSizeError(f"init has shape {tuple(init.shape)}; expected [rank={rank}, width={width}]")
            a = init.detach().to(torch.float32).T.contiguous()
        self.weight = no_decay(nn.Parameter(a))
        self._cached: tuple[tuple, Tensor] | None = None

    def _key(self) -> tuple:
        grad = torch.is_grad_enabled() and self.weight.requires_grad
        return (_current_epoch if grad else 0, grad, self.weight._version, self.weight.device)

    def forward(self) -> Float[Tensor, "k d"]:
        hit = self._cached
        if hit is not None and hit[0] == self._key():
            return hit[1]
        r = _orthonormal_rows(self.weight)
        outer = hit is not None and hit[0][1] and hit[0][0] == _current_epoch  # a forward with gradients is under way
        if not (torch.is_grad_enabled() and self.weight.requires_grad) and not outer:
            self._cached = (self._key(), r)
        return r

    def extra_repr(self) -> str:
        return f"width={self.width}, rank={self.rank}"

    def _apply(self, fn, recurse=True):  # .to()/.cuda(): drop a cached R on the old device
        self._cached = None
        out = super()._apply(fn, recurse)
        if self.weight.dtype != torch.float32:  # A stays fp32 through `.to(bf16)` / `.half()` (QR needs it)
            self.weight.data = self.weight.data.float()
            if self.weight.grad is not None:
                self.weight.grad = self.weight.grad.float()
        return out


def materialise(maps: Iterable[Orthonormal]) -> None:
    """Start a forward: compute every map's ``R`` once, batched by shape.

    Called by the hook engine at the top of each forward with the maps of the
    interventions in use.
    """
    global _current_epoch
    _current_epoch = next(_EPOCH)
    groups: dict[tuple, list[Orthonormal]] = defaultdict(list)
    for m in maps:
        if m._cached is not None and m._cached[0] == m._key():
            continue
        groups[(m.width, m.rank, m.weight.device)].append(m)
    for group in groups.values():
        if len(group) == 1:
            m = group[0]
            m._cached = (m._key(), _orthonormal_rows(m.weight))
            continue
        rs = _orthonormal_rows(torch.stack([m.weight for m in group]))
        for m, r in zip(group, rs.unbind(0)):
            m._cached = (m._key(), r)


def release(maps: Iterable[Orthonormal]) -> None:
    """Drop cached ``R``s that hold an autograd graph (end of an attachment)."""
    for m in maps:
        if m._cached is not None and m._cached[0][1]:
            m._cached = None
