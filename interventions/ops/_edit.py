"""The subspace edit that DAS and the ReFT family share.

.. math::

    h' = h + R^\\top (t - R h), \\qquad R \\in \\mathbb{R}^{k \\times d},\\; R R^\\top = I_k

replaces the coordinates of ``h`` in the row space of ``R`` by ``t`` and keeps
its orthogonal complement. DAS takes ``t = R s`` (a source's coordinates);
LoReFT ``t = W h + b``. The maths runs in fp32 when ``h`` is in a half
dtype, and the result is cast back.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["subspace_edit", "compute_dtype"]


def compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def subspace_edit(
    h: Float[Tensor, "*batch width"], rotation: Float[Tensor, "rank width"], target: Float[Tensor, "*batch rank"]
) -> Float[Tensor, "*batch width"]:
    """``h + (target - h Rᵀ) R`` (row-vector form of the formula above)."""
    dt = compute_dtype(h)
    h32 = h.to(dt)
    r = rotation.to(dt)
    return (h32 + (target.to(dt) - h32 @ r.T) @ r).to(h.dtype)
