"""Cutting a site's value down to the slice an intervention sees, and writing the result back.

A site's value is ``[batch, pos, width]`` (or ``[batch, width]`` without a
position axis); a fused projection's site is a set of its channels; a
per-head site is seen as ``[batch, pos, head, d_head]``. A :class:`Selection`
takes, in order, the site's channels, its head layout, the positions (the
spec resolved once per forward by the :class:`~steerlab.interventions.call.ForwardContext`),
the selected heads and the selected dimensions, hands the slice
``[batch, k, (head,) width]`` to a function, checks what comes back and
undoes each step to write the new slice into the full value.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from einops import rearrange
from torch import Tensor

from steerlab.interventions.call import ForwardContext
from steerlab.interventions.errors import ShapeMismatch
from steerlab.interventions.sites import ResolvedSite
from steerlab.interventions.units import Positions, gather_positions, scatter_positions

__all__ = ["Selection"]


@dataclass(eq=False)
class Selection:
    """The units of one site an edit or a read touches (``positions=None``: every position)."""

    site: ResolvedSite
    positions: Positions | None
    heads: tuple[int, ...] | None
    dims: tuple[int, ...] | None
    override: str = "positions"  # which per-call override applies: "positions" (edits) or "source_positions" (reads)
    owner: object = None  # the intervention, for a per-intervention override
    _cache: dict = field(default_factory=dict, repr=False)

    def _tensor(self, name: str, values, device) -> Tensor:
        key = (name, device)
        t = self._cache.get(key)
        if t is None:
            t = self._cache[key] = torch.as_tensor(values, device=device, dtype=torch.long)
        return t

    def transform(
        self, x: Tensor, ctx: ForwardContext, fn: Callable[[Tensor], Tensor | None], *, inplace: bool, decode: bool, read: bool = False
    ) -> Tensor:
        """Apply ``fn`` to the selected slice of ``x``; return the new full value (``x`` if ``fn`` returns None).

        ``read``: ``fn`` only records its argument, whose empty slots are zeros (never another token's value).
        """
        # one tuple of intermediate values, not an object: this runs at every hooked site of every forward
        cut = self._cut(x, ctx, decode, inplace)
        full, v, idx, index, filled, guard, p0, p1 = cut
        part = p1 if self.dims is None else p1.index_select(-1, self._tensor("dims", self.dims, x.device))
        if idx is None and inplace and self.site.channels is None:
            part = part.clone()  # fn may save its input for backward; we overwrite x below
        if read and guard:
            part = part * (idx >= 0).view(*idx.shape, *([1] * (part.dim() - 2))).to(part.dtype)  # type: ignore[union-attr]
        new = fn(part)
        if new is None:
            return x
        if not isinstance(new, Tensor) or new.shape != part.shape:
            self._check(new, part)
        return self._write(x, cut, new if new.dtype == x.dtype else new.to(x.dtype), inplace)

    def _spec(self, ctx: ForwardContext) -> Positions | None:
        if self.override == "positions":
            forced = ctx.call.edit_positions.get(self.owner) if ctx.call.edit_positions else None
            forced = forced if forced is not None else ctx.positions
        else:
            forced = ctx.call.source_positions
        return forced if forced is not None else self.positions

    def _cut(self, x: Tensor, ctx: ForwardContext, decode: bool, inplace: bool) -> tuple:
        """``(full, v, idx, index, filled, guard, p0, p1)``: the value with a position axis; with channels
        taken and heads split; the position indices and their gather index; whether every slot is filled;
        whether scatter must guard empty slots; the positions taken; the heads taken."""
        site = self.site
        full = x.unsqueeze(1) if x.dim() == 2 else x
        v = full
        if site.channels is not None:
            v = v.index_select(-1, self._tensor("ch", site.channels, x.device))
        if site.n_heads:
            v = rearrange(v, "b t (h d) -> b t h d", h=site.n_heads)
        spec = self._spec(ctx)
        if spec is None or (decode and ctx.info.past > 0):  # at a decode step the new token(s) are the positions
            idx, filled, guard, index = None, True, False, None
        else:
            idx, filled, guard = ctx.resolved(spec)
            index = None if idx is None else ctx.index(spec, tuple(v.shape[2:]))
        if idx is not None and idx.shape[0] != v.shape[0]:
            raise ShapeMismatch(f"site {site.name!r}: the positions have {idx.shape[0]} rows but the value has batch {v.shape[0]}")
        if idx is None:
            p0 = v
        elif inplace and v.requires_grad:
            # gather keeps its input for backward and the in-place write below modifies that input
            # (autograd then refuses the backward); indexing keeps only the sizes and the indices
            p0 = v[torch.arange(v.shape[0], device=v.device)[:, None], idx.clamp_min(0)]
        else:
            p0 = gather_positions(v, idx, index=index)
        p1 = p0 if self.heads is None else p0.index_select(2, self._tensor("heads", self.heads, x.device))
        return full, v, idx, index, filled, guard, p0, p1

    def _check(self, new, part: Tensor) -> None:
        if not isinstance(new, Tensor):
            raise ShapeMismatch(
                f"an intervention at {self.site.name!r} returned {type(new).__name__}; expected a tensor of shape {tuple(part.shape)} (the shape it was given)"
            )
        if new.shape != part.shape:
            raise ShapeMismatch(
                f"an intervention at {self.site.name!r} returned shape {tuple(new.shape)}; expected {tuple(part.shape)} (the shape it was given)"
            )

    def _write(self, x: Tensor, cut: tuple, new: Tensor, inplace: bool) -> Tensor:
        full, v, idx, index, filled, guard, p0, p1 = cut
        site = self.site
        if self.dims is not None:
            new = p1.index_copy(-1, self._tensor("dims", self.dims, x.device), new)
        if self.heads is not None:
            new = p0.index_copy(2, self._tensor("heads", self.heads, x.device), new)
        direct = inplace and site.channels is None and not site.n_heads
        two_d = x.dim() == 2
        if idx is None:
            nv = new
            if direct:
                return full.copy_(nv).squeeze(1) if two_d else full.copy_(nv)
        else:
            nv = scatter_positions(v, idx, new, may_be_empty=guard, inplace=direct, original=p0, index=index if filled else None)
            if direct:
                return x
        if site.n_heads:
            nv = rearrange(nv, "b t h d -> b t (h d)")
        if site.channels is not None:
            nv = full.index_copy(-1, self._tensor("ch", site.channels, x.device), nv)
        if inplace:
            full.copy_(nv)
            return x
        return nv.squeeze(1) if two_d else nv
