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
model sees it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from steerlab.interventions.errors import LifetimeError, SourceError
from steerlab.interventions.graph import Run, SourceValue
from steerlab.interventions.hooks import Edit, HookSet
from steerlab.interventions.ops import Intervention
from steerlab.interventions.units import Positions

if TYPE_CHECKING:
    from steerlab.interventions.lab import Lab

__all__ = ["Attachment"]


class Attachment:
    """Interventions attached to a model; a context manager, or ``attach()``/``detach()``."""

    def __init__(self, lab: Lab, interventions: Iterable[Intervention], *, decode: bool = False, positions=None):
        self.lab = lab
        self.interventions = list(interventions)
        self.decode = bool(decode)
        self._positions = None if positions is None else Positions(positions)
        self._hooks: HookSet | None = None
        self._edits = [self._edit(iv) for iv in self.interventions]

    def _edit(self, iv: Intervention) -> Edit:
        if not isinstance(iv, Intervention):
            raise LifetimeError(f"attach() takes Intervention objects; got {type(iv).__name__}")
        site = self.lab.prepare(iv)
        getter = None
        if iv.sourced:
            if iv.source is None:
                raise SourceError(
                    f"{type(iv).__name__} at {iv.site!r} needs a source: attached interventions take a precomputed "
                    "SourceValue (lab.source_value(...) gives one)"
                )
            if isinstance(iv.source, SourceValue):
                value = iv.source.value.to(self.lab.device)
                getter = lambda v=value: v  # noqa: E731
            else:
                kind = "a run" if isinstance(iv.source, Run) else "inputs" if iv.source is not None else "nothing"
                raise LifetimeError(
                    f"{type(iv).__name__} at {iv.site!r} reads from {kind}; attached interventions take a "
                    "precomputed SourceValue (lab.collect(...) gives one), or use lab.run for a per-call source"
                )
        valid = iv.source.valid if iv.sourced else None
        return Edit(iv, site, source=getter, decode=self.decode, source_valid=valid)

    # -- lifetime -------------------------------------------------------------
    @property
    def attached(self) -> bool:
        return self._hooks is not None

    def attach(self) -> Attachment:
        if self._hooks is not None:
            raise LifetimeError("these interventions are already attached")
        hs = HookSet(self.lab.model, self._edits, positions=self._positions, validate=True)
        hs.install()
        self._hooks = hs
        self.lab._attachments.append(self)
        return self

    def detach(self) -> None:
        if self._hooks is None:
            raise LifetimeError("these interventions are not attached")
        self._hooks.remove()
        self._hooks = None
        self.lab._attachments.remove(self)
        for iv in self.interventions:
            for m in iv.modules():
                if hasattr(m, "_cached"):
                    m._cached = None  # drop any R that holds an autograd graph

    def __enter__(self) -> Attachment:
        if self._hooks is None:
            self.attach()
        return self

    def __exit__(self, *exc) -> None:
        if self._hooks is not None:
            self.detach()

    # -- per-forward positions -----------------------------------------------------
    @property
    def positions(self) -> Positions | None:
        return self._positions

    @positions.setter
    def positions(self, spec) -> None:
        """Override every attached intervention's positions for the following forwards."""
        self._positions = None if spec is None else Positions(spec)
        if self._hooks is not None:
            self._hooks.positions = self._positions

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return f"Attachment({len(self.interventions)} interventions, {state})"
