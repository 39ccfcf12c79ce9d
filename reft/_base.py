"""What every ReFT intervention shares: rank, activation, dropout, dtype.

A ReFT intervention edits the representation ``h`` (``[..., d]``) at the
positions it is placed on, in a rank-``r`` subspace. The family differs in
how the edit is parametrised (see each type's module); all of them:

- take ``rank`` (``r``, at most the site's width ``d``: a larger one raises
  :class:`~steerlab.interventions.errors.SubspaceSizeError` when the width is
  known);
- apply ``act_fn`` (a name from ``transformers.activations.ACT2FN`` such as
  ``"relu"``, or ``None`` / ``"linear"`` for the identity) to the learned
  source ``W h + b``;
- apply dropout with probability ``dropout`` to the edited representation,
  as pyreft does, only in training mode (``module.train()``);
- keep their learned projections in ``dtype`` (``None``: float32, or the
  model's dtype when built by :class:`~steerlab.reft.ReftModel`), while an
  orthonormal ``R`` is an :class:`~steerlab.interventions.Orthonormal` whose
  maths always runs in float32 and which weight decay never reaches.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from jaxtyping import Float
from torch import Tensor, nn
from torch.nn import functional as F

from steerlab.interventions import Intervention, Orthonormal
from steerlab.interventions.errors import ConfigError, SubspaceSizeError

__all__ = ["ReftIntervention", "parse_dtype"]


def parse_dtype(dtype) -> torch.dtype | None:
    """``None``, a ``torch.dtype`` or its name (``"bfloat16"``) -> ``torch.dtype | None``."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        dt = getattr(torch, dtype.removeprefix("torch."), None)
        if isinstance(dt, torch.dtype) and dt.is_floating_point:
            return dt
    raise ConfigError(f"dtype={dtype!r}: expected a floating torch.dtype or its name ('float32', 'bfloat16', 'float16')")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _activation(name: str | None):
    if name is None or name in ("linear", "identity", "none"):
        return None
    from transformers.activations import ACT2FN

    if name not in ACT2FN:
        raise ConfigError(f"act_fn={name!r}: expected None or one of {sorted(ACT2FN)}")
    return ACT2FN[name]


class ReftIntervention(Intervention):
    """Base class of the ReFT family (sourceless, trainable).

    Subclasses create their parameters in :meth:`build` and implement
    :meth:`edit`; :meth:`forward` applies dropout around it.
    """

    sourced: ClassVar[bool] = False
    _arguments: ClassVar[tuple[str, ...]] = ("rank", "act_fn", "dropout", "dtype")

    def __init__(
        self,
        site: str,
        *,
        rank: int,
        width: int | None = None,
        act_fn: str | None = None,
        dropout: float = 0.0,
        dtype: torch.dtype | str | None = None,
        **placement,
    ):
        super().__init__(site, **placement)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise SubspaceSizeError(f"rank={rank!r}: expected a positive int (the dimension of the edited subspace)")
        if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout={dropout!r}: expected a probability in [0, 1)")
        self.rank = rank
        self.act_fn = None if act_fn in (None, "linear", "identity", "none") else act_fn
        self._act = _activation(act_fn)
        self.dropout = float(dropout)
        self.dtype = parse_dtype(dtype)
        self._drop = nn.Dropout(self.dropout) if self.dropout > 0 else None
        if width is not None:
            self.build(width)

    # -- construction --------------------------------------------------------
    def build(self, width: int) -> None:
        if self.rank > width:
            raise SubspaceSizeError(
                f"rank={self.rank} does not fit site {self.site!r} of width {width}; expected rank <= {width}"
            )
        super().build(width)

    @property
    def param_dtype(self) -> torch.dtype:
        return self.dtype or torch.float32

    def _linear(self, width: int) -> tuple[nn.Parameter, nn.Parameter]:
        """``W`` (``[rank, width]``) and ``b`` (``[rank]``) initialised as ``nn.Linear`` does."""
        w = torch.empty(self.rank, width, dtype=torch.float32)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        bound = 1.0 / math.sqrt(width)
        b = torch.empty(self.rank, dtype=torch.float32).uniform_(-bound, bound)
        return nn.Parameter(w.to(self.param_dtype)), nn.Parameter(b.to(self.param_dtype))

    def _rotation(self, width: int, init: Tensor | None, trainable: bool) -> Orthonormal:
        rot = Orthonormal(width, self.rank, init)
        rot.weight.requires_grad_(trainable)
        return rot

    # -- maths ---------------------------------------------------------------
    def learned_source(self, h: Float[Tensor, "*batch width"], weight: Tensor, bias: Tensor) -> Float[Tensor, "*batch rank"]:
        """``act(W h + b)``, in fp32 when ``h`` or ``W`` is half precision (as the rest of the edit:
        rounding ``W h + b`` to bf16 first moved a bf16 edit by up to ``2⁻⁸ |W h + b|``)."""
        dt = torch.promote_types(_compute_dtype(h.dtype), _compute_dtype(weight.dtype))
        t = F.linear(h.to(dt), weight.to(dt), bias.to(dt))
        return t if self._act is None else self._act(t)

    def edit(self, h: Float[Tensor, "*batch width"]) -> Float[Tensor, "*batch width"]:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, base: Float[Tensor, "*batch width"], source: Tensor | None = None) -> Float[Tensor, "*batch width"]:
        out = self.edit(base)
        return out if self._drop is None else self._drop(out)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", width={self.width}" if self.width else "")
