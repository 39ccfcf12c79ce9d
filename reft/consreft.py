"""ConsReFT: set the subspace's coordinates to a learned constant."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn

from steerlab.interventions import register, subspace_edit
from steerlab.interventions.errors import checked_first, flag
from steerlab.reft._base import ReftIntervention

__all__ = ["ConsReFT"]


@register("consreft")
class ConsReFT(ReftIntervention):
    r"""Constant ReFT: the subspace edit with a learned constant target.

    .. math::

        \Phi(h) = h + R^\top (b - R h), \qquad R R^\top = I_r,\; b \in \mathbb{R}^r

    Every edited representation ends with coordinates ``b`` in the row space
    of ``R`` (a learned, input-independent value: DAS's interchange with a
    learned source). ``act_fn`` does not apply (there is no ``W h``).
    """

    _arguments = ("rank", "dropout", "dtype", "train_rotation")

    @checked_first(train_rotation=flag("train_rotation"))
    def __init__(self, site: str, *, rank: int, width: int | None = None, dropout: float = 0.0,
                 dtype: torch.dtype | str | None = None, train_rotation: bool = True, **placement):
        self.train_rotation = bool(train_rotation)
        super().__init__(site, rank=rank, width=width, dropout=dropout, dtype=dtype, **placement)

    def build(self, width: int) -> None:
        super().build(width)
        self.rotation = self._rotation(width, None, self.train_rotation)
        self.bias = nn.Parameter(torch.rand(self.rank).to(self.param_dtype))

    def edit(self, h: Float[Tensor, "*batch width"]) -> Float[Tensor, "*batch width"]:
        return subspace_edit(h, self.rotation(), self.bias.expand(*h.shape[:-1], self.rank))
