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

``R`` is materialised once per forward, not once per site call: at the start
of every intervened forward the engine calls :func:`materialise` with all the
maps in use, which groups maps of the same shape into one batched QR and
returns a *table* ``{map: R}``. The table belongs to that forward (it travels
with the call, never with the module): while the engine runs a handler it
makes the table current on its thread (:func:`use_table`), and a map called
then returns its entry, so every site of one forward (and the backward's
gradient-checkpointing replay of it) sees the same ``R``. A map called
outside an intervened forward computes ``R`` afresh. Nothing about a forward
is stored on the module, so two threads, an interrupted forward or a
``copy.deepcopy`` after a training step see no stale state.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterable

import torch
from jaxtyping import Float
from torch import Tensor, nn

from steerlab.interventions.errors import SubspaceSizeError

__all__ = ["Orthonormal", "orthonormal_rows", "materialise", "use_table", "no_decay", "is_no_decay", "RTable"]

#: one forward's materialised maps: ``{map: (key, R)}``
RTable = dict

# the table of the forward whose handler runs now, by thread (a plain dict, not threading.local:
# this module travels by value to an nnsight server, and a thread-local object does not pickle)
_TABLES: dict[int, RTable] = {}


def orthonormal_rows(a: Float[Tensor, "*map width rank"]) -> Float[Tensor, "*map rank width"]:
    """Rows of ``Q(a)ᵀ`` (reduced QR, signs fixed so that ``diag(U) > 0``): orthonormal, a
    continuous function of ``a``, and unchanged when ``a`` is scaled by a positive factor."""
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


def use_table(table: RTable | None) -> RTable | None:
    """Make ``table`` the current forward's on this thread; returns the previous one (restore
    it with ``use_table(previous)`` in a ``finally``)."""
    ident = threading.get_ident()
    previous = _TABLES.get(ident)
    if table is None:
        _TABLES.pop(ident, None)
    else:
        _TABLES[ident] = table
    return previous


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
            a = orthonormal_rows(a).T.contiguous()
        else:
            if tuple(init.shape) != (rank, width):
                raise SubspaceSizeError(f"init has shape {tuple(init.shape)}; expected [rank={rank}, width={width}]")
            a = init.detach().to(torch.float32).T.contiguous()
        self.weight = no_decay(nn.Parameter(a))

    def key(self) -> tuple:
        """What ``R`` depends on: the weight's storage, version and device, and whether it is
        computed with gradients (an entry made without them cannot serve a forward that needs them)."""
        w = self.weight
        return (w.data_ptr(), w._version, w.device, torch.is_grad_enabled() and w.requires_grad)

    def forward(self) -> Float[Tensor, "rank width"]:
        table = _TABLES.get(threading.get_ident()) if _TABLES else None
        if table is not None:
            hit = table.get(self)
            key = self.key()
            if hit is not None and hit[0] == key:
                return hit[1]
            r = orthonormal_rows(self.weight)
            table[self] = (key, r)
            return r
        return orthonormal_rows(self.weight)

    def extra_repr(self) -> str:
        return f"width={self.width}, rank={self.rank}"

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        if self.weight.dtype != torch.float32:  # A stays fp32 through `.to(bf16)` / `.half()` (QR needs it)
            self.weight.data = self.weight.data.float()
            if self.weight.grad is not None:
                self.weight.grad = self.weight.grad.float()
        return out


def materialise(maps: Iterable[Orthonormal], reuse: RTable | None = None) -> RTable:
    """A new forward's table: every map's ``R`` computed once, batched by shape.

    ``reuse``: an earlier table of the same call (a generation's previous
    step), whose entries are kept where their key still matches (the weight
    unchanged, no gradient needed).
    """
    table: RTable = {}
    groups: dict[tuple, list[Orthonormal]] = defaultdict(list)
    for m in dict.fromkeys(maps):
        key = m.key()
        hit = None if reuse is None else reuse.get(m)
        if hit is not None and hit[0] == key and not key[3]:
            table[m] = hit
            continue
        groups[(m.width, m.rank, m.weight.device)].append(m)
    for group in groups.values():
        if len(group) == 1:
            m = group[0]
            table[m] = (m.key(), orthonormal_rows(m.weight))
            continue
        rs = orthonormal_rows(torch.stack([m.weight for m in group]))
        for m, r in zip(group, rs.unbind(0)):
            table[m] = (m.key(), r)
    return table
