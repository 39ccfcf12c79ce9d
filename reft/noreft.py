"""NoReFT: LoReFT's edit with a free (non-orthogonal) projection."""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from torch import Tensor, nn

from steerlab.interventions import register, subspace_edit
from steerlab.reft._base import ReftIntervention

__all__ = ["NoReFT"]


@register("noreft")
class NoReFT(ReftIntervention):
    r"""LoReFT without the orthogonality constraint.

    .. math::

        \Phi(h) = h + W_2^\top\big(\operatorname{act}(W_1 h + b) - W_2 h\big),
        \qquad W_1, W_2 \in \mathbb{R}^{r \times d}

    The same subspace edit as LoReFT (:func:`~steerlab.interventions.subspace_edit`)
    with ``W_2`` in place of ``R``; ``W_2`` is an ordinary parameter (weight
    decay applies to it).
    """

    def build(self, width: int) -> None:
        super().build(width)
        self.weight, self.bias = self._linear(width)
        w2 = torch.empty(self.rank, width)
        nn.init.kaiming_uniform_(w2, a=math.sqrt(5))
        self.proj_weight = nn.Parameter(w2.to(self.param_dtype))

    def edit(self, h: Float[Tensor, "*batch width"]) -> Float[Tensor, "*batch width"]:
        return subspace_edit(h, self.proj_weight, self.learned_source(h, self.weight, self.bias))
