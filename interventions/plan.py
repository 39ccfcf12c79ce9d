"""A run graph validated against a model, and its execution: the engine-independent half of every call.

:meth:`Plan.build` checks everything before any compute — sites, widths,
heads and dims, positions against each input's real lengths, source counts,
batch sizes and shapes — and decides the forwards: each run of the graph
(plus an implicit run for every sourced intervention whose source is plain
inputs) is a :class:`PlanNode` with its edits, the values other runs read
from it, and whether its output is kept.

:func:`run_plan` executes a plan with any engine's one-forward function:

1. runs with no interventions that only supply values (plain sources) and
   have inputs of one shape are concatenated into a single forward;
2. a run that only supplies values stops right after the last site anyone
   reads from it, and runs under ``no_grad`` unless a gradient must flow
   through it;
3. the remaining runs execute in topological order; each reads its
   sources' values from the slices collected above.

What a call computes (source values, collected slices) or receives
(per-call positions, a prefix, model keywords) travels in the
:class:`~steerlab.interventions.call.Bindings` of each :class:`Forward`,
never on the interventions. An :class:`Engine` is anything with
``execute(plan, ...)``; the hook engine and the nnsight engine both run
:func:`run_plan` with their own forward.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from steerlab.interventions.activation_cache import ActivationCache
from steerlab.interventions.call import Bindings
from steerlab.interventions.errors import BatchMismatch, LifetimeError, ShapeMismatch, UnitError
from steerlab.interventions.facts import ModelFacts, check_intervention
from steerlab.interventions.graph import Graph, GraphResult, Run, RunResult, SourceValue
from steerlab.interventions.handlers import Edit, Read
from steerlab.interventions.inputs import Inputs
from steerlab.interventions.ops import Intervention
from steerlab.interventions.prefix import Prefix
from steerlab.interventions.sites import ResolvedSite
from steerlab.interventions.units import MaskInfo, Positions

if TYPE_CHECKING:
    from steerlab.interventions.hooks import HookSet

__all__ = [
    "Plan",
    "PlanNode",
    "Forward",
    "Engine",
    "run_plan",
    "check_source_value",
    "check_prefix",
    "positions_or_none",
    "refuse_checkpointed_backward",
]


def positions_or_none(spec) -> Positions | None:
    return None if spec is None else Positions(spec)


@dataclass(eq=False)
class PlanNode:
    """One forward of a plan: a run of the graph, or an implicit source run of plain inputs."""

    index: int
    run: Run | None
    inputs: Inputs
    info: MaskInfo
    edits: list[Edit] = field(default_factory=list)
    reads: dict[tuple, Read] = field(default_factory=dict)
    readers: list[tuple[PlanNode, Edit, tuple]] = field(default_factory=list)
    output: bool = True
    hooks: HookSet | None = None  # the hook engine's compiled hooks, built on first use and reused

    @property
    def name(self) -> str:
        return self.run.name if self.run is not None else f"source of run {self.index}"


@dataclass(eq=False)
class Forward:
    """One forward a plan asks an engine to run, with this call's bindings."""

    inputs: Inputs
    edits: list[Edit]
    reads: dict[tuple, Read]
    bindings: Bindings
    stop_early: bool
    grad: bool
    prefix: Prefix | None
    model_kwargs: dict
    node: PlanNode | None = None  # the plan node it runs (None: several plain sources batched)


#: an engine's one-forward function: the model's output (None if stopped early)
ForwardFn = Callable[["Plan", Forward], Any]


@runtime_checkable
class Engine(Protocol):
    """Executes plans. ``lab.execute(graph, engine=...)`` takes any object with this method."""

    def execute(self, plan: Plan, *, prefix: Prefix | None = None, model_kwargs: dict | None = None) -> GraphResult: ...


def _read_key(site: ResolvedSite, positions: Positions, heads, dims) -> tuple:
    return (site.name, hash(positions), positions.kind, heads, dims)


class Plan:
    """A run graph validated against ``facts``; build with :meth:`build`."""

    def __init__(self, facts: ModelFacts, positions: Positions | None, source_positions: Positions | None, validate: bool):
        self.facts = facts
        self.positions = positions
        self.source_positions = source_positions
        self.validate = validate
        self.nodes: list[PlanNode] = []
        self.by_run: dict[int, PlanNode] = {}
        self.order: list[PlanNode] = []
        self.source_of: dict[Edit, PlanNode | SourceValue] = {}
        self.valid: dict[Edit, Tensor] = {}  # which source slots hold a token, by edit
        self.edit_positions: dict[Intervention, Positions] = {}  # per-intervention overrides of this call
        self._trainable_base: bool | None = None  # read at most once per plan, and only for a source run
        self._implicit: dict[int, PlanNode] = {}

    @classmethod
    def build(cls, facts: ModelFacts, graph: Graph, *, positions=None, source_positions=None, validate: bool = True) -> Plan:
        """Validate ``graph`` on ``facts``' model; ``positions`` / ``source_positions`` override every
        intervention's for this call (``source_positions`` defaults to ``positions``); ``positions``
        may also be a mapping ``{intervention: positions}`` overriding those interventions' only."""
        per_iv = positions if isinstance(positions, Mapping) else {}
        positions = None if per_iv else positions
        sp = source_positions if source_positions is not None else positions
        plan = cls(facts, positions_or_none(positions), positions_or_none(sp), validate)
        plan.edit_positions = {check_intervention(iv, "positions={...}"): Positions(p) for iv, p in per_iv.items()}
        graph.validate_sources()
        runs = graph.order()
        for run in runs:
            node = plan._node(run.inputs, run)
            node.output = run.output if run.output is not None else True
            plan.by_run[run.index] = node
        for run in runs:
            node = plan.by_run[run.index]
            for iv in run.interventions:
                node.edits.append(plan._check_edit(node, check_intervention(iv, "a run's interventions")))
        for node in plan.nodes:
            if node.run is not None and node.run.output is None and node.readers:
                node.output = False
        # implicit sources have no interventions and no dependencies: they go first
        plan.order = list(plan._implicit.values()) + [plan.by_run[r.index] for r in runs]
        return plan

    # -- nodes ------------------------------------------------------------
    def _node(self, inputs, run: Run | None) -> PlanNode:
        raw = self.facts.inputs(inputs, device=False)
        inp = raw.to(self.facts.device)
        info = inp.mask_info()
        if self.validate and info.lengths_cpu is None:
            # positions are checked against real lengths before compute: from the caller's CPU mask
            # when there is one; inputs already on an accelerator cost one host sync here
            host = raw.mask_info() if raw._ref.device.type == "cpu" else None
            lengths = host.lengths_cpu if host is not None else tuple(int(x) for x in info.lengths.tolist())
            info = MaskInfo(info.starts, info.lengths, info.seq, 0, lengths)
        node = PlanNode(len(self.nodes), run, inp, info)
        self.nodes.append(node)
        return node

    def _source_node(self, iv: Intervention) -> PlanNode | SourceValue:
        src = iv.source
        if isinstance(src, SourceValue):
            return src
        if isinstance(src, Run):
            return self.by_run[src.index]
        key = id(src)
        if key not in self._implicit:
            node = self._node(src, None)
            node.output = False
            self._implicit[key] = node
        return self._implicit[key]

    # -- validation ---------------------------------------------------------
    def _check_edit(self, node: PlanNode, iv: Intervention) -> Edit:
        facts = self.facts
        site = facts.place(iv)
        edit = Edit(iv, site)
        forced = self.edit_positions.get(iv) or self.positions
        spec = forced or iv.positions
        if forced is not None and spec.kind != "all" and not facts.has_positions(site):
            raise UnitError(f"{site.name!r} has no position axis (its value is [batch, width]); positions must be None")
        spec.validate(node.info, "positions")
        if not iv.sourced:
            return edit
        src = self._source_node(iv)
        self.source_of[edit] = src
        if isinstance(src, SourceValue):
            k = spec.count if spec.count is not None else node.info.seq
            check_source_value(facts, iv, site, src.value, batch=node.info.batch, k=k)
            if src.valid is not None:
                self.valid[edit] = src.valid
            return edit
        sspec = self.source_positions or iv.effective_source_positions()
        sspec.validate(src.info, "source_positions")
        if sspec.may_be_empty:
            self.valid[edit] = sspec.resolve(src.info) >= 0
        _check_aligned(iv, site, node, src, spec, sspec)
        src_site = self._source_site(iv, site)
        key = _read_key(src_site, sspec, iv.heads, iv.dims)
        src.reads[key] = Read(key, src_site, sspec, iv.heads, iv.dims)
        src.readers.append((node, edit, key))
        return edit

    def _source_site(self, iv: Intervention, site: ResolvedSite) -> ResolvedSite:
        if not iv.source_site:
            return site
        facts = self.facts
        src_site = facts.resolve(iv.source_site)
        src_width = len(iv.dims) if iv.dims else facts.site_shape(src_site)[-1]
        if src_width != iv.width or facts.site_shape(src_site)[:-1] != facts.site_shape(site)[:-1]:
            raise ShapeMismatch(
                f"source_site {src_site.name!r} has shape {facts.site_shape(src_site)} but {site.name!r} "
                f"has {facts.site_shape(site)}; an interchange needs equal shapes"
            )
        return src_site

    # -- what a forward needs ------------------------------------------------------
    def needs_grad(self, node: PlanNode) -> bool:
        """Whether a gradient must flow through ``node``'s forward (a source run feeding a trainable edit, ...)."""
        if not torch.is_grad_enabled():
            return False
        if any(e.iv.trainable for e in node.edits):
            return True
        if any(isinstance(v, Tensor) and v.requires_grad for v in list(node.inputs.kwargs.values()) + list(node.inputs.args)):
            return True
        upstream = (self.source_of.get(e) for e in node.edits)
        if any(self.needs_grad(s) for s in upstream if isinstance(s, PlanNode)):
            return True
        if self._trainable_base is None:
            self._trainable_base = self.facts.trainable_base()  # a scan of the base's flags: last, once
        return self._trainable_base

    def refuse_checkpointed_backward(self) -> None:
        refuse_checkpointed_backward(self.facts, [e for n in self.nodes for e in n.edits])


def refuse_checkpointed_backward(facts: ModelFacts, edits: list[Edit]) -> None:
    """Per-call hooks are removed when the call returns, but gradient checkpointing replays its
    layers during backward, later: the replay would miss the interventions (torch then raises
    CheckpointError, or with reentrant checkpointing the gradient silently skips them)."""
    model = facts.model
    if not (torch.is_grad_enabled() and model.training):
        return
    if not any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
        return
    if any(e.iv.trainable for e in edits) or facts.trainable_base():
        raise LifetimeError(
            "gradient checkpointing is on and this call needs gradients: backward replays the checkpointed "
            "layers after a per-call run has removed its interventions. Attach them for the whole step instead: "
            "`with lab.attach(interventions): loss = ...; loss.backward()`"
        )


def _check_aligned(iv: Intervention, site: ResolvedSite, node: PlanNode, src: PlanNode, spec: Positions, sspec: Positions) -> None:
    """A source run's batch and positions line up with the base's, one to one."""
    what = f"{type(iv).__name__} at {site.name!r}"
    if src.info.batch not in (1, node.info.batch):
        raise BatchMismatch(
            f"the source of {what} has batch {src.info.batch} but the base has "
            f"{node.info.batch}; expected equal batches (or a source batch of 1, broadcast)"
        )
    k_base, k_src = spec.count, sspec.count
    if (k_base is None) != (k_src is None):
        raise ShapeMismatch(
            f"{what}: one side selects all positions and the other {k_base or k_src}; give both positions= and source_positions= (or neither)"
        )
    if k_base is None and src.info.seq != node.info.seq:
        raise ShapeMismatch(
            f"{what} swaps all positions, but base length {node.info.seq} and source length {src.info.seq} differ; "
            "give positions= (and source_positions=)"
        )
    if k_base != k_src:
        raise ShapeMismatch(f"{what} selects {k_base} base positions but {k_src} source positions; they are aligned one to one")


def check_source_value(facts: ModelFacts, iv: Intervention, site: ResolvedSite, value: Tensor, *, batch: int | None, k: int | None) -> None:
    """The one source-shape check: a source slice must be ``[batch or 1, k, *slice]`` (``[batch or 1, *slice]``
    at a site without positions). ``batch`` / ``k`` ``None``: checked per forward (attached) / any length."""
    feat = facts.slice_shape(iv, site)
    what = f"the SourceValue for {type(iv).__name__} at {site.name!r}"
    if batch is not None and value.shape[0] not in (1, batch):
        raise BatchMismatch(f"{what} has batch {value.shape[0]}; expected {batch} or 1")
    if facts.has_positions(site):
        ok = value.dim() == len(feat) + 2 and tuple(value.shape[2:]) == feat and k in (None, value.shape[1])
        want = f"[batch, {k if k is not None else 'pos'}, {', '.join(map(str, feat))}]"
    else:
        ok = tuple(value.shape[1:]) in (feat, (1, *feat))
        want = f"[batch, {', '.join(map(str, feat))}]"
    if not ok:
        raise ShapeMismatch(f"{what} has shape {tuple(value.shape)}; expected {want}")


def check_prefix(prefix: Prefix, nodes: list[PlanNode]) -> None:
    """A prefix must hold the batch and positions of every run that resumes from it."""
    for n in nodes:
        if prefix.hidden.shape[0] != n.info.batch or prefix.hidden.shape[1] != n.info.seq:
            raise ShapeMismatch(
                f"the prefix holds {tuple(prefix.hidden.shape[:2])} (batch, seq) but {n.name} has ({n.info.batch}, {n.info.seq})"
            )
        mask = n.inputs.mask
        if prefix.past is not None and (mask is None or mask.shape[-1] != prefix.start + n.info.seq):
            raise ShapeMismatch(
                f"the prefix caches the first {prefix.start} positions, so {n.name} takes the remaining "
                f"{n.info.seq} tokens with an attention mask over all {prefix.start + n.info.seq}; "
                f"got a mask over {None if mask is None else mask.shape[-1]}"
            )


# -- execution ------------------------------------------------------------------------


def _per_example(plan: Plan, read: Read) -> bool:
    spec = plan.source_positions or read.sel.positions
    return spec is not None and spec.kind == "tensor"


class _Execution:
    """One call's running state: values read so far, results, and the nodes done."""

    def __init__(self, plan: Plan, forward: ForwardFn, model_kwargs: dict):
        self.plan, self.forward = plan, forward
        self.model_kwargs = model_kwargs
        self.values: dict[Edit, Tensor] = {}
        self.results: dict[int, RunResult] = {}
        self.done: set[int] = set()

    def bindings(self, edits: list[Edit], stop_after: int) -> Bindings:
        """A forward's bindings: its sourced edits' values, the plan's overrides, a read counter."""
        plan = self.plan
        b = Bindings(positions=plan.positions, source_positions=plan.source_positions, edit_positions=plan.edit_positions)
        for e in edits:
            src = plan.source_of.get(e)
            if isinstance(src, SourceValue):
                b.sources[e] = src.value.to(plan.facts.device)
            elif src is not None:
                b.sources[e] = self.values[e]
            if e in plan.valid:
                b.valid[e] = plan.valid[e]
        return b.stop_after(stop_after)

    def deliver(self, node: PlanNode, store: dict, rows: slice | None = None) -> None:
        for _reader, edit, key in node.readers:
            v = store[key]
            self.values[edit] = v if rows is None else v[rows]

    def run_sources(self) -> None:
        """Plain sources of one shape share a forward, unless a read takes per-example positions
        (a ``[batch, k]`` tensor, which would be resolved against the concatenated batch)."""
        plan = self.plan
        groups: dict[tuple, list[PlanNode]] = defaultdict(list)
        for node in plan.nodes:
            if not node.edits and not node.output and node.reads and not any(_per_example(plan, r) for r in node.reads.values()):
                groups[node.inputs.signature()].append(node)
        for members in groups.values():
            if len(members) == 1:
                continue
            reads = {k: v for m in members for k, v in m.reads.items()}
            grad = any(plan.needs_grad(m) for m in members)
            b = self.bindings([], len(reads))
            step = Forward(Inputs.cat([m.inputs for m in members]), [], reads, b, True, grad, None, plan.facts.no_cache)
            self.forward(plan, step)
            offset = 0
            for m in members:
                self.deliver(m, b.store, slice(offset, offset + m.info.batch))
                offset += m.info.batch
                self.done.add(m.index)

    def run_node(self, node: PlanNode, prefix: Prefix | None) -> None:
        plan = self.plan
        stop = not node.output
        reads = len(node.reads) + sum(e.collect for e in node.edits)
        b = self.bindings(node.edits, reads if stop else 0)
        grad = torch.is_grad_enabled() if node.output else plan.needs_grad(node)
        kwargs = self.model_kwargs if node.output else plan.facts.no_cache
        step = Forward(node.inputs, node.edits, node.reads, b, stop, grad, prefix if node.output else None, kwargs, node)
        out = self.forward(plan, step)
        self.deliver(node, b.store)
        if node.output and node.run is not None:
            self.results[node.run.index] = RunResult(out, ActivationCache(b.cache))
        self.done.add(node.index)


def run_plan(plan: Plan, forward: ForwardFn, *, prefix: Prefix | None = None, model_kwargs: dict | None = None) -> GraphResult:
    """Execute a validated plan, one forward at a time through ``forward`` (see the module docstring)."""
    plan.refuse_checkpointed_backward()
    if prefix is not None:
        check_prefix(prefix, [n for n in plan.nodes if n.output])
    ex = _Execution(plan, forward, dict(model_kwargs or {}))
    ex.run_sources()
    for node in plan.order:
        if node.index in ex.done or (not node.output and not node.reads):
            continue  # batched above, or nobody reads it and nobody wants it
        ex.run_node(node, prefix)
    return GraphResult(ex.results)

