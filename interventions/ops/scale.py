"""Scale the selected units."""

from __future__ import annotations

from jaxtyping import Float
from torch import Tensor

from steerlab.interventions.ops._base import Intervention, register

__all__ = ["Scale"]


@register("scale")
class Scale(Intervention):
    """``h' = α h`` (``α = 0`` is a zero ablation, ``α = -1`` flips the direction)."""

    _arguments = ("factor",)

    def __init__(self, site: str, *, factor: float, **placement):
        super().__init__(site, **placement)
        self.factor = float(factor)

    def forward(self, base: Float[Tensor, "*batch width"], source: Tensor | None = None) -> Float[Tensor, "*batch width"]:
        return base * self.factor
