"""The hook engine's mechanics: one hook per (module, side), installed and removed as a set.

A :class:`HookSet` is built once from handlers (edits and reads at resolved
sites): it groups them by (module, side) and knows the orthonormal maps they
use. :meth:`HookSet.install` puts it on the model for one call (or one
attachment) with that call's :class:`~steerlab.interventions.call.Bindings`
and returns an :class:`Installation`: exactly one PyTorch hook per (module,
side), plus a pre-hook and an always-called post-hook on the model's root
that open and close a :class:`~steerlab.interventions.call.ForwardContext`
for each forward. Removing the installation removes exactly its own handles;
nobody else's hooks are touched.

**Threads.** A per-call installation belongs to the thread that made it:
its hooks pass every other thread's forward through untouched, so a plain
forward or ``generate`` in another thread sees the model as it is, and two
threads' calls on one model do not mix. An attached installation
(``lab.attach``) acts on every forward of the model, whatever the thread,
by design; each thread has its own forward contexts.

**Interrupts.** Per-forward state lives on the installation, per thread, as a
stack of contexts pushed by the root pre-hook and popped by the root
post-hook. PyTorch runs ``always_call`` hooks on ``Exception`` only, so a
``KeyboardInterrupt`` (or any ``BaseException``) inside a forward skips the
pop. Nothing depends on that pop: per-call installations are removed in the
``finally`` of the call that made them; every entry point that runs an
attached installation resets its thread's state in a ``finally``
(:meth:`Installation.scope`); and a raw ``model(...)`` forward while
attached recognises a leftover context (no forward of this model is running
below it on the thread's stack) and drops it before it starts.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import no_type_check

from torch import nn

from steerlab.interventions.call import Bindings, ForwardContext
from steerlab.interventions.errors import BatchMismatch
from steerlab.interventions.handlers import (
    Edit,
    Handler,
    group_handlers,
    input_tensor,
    mask_info_of_call,
    output_tensor,
    run_on_inputs,
    run_on_output,
)
from steerlab.interventions.orthonormal import Orthonormal, materialise, use_table
from steerlab.interventions.units import MaskInfo, Positions

__all__ = ["HookSet", "Installation", "POSITIONS_KWARG"]

#: a keyword a caller may pass to the model's forward while interventions are
#: attached: per-example positions for this forward, removed before the model sees it
POSITIONS_KWARG = "intervention_positions"

# the context of a forward nested in a per-call forward: no handler acts on it
_NESTED = object()
# a decode step of a set whose edits all act on prompt positions only: every site hook returns at
# once (no mask bookkeeping, no materialised R), so steering costs nothing per generated token
_DECODE_SKIP = object()

_CALL_IMPL = nn.Module._call_impl.__code__


def _root_calls_on_stack(root: nn.Module) -> int:
    """How many calls of ``root`` are running on this thread (from the Python stack)."""
    n, f = 0, sys._getframe(1)
    while f is not None:
        if f.f_code is _CALL_IMPL and f.f_locals.get("self") is root:
            n += 1
        f = f.f_back
    return n


def _nested(root: nn.Module) -> bool:
    """Whether the forward of ``root`` starting now runs inside another forward of it (started by a
    handler, an intervention calling the model, or by any code below a running call of ``root``).
    Asked only when this thread has contexts open: a nested forward, or leftovers of an interrupt."""
    return _root_calls_on_stack(root) > 1


class HookSet:
    """Handlers for one model, grouped once; :meth:`install` puts them on the model for a call.

    ``per_call``: only the top-level forward of the installing thread is
    intervened; a forward nested in it (an intervention calling the model)
    passes through. Otherwise (attached) every forward is, nested ones too.
    ``validate``: check positions (and attached source batches) against each
    forward's real lengths. ``continuation``: the call resumes after cached
    positions (``Prefix.past``): its tokens are prompt positions, not decode steps.
    """

    def __init__(
        self,
        root: nn.Module,
        handlers: Iterable[Handler],
        *,
        validate: bool = False,
        per_call: bool = False,
        continuation: bool = False,
        maps: Iterable[Orthonormal] | None = None,
    ):
        self.root = root
        self.handlers = list(handlers)
        self.groups = group_handlers(self.handlers)
        self.validate = validate
        self.per_call = per_call
        self.continuation = continuation
        if maps is None:  # the orthonormal maps the edits use (given by the caller when it knows them already)
            maps = (m for h in self.handlers if isinstance(h, Edit) for m in h.iv.modules() if isinstance(m, Orthonormal))
        self.maps = list(dict.fromkeys(maps))
        self.prompt_only = all(isinstance(h, Edit) and not h.decode for h in self.handlers)

    def install(self, bindings: Bindings, *, thread: int | None) -> Installation:
        """Hooks on the model for ``bindings``; ``thread``: the only thread they act on (None: every thread)."""
        return Installation(self, bindings, thread)._install()


@dataclass(eq=False)
class _Thread:
    """One thread's state on an installation: the contexts of the forwards it is running."""

    frames: list = field(default_factory=list)
    positions: Positions | None = None  # this thread's override for the current scope (an entry point's call)
    off: bool = False  # this thread's forwards pass through for the scope (the call brings its own interventions)
    reuse: dict | None = None  # maps materialised earlier in the scope, reused where unchanged (no gradients)
    last: ForwardContext | None = None  # the last top-level forward's context (a checkpointed layer replayed alone)


class Installation:
    """A :class:`HookSet` on its model for one call or one attachment; :meth:`remove` takes it off."""

    def __init__(self, hooks: HookSet, bindings: Bindings, owner: int | None):
        self.hooks = hooks
        self.bindings = bindings
        self.owner = owner
        self._handles: list = []
        self._threads: dict[int, _Thread] = {}

    def _install(self) -> Installation:
        hs = self.hooks
        try:
            self._handles.append(hs.root.register_forward_pre_hook(self._root_pre, with_kwargs=True, prepend=True))
            self._handles.append(hs.root.register_forward_hook(self._root_post, always_call=True))
            for site, handlers in hs.groups.values():
                if site.port.io == "input":
                    hook = self._make_pre(handlers, site.port.inplace)
                    self._handles.append(site.module.register_forward_pre_hook(hook, with_kwargs=True))
                else:
                    self._handles.append(site.module.register_forward_hook(self._make_post(handlers)))
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._threads.clear()

    def __enter__(self) -> Installation:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # -- per-thread state -------------------------------------------------------------
    def _thread(self) -> _Thread | None:
        ident = threading.get_ident()
        if self.owner is not None and ident != self.owner:
            return None
        st = self._threads.get(ident)
        if st is None:
            st = self._threads[ident] = _Thread()
        return st

    @contextmanager
    def scope(self, positions: Positions | None = None, *, off: bool = False) -> Iterator[None]:
        """One entry point's call on this thread (a ``ReftModel`` forward, a ``generate``): ``positions``
        override every edit's for its forwards (``off``: its forwards pass through); on exit, however
        it exits, the thread's state is dropped. After a call that completed, its last forward's
        context stays for a checkpointed layer replayed in backward; after one that raised, nothing."""
        ident = threading.get_ident()
        outer = self._threads.get(ident)
        st = self._threads[ident] = _Thread(positions=positions, off=off, reuse={})
        ok = False
        try:
            yield
            ok = True
        finally:
            st.frames.clear()
            keep = st.last if ok else None
            if outer is not None:
                self._threads[ident] = outer
            else:
                self._threads.pop(ident, None)
            if keep is not None and self._handles:
                self._threads.setdefault(ident, _Thread()).last = keep

    # -- the root hooks -----------------------------------------------------------------
    def _root_pre(self, module, args, kwargs=None):
        st = self._thread()
        if st is None or kwargs is None:
            # another thread's forward: a per-call installation does not act on it (nor on one that met
            # the hook half-registered: torch files a with-kwargs hook in two steps)
            return None
        if st.frames and not _nested(module):
            st.frames.clear()  # contexts of a forward that died without its post-hook (a KeyboardInterrupt)
        if st.off:
            st.frames.append(_NESTED)
            return (args, {k: v for k, v in kwargs.items() if k != POSITIONS_KWARG}) if POSITIONS_KWARG in kwargs else None
        if self.hooks.per_call and st.frames:
            st.frames.append(_NESTED)
            return None
        override = st.positions if st.positions is not None else self.bindings.positions
        if st.frames and override is not None and override.kind == "tensor":
            # per-example positions belong to the batch they were set for, not to a forward nested
            # in it (an intervention calling the model on other inputs): that one uses each spec
            override = None
        changed = POSITIONS_KWARG in kwargs
        if changed:
            kwargs = dict(kwargs)
            override = Positions(kwargs.pop(POSITIONS_KWARG))
        info = mask_info_of_call(args, kwargs)
        if self.hooks.continuation:
            info = MaskInfo(info.starts, info.lengths, info.seq, 0, info.lengths_cpu)
        if info.past > 0 and self.hooks.prompt_only:
            st.frames.append(_DECODE_SKIP)
            return (args, kwargs) if changed else None
        table = materialise(self.hooks.maps, st.reuse) if self.hooks.maps else None
        ctx = ForwardContext(info, self.bindings, override, table)
        if self.hooks.validate and info.past == 0:
            self._validate(ctx)
        if st.reuse is not None and table is not None:
            st.reuse = table
        st.frames.append(ctx)
        if len(st.frames) == 1:
            st.last = ctx
        return (args, kwargs) if changed else None

    def _root_post(self, module, args, out):
        # always_call: also when the forward raised (EarlyExit included); not on a KeyboardInterrupt
        st = self._thread()
        if st is not None and st.frames:
            st.frames.pop()

    def _validate(self, ctx: ForwardContext) -> None:
        seen: set[int] = set()
        for h in self.hooks.handlers:
            spec = ctx.spec("positions", h.sel.positions, h.sel.owner)
            if spec is not None and id(spec) not in seen:
                seen.add(id(spec))
                spec.validate(ctx.info, "positions")
            src = self.bindings.sources.get(h)
            if src is not None and src.shape[0] not in (1, ctx.info.batch):
                # an attached SourceValue: its batch must fit every forward
                raise BatchMismatch(
                    f"the SourceValue of {type(h.iv).__name__} at {h.site.name!r} has batch {src.shape[0]} but this "  # type: ignore[union-attr]
                    f"forward has {ctx.info.batch}; expected equal batches (or a SourceValue of batch 1, broadcast)"
                )

    # -- the site hooks -----------------------------------------------------------------
    def context(self, x=None) -> ForwardContext | None:
        """The context site hooks use now on this thread (``None``: pass through)."""
        st = self._thread()
        if st is None:
            return None
        if st.frames:
            ctx = st.frames[-1]
            return None if ctx is _NESTED or ctx is _DECODE_SKIP else ctx
        # a module called outside a forward of the root: a checkpointed layer replayed in backward
        # (the last forward's context, if it fits), or a module called directly
        last = st.last
        if last is not None and x is not None and last.info.batch == x.shape[0] and (x.dim() < 3 or last.info.seq == x.shape[1]):
            return last
        if x is None:
            return None
        seq = x.shape[1] if x.dim() >= 3 else 1
        return ForwardContext(MaskInfo.from_mask(None, x.shape[0], seq, x.device), self.bindings, self.bindings.positions)

    def replay(self, ctx: ForwardContext | None):
        """Context manager: run a checkpointed layer's replay with the context of the forward that ran it."""
        return _Replaying(self, ctx)

    def _site(self, x_of, args, kwargs_or_out):
        """The context a site hook acts in on this thread, or ``None`` to pass through."""
        ident = threading.get_ident()
        if self.owner is not None and ident != self.owner:
            return None
        st = self._threads.get(ident)
        if st is not None and st.frames:
            ctx = st.frames[-1]
            return None if ctx is _NESTED or ctx is _DECODE_SKIP else ctx
        return self.context(x_of(args, kwargs_or_out))

    def _make_pre(self, handlers: list, inplace: bool):
        site = self._site

        @no_type_check  # a closure made per call: the suite's runtime checker would decorate it on every call
        def hook(module, args, kwargs=None):
            if kwargs is None:
                return None  # met half-registered (another thread's forward): see _root_pre
            ctx = site(_input_of, args, kwargs)
            if ctx is None:
                return None
            if ctx.table is None:
                return run_on_inputs(handlers, args, kwargs, ctx, inplace)
            previous = use_table(ctx.table)  # the forward's materialised maps, current while its handlers run
            try:
                return run_on_inputs(handlers, args, kwargs, ctx, inplace)
            finally:
                use_table(previous)

        return hook

    def _make_post(self, handlers: list):
        site = self._site

        @no_type_check
        def hook(module, args, out):
            ctx = site(_output_of, args, out)
            if ctx is None:
                return None
            if ctx.table is None:
                return run_on_output(handlers, out, ctx)
            previous = use_table(ctx.table)  # the forward's materialised maps, current while its handlers run
            try:
                return run_on_output(handlers, out, ctx)
            finally:
                use_table(previous)

        return hook


def _input_of(args, kwargs):
    return input_tensor(args, kwargs)[0]


def _output_of(args, out):
    return output_tensor(out)


class _Replaying:
    """Within: this thread's site hooks use ``ctx`` (a replayed layer's forward context)."""

    def __init__(self, inst: Installation, ctx: ForwardContext | None):
        self.inst, self.ctx = inst, ctx

    def __enter__(self) -> None:
        st = self.inst._thread()
        self.st = st
        if st is not None and self.ctx is not None:
            st.frames.append(self.ctx)
            self.depth = len(st.frames)

    def __exit__(self, *exc) -> None:
        st = self.st
        if st is not None and self.ctx is not None:
            del st.frames[self.depth - 1 :]
