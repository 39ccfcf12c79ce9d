"""A labelled cache of collected activations (TransformerLens's ``ActivationCache`` ergonomics)."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterator, Mapping

import torch
from jaxtyping import Float
from torch import Tensor

from steerlab.interventions.errors import SiteNotFound

__all__ = ["ActivationCache"]

_LAYER = re.compile(r"^blocks\.(\d+)\.")


class ActivationCache(Mapping[str, Tensor]):
    """Site name -> collected value ``[batch, k, ...]`` (``k`` the collected positions).

    ``cache["blocks.3.resid_post"]``, ``cache.stack("blocks.*.resid_post")``
    (``[layer, batch, k, width]`` in layer order), ``cache.to(device)``.
    """

    def __init__(self, values: dict[str, Tensor] | None = None, *, positions: dict[str, object] | None = None):
        self._values: dict[str, Tensor] = dict(values or {})
        self.positions = dict(positions or {})

    def __getitem__(self, name: str) -> Tensor:
        try:
            return self._values[name]
        except KeyError:
            raise SiteNotFound(name, self._values, reason="it was not collected") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __setitem__(self, name: str, value: Tensor) -> None:
        self._values[name] = value

    def stack(self, pattern: str) -> Float[Tensor, "site ..."]:
        """Stack the values whose names match ``pattern`` (layer order)."""
        names = [n for n in self._values if fnmatch.fnmatchcase(n, pattern)]
        if not names:
            raise SiteNotFound(pattern, self._values, reason="no collected site matches the pattern")
        names.sort(key=lambda n: (int(m[1]) if (m := _LAYER.match(n)) else -1, n))
        return torch.stack([self._values[n] for n in names])

    def to(self, device) -> ActivationCache:
        return ActivationCache({k: v.to(device) for k, v in self._values.items()}, positions=self.positions)

    def __repr__(self) -> str:
        rows = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in list(self._values.items())[:6])
        more = f", ... ({len(self)} in all)" if len(self) > 6 else ""
        return f"ActivationCache({rows}{more})"
