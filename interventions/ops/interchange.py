"""Interchange: copy the source's values into the base."""

from __future__ import annotations

from jaxtyping import Float
from torch import Tensor

from steerlab.interventions.ops._base import Intervention, register

__all__ = ["Interchange"]


@register("interchange")
class Interchange(Intervention):
    """``h' = s``: the selected units take the source run's values (activation
    patching). With ``dims=`` only those features are swapped (a localist,
    neuron-aligned interchange).

    Example::

        lab.run(corrupt, [Interchange("blocks.6.resid_post", positions=-1, source=clean)])
    """

    sourced = True

    def forward(self, base: Float[Tensor, "*batch width"], source: Float[Tensor, "*batch width"] | None = None) -> Float[Tensor, "*batch width"]:
        source = self.require_source(source)
        return source.to(base.dtype)
