"""The hook engine's mechanics: one hook per (module, side), installed and removed as a set.

A :class:`HookSet` holds *handlers* (edits and reads at resolved sites) and
installs, on each module they touch, exactly one PyTorch hook (a forward
pre-hook with kwargs for inputs, a forward hook for outputs), plus one
pre-hook on the model's root that opens a :class:`ForwardContext` for each
forward: where the real tokens are, which position indices each spec
resolves to (computed once per forward, shared by every site), and whether
this is a prefill or a decode step. Removing the set removes exactly its own
handles; nobody else's hooks are touched.

At one (module, side) edits run first, in the order given, then reads, which
therefore see the value the rest of the forward will use.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from einops import rearrange
from torch import Tensor, nn

from steerlab.interventions.errors import BatchMismatch, ShapeMismatch, UnitError
from steerlab.interventions.ops import Collect, Intervention
from steerlab.interventions.orthonormal import Orthonormal, materialise
from steerlab.interventions.sites import ResolvedSite
from steerlab.interventions.units import MaskInfo, Positions, gather_positions, position_index, scatter_positions

__all__ = ["HookSet", "Edit", "Read", "ForwardContext", "EarlyExit", "POSITIONS_KWARG"]

#: a keyword a caller may pass to the model's forward while interventions are
#: attached: per-example positions for this forward, removed before the model sees it
POSITIONS_KWARG = "intervention_positions"


#: the context of a forward nested in a per-call forward: no handler acts on it
_NESTED: ForwardContext = object()  # type: ignore[assignment]
# a decode step of a set whose edits all act on prompt positions only: every site hook returns at
# once (no mask bookkeeping, no re-materialised R), so steering costs nothing per generated token
_DECODE_SKIP: ForwardContext = object()  # type: ignore[assignment]


class EarlyExit(Exception):
    """Raised inside a forward once every value a source run must supply is read."""


class ForwardContext:
    """Per-forward state: mask info and the position indices resolved from it."""

    __slots__ = ("info", "_idx", "_index", "positions", "source_positions")

    def __init__(self, info: MaskInfo, positions: Positions | None = None, source_positions: Positions | None = None):
        self.info = info
        # per-call overrides: of every edit's positions, and of every source read's positions
        self.positions = positions
        self.source_positions = source_positions
        # by value: interventions with equal specs share one resolution per forward
        self._idx: dict[Positions, tuple[Tensor | None, bool, bool]] = {}
        self._index: dict[tuple, Tensor] = {}

    def resolved(self, spec: Positions) -> tuple[Tensor | None, bool, bool]:
        """``(indices, filled, guard)``: the padded indices; whether every slot is known to be
        filled; whether scatter must guard against empty slots."""
        hit = self._idx.get(spec)
        if hit is None:
            idx = spec.resolve(self.info)
            filled = spec.filled(self.info, idx)
            hit = self._idx[spec] = (idx, filled, spec.may_be_empty and not filled)
        return hit

    def indices(self, spec: Positions) -> Tensor | None:
        return self.resolved(spec)[0]

    def index(self, spec: Positions, rest: tuple[int, ...]) -> Tensor:
        """``spec``'s indices broadcast over a value's trailing dims ``rest`` (clamped unless filled), for gather."""
        key = (spec, rest)
        hit = self._index.get(key)
        if hit is None:
            idx, filled, _ = self.resolved(spec)
            hit = self._index[key] = position_index(idx, rest, clamp=not filled)
        return hit


@dataclass(eq=False)
class _Selection:
    """How to cut a site's value down to the slice an intervention sees, and back."""

    site: ResolvedSite
    positions: Positions | None  # None: all positions
    heads: tuple[int, ...] | None
    dims: tuple[int, ...] | None
    override: str = "positions"  # which per-call override applies: "positions" (edits) or "source_positions" (reads)
    _cache: dict = field(default_factory=dict, repr=False)

    def _index(self, name: str, values, device) -> Tensor:
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
        site = self.site
        two_d = x.dim() == 2
        full = x.unsqueeze(1) if two_d else x
        v = full
        if site.channels is not None:
            v = v.index_select(-1, self._index("ch", site.channels, x.device))
        if site.n_heads:
            v = rearrange(v, "b t (h d) -> b t h d", h=site.n_heads)
        forced = getattr(ctx, self.override)
        spec = forced if forced is not None else self.positions
        if decode and ctx.info.past > 0:
            idx, filled, guard = None, True, False  # a decode step: the new token(s) are the positions
        elif spec is None:
            idx, filled, guard = None, True, False
        else:
            idx, filled, guard = ctx.resolved(spec)
        if idx is not None and idx.shape[0] != v.shape[0]:
            raise ShapeMismatch(
                f"site {site.name!r}: the positions have {idx.shape[0]} rows but the value has batch {v.shape[0]}"
            )
        index = None if idx is None else ctx.index(spec, tuple(v.shape[2:]))
        if idx is not None and inplace and v.requires_grad:
            # gather keeps its input for backward and the in-place write below modifies that input
            # (autograd then refuses the backward); indexing keeps only the sizes and the indices
            p0 = v[torch.arange(v.shape[0], device=v.device)[:, None], idx.clamp_min(0)]
        else:
            p0 = v if idx is None else gather_positions(v, idx, index=index)
        heads = None if self.heads is None else self._index("heads", self.heads, x.device)
        dims = None if self.dims is None else self._index("dims", self.dims, x.device)
        p1 = p0 if heads is None else p0.index_select(2, heads)
        p2 = p1 if dims is None else p1.index_select(-1, dims)
        if idx is None and inplace and site.channels is None:
            p2 = p2.clone()  # fn may save its input for backward; we overwrite x below
        if read and guard:
            p2 = p2 * (idx >= 0).view(*idx.shape, *([1] * (p2.dim() - 2))).to(p2.dtype)
        new = fn(p2)
        if new is None:
            return x
        if not isinstance(new, Tensor):
            raise ShapeMismatch(
                f"an intervention at {site.name!r} returned {type(new).__name__}; expected a tensor of shape {tuple(p2.shape)} (the shape it was given)"
            )
        if new.shape != p2.shape:
            raise ShapeMismatch(
                f"an intervention at {site.name!r} returned shape {tuple(new.shape)}; expected {tuple(p2.shape)} (the shape it was given)"
            )
        new = new.to(x.dtype)
        if dims is not None:
            new = p1.index_copy(-1, dims, new)
        if heads is not None:
            new = p0.index_copy(2, heads, new)
        direct = inplace and site.channels is None and not site.n_heads
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
            nv = full.index_copy(-1, self._index("ch", site.channels, x.device), nv)
        if inplace:
            full.copy_(nv)
            return x
        return nv.squeeze(1) if two_d else nv


class Edit:
    """An intervention acting at its resolved site."""

    def __init__(
        self,
        iv: Intervention,
        site: ResolvedSite,
        *,
        source: Callable[[], Tensor] | None = None,
        decode: bool = False,
        source_valid: Tensor | None = None,
    ):
        self.iv = iv
        self.sel = _Selection(site, iv.positions if iv.positions.kind != "all" else None, iv.heads, iv.dims)
        self.source = source
        # [batch or 1, k]: which source slots hold a token; where one is empty the base slot keeps its value
        self.source_valid = source_valid
        self.decode = decode
        self.collect = isinstance(iv, Collect)
        self.store: dict | None = None
        self.on_read: Callable[[], None] | None = None  # a collect counts as a read: the engine may stop after the last

    def run(self, x: Tensor, ctx: ForwardContext, inplace: bool) -> Tensor:
        iv = self.iv
        if ctx.info.past > 0 and not self.decode:
            return x  # prompt-only interventions leave decode steps alone
        if self.collect:
            assert self.store is not None
            key = iv.name  # type: ignore[attr-defined]

            def keep(part: Tensor) -> None:
                self.store[key] = part.detach() if iv.detach else part  # type: ignore[attr-defined,index]

            out = self.sel.transform(x, ctx, keep, inplace=False, decode=self.decode, read=True)
            if self.on_read is not None:
                self.on_read()
            return out
        if iv.sourced:
            if ctx.info.past > 0:
                return x  # a source has no values at generated tokens
            assert self.source is not None
            src = self.source()
            # a site without a position axis is handled as [batch, 1, width]; its SourceValue is [batch, width]
            fn = lambda part: iv(part, _aligned(src, part))  # noqa: E731
            if self.source_valid is not None:
                fn = _where_source(fn, self.source_valid)
        else:
            fn = iv
        return self.sel.transform(x, ctx, fn, inplace=inplace, decode=self.decode)


def _where_source(fn: Callable[[Tensor], Tensor], valid: Tensor) -> Callable[[Tensor], Tensor]:
    def edit(part: Tensor) -> Tensor:
        keep = valid.to(part.device).view(*valid.shape, *([1] * (part.dim() - 2)))
        return torch.where(keep, fn(part), part)

    return edit


def _aligned(src: Tensor, part: Tensor) -> Tensor:
    if src.dim() == part.dim() - 1:
        src = src.unsqueeze(1)
    return src.expand_as(part) if src.shape[0] == 1 else src


class Read:
    """Store the selected slice of a site under ``key`` (a source run feeding a sourced edit)."""

    def __init__(self, key, site: ResolvedSite, positions: Positions, heads, dims, store: dict, on_read: Callable[[], None]):
        self.key = key
        self.sel = _Selection(site, positions if positions.kind != "all" else None, heads, dims, override="source_positions")
        self.store = store
        self.on_read = on_read

    def run(self, x: Tensor, ctx: ForwardContext, inplace: bool) -> Tensor:
        def keep(part: Tensor) -> None:
            self.store[self.key] = part

        self.sel.transform(x, ctx, keep, inplace=False, decode=False, read=True)
        self.on_read()
        return x


def _input_tensor(args: tuple, kwargs: dict) -> tuple[Tensor, int | str]:
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


def _output_tensor(out) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    if hasattr(out, "to_tuple"):  # a transformers ModelOutput
        return out.to_tuple()[0]
    raise UnitError(f"a hooked module returned {type(out).__name__}; expected a tensor or a tuple starting with one")


def _replace_output(out, new: Tensor):
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


class HookSet:
    """Hooks for a set of handlers on one model; :meth:`install` / :meth:`remove`."""

    def __init__(
        self,
        root: nn.Module,
        handlers: Iterable[Edit | Read],
        *,
        positions: Positions | None = None,
        source_positions: Positions | None = None,
        validate: bool = False,
        per_call: bool = False,
        continuation: bool = False,
    ):
        self.root = root
        # a prompt resumed after cached positions (Prefix.past): its tokens are prompt positions, not decode steps
        self.continuation = continuation
        self.validate = validate  # check positions against each forward's real lengths (attached lifetime)
        # per call: only the forward the set was installed for is intervened; a forward nested in it
        # (an intervention calling the model) passes through. Attached: every forward, nested too.
        self.per_call = per_call
        self._outer: list = []  # the contexts of the forwards a nested forward interrupted
        self._depth = 0
        self.handlers = list(handlers)
        self.positions = positions  # per-call override for every edit's positions
        self.source_positions = source_positions
        self.ctx: ForwardContext | None = None
        self._handles: list = []
        self._maps = [m for h in self.handlers if isinstance(h, Edit) for m in h.iv.modules() if isinstance(m, Orthonormal)]
        self._prompt_only = all(isinstance(h, Edit) and not h.decode for h in self.handlers)

    @property
    def installed(self) -> bool:
        return bool(self._handles)

    def install(self) -> HookSet:
        groups: dict[tuple[str, str], list] = defaultdict(list)
        modules: dict[tuple[str, str], nn.Module] = {}
        inplace: dict[tuple[str, str], bool] = {}
        for h in self.handlers:
            key = h.sel.site.key
            groups[key].append(h)
            modules[key] = h.sel.site.module
            inplace[key] = h.sel.site.port.inplace
        try:
            self._handles.append(self.root.register_forward_pre_hook(self._root_pre, with_kwargs=True, prepend=True))
            self._handles.append(self.root.register_forward_hook(self._root_post, always_call=True))
            for key, hs in groups.items():
                ordered = [h for h in hs if isinstance(h, Edit) and not h.collect] + [h for h in hs if not (isinstance(h, Edit) and not h.collect)]
                if key[1] == "input":
                    fn = self._make_pre(ordered, inplace[key])
                    self._handles.append(modules[key].register_forward_pre_hook(fn, with_kwargs=True))
                else:
                    self._handles.append(modules[key].register_forward_hook(self._make_post(ordered)))
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.ctx = None
        self._outer.clear()
        self._depth = 0

    # -- the hooks -------------------------------------------------------------
    def _root_pre(self, module, args, kwargs):
        self._outer.append(self.ctx)  # restored by _root_post, so a nested forward cannot clobber it
        self._depth += 1
        if self.per_call and self._depth > 1:
            self.ctx = _NESTED
            return None
        changed = False
        override = self.positions
        if self._depth > 1 and override is not None and override.kind == "tensor":
            # per-example positions belong to the batch they were set for, not to a forward nested
            # in it (an intervention calling the model on other inputs): that one uses each spec
            override = None
        if POSITIONS_KWARG in kwargs:
            kwargs = dict(kwargs)
            override = Positions(kwargs.pop(POSITIONS_KWARG))
            changed = True
        ref, _ = _input_tensor(args, {k: kwargs[k] for k in ("input_ids", "inputs_embeds") if k in kwargs} or kwargs)
        batch = ref.shape[0]
        seq = ref.shape[1] if (ref.dim() >= 2 and ("input_ids" in kwargs or "inputs_embeds" in kwargs or ref.dim() >= 3)) else 1
        if not ("input_ids" in kwargs or "inputs_embeds" in kwargs) and args and ref.dtype in (torch.int64, torch.int32):
            seq = ref.shape[1]
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1 and isinstance(args[1], Tensor) and args[1].dim() == 2 and args[1].shape[0] == batch:
            mask = args[1]
        if isinstance(mask, Tensor) and mask.dim() == 2:
            past = mask.shape[-1] - seq
        else:
            mask, past = None, _cache_length(kwargs)
        if self.continuation:
            past = 0
        if past > 0 and self._prompt_only:
            self.ctx = _DECODE_SKIP
            return (args, kwargs) if changed else None
        self.ctx = ForwardContext(MaskInfo.from_mask(mask, batch, seq, ref.device, past), override, self.source_positions)
        if self.validate and past == 0:
            self._validate(self.ctx)
        if self._maps and self._depth == 1:  # a nested forward must not re-materialise the outer one's R
            materialise(self._maps)
        return (args, kwargs) if changed else None

    def _root_post(self, module, args, out):
        # always_call: also when the forward raised (EarlyExit included)
        self._depth = max(self._depth - 1, 0)
        outer = self._outer.pop() if self._outer else None
        if self._depth > 0:
            self.ctx = outer  # back to the forward the nested one interrupted
        # the outermost forward keeps its context: gradient checkpointing replays its layers in backward

    def _validate(self, ctx: ForwardContext) -> None:
        seen: set[int] = set()
        for h in self.handlers:
            spec = ctx.positions if ctx.positions is not None else h.sel.positions
            if spec is not None and id(spec) not in seen:
                seen.add(id(spec))
                spec.validate(ctx.info, "positions")
            if isinstance(h, Edit) and h.source is not None and not h.collect:
                batch = h.source().shape[0]  # an attached SourceValue: its batch must fit every forward
                if batch not in (1, ctx.info.batch):
                    raise BatchMismatch(
                        f"the SourceValue of {type(h.iv).__name__} at {h.sel.site.name!r} has batch {batch} but this "
                        f"forward has {ctx.info.batch}; expected equal batches (or a SourceValue of batch 1, broadcast)"
                    )

    def _context(self, x: Tensor) -> ForwardContext:
        ctx = self.ctx
        if ctx is None:  # the module was called directly, not through the model's root
            b = x.shape[0]
            seq = x.shape[1] if x.dim() >= 3 else 1
            ctx = ForwardContext(MaskInfo.from_mask(None, b, seq, x.device), self.positions, self.source_positions)
        return ctx

    def _make_pre(self, handlers: list, inplace: bool):
        def hook(module, args, kwargs):
            if self.ctx is _NESTED or self.ctx is _DECODE_SKIP:
                return None
            x, where = _input_tensor(args, kwargs)
            ctx = self._context(x)
            new = x
            for h in handlers:
                new = h.run(new, ctx, inplace)
            if new is x or inplace:
                return None
            if isinstance(where, int):
                return (new, *args[1:]), kwargs
            return args, {**kwargs, where: new}

        return hook

    def _make_post(self, handlers: list):
        def hook(module, args, out):
            if self.ctx is _NESTED or self.ctx is _DECODE_SKIP:
                return None
            x = _output_tensor(out)
            ctx = self._context(x)
            new = x
            for h in handlers:
                new = h.run(new, ctx, False)
            return None if new is x else _replace_output(out, new)

        return hook


# -- what happens at one (module, side), whatever the engine -------------------------


def group_handlers(handlers: Iterable[Edit | Read]) -> dict[tuple[str, str], tuple[ResolvedSite, list]]:
    """Handlers by (module, side), each group in run order: edits first, then collects and reads."""
    groups: dict[tuple[str, str], tuple[ResolvedSite, list]] = {}
    for h in handlers:
        site = h.sel.site
        groups.setdefault(site.key, (site, []))[1].append(h)
    for key, (site, hs) in groups.items():
        edits = [h for h in hs if isinstance(h, Edit) and not h.collect]
        groups[key] = (site, edits + [h for h in hs if not (isinstance(h, Edit) and not h.collect)])
    return groups


def mask_info_of_call(args: tuple, kwargs: dict) -> MaskInfo:
    """Where the real tokens are in a call of the model's root, from its arguments."""
    ref, _ = _input_tensor(args, {k: kwargs[k] for k in ("input_ids", "inputs_embeds") if k in kwargs} or kwargs)
    batch = ref.shape[0]
    seq = ref.shape[1] if (ref.dim() >= 2 and ("input_ids" in kwargs or "inputs_embeds" in kwargs or ref.dim() >= 3)) else 1
    if not ("input_ids" in kwargs or "inputs_embeds" in kwargs) and args and ref.dtype in (torch.int64, torch.int32):
        seq = ref.shape[1]
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > 1 and isinstance(args[1], Tensor) and args[1].dim() == 2 and args[1].shape[0] == batch:
        mask = args[1]
    if isinstance(mask, Tensor) and mask.dim() == 2:
        past = mask.shape[-1] - seq
    else:
        mask, past = None, _cache_length(kwargs)
    return MaskInfo.from_mask(mask, batch, seq, ref.device, past)


def run_on_inputs(handlers: list, args: tuple, kwargs: dict, ctx: ForwardContext, inplace: bool):
    """Run ``handlers`` on a module's input: the new ``(args, kwargs)``, or None if unchanged (or edited in place)."""
    x, where = _input_tensor(args, kwargs)
    new = x
    for h in handlers:
        new = h.run(new, ctx, inplace)
    if new is x or inplace:
        return None
    if isinstance(where, int):
        return (new, *args[1:]), kwargs
    return args, {**kwargs, where: new}


def run_on_output(handlers: list, out, ctx: ForwardContext):
    """Run ``handlers`` on a module's output: the new output, or None if unchanged."""
    x = _output_tensor(out)
    new = x
    for h in handlers:
        new = h.run(new, ctx, False)
    return None if new is x else _replace_output(out, new)
