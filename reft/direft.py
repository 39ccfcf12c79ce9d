"""DiReFT: the edit without orthogonality and without subtracting ``R h``."""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from torch import Tensor, nn

from steerlab.interventions import register
from steerlab.interventions.ops import compute_dtype
from steerlab.interventions.errors import checked_first, flag
from steerlab.reft._base import ReftIntervention

__all__ = ["DiReFT"]


@register("direft")
class DiReFT(ReftIntervention):
    r"""Direct ReFT (Wu et al. 2024, the ablation of LoReFT that drops the difference).

    .. math::

        \Phi(h) = h + W_2^\top\,\operatorname{act}(W_1 h + b),
        \qquad W_1, W_2 \in \mathbb{R}^{r \times d},\; b \in \mathbb{R}^r

    ``W_2`` is a free low-rank matrix (the paper's DiReFT; pyreft's
    ``NodireftIntervention``); with ``orthogonal=True`` it is an
    :class:`~steerlab.interventions.Orthonormal` ``R`` instead (pyreft's
    ``DireftIntervention``). Cheaper than LoReFT: one projection of ``h``
    fewer.
    """

    _arguments = ("rank", "act_fn", "dropout", "dtype", "orthogonal")

    @checked_first(orthogonal=flag("orthogonal"))
    def __init__(
        self,
        site: str,
        *,
        rank: int,
        width: int | None = None,
        act_fn: str | None = None,
        dropout: float = 0.0,
        dtype: torch.dtype | str | None = None,
        orthogonal: bool = False,
        **placement,
    ):
        self.orthogonal = bool(orthogonal)
        super().__init__(site, rank=rank, width=width, act_fn=act_fn, dropout=dropout, dtype=dtype, **placement)

    def build(self, width: int) -> None:
        super().build(width)
        self.weight, self.bias = self._linear(width)
        if self.orthogonal:
            self.rotation = self._rotation(width, None, True)
        else:
            w2 = torch.empty(self.rank, width)
            nn.init.kaiming_uniform_(w2, a=math.sqrt(5))
            self.out_weight = nn.Parameter(w2.to(self.param_dtype))

    def edit(self, h: Float[Tensor, "*batch width"]) -> Float[Tensor, "*batch width"]:
        dt = compute_dtype(h)
        out = self.rotation() if self.orthogonal else self.out_weight
        t = self.learned_source(h, self.weight, self.bias)
        return (h.to(dt) + t.to(dt) @ out.to(dt)).to(h.dtype)
