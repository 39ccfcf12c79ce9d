"""What happens at one (module, side) of a forward, whatever the engine.

A *handler* acts on the value at its site: an :class:`Edit` applies an
intervention to its selected slice (a sourced one reads its aligned source
slice from the call's :class:`~steerlab.interventions.call.Bindings`), a
``Collect`` edit records the slice, a :class:`Read` stores the slice a
source run supplies. Handlers are built once per plan and hold no per-call
data, so a plan can run many times (a DAS fit's steps) and from two threads.

At one (module, side) edits run first, in the order given, then collects
and reads, which therefore see the value the rest of the forward will use
(:func:`group_handlers`). :func:`run_on_inputs` and :func:`run_on_output`
apply a group to a module's call; the hook engine calls them from PyTorch
hooks, the nnsight engine from its trace.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import no_type_check

import torch
from torch import Tensor

from steerlab.interventions.call import ForwardContext
from steerlab.interventions.errors import ShapeMismatch, SourceError, UnitError
from steerlab.interventions.ops import Collect, Intervention
from steerlab.interventions.selection import Selection
from steerlab.interventions.sites import ResolvedSite
from steerlab.interventions.units import MaskInfo, Positions

__all__ = [
    "Edit",
    "Read",
    "Handler",
    "group_handlers",
    "run_on_inputs",
    "run_on_output",
    "input_tensor",
    "output_tensor",
    "replace_output",
    "mask_info_of_call",
]


class Edit:
    """An intervention acting at its resolved site (``decode``: also at generated tokens)."""

    def __init__(self, iv: Intervention, site: ResolvedSite, *, decode: bool = False):
        self.iv = iv
        self.sel = Selection(site, iv.positions if iv.positions.kind != "all" else None, iv.heads, iv.dims, owner=iv)
        self.decode = decode
        self.collect = isinstance(iv, Collect)
        self.sourced = iv.sourced

    @property
    def site(self) -> ResolvedSite:
        return self.sel.site

    def run(self, x: Tensor, ctx: ForwardContext, inplace: bool) -> Tensor:
        if ctx.info.past > 0 and not self.decode:
            return x  # prompt-only interventions leave decode steps alone
        if self.collect:
            return self._collect(x, ctx)
        if self.sourced:
            if ctx.info.past > 0:
                return x  # a source has no values at generated tokens
            return self.sel.transform(x, ctx, self._sourced_fn(ctx), inplace=inplace, decode=self.decode)
        return self.sel.transform(x, ctx, self.iv, inplace=inplace, decode=self.decode)

    def _sourced_fn(self, ctx: ForwardContext) -> Callable[[Tensor], Tensor]:
        src = ctx.call.sources.get(self)
        if src is None:
            raise SourceError(f"{type(self.iv).__name__} at {self.site.name!r} was given no source value for this call")
        iv = self.iv
        # a site without a position axis is handled as [batch, 1, width]; its SourceValue is [batch, width]
        fn = lambda part: iv(part, _aligned(src, part, self))  # noqa: E731
        valid = ctx.call.valid.get(self)
        return fn if valid is None else _where_source(fn, valid)

    def _collect(self, x: Tensor, ctx: ForwardContext) -> Tensor:
        iv = self.iv
        cache, key, detach = ctx.call.cache, iv.name, iv.detach  # type: ignore[attr-defined]

        @no_type_check  # a closure made per call: the suite's runtime checker would decorate it on every call
        def keep(part: Tensor) -> None:
            cache[key] = part.detach() if detach else part

        out = self.sel.transform(x, ctx, keep, inplace=False, decode=self.decode, read=True)
        ctx.call.read_done()
        return out


class Read:
    """Store the selected slice of a site under ``key`` (a source run feeding a sourced edit)."""

    collect = False

    def __init__(self, key, site: ResolvedSite, positions: Positions, heads, dims):
        self.key = key
        self.sel = Selection(site, positions if positions.kind != "all" else None, heads, dims, override="source_positions")

    @property
    def site(self) -> ResolvedSite:
        return self.sel.site

    def run(self, x: Tensor, ctx: ForwardContext, inplace: bool) -> Tensor:
        store, key = ctx.call.store, self.key

        @no_type_check
        def keep(part: Tensor) -> None:
            store[key] = part

        self.sel.transform(x, ctx, keep, inplace=False, decode=False, read=True)
        ctx.call.read_done()
        return x


Handler = Edit | Read


def _where_source(fn: Callable[[Tensor], Tensor], valid: Tensor) -> Callable[[Tensor], Tensor]:
    @no_type_check
    def edit(part: Tensor) -> Tensor:
        keep = valid.to(part.device).view(*valid.shape, *([1] * (part.dim() - 2)))
        return torch.where(keep, fn(part), part)

    return edit


def _aligned(src: Tensor, part: Tensor, edit: Edit) -> Tensor:
    """The source slice shaped as this forward's base slice (a batch of 1 broadcast); refused when its
    other axes differ (an attached source over all positions is checked here, per forward, as only
    then is the number of positions known: broadcasting one position over all would be silent)."""
    if src.dim() == part.dim() - 1:
        src = src.unsqueeze(1)
    if src.shape[1:] != part.shape[1:] or src.shape[0] not in (1, part.shape[0]):
        raise ShapeMismatch(
            f"the source of {type(edit.iv).__name__} at {edit.site.name!r} has shape {tuple(src.shape)} but this forward's "
            f"slice is {tuple(part.shape)}: a source value must hold the positions the intervention edits"
        )
    return src.expand_as(part) if src.shape[0] == 1 else src


def group_handlers(handlers: Iterable[Handler]) -> dict[tuple[str, str], tuple[ResolvedSite, list[Handler]]]:
    """Handlers by (module, side), each group in run order: edits first, then collects and reads."""
    groups: dict[tuple[str, str], tuple[ResolvedSite, list]] = {}
    for h in handlers:
        site = h.site
        groups.setdefault(site.key, (site, []))[1].append(h)
    for key, (site, hs) in groups.items():
        edits = [h for h in hs if isinstance(h, Edit) and not h.collect]
        groups[key] = (site, edits + [h for h in hs if not (isinstance(h, Edit) and not h.collect)])
    return groups


def run_on_inputs(handlers: list[Handler], args: tuple, kwargs: dict, ctx: ForwardContext, inplace: bool):
    """Run ``handlers`` on a module's input: the new ``(args, kwargs)``, or None if unchanged (or edited in place)."""
    x, where = input_tensor(args, kwargs)
    new = x
    for h in handlers:
        new = h.run(new, ctx, inplace)
    if new is x or inplace:
        return None
    if isinstance(where, int):
        return (new, *args[1:]), kwargs
    return args, {**kwargs, where: new}


def run_on_output(handlers: list[Handler], out, ctx: ForwardContext):
    """Run ``handlers`` on a module's output: the new output, or None if unchanged."""
    x = output_tensor(out)
    new = x
    for h in handlers:
        new = h.run(new, ctx, False)
    return None if new is x else replace_output(out, new)


# -- a module call's tensors -------------------------------------------------------------


def input_tensor(args: tuple, kwargs: dict) -> tuple[Tensor, int | str]:
    """The tensor a module is called on, and where it was passed (position or keyword)."""
    if args and isinstance(args[0], Tensor):
        return args[0], 0
    for name in ("hidden_states", "input", "x", "hidden", "inputs_embeds"):
        v = kwargs.get(name)
        if isinstance(v, Tensor):
            return v, name
    for name, v in kwargs.items():
        if isinstance(v, Tensor):
            return v, name
    raise UnitError("a hooked module was called without a tensor input")


def output_tensor(out) -> Tensor:
    """The tensor a module returned (the first of a tuple or a ``ModelOutput``)."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    if hasattr(out, "to_tuple"):  # a transformers ModelOutput
        return out.to_tuple()[0]
    raise UnitError(f"a hooked module returned {type(out).__name__}; expected a tensor or a tuple starting with one")


def replace_output(out, new: Tensor):
    """``out`` with its tensor (see :func:`output_tensor`) replaced by ``new``."""
    if isinstance(out, Tensor):
        return new
    if isinstance(out, tuple):
        return (new, *out[1:])
    if isinstance(out, list):
        return [new, *out[1:]]
    key = next(iter(out.keys()))
    out[key] = new
    return out


def _cache_length(kwargs: dict) -> int:
    for name in ("past_key_values", "cache"):
        c = kwargs.get(name)
        if c is not None and hasattr(c, "get_seq_length"):
            try:
                return int(c.get_seq_length())
            except Exception:  # an empty or foreign cache object
                return 0
    return 0


def mask_info_of_call(args: tuple, kwargs: dict) -> MaskInfo:
    """Where the real tokens are in a call of the model's root, from its arguments."""
    ref, _ = input_tensor(args, {k: kwargs[k] for k in ("input_ids", "inputs_embeds") if k in kwargs} or kwargs)
    batch = ref.shape[0]
    named = "input_ids" in kwargs or "inputs_embeds" in kwargs
    seq = ref.shape[1] if (ref.dim() >= 2 and (named or ref.dim() >= 3)) else 1
    if not named and args and ref.dtype in (torch.int64, torch.int32):
        seq = ref.shape[1]
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > 1 and isinstance(args[1], Tensor) and args[1].dim() == 2 and args[1].shape[0] == batch:
        mask = args[1]
    if isinstance(mask, Tensor) and mask.dim() == 2:
        past = mask.shape[-1] - seq
    else:
        mask, past = None, _cache_length(kwargs)
    return MaskInfo.from_mask(mask, batch, seq, ref.device, past)
