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
from contextlib import ExitStack, contextmanager
import weakref
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Int
from torch import Tensor, nn

from steerlab.interventions.errors import ConfigError, UnitError
from steerlab.interventions.graph import Graph, GraphResult, RunResult
from steerlab.interventions.hooks import (
    Edit,
    ForwardContext,
    group_handlers,
    mask_info_of_call,
    run_on_inputs,
    run_on_output,
)
from steerlab.interventions.lab import execution_device
from steerlab.interventions.orthonormal import Orthonormal, materialise
from steerlab.interventions.units import Positions

if TYPE_CHECKING:
    from steerlab.interventions.lab import Lab

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

    def execute(self, lab: Lab, graph: Graph, *, positions=None, source_positions=None, prefix=None, validate: bool = True, model_kwargs: dict | None = None) -> GraphResult:
        """Run ``graph`` on ``lab``'s model through nnsight (see the module docstring)."""
        from steerlab.interventions import engine

        if prefix is not None:
            raise ConfigError("prefix= is not supported by the nnsight engine (it replaces block forwards, which nnsight owns); use the hook engine")
        model = self.model if self.model is not None else getattr(lab, "nnsight_model", None)
        if model is not None and getattr(model, "_module", None) is not lab.model:
            raise ConfigError(
                f"NNsightEngine(model=...) wraps {type(getattr(model, '_module', model)).__name__}, "
                "not this lab's model; wrap the nnsight model itself: lab = wrap(lm)"
            )
        if self.remote and model is None:
            raise ConfigError(
                "remote execution needs the nnsight model that names the remote checkpoint: "
                "lm = LanguageModel('org/model'); lab = wrap(lm); lab.execute(graph, engine=NNsightEngine(remote=True))"
            )
        plan = engine._Plan(lab, graph, positions, source_positions, validate)  # every check, before compute
        with _Session(lab, model, self.remote) as session:
            session.check([site for node in plan.nodes for site in _sites(node)])
            return engine._run_plan(plan, prefix=None, model_kwargs=model_kwargs, forward=session.forward)


    def reft_forward(
        self,
        reft_model,
        input_ids: Int[Tensor, "batch seq"],
        attention_mask: Int[Tensor, "batch seq"] | None = None,
        intervention_positions: Int[Tensor, "batch group k"] | None = None,
        **model_kwargs,
    ) -> RunResult:
        """``reft_model(**batch)`` through this engine: a ReftModel's interventions, weight
        groups and per-example positions (``[batch, groups, k]``, or ``[batch, k]`` with one
        group) as one run; its attached hooks are set aside for the call, then restored."""
        ivs, groups = list(reft_model.interventions), reft_model.groups
        per_group = [None] * len(groups)
        if intervention_positions is not None:
            pos = intervention_positions
            per_group = [pos] if pos.dim() == 2 and len(groups) == 1 else list(pos.unbind(1)) if pos.dim() == 3 else []
            if len(per_group) != len(groups):
                raise UnitError(f"intervention_positions has shape {tuple(pos.shape)}; expected [batch, {len(groups)}, k] ({len(groups)} position groups)")
        inputs = {"input_ids": input_ids} | ({} if attention_mask is None else {"attention_mask": attention_mask})
        was = [iv.positions for iv in ivs]
        try:
            for group, p in zip(groups, per_group):
                for i in group if p is not None else ():
                    ivs[i].positions = Positions(p)
            with reft_model.disabled():
                return reft_model.lab.run(inputs, ivs, engine=self, **model_kwargs)
        finally:
            for iv, p in zip(ivs, was):
                iv.positions = p


def _nothing() -> None:
    """Reads need no callback here: a compiled program stops after its last read."""


def _sites(node) -> list:
    return [site for _, site in node.edits] + [site for site, *_ in node.reads.values()]


# -- the order in which a model reaches its modules -------------------------------

_ORDER: weakref.WeakKeyDictionary[nn.Module, tuple[dict, dict]] = weakref.WeakKeyDictionary()


def _event_order(lab: Lab, refresh: bool = False) -> tuple[dict, dict]:
    """``(index, calls)``: for each ``(id(module), side)`` the rank of its first
    event in a forward, and how many times it happens; from one probe forward."""
    hit = _ORDER.get(lab.model)
    if hit is not None and not refresh:
        return hit
    index: dict[tuple[int, str], int] = {}
    calls: dict[tuple[int, str], int] = {}

    def note(key):
        index.setdefault(key, len(index))
        calls[key] = calls.get(key, 0) + 1

    handles = []
    try:
        for m in lab.model.modules():
            handles.append(m.register_forward_pre_hook(lambda mod, a, k=(id(m), "input"): note(k)))
            handles.append(m.register_forward_hook(lambda mod, a, o, k=(id(m), "output"): note(k)))
        inp = lab._probe_inputs()
        with torch.no_grad():
            lab.model(*inp.args, **inp.kwargs, **({"use_cache": False} if lab.is_hf else {}))
    finally:
        for h in handles:
            h.remove()
    _ORDER[lab.model] = (index, calls)
    return index, calls


# -- one call's nnsight wrapper ------------------------------------------------------


_ENVOYS: weakref.WeakKeyDictionary[Lab, tuple[Any, dict]] = weakref.WeakKeyDictionary()


def _private_envoy(lab: Lab, nnsight) -> tuple[Any, dict]:
    """A private ``NNsight`` tree of ``lab.model`` (kept per lab) with no module instrumented:
    each call instruments only the modules it visits, and removes that afterwards."""
    hit = _ENVOYS.get(lab)
    if hit is not None and all(id(m) in hit[1] for m in lab.model.modules()):
        return hit
    with _restored(list(lab.model.modules())), warnings.catch_warnings():
        # BERT's `output` submodules: nnsight renames them on its envoys; we address modules, not names
        warnings.filterwarnings("ignore", message=".*which nnsight already serves.*")
        envoy = _envoy_class(nnsight)(lab.model)
    hit = _ENVOYS[lab] = (envoy, {id(e._module): e for e in envoy.modules()})
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

    def __init__(self, lab: Lab, model, remote):
        self.lab, self.remote, self.envoy = lab, remote, model
        self._stack = ExitStack()
        self._installed: set[int] = set()

    def __enter__(self) -> _Session:
        import nnsight

        self._nnsight = nnsight
        if self.envoy is None:
            self.envoy, self.by_module = _private_envoy(self.lab, nnsight)
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
        index, calls = _event_order(self.lab)
        if any((id(s.module), s.port.io) not in index for s in sites):
            index, calls = _event_order(self.lab, refresh=True)  # the model changed since we looked
        for s in sites:
            n = calls.get((id(s.module), s.port.io), 0)
            if n != 1:
                what = "did not run in a probe forward" if n == 0 else f"runs {n} times per forward"
                raise ConfigError(f"site {s.name!r}: its module {s.module_path!r} {what}; the nnsight engine needs one call per forward (use the hook engine)")
        self.index = index

    # -- one forward ---------------------------------------------------------------
    def forward(self, plan, inputs, edits, reads, *, values: dict, cache: dict, stop_early: bool, grad: bool, prefix, model_kwargs: dict, decode: bool = False):
        """One forward of the plan as one trace (the hook engine's ``_forward`` contract)."""
        from steerlab.interventions.engine import _handlers

        store: dict = {}
        handlers = _handlers(plan, edits, reads, values=values, cache=cache, store=store, on_read=_nothing, decode=decode)
        program = self._compile(plan, handlers, stop_early, {"store": store, "cache": cache})
        kwargs = {**inputs.kwargs, **model_kwargs}
        if self.remote:
            kwargs["remote"] = self.remote
        with torch.set_grad_enabled(grad):
            box = _trace(self.envoy, self._nnsight, inputs.args, kwargs, program)
        if box["cache"] is not cache:  # a remote run returns copies
            cache.update(box["cache"])
        return box.get("output"), box["store"]

    def _compile(self, plan, handlers, stop_early: bool, box: dict) -> _Program:
        groups = group_handlers(handlers)
        for _, hs in groups.values():
            for h in hs:  # the program carries no module (a remote request names modules through envoys)
                h.sel.site = dataclasses.replace(h.sel.site, module=None)
        root_in = (id(self.lab.model), "input")
        root_out = (id(self.lab.model), "output")
        steps: list[_Step] = []
        first: list = []
        for (path, side), (site, hs) in groups.items():
            key = (id(site.module), side)
            if key == root_in:
                first = hs
                continue
            steps.append(_Step(self.index[key], self.by_module[id(site.module)], side, hs, site.port.inplace))
        self._instrument([self.lab.model] + [site.module for site, _ in groups.values()])
        steps.sort(key=lambda s: s.rank)
        reads = [i for i, s in enumerate(steps) if any(not isinstance(h, Edit) or h.collect for h in s.handlers)]
        if stop_early:
            steps = steps[: reads[-1] + 1] if reads else []
        elif not steps or steps[-1].envoy is not self.envoy or steps[-1].side != "output":
            steps.append(_Step(self.index.get(root_out, len(self.index)), self.envoy, "output", [], False))
        if not stop_early:
            steps[-1].keep = True
        maps = [m for hs in (first, *(s.handlers for s in steps)) for h in hs if isinstance(h, Edit) for m in h.iv.modules() if isinstance(m, Orthonormal)]
        return _Program(self.envoy, first, steps, plan.positions, plan.source_positions, maps, stop_early, box)


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
    positions: Any
    source_positions: Any
    maps: list
    stop: bool
    box: dict

    def run(self, tracer) -> None:
        args, kwargs = self.root.inputs
        ctx = ForwardContext(mask_info_of_call(args, kwargs), self.positions, self.source_positions)
        if self.maps:
            materialise(self.maps)
        if self.first:
            with _plain_calls(self.root):
                new = run_on_inputs(self.first, args, kwargs, ctx, False)
            if new is not None:
                self.root.inputs = new
        for step in self.steps:
            step.run(ctx, self.box)
        if self.stop:
            tracer.stop()


def _trace(envoy, nnsight, args: tuple, kwargs: dict, program: _Program) -> dict:
    # nnsight re-reads this block's source and runs it interleaved with the forward
    with envoy.trace(*args, **kwargs) as tracer:
        box = program.box
        nnsight.save(box)
        program.run(tracer)
    return box


_ = Tensor
