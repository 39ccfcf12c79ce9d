"""Distributed interchange interventions (DAS): swap a learned subspace."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn

from steerlab.interventions.errors import SubspaceSizeError
from steerlab.interventions.ops._base import Intervention, register
from steerlab.interventions.ops._edit import compute_dtype, subspace_edit
from steerlab.interventions.orthonormal import Orthonormal, no_decay

__all__ = ["SubspaceInterchange", "BoundlessSubspaceInterchange"]


@register("subspace_interchange")
class SubspaceInterchange(Intervention):
    r"""Distributed interchange: swap the coordinates of a ``size``-dimensional subspace.

    .. math::

        h' = h + R^\top (R s - R h), \qquad R \in \mathbb{R}^{k \times d},\; R R^\top = I_k

    ``R`` (``k = size`` rows, ``d`` = the site's width) is an
    :class:`~steerlab.interventions.orthonormal.Orthonormal` map: exact,
    materialised once per forward, in fp32 whatever the model's dtype, never
    shrunk by weight decay. With ``size == d`` this is :class:`Interchange`
    (up to rounding). ``init`` seeds ``R`` (``[size, width]``), e.g. from a
    :class:`~steerlab.interventions.subspace.Subspace`.

    Args:
        site: where it acts; ``positions``, ``heads``, ``dims``, ``source``,
            ``source_positions`` as for every intervention.
        size: ``k``, the subspace dimension.
        width: ``d``; inferred from the site when the intervention is first used.
    """

    sourced = True
    _arguments = ("size",)

    def __init__(self, site: str, *, size: int, width: int | None = None, init: Tensor | None = None, **placement):
        super().__init__(site, **placement)
        if not isinstance(size, int) or size < 1:
            raise SubspaceSizeError(f"size={size!r}: expected a positive int (the subspace dimension)")
        self.size = size
        self._init = init
        if width is not None:
            self.build(width)

    def build(self, width: int) -> None:
        if self.size > width:
            raise SubspaceSizeError(
                f"a subspace of size {self.size} does not fit site {self.site!r} of width {width}; "
                f"expected size <= {width}"
            )
        super().build(width)
        self.rotation = Orthonormal(width, self.size, self._init)
        self._init = None

    @property
    def R(self) -> Float[Tensor, "rank width"]:
        """The current ``R`` (``[size, width]``, orthonormal rows, fp32)."""
        return self.rotation()

    def forward(self, base: Float[Tensor, "*batch width"], source: Float[Tensor, "*batch width"] | None = None) -> Float[Tensor, "*batch width"]:
        source = self.require_source(source)
        r = self.rotation()
        return subspace_edit(base, r, source.to(compute_dtype(base)) @ r.to(compute_dtype(base)).T)


@register("boundless_subspace_interchange")
class BoundlessSubspaceInterchange(Intervention):
    r"""Boundless DAS: a full rotation and a learned, soft subspace size.

    .. math::

        h' = h + R^\top \big(m \odot (R s - R h)\big), \qquad
        m_i = \sigma\!\big((\beta d - i) / \tau\big),\; \beta = \operatorname{clamp}(b, 0, 1)

    ``R`` is ``d × d`` orthonormal; ``b`` (``boundary``) is learned, ``τ``
    (``temperature``) is annealed by the trainer (:meth:`set_temperature`).
    :attr:`size` reads the current boundary as a dimension count; the found
    subspace is the first ``size`` rows of ``R``.
    """

    sourced = True
    _arguments = ("init_boundary", "temperature")

    def __init__(
        self,
        site: str,
        *,
        width: int | None = None,
        init_boundary: float = 0.5,
        temperature: float = 1.0,
        **placement,
    ):
        super().__init__(site, **placement)
        if not 0.0 <= init_boundary <= 1.0:
            raise SubspaceSizeError(f"init_boundary={init_boundary!r}: expected a fraction of the width in [0, 1]")
        self.init_boundary = float(init_boundary)
        self.temperature = float(temperature)
        if width is not None:
            self.build(width)

    def build(self, width: int) -> None:
        super().build(width)
        self.rotation = Orthonormal(width, width)
        self.boundary = no_decay(nn.Parameter(torch.tensor(self.init_boundary)))
        self.register_buffer("_index", torch.arange(width, dtype=torch.float32), persistent=False)

    def set_temperature(self, temperature: float) -> None:
        self.temperature = float(temperature)

    def mask(self) -> Float[Tensor, " width"]:
        beta = self.boundary.clamp(0.0, 1.0) * self.width
        return torch.sigmoid((beta - self._index) / self.temperature)

    @property
    def size(self) -> int:
        return int(round(float(self.boundary.detach().clamp(0, 1)) * (self.width or 0)))

    def forward(self, base: Float[Tensor, "*batch width"], source: Float[Tensor, "*batch width"] | None = None) -> Float[Tensor, "*batch width"]:
        source = self.require_source(source)
        dt = compute_dtype(base)
        r = self.rotation().to(dt)
        h = base.to(dt)
        delta = (source.to(dt) - h) @ r.T * self.mask().to(dt)
        return (h + delta @ r).to(base.dtype)
