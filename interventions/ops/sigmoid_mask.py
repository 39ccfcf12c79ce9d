"""A learned soft mask over features, interchanging where it is open."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn

from steerlab.interventions.ops._base import Intervention, register

__all__ = ["SigmoidMask"]


@register("sigmoid_mask")
class SigmoidMask(Intervention):
    r"""``h' = (1 - m) \odot h + m \odot s`` with ``m = σ(ℓ / τ)`` learned per feature.

    A neuron-aligned relative of DAS: the mask learns *which features* carry
    the variable. ``logits`` start at ``init`` (default 0: half open).
    """

    sourced = True
    _arguments = ("temperature", "init")

    def __init__(self, site: str, *, width: int | None = None, temperature: float = 1.0, init: float = 0.0, **placement):
        super().__init__(site, **placement)
        self.temperature, self.init = float(temperature), float(init)
        if width is not None:
            self.build(width)

    def build(self, width: int) -> None:
        super().build(width)
        self.logits = nn.Parameter(torch.full((width,), self.init))

    def set_temperature(self, temperature: float) -> None:
        self.temperature = float(temperature)

    def mask(self) -> Float[Tensor, " width"]:
        return torch.sigmoid(self.logits / self.temperature)

    def forward(self, base: Float[Tensor, "*batch width"], source: Float[Tensor, "*batch width"] | None = None) -> Float[Tensor, "*batch width"]:
        source = self.require_source(source)
        m = self.mask().to(base.dtype)
        return base + m * (source.to(base.dtype) - base)
