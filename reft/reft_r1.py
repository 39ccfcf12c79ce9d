"""ReFT-r1: a rank-1 steering direction learned with the language-modelling loss (AxBench, Wu et al. 2025)."""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from torch import Tensor, nn

from steerlab.interventions import Subspace, register
from steerlab.interventions.errors import ConfigError
from steerlab.reft._base import ReftIntervention

__all__ = ["ReFTr1"]


@register("reft_r1")
class ReFTr1(ReftIntervention):
    r"""Rank-1 representation finetuning, AxBench's ReFT-r1.

    .. math::

        z_t = \operatorname{ReLU}(h_t \cdot v), \qquad
        \Phi(h_t) = h_t + \Big(\tfrac{1}{k}\textstyle\sum \operatorname{TopK}_k(z)\Big)\, v,
        \qquad v = w / \lVert w \rVert,\; w \in \mathbb{R}^d

    ``z`` is the detection latent (max-pooled over tokens it scores a text);
    the edit adds ``v`` with the mean of the ``topk`` largest latents over the
    selected positions of each example, so the strength is read from the
    input itself. After training, :meth:`direction` exports ``v`` as a
    :class:`~steerlab.interventions.Subspace`, which steers as an ``Add`` with a
    factor, as AxBench does. AxBench also adds an L1 penalty on the latents
    outside the top ``k``; :func:`steerlab.reft.train` trains the
    language-modelling loss alone.

    Args:
        site: where it acts; ``positions`` as for every intervention.
        topk: ``k`` (default 8; fewer when fewer positions are selected).
        width: as for every ReFT intervention.
        dropout: as for every ReFT intervention.
        dtype: as for every ReFT intervention.
        rank: must be 1 (accepted for a uniform signature).
    """

    _arguments = ("rank", "dropout", "dtype", "topk")

    def __init__(self, site: str, *, topk: int = 8, width: int | None = None, dropout: float = 0.0, dtype=None, rank: int = 1, **placement):
        if rank != 1:
            raise ConfigError(f"ReFT-r1 has rank 1; got rank={rank}")
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            raise ConfigError(f"topk={topk!r}: expected a positive int")
        self.topk = topk
        super().__init__(site, rank=1, width=width, dropout=dropout, dtype=dtype, **placement)

    def build(self, width: int) -> None:
        super().build(width)
        w = torch.empty(1, width, dtype=torch.float32)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        self.weight = nn.Parameter(w.to(self.param_dtype))

    @property
    def v(self) -> Float[Tensor, " width"]:
        w = self.weight[0].float()
        return w / w.norm().clamp_min(1e-12)

    def latent(self, h: Float[Tensor, "*batch width"]) -> Float[Tensor, "*batch"]:
        """``ReLU(h · v)``: the detection latent."""
        return torch.relu(h.float() @ self.v)

    def edit(self, h: Float[Tensor, "batch k width"]) -> Float[Tensor, "batch k width"]:
        z = self.latent(h)  # [batch, k]
        k = min(self.topk, z.shape[-1])
        strength = z.topk(k, dim=-1).values.mean(-1, keepdim=True)  # [batch, 1]
        return (h.float() + strength[..., None] * self.v).to(h.dtype)

    def direction(self, *, norm: float | None = None, **metadata) -> Subspace:
        """``v`` as a size-1 :class:`Subspace` at this site (``metadata["norm"]``: the factor unit of a steering ``Add``)."""
        meta = {"method": "reft_r1", **({} if norm is None else {"norm": float(norm)}), **metadata}
        return Subspace(self.v.detach().cpu()[None], self.site, metadata=meta)
