"""The nnsight engine: the same run graph, executed as nnsight traces.

For researchers who already work in nnsight, and for models too large for
one machine: with ``remote=True`` the graph runs on NDIF, the model never
leaving the server. The plan is the hook engine's (validation before compute,
plain sources of one shape batched into one forward, source runs stopped
right after their last read, ``no_grad`` where no gradient is needed); only
the mechanism differs. Each forward of the plan becomes one trace::

    with envoy.trace(**inputs) as tracer:
        box = program.box
        nnsight.save(box)
        program.run(tracer)

where ``program`` visits the sites the run touches in the order the model
reaches them (nnsight serves a module's values in forward order only), at
each one reads ``.inputs`` / ``.output``, applies the same handlers the hook
engine installs as hooks, writes the result back, and ``tracer.stop()``\\ s a
source run after its last read. Results therefore agree with the hook
engine's to rounding (tested on several architectures and real models).

Use::

    lab.execute(graph, engine="nnsight")                       # a private NNsight wrapper per call
    lab.execute(graph, engine=NNsightEngine(lm))               # your nnsight model (lm wraps lab.model)
    lab.execute(graph, engine=NNsightEngine(lm, remote=True))  # on NDIF

nnsight is imported only here, when the engine first runs (its import patches
``sys.excepthook`` and ``torch.Tensor.backward``). A private wrapper is
removed after the call: the model's modules are left exactly as found. A
model you wrapped yourself stays yours, as you left it.

Not supported here (a named error before any compute): ``prefix=`` (the
hook engine's prefix reuse replaces block forwards, which nnsight owns), and
a site whose module runs more than once per forward. For ``remote=True`` the
lab still learns site shapes and the forward order from one small local
forward, so it must wrap a model that runs locally (same architecture; the
weights may be random): a weightless (``meta``) model cannot be probed yet.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
import weakref
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from steerlab.interventions.call import Bindings, ForwardContext, running
from steerlab.interventions.errors import ConfigError
from steerlab.interventions.facts import ModelFacts, execution_device
from steerlab.interventions.graph import GraphResult
from steerlab.interventions.handlers import Edit, group_handlers, mask_info_of_call, run_on_inputs, run_on_output
from steerlab.interventions.orthonormal import Orthonormal, materialise, use_table
from steerlab.interventions.plan import Forward, Plan, run_plan
from steerlab.interventions.prefix import Prefix

__all__ = ["NNsightEngine"]

_ROOT = "model"  # nnsight's path of the root envoy


class NNsightEngine:
    """Executes run graphs as nnsight traces. Pass it as ``lab.execute(graph, engine=...)``.

    Args:
        model: an nnsight model (``NNsight``, ``LanguageModel``, ...) wrapping
            ``lab.model``; default: a private ``NNsight`` wrapper made for each
            call and removed after it.
        remote: run on NDIF (``True``, or a host URL); needs ``model``, a
            remotable nnsight model naming the checkpoint. ``"local"`` is
            nnsight's serverless rehearsal of the remote path.
    """

    def __init__(self, model: Any = None, *, remote: bool | str = False):
        self.model = model
        self.remote = remote

    def __repr__(self) -> str:
        return f"NNsightEngine(model={type(self.model).__name__ if self.model is not None else None}, remote={self.remote!r})"

    def execute(self, plan: Plan, *, prefix: Prefix | None = None, model_kwargs: dict | None = None) -> GraphResult:
        """Run ``plan`` through nnsight (see the module docstring)."""
        facts = plan.facts
        if prefix is not None:
            raise ConfigError("prefix= is not supported by the nnsight engine (it replaces block forwards, which nnsight owns); use the hook engine")
        model = self.model if self.model is not None else facts.nnsight_model
        if model is not None and getattr(model, "_module", None) is not facts.model:
            raise ConfigError(
                f"NNsightEngine(model=...) wraps {type(getattr(model, '_module', model)).__name__}, "
                "not this lab's model; wrap the nnsight model itself: lab = wrap(lm)"
            )
        if self.remote and model is None:
            raise ConfigError(
                "remote execution needs the nnsight model that names the remote checkpoint: "
                "lm = LanguageModel('org/model'); lab = wrap(lm); lab.execute(graph, engine=NNsightEngine(remote=True))"
            )
        with running(facts.model, "nnsight-engine", exclusive=True), _Session(facts, model, self.remote) as session:
            session.check([site for node in plan.nodes for site in _sites(node)])
            return run_plan(plan, session.forward, model_kwargs=model_kwargs)


def _sites(node) -> list:
    return [e.site for e in node.edits] + [r.site for r in node.reads.values()]


# -- the order in which a model reaches its modules -------------------------------

_ORDER: weakref.WeakKeyDictionary[nn.Module, tuple[dict, dict]] = weakref.WeakKeyDictionary()


def _event_order(facts: ModelFacts, refresh: bool = False) -> tuple[dict, dict]:
    """``(index, calls)``: for each ``(id(module), side)`` the rank of its first
    event in a forward, and how many times it happens; from one probe forward."""
    hit = _ORDER.get(facts.model)
    if hit is not None and not refresh:
        return hit
    index: dict[tuple[int, str], int] = {}
    calls: dict[tuple[int, str], int] = {}

    def note(key):
        index.setdefault(key, len(index))
        calls[key] = calls.get(key, 0) + 1

    handles = []
    try:
        for m in facts.model.modules():
            handles.append(m.register_forward_pre_hook(lambda mod, a, k=(id(m), "input"): note(k)))
            handles.append(m.register_forward_hook(lambda mod, a, o, k=(id(m), "output"): note(k)))
        inp = facts.probe_inputs()
        with torch.no_grad():
            facts.model(*inp.args, **inp.kwargs, **facts.no_cache)
    finally:
        for h in handles:
            h.remove()
    _ORDER[facts.model] = (index, calls)
    return index, calls


# -- one call's nnsight wrapper ------------------------------------------------------


_ENVOYS: weakref.WeakKeyDictionary[nn.Module, tuple[Any, dict]] = weakref.WeakKeyDictionary()


def _private_envoy(model: nn.Module, nnsight) -> tuple[Any, dict]:
    """A private ``NNsight`` tree of ``model`` (kept per model) with no module instrumented:
    each call instruments only the modules it visits, and removes that afterwards."""
    hit = _ENVOYS.get(model)
    if hit is not None and all(id(m) in hit[1] for m in model.modules()):
        return hit
    with _restored(list(model.modules())), warnings.catch_warnings():
        # BERT's `output` submodules: nnsight renames them on its envoys; we address modules, not names
        warnings.filterwarnings("ignore", message=".*which nnsight already serves.*")
        envoy = _envoy_class(nnsight)(model)
    hit = _ENVOYS[model] = (envoy, {id(e._module): e for e in envoy.modules()})
    return hit


@functools.cache
def _envoy_class(nnsight) -> type:
    class _Envoy(nnsight.NNsight):
        """``NNsight`` whose inputs go where the model computes: nnsight moves them to the
        first parameter's device, which accelerate's offloading leaves on ``meta``."""

        @property
        def device(self) -> torch.device:
            return execution_device(self._module)

    return _Envoy


@contextmanager
def _restored(modules: list[nn.Module]):
    """On exit, each module's instance ``forward`` and nnsight state are as on entry."""
    from nnsight.intervention.source import STATE

    keys = ("forward", STATE)
    saved = [(m, {k: m.__dict__[k] for k in keys if k in m.__dict__}) for m in modules]
    try:
        yield
    finally:
        for m, had in saved:
            for k in keys:
                if k in had:
                    m.__dict__[k] = had[k]
                else:
                    m.__dict__.pop(k, None)


class _Session:
    """The nnsight wrapper for one ``execute`` call; the model is restored after it."""

    def __init__(self, facts: ModelFacts, model, remote):
        self.facts, self.remote, self.envoy = facts, remote, model
        self._stack = ExitStack()
        self._installed: set[int] = set()

    def __enter__(self) -> _Session:
        import nnsight

        self._nnsight = nnsight
        if self.envoy is None:
            self.envoy, self.by_module = _private_envoy(self.facts.model, nnsight)
            self.private = True
        else:
            self.by_module = {id(e._module): e for e in self.envoy.modules()}
            self.private = False
        if self.remote:
            nnsight.register("steerlab")  # the handlers travel by value; the server has no steerlab
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _instrument(self, modules: list[nn.Module]) -> None:
        """Hand these modules' values to nnsight for this call (a private tree only)."""
        from nnsight.intervention.source import install_controller

        todo = [m for m in modules if id(m) not in self._installed]
        if not self.private or not todo:
            return
        self._stack.enter_context(_restored(todo))
        for m in todo:
            install_controller(self.by_module[id(m)])
            self._installed.add(id(m))

    def check(self, sites) -> None:
        """Every site's module must run exactly once per forward (nnsight serves its first call)."""
        index, calls = _event_order(self.facts)
        if any((id(s.module), s.port.io) not in index for s in sites):
            index, calls = _event_order(self.facts, refresh=True)  # the model changed since we looked
        for s in sites:
            n = calls.get((id(s.module), s.port.io), 0)
            if n != 1:
                what = "did not run in a probe forward" if n == 0 else f"runs {n} times per forward"
                raise ConfigError(f"site {s.name!r}: its module {s.module_path!r} {what}; the nnsight engine needs one call per forward (use the hook engine)")
        self.index = index

    # -- one forward ---------------------------------------------------------------
    def forward(self, plan: Plan, step: Forward) -> Any:
        """One forward of the plan as one trace (the :data:`~steerlab.interventions.plan.ForwardFn` contract)."""
        b = step.bindings
        b.on_read = None  # the compiled program stops after its last read itself
        handlers = [*step.edits, *step.reads.values()]
        selections = [h.sel for h in handlers]
        kwargs = {**step.inputs.kwargs, **step.model_kwargs}
        if self.remote:
            kwargs["remote"] = self.remote
        try:
            program = self._compile(handlers, step.stop_early, b)
            with torch.set_grad_enabled(step.grad):
                box = _trace(self.envoy, self._nnsight, step.inputs.args, kwargs, program)
        finally:
            for h, sel in zip(handlers, selections):
                h.sel = sel  # the plan's handlers keep their modules
        if box["cache"] is not b.cache:  # a remote run returns copies
            b.cache.update(box["cache"])
            b.store.update(box["store"])
        return box.get("output")

    def _compile(self, handlers: list, stop_early: bool, bindings: Bindings) -> _Program:
        groups = group_handlers(handlers)
        for _, hs in groups.values():
            for h in hs:  # the program carries no module (a remote request names modules through envoys)
                h.sel = dataclasses.replace(h.sel, site=dataclasses.replace(h.sel.site, module=None))
        model = self.facts.model
        root_in, root_out = (id(model), "input"), (id(model), "output")
        steps: list[_Step] = []
        first: list = []
        modules = [model]
        for site, hs in groups.values():
            key = (id(site.module), site.port.io)
            modules.append(site.module)
            if key == root_in:
                first = hs
                continue
            steps.append(_Step(self.index[key], self.by_module[id(site.module)], site.port.io, hs, site.port.inplace))
        self._instrument(modules)
        steps.sort(key=lambda s: s.rank)
        reads = [i for i, s in enumerate(steps) if any(not isinstance(h, Edit) or h.collect for h in s.handlers)]
        if stop_early:
            steps = steps[: reads[-1] + 1] if reads else []
        elif not steps or steps[-1].envoy is not self.envoy or steps[-1].side != "output":
            steps.append(_Step(self.index.get(root_out, len(self.index)), self.envoy, "output", [], False))
        if not stop_early:
            steps[-1].keep = True
        maps = list(dict.fromkeys(m for hs in (first, *(s.handlers for s in steps)) for h in hs if isinstance(h, Edit) for m in h.iv.modules() if isinstance(m, Orthonormal)))
        return _Program(self.envoy, first, steps, maps, stop_early, bindings, {"store": bindings.store, "cache": bindings.cache})


class _plain_calls:
    """While handlers run, a forward they start themselves (an intervention calling the
    model) runs plainly, as under the hook engine, instead of feeding this trace.

    A class, not a ``@contextmanager``: this code travels to NDIF by value, and a
    decorated generator function does not survive that (it arrives as the bare generator)."""

    def __init__(self, envoy):
        self.interleaver = envoy.interleaver

    def __enter__(self) -> None:
        self.was = self.interleaver.interleaving
        self.interleaver.interleaving = False

    def __exit__(self, *exc) -> None:
        self.interleaver.interleaving = self.was


@dataclasses.dataclass(eq=False)
class _Step:
    """One (module, side) the run touches, with its handlers (edits first, then reads)."""

    rank: int
    envoy: Any
    side: str
    handlers: list
    inplace: bool
    keep: bool = False  # the model's output: keep it

    def run(self, ctx: ForwardContext, box: dict) -> None:
        if self.side == "input":
            args, kwargs = self.envoy.inputs
            with _plain_calls(self.envoy):
                new = run_on_inputs(self.handlers, args, kwargs, ctx, self.inplace)
            if new is not None:
                self.envoy.inputs = new
            return
        out = self.envoy.output
        with _plain_calls(self.envoy):
            new = run_on_output(self.handlers, out, ctx) if self.handlers else None
        if new is not None:
            self.envoy.output = new
            out = new
        if self.keep:
            box["output"] = out


@dataclasses.dataclass(eq=False)
class _Program:
    """One forward of the plan, compiled for one trace."""

    root: Any
    first: list  # handlers at the root's own input
    steps: list[_Step]
    maps: list
    stop: bool
    bindings: Bindings
    box: dict  # what comes back: {"store": reads, "cache": collects, "output": the model's output} (plain data)

    def run(self, tracer) -> None:
        args, kwargs = self.root.inputs
        ctx = ForwardContext(mask_info_of_call(args, kwargs), self.bindings, self.bindings.positions, materialise(self.maps) if self.maps else None)
        previous = use_table(ctx.table)
        try:
            if self.first:
                with _plain_calls(self.root):
                    new = run_on_inputs(self.first, args, kwargs, ctx, False)
                if new is not None:
                    self.root.inputs = new
            for step in self.steps:
                step.run(ctx, self.box)
        finally:
            use_table(previous)
        if self.stop:
            tracer.stop()


def _trace(envoy, nnsight, args: tuple, kwargs: dict, program: _Program) -> dict:
    # nnsight re-reads this block's source and runs it interleaved with the forward
    with envoy.trace(*args, **kwargs) as tracer:
        box = program.box
        nnsight.save(box)
        program.run(tracer)
    return box

