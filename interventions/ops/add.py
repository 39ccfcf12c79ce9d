"""Add a vector: the steering-vector intervention."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn

from steerlab.interventions.errors import ShapeMismatch, checked_first, flag
from steerlab.interventions.ops._base import Intervention, register

__all__ = ["Add"]


@register("add")
class Add(Intervention):
    """``h' = h + α v``: add a steering vector ``v`` (``[width]``) at the selected units.

    ``trainable=True`` makes ``v`` a parameter (a learned steering vector);
    otherwise it is a buffer. ``v`` is saved in the weights file.
    """

    _arguments = ("alpha", "trainable")

    @checked_first(trainable=flag("trainable"))  # "false" would otherwise read as True
    def __init__(self, site: str, vector: Tensor | None = None, *, alpha: float = 1.0, trainable: bool = False, width: int | None = None, **placement):
        super().__init__(site, **placement)
        self.alpha, self.trainable_vector = float(alpha), bool(trainable)
        self._vector = None if vector is None else vector.detach().clone()
        if self._vector is not None and self._vector.dim() != 1:
            raise ShapeMismatch(f"Add vector has shape {tuple(self._vector.shape)}; expected [width]")
        if width is not None or self._vector is not None:
            self.build(width if width is not None else self._vector.shape[0])  # type: ignore[union-attr]

    @property
    def trainable(self) -> bool:  # type: ignore[override]
        return self.trainable_vector

    def arguments(self):
        return {"alpha": self.alpha, "trainable": self.trainable_vector}

    def build(self, width: int) -> None:
        if self._vector is not None and self._vector.shape[0] != width:
            raise ShapeMismatch(f"Add vector has width {self._vector.shape[0]} but site {self.site!r} has width {width}")
        super().build(width)
        v = self._vector if self._vector is not None else torch.zeros(width)
        self._vector = None
        if self.trainable_vector:
            self.vector = nn.Parameter(v)
        else:
            self.register_buffer("vector", v)

    def forward(self, base: Float[Tensor, "*batch width"], source: Tensor | None = None) -> Float[Tensor, "*batch width"]:
        v = self.vector
        v = v if v.dtype == base.dtype else v.to(base.dtype)
        return base + v if self.alpha == 1.0 else base + self.alpha * v  # one op fewer per call at alpha 1 (same result)
