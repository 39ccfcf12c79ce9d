"""The hook engine's executor: validate a run graph, then run it with as few forwards as it needs.

Execution plan for a :class:`~steerlab.interventions.graph.Graph`:

1. Validate everything before any compute: sites, widths, heads and dims,
   positions against each input's real lengths, source counts and batch sizes.
2. Runs with no interventions that only supply values (plain sources) and
   have inputs of one shape are concatenated into a single forward.
3. A run that only supplies values stops right after the last site anyone
   reads from it (``EarlyExit``), and runs under ``no_grad`` unless a
   gradient must flow through it.
4. The remaining runs execute in topological order; each reads its sources'
   values from the slices collected above.

Hooks live only inside each forward (``try/finally``), so after a call, even
one that raised, the model's hook registries are as they were.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from steerlab.interventions.errors import BatchMismatch, LifetimeError, ShapeMismatch, SourceError, UnitError
from steerlab.interventions.graph import Graph, GraphResult, Run, RunResult, SourceValue
from steerlab.interventions.hooks import EarlyExit, Edit, HookSet, Read
from steerlab.interventions.inputs import Inputs
from steerlab.interventions.activation_cache import ActivationCache
from steerlab.interventions.ops import Collect, Intervention
from steerlab.interventions.prefix import Prefix, resume_from
from steerlab.interventions.sites import ResolvedSite
from steerlab.interventions.units import MaskInfo, Positions

if TYPE_CHECKING:
    from steerlab.interventions.lab import Lab

__all__ = ["execute"]


@dataclass(eq=False)
class _Node:
    index: int
    run: Run | None
    inputs: Inputs
    info: MaskInfo
    edits: list[tuple[Intervention, ResolvedSite]] = field(default_factory=list)
    reads: dict[tuple, tuple[ResolvedSite, Positions, Any, Any]] = field(default_factory=dict)
    readers: list[tuple[_Node, Intervention, tuple]] = field(default_factory=list)
    output: bool = True

    @property
    def name(self) -> str:
        return self.run.name if self.run is not None else f"source of run {self.index}"


def _read_key(site: ResolvedSite, positions: Positions, heads, dims) -> tuple:
    return (site.name, hash(positions), positions.kind, heads, dims)


class _Plan:
    def __init__(self, lab: Lab, graph: Graph, positions, source_positions, validate: bool):
        self.lab = lab
        self.positions = None if positions is None else Positions(positions)
        sp = source_positions if source_positions is not None else positions
        self.source_positions = None if sp is None else Positions(sp)
        self.validate = validate
        self.nodes: list[_Node] = []
        self.by_run: dict[int, _Node] = {}
        self.implicit: dict[int, _Node] = {}
        self.source_of: dict[int, _Node | SourceValue] = {}
        self.source_valid: dict[int, Tensor] = {}  # id(iv) -> which source slots hold a token
        graph.validate_sources()
        order = graph.order()
        for run in order:
            node = self._node(run.inputs, run)
            node.output = run.output if run.output is not None else True
            self.by_run[run.index] = node
        for run in order:
            node = self.by_run[run.index]
            for iv in run.interventions:
                node.edits.append((iv, self._check_edit(node, iv)))
        for node in self.nodes:
            if node.run is not None and node.run.output is None and node.readers:
                node.output = False
        # implicit sources have no interventions and no dependencies: they go first
        self.order = list(self.implicit.values()) + [self.by_run[r.index] for r in order]

    # -- nodes ------------------------------------------------------------
    def _node(self, inputs, run: Run | None) -> _Node:
        lab = self.lab
        inp = Inputs.of(inputs, tokenizer=lab.tokenizer, device=lab.device, is_lm=lab.is_lm)
        info = inp.mask_info()
        if self.validate and info.lengths_cpu is None:
            info = MaskInfo(info.starts, info.lengths, info.seq, 0, tuple(int(x) for x in info.lengths.tolist()))
        node = _Node(len(self.nodes), run, inp, info)
        self.nodes.append(node)
        return node

    def _source_node(self, iv: Intervention) -> _Node | SourceValue:
        src = iv.source
        if isinstance(src, SourceValue):
            return src
        if isinstance(src, Run):
            return self.by_run[src.index]
        key = id(src)
        if key not in self.implicit:
            node = self._node(src, None)
            node.output = False
            self.implicit[key] = node
        return self.implicit[key]

    # -- validation ---------------------------------------------------------
    def _check_edit(self, node: _Node, iv: Intervention) -> ResolvedSite:
        site = self.lab.prepare(iv)
        width = iv.width
        spec = self.positions or iv.positions
        if self.positions is not None and spec.kind != "all" and not self.lab.has_positions(site):
            raise UnitError(f"{site.name!r} has no position axis (its value is [batch, width]); positions must be None")
        spec.validate(node.info, "positions")
        if not iv.sourced:
            return site
        src = self._source_node(iv)
        self.source_of[id(iv)] = src
        k_base = spec.count
        feat = self.lab.site_shape(site)
        if iv.heads is not None:
            feat = (len(iv.heads), *feat[1:])
        if iv.dims is not None:
            feat = (*feat[:-1], len(iv.dims))
        if isinstance(src, SourceValue):
            v = src.value
            if v.shape[0] not in (1, node.info.batch):
                raise BatchMismatch(f"the SourceValue for {site.name!r} has batch {v.shape[0]}; expected {node.info.batch} or 1")
            k = k_base if k_base is not None else node.info.seq
            want = (k, *feat) if self.lab.has_positions(site) else feat
            if src.valid is not None:
                self.source_valid[id(iv)] = src.valid
            if tuple(v.shape[1:]) != want:
                raise ShapeMismatch(
                    f"the SourceValue for {site.name!r} has shape {tuple(v.shape)}; expected [batch, {', '.join(map(str, want))}]"
                )
            return site
        sspec = self.source_positions or iv.effective_source_positions()
        sspec.validate(src.info, "source_positions")
        if sspec.may_be_empty:
            self.source_valid[id(iv)] = sspec.resolve(src.info) >= 0
        if src.info.batch not in (1, node.info.batch):
            raise BatchMismatch(
                f"the source of {type(iv).__name__} at {site.name!r} has batch {src.info.batch} but the base has "
                f"{node.info.batch}; expected equal batches (or a source batch of 1, broadcast)"
            )
        k_src = sspec.count
        if (k_base is None) != (k_src is None):
            raise ShapeMismatch(
                f"{type(iv).__name__} at {site.name!r}: one side selects all positions and the other {k_base or k_src}; "
                "give both positions= and source_positions= (or neither)"
            )
        if k_base is None and src.info.seq != node.info.seq:
            raise ShapeMismatch(
                f"{type(iv).__name__} at {site.name!r} swaps all positions, but base length {node.info.seq} and source "
                f"length {src.info.seq} differ; give positions= (and source_positions=)"
            )
        if k_base != k_src:
            raise ShapeMismatch(
                f"{type(iv).__name__} at {site.name!r} selects {k_base} base positions but {k_src} source positions; "
                "they are aligned one to one"
            )
        src_site = self.lab.resolve(iv.source_site) if iv.source_site else site
        if iv.source_site:
            src_width = len(iv.dims) if iv.dims else self.lab.site_shape(src_site)[-1]
            if src_width != width or self.lab.site_shape(src_site)[:-1] != self.lab.site_shape(site)[:-1]:
                raise ShapeMismatch(
                    f"source_site {src_site.name!r} has shape {self.lab.site_shape(src_site)} but {site.name!r} "
                    f"has {self.lab.site_shape(site)}; an interchange needs equal shapes"
                )
        key = _read_key(src_site, sspec, iv.heads, iv.dims)
        src.reads[key] = (src_site, sspec, iv.heads, iv.dims)
        src.readers.append((node, iv, key))
        return site



def _needs_grad(plan: _Plan, node: _Node) -> bool:
    if not torch.is_grad_enabled():
        return False
    if any(iv.trainable for iv, _ in node.edits):
        return True
    if plan.lab.has_trainable_base():
        return True
    if any(isinstance(v, Tensor) and v.requires_grad for v in list(node.inputs.kwargs.values()) + list(node.inputs.args)):
        return True
    upstream = (plan.source_of.get(id(iv)) for iv, _ in node.edits)
    return any(_needs_grad(plan, s) for s in upstream if isinstance(s, _Node))


def _handlers(
    plan: _Plan,
    edits: list[tuple[Intervention, ResolvedSite]],
    reads: dict[tuple, tuple],
    *,
    values: dict,
    cache: dict,
    store: dict,
    on_read,
    decode: bool = False,
) -> list[Edit | Read]:
    """The edits and reads of one forward, whatever engine runs them: sourced edits
    take their values from ``values``, collects fill ``cache``, reads fill ``store``."""
    lab = plan.lab
    handlers: list[Edit | Read] = []
    for iv, site in edits:
        src = plan.source_of.get(id(iv))
        getter = None
        if isinstance(src, SourceValue):
            value = src.value.to(lab.device)
            getter = lambda v=value: v  # noqa: E731
        elif src is not None:
            getter = lambda k=id(iv): values[k]  # noqa: E731
        h = Edit(iv, site, source=getter, decode=decode, source_valid=plan.source_valid.get(id(iv)))
        if h.collect:
            h.store = cache
            h.on_read = on_read
        handlers.append(h)
    for key, (site, spec, heads, dims) in reads.items():
        handlers.append(Read(key, site, spec, heads, dims, store, on_read))
    return handlers


def _forward(
    plan: _Plan,
    inputs: Inputs,
    edits: list[tuple[Intervention, ResolvedSite]],
    reads: dict[tuple, tuple],
    *,
    values: dict,
    cache: dict,
    stop_early: bool,
    grad: bool,
    prefix: Prefix | None,
    model_kwargs: dict,
    decode: bool = False,
):
    lab = plan.lab
    store: dict = {}
    pending = [len(reads) + sum(isinstance(iv, Collect) for iv, _ in edits)]

    def on_read() -> None:
        pending[0] -= 1
        if pending[0] == 0 and stop_early:
            raise EarlyExit

    handlers = _handlers(plan, edits, reads, values=values, cache=cache, store=store, on_read=on_read, decode=decode)
    continuing = prefix is not None and prefix.past is not None
    hs = HookSet(lab.model, handlers, positions=plan.positions, source_positions=plan.source_positions, per_call=True, continuation=continuing)
    if continuing:
        model_kwargs = {**model_kwargs, **prefix.past_kwargs(lab.model)}
    out = None
    with torch.set_grad_enabled(grad):
        try:
            hs.install()
            with resume_from(lab.layers, prefix, root=lab.model) if prefix is not None else nullcontext():
                out = lab.model(*inputs.args, **inputs.kwargs, **model_kwargs)
        except EarlyExit:
            pass
        finally:
            hs.remove()
    return out, store


def execute(
    lab: Lab,
    graph: Graph,
    *,
    positions=None,
    source_positions=None,
    prefix: Prefix | None = None,
    validate: bool = True,
    model_kwargs: dict | None = None,
) -> GraphResult:
    """Run ``graph`` on ``lab``'s model; see the module docstring for the plan."""
    plan = _Plan(lab, graph, positions, source_positions, validate)
    return _run_plan(plan, prefix=prefix, model_kwargs=model_kwargs)


def _refuse_checkpointed_backward(plan: _Plan) -> None:
    """Per-call hooks are removed when the call returns, but gradient checkpointing replays its
    layers during backward, later: the replay would miss the interventions (torch then raises
    CheckpointError, or with reentrant checkpointing the gradient silently skips them)."""
    lab = plan.lab
    if not (torch.is_grad_enabled() and lab.model.training):
        return
    if not (lab.has_trainable_base() or any(iv.trainable for n in plan.nodes for iv, _ in n.edits)):
        return
    if any(getattr(m, "gradient_checkpointing", False) is True for m in lab.model.modules()):
        raise LifetimeError(
            "gradient checkpointing is on and this call needs gradients: backward replays the checkpointed "
            "layers after a per-call run has removed its interventions. Attach them for the whole step instead: "
            "`with lab.attach(interventions): loss = ...; loss.backward()`"
        )


def _run_plan(plan: _Plan, *, prefix: Prefix | None, model_kwargs: dict | None, forward=None) -> GraphResult:
    """Execute a validated plan; ``forward`` runs one forward (default: the hook engine's :func:`_forward`)."""
    lab = plan.lab
    _refuse_checkpointed_backward(plan)
    forward = forward or _forward
    model_kwargs = dict(model_kwargs or {})
    if prefix is not None:
        outs = [n for n in plan.nodes if n.output]
        for n in outs:
            if prefix.hidden.shape[0] != n.info.batch or prefix.hidden.shape[1] != n.info.seq:
                raise ShapeMismatch(
                    f"the prefix holds {tuple(prefix.hidden.shape[:2])} (batch, seq) but {n.name} has "
                    f"({n.info.batch}, {n.info.seq})"
                )
            mask = n.inputs.mask
            if prefix.past is not None and (mask is None or mask.shape[-1] != prefix.start + n.info.seq):
                raise ShapeMismatch(
                    f"the prefix caches the first {prefix.start} positions, so {n.name} takes the remaining "
                    f"{n.info.seq} tokens with an attention mask over all {prefix.start + n.info.seq}; "
                    f"got a mask over {None if mask is None else mask.shape[-1]}"
                )
    values: dict[int, Tensor] = {}
    results: dict[int, RunResult] = {}
    done: set[int] = set()

    def deliver(node: _Node, store: dict, rows: slice | None = None) -> None:
        for reader, iv, key in node.readers:
            v = store[key]
            values[id(iv)] = v if rows is None else v[rows]

    # plain sources of one shape share a forward, unless a read takes per-example positions
    # (a [batch, k] tensor, which would be resolved against the concatenated batch)
    groups: dict[tuple, list[_Node]] = defaultdict(list)
    for node in plan.nodes:
        if not node.edits and not node.output and node.reads and all(r[1].kind != "tensor" for r in node.reads.values()):
            groups[node.inputs.signature()].append(node)
    src_kwargs = lab.no_cache
    for members in groups.values():
        if len(members) == 1:
            continue
        inputs = Inputs.cat([m.inputs for m in members])
        reads = {k: v for m in members for k, v in m.reads.items()}
        grad = any(_needs_grad(plan, m) for m in members)
        _, store = forward(plan, inputs, [], reads, values=values, cache={}, stop_early=True, grad=grad, prefix=None, model_kwargs=src_kwargs)
        offset = 0
        for m in members:
            deliver(m, store, slice(offset, offset + m.info.batch))
            offset += m.info.batch
            done.add(m.index)

    for node in plan.order:
        if node.index in done:
            continue
        if not node.output and not node.reads:
            continue  # nobody reads it and nobody wants it
        cache: dict = {}
        grad = torch.is_grad_enabled() if node.output else _needs_grad(plan, node)
        out, store = forward(
            plan,
            node.inputs,
            node.edits,
            node.reads,
            values=values,
            cache=cache,
            stop_early=not node.output,
            grad=grad,
            prefix=prefix if node.output else None,
            model_kwargs=model_kwargs if node.output else src_kwargs,
        )
        deliver(node, store)
        if node.output and node.run is not None:
            results[node.run.index] = RunResult(out, ActivationCache(cache))
        done.add(node.index)
    return GraphResult(results)


def collect_only(lab: Lab, graph: Graph, run: Run) -> ActivationCache:
    """Run ``run`` (whose interventions are all :class:`Collect`) until its last collected site."""
    plan = _Plan(lab, graph, None, None, True)
    node = plan.by_run[run.index]
    cache: dict = {}
    grad = torch.is_grad_enabled() and any(not iv.detach for iv, _ in node.edits)  # type: ignore[attr-defined]
    src_kwargs = lab.no_cache
    _forward(plan, node.inputs, node.edits, {}, values={}, cache=cache, stop_early=True, grad=grad, prefix=None, model_kwargs=src_kwargs)
    return ActivationCache(cache)


_ = (SourceError, UnitError)
