"""Collect: record the selected units, change nothing."""

from __future__ import annotations

from torch import Tensor

from steerlab.interventions.errors import checked_first, flag
from steerlab.interventions.ops._base import Intervention, register

__all__ = ["Collect"]


@register("collect")
class Collect(Intervention):
    """Records the selected slice into the run's :class:`ActivationCache`
    (under ``name``, default the site name); the forward is unchanged.
    ``detach=False`` keeps the autograd graph (for gradients of the values)."""

    _arguments = ("name", "detach")

    @checked_first(detach=flag("detach"))
    def __init__(self, site: str, *, name: str | None = None, detach: bool = True, **placement):
        super().__init__(site, **placement)
        self.name = name or site
        self.detach = bool(detach)

    def forward(self, base: Tensor, source: Tensor | None = None) -> Tensor:
        return base
