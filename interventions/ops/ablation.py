"""Ablations: replace the selected units by zero, a mean, or add noise."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from steerlab.interventions.errors import ConfigError, ShapeMismatch
from steerlab.interventions.ops._base import Intervention, register

__all__ = ["Zero", "Mean", "Noise"]


@register("zero")
class Zero(Intervention):
    """``h' = 0`` (zero ablation)."""

    def forward(self, base: Float[Tensor, "*batch width"], source: Tensor | None = None) -> Float[Tensor, "*batch width"]:
        return torch.zeros_like(base)


@register("mean")
class Mean(Intervention):
    """``h' = μ`` (mean ablation) with ``μ`` a ``[width]`` vector, e.g. the
    mean of ``lab.collect(...)`` over a reference set. ``μ`` is saved in the
    weights file."""

    def __init__(self, site: str, mean: Tensor | None = None, *, width: int | None = None, **placement):
        super().__init__(site, **placement)
        self._mean = None if mean is None else mean.detach().clone()
        if self._mean is not None and self._mean.dim() != 1:
            raise ShapeMismatch(f"Mean has shape {tuple(self._mean.shape)}; expected [width]")
        if width is not None or self._mean is not None:
            self.build(width if width is not None else self._mean.shape[0])  # type: ignore[union-attr]

    def build(self, width: int) -> None:
        if self._mean is not None and self._mean.shape[0] != width:
            raise ShapeMismatch(f"Mean has width {self._mean.shape[0]} but site {self.site!r} has width {width}")
        super().build(width)
        self.register_buffer("mean", self._mean if self._mean is not None else torch.zeros(width))
        self._mean = None

    def forward(self, base: Float[Tensor, "*batch width"], source: Tensor | None = None) -> Float[Tensor, "*batch width"]:
        return self.mean.to(base.dtype).expand_as(base).clone()


@register("noise")
class Noise(Intervention):
    """``h' = h + σ ε``, ``ε ~ N(0, I)`` drawn from a generator seeded with
    ``seed`` at every call, so the same call gives the same noise."""

    _arguments = ("std", "seed")

    def __init__(self, site: str, *, std: float = 1.0, seed: int = 0, **placement):
        super().__init__(site, **placement)
        if std < 0:
            raise ConfigError(f"std={std!r}: expected a non-negative standard deviation")
        self.std, self.seed = float(std), int(seed)

    def forward(self, base: Float[Tensor, "*batch width"], source: Tensor | None = None) -> Float[Tensor, "*batch width"]:
        gen = torch.Generator(device=base.device).manual_seed(self.seed)
        eps = torch.randn(base.shape, generator=gen, device=base.device, dtype=torch.float32)
        return base + (self.std * eps).to(base.dtype)
