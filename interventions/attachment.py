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

from torch import nn

from steerlab.interventions.errors import LifetimeError, ShapeMismatch, SourceError
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
        self._replays: list[tuple[nn.Module, _Replay]] = []
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
                self._check_source_value(iv, site, value)
                getter = lambda v=value: v  # noqa: E731
            else:
                kind = "a run" if isinstance(iv.source, Run) else "inputs" if iv.source is not None else "nothing"
                raise LifetimeError(
                    f"{type(iv).__name__} at {iv.site!r} reads from {kind}; attached interventions take a "
                    "precomputed SourceValue (lab.collect(...) gives one), or use lab.run for a per-call source"
                )
        valid = iv.source.valid if iv.sourced else None
        return Edit(iv, site, source=getter, decode=self.decode, source_valid=valid)

    def _check_source_value(self, iv: Intervention, site, value) -> None:
        """A SourceValue's shape past the batch (checked per forward) must be the slice ``iv`` edits."""
        feat = self.lab.site_shape(site)
        if iv.heads is not None:
            feat = (len(iv.heads), *feat[1:])
        if iv.dims is not None:
            feat = (*feat[:-1], len(iv.dims))
        if self.lab.has_positions(site):
            k = (self._positions or iv.positions).count  # None: all positions, whatever the length
            ok = value.dim() == len(feat) + 2 and tuple(value.shape[2:]) == feat and k in (None, value.shape[1])
            want = f"[batch, {k if k is not None else 'pos'}, {', '.join(map(str, feat))}]"
        else:
            ok = tuple(value.shape[1:]) in (feat, (1, *feat))
            want = f"[batch, {', '.join(map(str, feat))}]"
        if not ok:
            raise ShapeMismatch(f"the SourceValue for {type(iv).__name__} at {site.name!r} has shape {tuple(value.shape)}; expected {want}")

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
        for m in self.lab.model.modules():  # layers with gradient checkpointing (transformers sets this attribute)
            inner = m.__dict__.get("_gradient_checkpointing_func")
            if inner is not None:
                m._gradient_checkpointing_func = replay = _Replay(hs, inner)
                self._replays.append((m, replay))
        self.lab._attachments.append(self)
        return self

    def detach(self) -> None:
        if self._hooks is None:
            raise LifetimeError("these interventions are not attached")
        self._hooks.remove()
        self._hooks = None
        for m, replay in reversed(self._replays):
            _unlink(m, replay)
        self._replays.clear()
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


class _Replay:
    """A layer's checkpoint function that replays the layer, in backward, with the context
    (positions, mask) of the forward that ran it: with several forwards before one backward,
    the hook set's current context is the last forward's, not the replayed one's."""

    def __init__(self, hooks: HookSet, inner):
        self.hooks, self.inner = hooks, inner

    def __call__(self, fn, *args, **kwargs):
        hooks, ctx = self.hooks, self.hooks.ctx

        def run(*a, **k):
            saved, hooks.ctx = hooks.ctx, ctx
            try:
                return fn(*a, **k)
            finally:
                hooks.ctx = saved

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
