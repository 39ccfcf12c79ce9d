"""The attached lifetime: interventions installed across calls, until detached.

Per-call methods (``lab.run``, ``lab.collect``, sweeps) install hooks for one
call. Training with the Hugging Face ``Trainer``, gradient checkpointing
(whose backward replays a layer's forward after the call returned) and
``generate`` need the interventions in place across calls::

    with lab.attach([LoReFTIntervention(...), ...]):
        trainer.train()                       # or model(**batch); loss.backward()

    att = lab.attach(ivs)   # PEFT-style enable ...
    att.detach()            # ... and disable; the model is as it was

While attached, a forward may pass per-example positions as the keyword
``intervention_positions=LongTensor[batch, k]``; it is removed before the
model sees it. An entry point that runs several forwards for one call (a
``ReftModel`` forward, ``generate``) gives its positions with
:meth:`Attachment.using`, for this thread and this call only.

**Threads.** Attached interventions act on *every* forward of the model, in
every thread, until detached: that is what attaching means (a Trainer's
forwards, a DataParallel replica's). An attachment made by a per-call method
for its own use (``lab.generate``) belongs to the calling thread alone.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Protocol, no_type_check, runtime_checkable

from torch import nn

from steerlab.interventions.call import Bindings
from steerlab.interventions.errors import LifetimeError, SourceError
from steerlab.interventions.facts import ModelFacts, check_intervention
from steerlab.interventions.graph import Run, SourceValue
from steerlab.interventions.handlers import Edit
from steerlab.interventions.hooks import HookSet, Installation
from steerlab.interventions.ops import Intervention
from steerlab.interventions.plan import check_source_value
from steerlab.interventions.units import Positions


@runtime_checkable  # so that a runtime type checker (the test suite's) can check a lab argument
class LabLike(Protocol):
    """What an attachment needs of the :class:`~steerlab.interventions.Lab` it attaches through."""

    facts: ModelFacts

    @property
    def model(self) -> nn.Module: ...

    def check_wrapped(self, what: str = ...) -> None: ...

__all__ = ["Attachment", "attachments_of"]

_LIVE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # lab -> its attached attachments, in order


class Attachment:
    """Interventions attached to a model; a context manager, or ``attach()``/``detach()``.

    ``sources`` binds a ``SourceValue`` to sourced interventions (by
    intervention) in place of their declared ``source``; ``thread``: the only
    thread whose forwards it acts on (``None``: every thread).
    """

    def __init__(
        self,
        lab: LabLike,
        interventions: Iterable[Intervention],
        *,
        decode: bool = False,
        positions=None,
        sources: dict[Intervention, SourceValue] | None = None,
        thread: int | None = None,
    ):
        self.lab = lab
        self.interventions = [check_intervention(iv, "attach()") for iv in interventions]
        self.decode = bool(decode)
        self.thread = thread
        self._positions = None if positions is None else Positions(positions)
        self._installed: Installation | None = None
        self._replays: list[tuple[nn.Module, _Replay]] = []
        self._bindings = Bindings(positions=self._positions)
        edits = [self._edit(iv, (sources or {}).get(iv)) for iv in self.interventions]
        self._hooks = HookSet(lab.model, edits, validate=True, maps=[m for iv in self.interventions for m in lab.facts.maps(iv)])

    def _edit(self, iv: Intervention, bound: SourceValue | None) -> Edit:
        facts = self.lab.facts
        site = facts.place(iv)
        edit = Edit(iv, site, decode=self.decode)
        if not iv.sourced:
            return edit
        src = bound if bound is not None else iv.source
        if not isinstance(src, SourceValue):
            if src is None:
                raise SourceError(
                    f"{type(iv).__name__} at {iv.site!r} needs a source: attached interventions take a precomputed "
                    "SourceValue (lab.source_value(...) gives one)"
                )
            kind = "a run" if isinstance(src, Run) else "inputs"
            raise LifetimeError(
                f"{type(iv).__name__} at {iv.site!r} reads from {kind}; attached interventions take a "
                "precomputed SourceValue (lab.source_value(...) gives one), or use lab.run for a per-call source"
            )
        value = src.value.to(facts.device)
        k = (self._positions or iv.positions).count  # None: all positions, whatever the length
        check_source_value(facts, iv, site, value, batch=None, k=k)  # the batch is checked per forward
        self._bindings.sources[edit] = value
        if src.valid is not None:
            self._bindings.valid[edit] = src.valid
        return edit

    # -- lifetime -------------------------------------------------------------
    @property
    def attached(self) -> bool:
        return self._installed is not None

    def attach(self) -> Attachment:
        if self._installed is not None:
            raise LifetimeError("these interventions are already attached")
        self.lab.check_wrapped("attach()")
        inst = self._hooks.install(self._bindings, thread=self.thread)
        self._installed = inst
        for m in self.lab.model.modules():  # layers with gradient checkpointing (transformers sets this attribute)
            inner = m.__dict__.get("_gradient_checkpointing_func")
            if inner is not None:
                m._gradient_checkpointing_func = replay = _Replay(inst, inner)
                self._replays.append((m, replay))
        _LIVE.setdefault(self.lab, []).append(self)
        return self

    def detach(self) -> None:
        if self._installed is None:
            raise LifetimeError("these interventions are not attached")
        self._installed.remove()
        self._installed = None
        for m, replay in reversed(self._replays):
            _unlink(m, replay)
        self._replays.clear()
        live = _LIVE.get(self.lab, [])
        if self in live:
            live.remove(self)

    def __enter__(self) -> Attachment:
        if self._installed is None:
            self.attach()
        return self

    def __exit__(self, *exc) -> None:
        if self._installed is not None:
            self.detach()

    # -- positions --------------------------------------------------------------------
    @property
    def positions(self) -> Positions | None:
        return self._positions

    @positions.setter
    def positions(self, spec) -> None:
        """Override every attached intervention's positions for the following forwards (every thread)."""
        self._positions = None if spec is None else Positions(spec)
        self._bindings.positions = self._positions

    @contextmanager
    def using(self, positions=None, *, off: bool = False) -> Iterator[Attachment]:
        """``with att.using(positions=p):`` one call of an entry point on this thread: its forwards use
        ``p`` (another thread's forwards do not; ``off=True``: they pass through untouched); on exit,
        however it exits, this thread's per-call state (positions, forward contexts, materialised maps)
        is dropped."""
        if self._installed is None:
            raise LifetimeError("these interventions are not attached")
        with self._installed.scope(None if positions is None else Positions(positions), off=off):
            yield self

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return f"Attachment({len(self.interventions)} interventions, {state})"


class _Replay:
    """A layer's checkpoint function that replays the layer, in backward, with the context
    (positions, mask, materialised maps) of the forward that ran it: with several forwards
    before one backward, the current context is the last forward's, not the replayed one's."""

    def __init__(self, inst: Installation, inner):
        self.inst, self.inner = inst, inner

    def __call__(self, fn, *args, **kwargs):
        inst, ctx = self.inst, self.inst.context()

        @no_type_check  # a closure made per call: the suite's runtime checker would decorate it on every call
        def run(*a, **k):
            with inst.replay(ctx):
                return fn(*a, **k)

        return self.inner(run, *args, **kwargs)


def _unlink(module: nn.Module, replay: _Replay) -> None:
    """Remove ``replay`` from the module's chain of checkpoint functions (attachments may detach in any order)."""
    cur = module.__dict__.get("_gradient_checkpointing_func")
    if cur is replay:
        module._gradient_checkpointing_func = replay.inner
        return
    while isinstance(cur, _Replay) and cur.inner is not replay:
        cur = cur.inner
    if isinstance(cur, _Replay):
        cur.inner = replay.inner



def attachments_of(lab: LabLike) -> tuple[Attachment, ...]:
    """The attachments currently attached through ``lab``."""
    return tuple(_LIVE.get(lab, ()))
