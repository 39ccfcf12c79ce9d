"""LoReFT: low-rank linear subspace ReFT, the paper's main method."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from steerlab.interventions import register, subspace_edit
from steerlab.interventions.ops import compute_dtype
from steerlab.interventions.errors import ConfigError, SubspaceSizeError, checked_first, flag
from steerlab.reft._base import ReftIntervention

if TYPE_CHECKING:
    from steerlab.interventions import Subspace

__all__ = ["LoReFT"]


@register("loreft")
class LoReFT(ReftIntervention):
    r"""Low-rank linear subspace representation finetuning (Wu et al. 2024).

    .. math::

        \Phi(h) = h + R^\top\big(\operatorname{act}(W h + b) - R h\big),
        \qquad R \in \mathbb{R}^{r \times d},\; R R^\top = I_r,\;
        W \in \mathbb{R}^{r \times d},\; b \in \mathbb{R}^r

    It replaces ``h``'s coordinates in the row space of ``R`` by the learned
    target ``W h + b``: the subspace edit DAS uses with ``t = R s``
    (:func:`~steerlab.interventions.subspace_edit`). ``R`` is an
    :class:`~steerlab.interventions.Orthonormal` map (orthonormal exactly,
    float32, immune to weight decay); ``W`` and ``b`` live in ``dtype``.

    Args:
        site: where it acts (``"blocks.4.resid_post"``); ``positions`` as for
            every intervention (``"f7+l7"``, ``-1``, ``"per-call"``, ...).
        rank: ``r``.
        width: ``d``; inferred from the site when first used.
        act_fn: see :mod:`steerlab.reft._base`.
        dropout: see :mod:`steerlab.reft._base`.
        dtype: see :mod:`steerlab.reft._base`.
        init: an initial ``R`` (``[rank, width]``), e.g. a DAS subspace's basis.
        train_rotation: ``False`` freezes ``R`` (train ``W`` and ``b`` only).

    Example::

        >>> iv = LoReFT("blocks.3.resid_post", rank=4, width=16, positions=-1)
        >>> iv(torch.randn(2, 1, 16)).shape
        torch.Size([2, 1, 16])
    """

    _arguments = ("rank", "act_fn", "dropout", "dtype", "train_rotation")

    @checked_first(train_rotation=flag("train_rotation"))
    def __init__(
        self,
        site: str,
        *,
        rank: int,
        width: int | None = None,
        act_fn: str | None = None,
        dropout: float = 0.0,
        dtype: torch.dtype | str | None = None,
        init: Tensor | None = None,
        train_rotation: bool = True,
        **placement,
    ):
        self._init = init
        self.train_rotation = bool(train_rotation)
        super().__init__(site, rank=rank, width=width, act_fn=act_fn, dropout=dropout, dtype=dtype, **placement)

    def build(self, width: int) -> None:
        super().build(width)
        self.rotation = self._rotation(width, self._init, self.train_rotation)
        self._init = None
        self.weight, self.bias = self._linear(width)

    @property
    def R(self) -> Float[Tensor, "rank width"]:
        """The current ``R`` (orthonormal rows, float32)."""
        return self.rotation()

    def edit(self, h: Float[Tensor, "*batch width"]) -> Float[Tensor, "*batch width"]:
        if self._act is not None:
            return subspace_edit(h, self.rotation(), self.learned_source(h, self.weight, self.bias))
        # without an activation the same edit fuses: t - R h = (W - R) h + b, so
        # h' = h + ((W - R) h + b) R in two matrix products with the additions folded in
        # (three kernels where the unfused form launches six), in float32 for half inputs
        dt = compute_dtype(h)
        r = self.rotation().to(dt)
        flat = h.reshape(-1, h.shape[-1]).to(dt)
        u = torch.addmm(self.bias.to(dt), flat, (self.weight.to(dt) - r).T)
        return torch.addmm(flat, u, r).view(h.shape).to(h.dtype)

    @classmethod
    def from_subspace(
        cls,
        subspace: Subspace,
        *,
        train_rotation: bool = False,
        site: str | None = None,
        positions=None,
        **kwargs,
    ) -> LoReFT:
        """A LoReFT whose ``R`` is ``subspace.basis``: steer in the subspace DAS found.

        ``train_rotation=False`` (default) keeps ``R`` fixed and trains ``W``
        and ``b`` only; ``True`` fine-tunes ``R`` as well. The site and
        positions default to the subspace's own; the rank is its size.
        """
        basis = getattr(subspace, "basis", None)
        if not isinstance(basis, Tensor) or basis.dim() != 2:
            raise ConfigError(f"from_subspace takes a steerlab Subspace; got {type(subspace).__name__}")
        if "rank" in kwargs and kwargs["rank"] != subspace.size:
            raise SubspaceSizeError(f"rank={kwargs['rank']} but the subspace has size {subspace.size}; leave rank out")
        kwargs.pop("rank", None)
        kwargs.pop("width", None)
        pos = subspace.positions if positions is None else positions
        if subspace.heads and "heads" not in kwargs:
            kwargs["heads"] = list(subspace.heads)
        return cls(
            site or subspace.site,
            rank=subspace.size,
            width=subspace.width,
            init=basis,
            train_rotation=train_rotation,
            positions=pos,
            **kwargs,
        )
