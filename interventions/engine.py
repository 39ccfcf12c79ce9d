"""The hook engine, and prepared runs: a plan's forwards with PyTorch hooks.

:class:`HookEngine` implements :class:`~steerlab.interventions.plan.Engine`:
each forward of a :class:`~steerlab.interventions.plan.Plan` installs the
node's hooks (compiled once per node) with that forward's bindings, runs the
model (resuming from a :class:`~steerlab.interventions.prefix.Prefix` when
given) and removes them in a ``finally``, so after a call, even one that
raised (``KeyboardInterrupt`` included), the model's hook registries are as
they were and no per-call state outlives the call.

:class:`PreparedRun` is one intervened run validated and compiled once and
then called many times, each call binding its own inputs, source values,
positions and prefix (a DAS fit's steps)::

    run = lab.prepare([das_iv], positions="per-call")
    for batch in batches:
        out = run(batch.base, sources=[batch.source_slice], positions=batch.positions, prefix=batch.prefix)
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from typing import Any, Literal

import torch
from torch import Tensor

from steerlab.interventions.call import Bindings, EarlyExit, running
from steerlab.interventions.errors import ConfigError, SourceError, checked_first
from steerlab.interventions.facts import ModelFacts, check_intervention
from steerlab.interventions.graph import GraphResult, RunResult, SourceValue
from steerlab.interventions.handlers import Edit
from steerlab.interventions.hooks import HookSet
from steerlab.interventions.ops import Intervention
from steerlab.interventions.plan import (
    Engine,
    Forward,
    Plan,
    PlanNode,
    check_prefix,
    check_source_value,
    positions_or_none,
    refuse_checkpointed_backward,
    run_plan,
)
from steerlab.interventions.prefix import Prefix, resume_from

__all__ = ["HookEngine", "PreparedRun", "HOOKS", "EngineSpec", "engine_of"]


class HookEngine:
    """Executes plans with PyTorch hooks (the default engine)."""

    def execute(self, plan: Plan, *, prefix: Prefix | None = None, model_kwargs: dict | None = None) -> GraphResult:
        with running(plan.facts.model, "hook-engine"):
            return run_plan(plan, self.forward, prefix=prefix, model_kwargs=model_kwargs)

    def forward(self, plan: Plan, step: Forward) -> Any:
        """Run one forward of ``plan`` (see :class:`~steerlab.interventions.plan.Forward`); ``None`` if it stopped early."""
        return forward(plan.facts, step)

    def __repr__(self) -> str:
        return "HookEngine()"


#: the engine ``lab.run`` / ``lab.execute`` use unless told otherwise
HOOKS = HookEngine()


def _hooks(facts: ModelFacts, step: Forward, continuing: bool) -> HookSet:
    node = step.node
    cached = None if node is None or node.hooks is None else node.hooks
    if cached is not None and cached.continuation == continuing:
        return cached
    maps = [m for e in step.edits for m in facts.maps(e.iv)]
    hs = HookSet(facts.model, [*step.edits, *step.reads.values()], per_call=True, continuation=continuing, maps=maps)
    if node is not None:
        node.hooks = hs  # a plan run again (a prepared run) reuses its compiled hooks
    return hs


def forward(facts: ModelFacts, step: Forward) -> Any:
    """One forward on ``facts``' model with ``step``'s handlers installed for it alone (this thread)."""
    continuing = step.prefix is not None and step.prefix.past is not None
    hooks = _hooks(facts, step, continuing)
    kwargs = step.model_kwargs
    if continuing:
        keyword = "cache" if facts.takes("cache") else "past_key_values"
        kwargs = {**kwargs, **step.prefix.past_kwargs(keyword)}  # type: ignore[union-attr]
    resume = resume_from(facts.layers, step.prefix, root=facts.model) if step.prefix is not None else nullcontext()
    with torch.set_grad_enabled(step.grad):
        try:
            with hooks.install(step.bindings, thread=threading.get_ident()), resume:
                return facts.model(*step.inputs.args, **step.inputs.kwargs, **kwargs)
        except EarlyExit:
            return None


class PreparedRun:
    """One run of the model with ``interventions``, validated and compiled once; call it per batch.

    Checked once: every site, unit, width and device (see :meth:`ModelFacts.place`).
    Each call binds ``inputs``, the source slices of the sourced interventions
    (``sources``, in the order of those interventions; a ``SourceValue`` the
    intervention declares is used where none is given), per-call ``positions``
    (an override of every intervention's, e.g. a collator's per-example
    ``LongTensor[batch, k]``), a ``prefix`` and model keywords. The
    interventions are never modified; per-call checks are shape checks (no
    host sync).
    """

    def __init__(self, facts: ModelFacts, interventions: Iterable[Intervention] | Intervention, *, validate: bool = True):
        ivs = [interventions] if isinstance(interventions, Intervention) else list(interventions)
        self.facts = facts
        self.validate = validate
        self.interventions = [check_intervention(iv, "prepare()") for iv in ivs]
        self._edits = [Edit(iv, facts.place(iv)) for iv in self.interventions]
        self._sourced = [e for e in self._edits if e.sourced]
        for e in self._sourced:
            if e.iv.source is not None and not isinstance(e.iv.source, SourceValue):
                raise SourceError(
                    f"{type(e.iv).__name__} at {e.site.name!r} reads from {type(e.iv.source).__name__}; a prepared run takes "
                    "its sources as values with each call (sources=[...]) or as a declared SourceValue"
                )
        self._hooks: HookSet | None = None

    def __call__(
        self,
        inputs: Any,
        *,
        sources: Sequence[Tensor | SourceValue | None] = (),
        positions=None,
        prefix: Prefix | None = None,
        **model_kwargs,
    ) -> RunResult:
        facts = self.facts
        inp = facts.inputs(inputs)
        info = inp.mask_info()
        spec = positions_or_none(positions)
        b = Bindings(positions=spec)
        self._bind(b, list(sources), info, spec)
        if self.validate:
            for e in self._edits:
                (spec or e.iv.positions).validate(info, "positions")
        node = PlanNode(0, None, inp, info, self._edits, hooks=self._hooks)  # HookSets are stateless: shared by calls and threads
        if prefix is not None:
            check_prefix(prefix, [node])
        refuse_checkpointed_backward(facts, self._edits)
        step = Forward(inp, self._edits, {}, b, False, torch.is_grad_enabled(), prefix, model_kwargs, node)
        with running(facts.model, "prepared run"):
            out = forward(facts, step)
        self._hooks = node.hooks
        return RunResult(out)

    def _bind(self, b: Bindings, sources: list, info, spec) -> None:
        if len(sources) > len(self._sourced):
            raise SourceError(f"{len(sources)} source values given for {len(self._sourced)} sourced interventions")
        for i, e in enumerate(self._sourced):
            given = sources[i] if i < len(sources) else None
            sv = given if given is not None else e.iv.source
            if sv is None:
                raise SourceError(f"{type(e.iv).__name__} at {e.site.name!r} needs a source value with each call: sources=[...]")
            value, valid = (sv.value, sv.valid) if isinstance(sv, SourceValue) else (sv, None)
            if not isinstance(value, Tensor):
                raise SourceError(f"the source of {type(e.iv).__name__} at {e.site.name!r} is {type(value).__name__}; expected a tensor or a SourceValue")
            k = (spec or e.iv.positions).count
            check_source_value(self.facts, e.iv, e.site, value, batch=info.batch, k=info.seq if k is None else k)
            b.sources[e] = value.to(self.facts.device)
            if valid is not None:
                b.valid[e] = valid

    def __repr__(self) -> str:
        return f"PreparedRun({len(self.interventions)} interventions)"


#: what a call's ``engine=`` takes: a name, or an object implementing :class:`~steerlab.interventions.plan.Engine`
EngineSpec = Literal["hooks", "nnsight"] | Engine


def check_engine(engine: object) -> None:
    if not (engine in ("hooks", "nnsight") if isinstance(engine, str) else callable(getattr(engine, "execute", None))):
        raise ConfigError(f"engine={engine!r}: expected 'hooks', 'nnsight' or an engine object such as NNsightEngine(model, remote=True)")


@checked_first(engine=check_engine)
def engine_of(engine: EngineSpec) -> Engine:
    """An engine object from ``"hooks"``, ``"nnsight"`` or an object with ``execute(plan, ...)``."""
    if engine == "hooks":
        return HOOKS
    if engine == "nnsight":
        from steerlab.interventions.nnsight_engine import NNsightEngine

        return NNsightEngine()
    return engine

