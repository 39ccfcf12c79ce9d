"""Per-call data: what one call binds to a plan's handlers, and one forward's state.

An intervention module holds its parameters and its declared placement
(site, units, the ``source`` the user named). Everything an engine computes
or receives *during a call* travels in a :class:`Bindings` object made for
that call, never on the module:

* the source slices sourced edits read (filled by source runs, or bound by
  the caller: a cached ``SourceValue``, a DAS step's minibatch of sources),
  and which of their slots hold a token;
* per-call positions (an override of every edit's positions, of every
  source read's positions, or of one intervention's: a ``ReftModel``'s weight
  groups);
* what reads and collects record, and the callback that stops a source run
  after its last read.

Each forward of a call gets a :class:`ForwardContext`: where the real tokens
are (:class:`~steerlab.interventions.units.MaskInfo`), the position indices
every spec resolves to (computed once, shared by all sites), the table of
orthonormal maps materialised for it, and the call's bindings. A context is
dropped when its call ends, so nothing of one call reaches the next, not
even after an interrupted forward.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, no_type_check

from torch import Tensor, nn

from steerlab.interventions.errors import ConcurrentCall
from steerlab.interventions.units import MaskInfo, Positions, position_index

__all__ = ["Bindings", "ForwardContext", "EarlyExit", "running"]


class EarlyExit(Exception):
    """Raised inside a forward once every value a source run must supply is read."""


@dataclass(eq=False)
class Bindings:
    """The data one call binds to a hook set's handlers (keys are handler objects or interventions)."""

    #: source slice of each sourced edit, ``[batch or 1, k, ..., width]`` (by edit)
    sources: dict[Any, Tensor] = field(default_factory=dict)
    #: ``[batch or 1, k]`` bool: which source slots hold a token (by edit; absent: all)
    valid: dict[Any, Tensor] = field(default_factory=dict)
    #: override of every edit's positions / every source read's positions
    positions: Positions | None = None
    source_positions: Positions | None = None
    #: override of one intervention's positions (by intervention)
    edit_positions: dict[Any, Positions] = field(default_factory=dict)
    #: values recorded by reads (by read key) and by collects (by name)
    store: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)
    #: called after each read or collect (the engine stops a source run after its last)
    on_read: Callable[[], None] | None = None

    def read_done(self) -> None:
        if self.on_read is not None:
            self.on_read()

    def stop_after(self, reads: int) -> Bindings:
        """Stop the forward (:class:`EarlyExit`) once ``reads`` reads and collects are done (0: never)."""
        if reads <= 0:
            self.on_read = None
            return self
        pending = [reads]

        @no_type_check  # a closure made per call: the suite's runtime checker would decorate it on every call
        def on_read() -> None:
            pending[0] -= 1
            if pending[0] == 0:
                raise EarlyExit

        self.on_read = on_read
        return self


class ForwardContext:
    """One forward's state: mask info, resolved position indices, the materialised maps, the call's bindings."""

    __slots__ = ("info", "call", "positions", "table", "_idx", "_index")

    def __init__(self, info: MaskInfo, call: Bindings, positions: Positions | None = None, table: dict | None = None):
        self.info = info
        self.call = call
        #: this forward's override of every edit's positions (the call's, ``intervention_positions=``, or none)
        self.positions = positions
        self.table = table
        # by value: interventions with equal specs share one resolution per forward
        self._idx: dict[Positions, tuple[Tensor | None, bool, bool]] = {}
        self._index: dict[tuple, Tensor] = {}

    def spec(self, override: str, own: Positions | None, iv: Any = None) -> Positions | None:
        """The positions an edit (``override="positions"``) or a read (``"source_positions"``) uses here."""
        if override == "positions":
            if iv is not None and self.call.edit_positions:
                forced = self.call.edit_positions.get(iv)
                if forced is not None:
                    return forced
            forced = self.positions
        else:
            forced = self.call.source_positions
        return forced if forced is not None else own

    def resolved(self, spec: Positions) -> tuple[Tensor | None, bool, bool]:
        """``(indices, filled, guard)``: the padded indices; whether every slot is known to be
        filled; whether scatter must guard against empty slots."""
        hit = self._idx.get(spec)
        if hit is None:
            idx = spec.resolve(self.info)
            filled = spec.filled(self.info, idx)
            hit = self._idx[spec] = (idx, filled, spec.may_be_empty and not filled)
        return hit

    def index(self, spec: Positions, rest: tuple[int, ...]) -> Tensor:
        """``spec``'s indices broadcast over a value's trailing dims ``rest`` (clamped unless filled), for gather."""
        key = (spec, rest)
        hit = self._index.get(key)
        if hit is None:
            idx, filled, _ = self.resolved(spec)
            hit = self._index[key] = position_index(idx, rest, clamp=not filled)  # type: ignore[arg-type]
        return hit


# -- which calls run on a model now, by thread ----------------------------------------------

_ACTIVE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {thread: [kinds]}
_ACTIVE_LOCK = threading.Lock()


@contextmanager
def running(model: nn.Module, kind: str, *, exclusive: bool = False) -> Iterator[None]:
    """Mark a steerlab call of ``kind`` running on ``model`` in this thread for the block.

    ``exclusive`` (the nnsight engine, which instruments the model's modules for its call):
    refused with :class:`ConcurrentCall` while another thread runs a call on the model; and
    any call is refused while another thread runs an exclusive one.
    """
    ident = threading.get_ident()
    with _ACTIVE_LOCK:
        calls = _ACTIVE.setdefault(model, {})
        others = {k for t, kinds in calls.items() if t != ident for k in kinds}
        if others and (exclusive or "exclusive" in others):
            raise ConcurrentCall(
                f"{'this ' + kind + ' call' if exclusive else 'a steerlab call'} cannot run on this model while another thread runs "
                f"{'a call' if exclusive else 'an nnsight-engine call'} on it (the nnsight engine instruments the model's modules for its "
                "call); run them one after the other, or use the hook engine, which lets calls from several threads share a model"
            )
        calls.setdefault(ident, []).append("exclusive" if exclusive else kind)
    try:
        yield
    finally:
        with _ACTIVE_LOCK:
            mine = _ACTIVE.get(model, {}).get(ident)
            if mine:
                mine.pop()
                if not mine:
                    del _ACTIVE[model][ident]
