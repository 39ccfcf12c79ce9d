"""Lambda: any function of the base (and source) slice. Not serialisable."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from steerlab.interventions.errors import ConfigError
from steerlab.interventions.ops._base import Intervention, register

__all__ = ["Lambda"]


@register("lambda")
class Lambda(Intervention):
    """``h' = f(h)`` or, with ``sourced=True``, ``h' = f(h, s)``.

    Works everywhere an intervention does; saving one raises
    :class:`~steerlab.interventions.errors.NotSerialisable` (code is not data).
    """

    def __init__(self, site: str, fn: Callable[..., Tensor], *, sourced: bool = False, **placement):
        if not callable(fn):
            raise ConfigError(f"Lambda needs a callable; got {fn!r}")
        self.__dict__["sourced"] = bool(sourced)  # before super().__init__ checks `source`
        super().__init__(site, **placement)
        self.fn = fn

    def forward(self, base: Tensor, source: Tensor | None = None) -> Any:
        # whatever the user's function returns: the engine checks it (a tensor of the slice's shape)
        # and names the intervention when it is not
        return self.fn(base, source) if self.sourced else self.fn(base)
