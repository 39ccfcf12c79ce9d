"""LobiReFT: add a learned vector that lives in a low-rank subspace."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn

from steerlab.interventions import register
from steerlab.interventions.ops import compute_dtype
from steerlab.interventions.errors import checked_first, flag
from steerlab.reft._base import ReftIntervention

__all__ = ["LobiReFT"]


@register("lobireft")
class LobiReFT(ReftIntervention):
    r"""Low-rank bias ReFT: a steering vector constrained to a learned subspace.

    .. math::

        \Phi(h) = h + R^\top b, \qquad R R^\top = I_r,\; b \in \mathbb{R}^r

    ``act_fn`` does not apply. With ``rank == width`` this is a learned
    steering vector (:class:`~steerlab.interventions.Add` with ``trainable=True``).
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
        dt = compute_dtype(h)
        return (h.to(dt) + self.bias.to(dt) @ self.rotation().to(dt)).to(h.dtype)
