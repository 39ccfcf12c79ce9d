"""Reusable reliability checks (RELIABILITY.md rows 1, 2 and 13).

Three pieces, meant to be imported by every layer's tests:

* :func:`snapshot` / :func:`assert_unchanged`: everything a call could leave
  behind on a model (every hook registry of every module, global module hooks,
  tensor hooks on parameters, instance ``forward`` patches, ``training`` and
  ``requires_grad`` flags, parameter contents and version counters, configs).
* :class:`Fault` and :data:`FAULTS`: fault injectors. A fault enters a call
  through *channels*; a call type asks the fault at each point where one can
  enter (``fault.interventions(...)``, ``fault.source_inputs(...)``,
  ``fault.model_kwargs(...)``, ...). The ``context`` channel (the model or a
  user hook failing mid-forward) works for every call type.
* :class:`CallType` and :data:`CALL_TYPES`: a registry of the library's call
  types. A later layer adds its own (``register_call_type(CallType("das_step",
  fn, channels={...}))``) and parametrises :func:`check_fault` over
  :func:`fault_cases` to run the whole battery on it.

A call type's ``fn(scenario, fault)`` performs one call with the fault's
injections and returns a tensor; with :data:`NO_FAULT` the result must be
reproducible bit for bit (fresh interventions, seeded).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.modules.module as _torch_module
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

import steerlab as sl

__all__ = [
    "HOOK_DICTS",
    "ModelState",
    "snapshot",
    "assert_unchanged",
    "plain_logits",
    "check_user_hooks",
    "UserHooks",
    "InjectedFault",
    "Scenario",
    "Fault",
    "FAULTS",
    "NO_FAULT",
    "CallType",
    "CALL_TYPES",
    "register_call_type",
    "fault_cases",
    "check_fault",
    "INTERRUPTS",
    "interrupt_cases",
    "check_interrupt",
    "attached_reft",
]

#: every per-module hook registry PyTorch keeps (``_is_full_backward_hook`` is checked too)
HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
_GLOBAL_HOOKS = tuple(n for n in dir(_torch_module) if n.startswith("_global_") and isinstance(getattr(_torch_module, n), dict))


# --------------------------------------------------------------------------- snapshots
def _registry(d) -> tuple:
    return () if d is None else tuple((k, v) for k, v in d.items())


@dataclass
class ModelState:
    """What a call must leave exactly as it found it (compare with ``==`` or :meth:`diff`)."""

    modules: dict[str, tuple]
    hooks: dict[str, dict[str, tuple]]
    instance_attrs: dict[str, dict[str, Any]]
    params: dict[str, tuple]
    global_hooks: dict[str, tuple]
    configs: tuple
    contents: dict[str, Tensor] | None = field(default=None, repr=False)

    def diff(self, other: ModelState) -> list[str]:
        out: list[str] = []
        for name in ("modules", "hooks", "instance_attrs", "params", "global_hooks"):
            a, b = getattr(self, name), getattr(other, name)
            for key in sorted(set(a) | set(b)):
                if a.get(key, "<absent>") != b.get(key, "<absent>"):
                    out.append(f"{name}[{key!r}]: before {a.get(key, '<absent>')!r:.300} after {b.get(key, '<absent>')!r:.300}")
        if self.configs != other.configs:
            out.append("model.config or generation_config changed")
        if self.contents is not None and other.contents is not None:
            for k, v in self.contents.items():
                w = other.contents.get(k)
                if w is None or w.dtype != v.dtype or not torch.equal(v, w):
                    out.append(f"tensor {k!r} changed")
        return out


def _instance_attrs(m: nn.Module) -> dict[str, Any]:
    # methods patched onto the instance (prefix.py replaces `forward` for a call) and any new attribute
    return {k: v for k, v in vars(m).items() if callable(v) and not isinstance(v, nn.Module)} | {"<keys>": tuple(sorted(vars(m)))}


def _configs(model: nn.Module) -> tuple:
    cfg = getattr(model, "config", None)
    gen = getattr(model, "generation_config", None)
    return (
        repr(sorted(cfg.to_dict().items())) if hasattr(cfg, "to_dict") else None,
        repr(sorted(gen.to_dict().items())) if hasattr(gen, "to_dict") else None,
    )


def snapshot(model: nn.Module, *, contents: bool | None = None) -> ModelState:
    """Record the model's state. ``contents`` clones every parameter and buffer
    (default: for models under 20M elements; larger ones compare version counters)."""
    mods = dict(model.named_modules(remove_duplicate=False))
    n = sum(p.numel() for p in model.parameters())
    if contents is None:
        contents = n < 20_000_000
    params = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        params[name] = (
            p.requires_grad,
            p.grad is None,
            p.dtype,
            p.data_ptr(),
            p._version,
            _registry(getattr(p, "_backward_hooks", None)),
            _registry(getattr(p, "_post_accumulate_grad_hooks", None)),
        )
    for name, b in model.named_buffers(remove_duplicate=False):
        params["buffer:" + name] = (b.dtype, b.data_ptr(), b._version)
    return ModelState(
        modules={k: (type(m), m.training, getattr(m, "_is_full_backward_hook", None)) for k, m in mods.items()},
        hooks={k: {d: _registry(getattr(m, d, None)) for d in HOOK_DICTS} for k, m in mods.items()},
        instance_attrs={k: _instance_attrs(m) for k, m in mods.items()},
        params=params,
        global_hooks={g: _registry(getattr(_torch_module, g)) for g in _GLOBAL_HOOKS},
        configs=_configs(model),
        contents={k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()} if contents else None,
    )


def assert_unchanged(model: nn.Module, before: ModelState, *, what: str = "the call") -> None:
    """Fail with a list of differences if ``model`` is not exactly as in ``before``."""
    after = snapshot(model, contents=before.contents is not None)
    diffs = before.diff(after)
    assert not diffs, f"{what} left the model changed:\n  " + "\n  ".join(diffs[:20])


@torch.no_grad()
def plain_logits(model: nn.Module, inputs: dict) -> Tensor:
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


# --------------------------------------------------------------------------- the user's own hooks
class UserHooks:
    """K hooks of every kind a user might register, each counting its calls.

    ``install(model)`` registers them; :meth:`registered` says whether all are
    still in the model's registries (the same function objects, in order);
    :meth:`fired_since` which have fired since a mark.
    """

    def __init__(self):
        self.counts: dict[str, int] = {}
        self.handles: list = []
        self._where: list[tuple[str, nn.Module, str, int]] = []

    def _counter(self, name: str):
        self.counts[name] = 0

        def hook(*args, **kwargs):
            self.counts[name] += 1

        return hook

    def _add(self, name: str, module: nn.Module, registry: str, handle) -> None:
        self.handles.append(handle)
        self._where.append((name, module, registry, handle.id))

    def install(self, model: nn.Module, blocks: nn.ModuleList, site_modules: list[nn.Module] = ()) -> UserHooks:
        root, mid = model, blocks[len(blocks) // 2]
        self._add("root_pre", root, "_forward_pre_hooks", root.register_forward_pre_hook(self._counter("root_pre")))
        self._add("root_pre_kw_prepend", root, "_forward_pre_hooks",
                  root.register_forward_pre_hook(self._counter("root_pre_kw_prepend"), with_kwargs=True, prepend=True))
        self._add("root_fwd", root, "_forward_hooks", root.register_forward_hook(self._counter("root_fwd")))
        self._add("block_fwd_always", mid, "_forward_hooks", mid.register_forward_hook(self._counter("block_fwd_always"), always_call=True))
        self._add("block_fwd_kw", mid, "_forward_hooks", mid.register_forward_hook(self._counter("block_fwd_kw"), with_kwargs=True))
        self._add("block_pre", mid, "_forward_pre_hooks", mid.register_forward_pre_hook(self._counter("block_pre")))
        for i, m in enumerate(site_modules):  # modules steerlab hooks as well
            self._add(f"site{i}_fwd", m, "_forward_hooks", m.register_forward_hook(self._counter(f"site{i}_fwd"), prepend=True))
            self._add(f"site{i}_pre", m, "_forward_pre_hooks", m.register_forward_pre_hook(self._counter(f"site{i}_pre")))
        last = blocks[-1]
        self._add("block_full_bwd", last, "_backward_hooks", last.register_full_backward_hook(self._counter("block_full_bwd")))
        self._add("root_state_dict", root, "_state_dict_hooks", root.register_state_dict_post_hook(self._counter("root_state_dict")))
        return self

    @property
    def k(self) -> int:
        return len(self._where)

    def registered(self) -> list[str]:
        return [name for name, m, reg, hid in self._where if hid in getattr(m, reg)]

    def mark(self) -> dict[str, int]:
        return dict(self.counts)

    def fired_since(self, mark: dict[str, int]) -> list[str]:
        return [k for k, v in self.counts.items() if v > mark.get(k, 0)]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def check_user_hooks(hooks: UserHooks, model: nn.Module, inputs: dict) -> None:
    """All K user hooks registered, and all K firing on a plain forward + backward + state_dict."""
    assert hooks.registered() == [w[0] for w in hooks._where], f"user hooks lost: {set(w[0] for w in hooks._where) - set(hooks.registered())}"
    mark = hooks.mark()
    emb = model.get_input_embeddings()(inputs["input_ids"]).detach().requires_grad_(True)
    out = model(inputs_embeds=emb, attention_mask=inputs.get("attention_mask"))
    (out.logits if hasattr(out, "logits") else out.last_hidden_state).float().sum().backward()
    model.state_dict()
    fired = hooks.fired_since(mark)
    assert sorted(fired) == sorted(hooks.counts), f"user hooks not firing: {sorted(set(hooks.counts) - set(fired))}"


# --------------------------------------------------------------------------- scenario
@dataclass
class Scenario:
    """A wrapped causal LM and the inputs every call type uses.

    ``base`` (batch 2, left-padded), ``source`` (same shape), ``other``
    (the same batch, another length: what a re-entrant call runs).
    """

    model: nn.Module
    lab: sl.Lab
    base: dict
    source: dict
    other: dict
    vocab: int
    width: int
    n_layers: int
    reference: nn.Module = field(repr=False)  # an untouched deep copy
    _memo: dict = field(default_factory=dict, repr=False)

    def reference_logits(self) -> Tensor:
        """The untouched copy's output on ``base`` (computed once)."""
        if "reference" not in self._memo:
            self._memo["reference"] = plain_logits(self.reference, self.base)
        return self._memo["reference"]

    def clean(self, call: CallType) -> Tensor:
        """``call`` without a fault (computed once per call type)."""
        if call.name not in self._memo:
            self._memo[call.name] = call.fn(self, NO_FAULT)
        return self._memo[call.name]

    @classmethod
    def of(cls, model: nn.Module, tokenizer=None, *, base: dict | None = None, source: dict | None = None) -> Scenario:
        reference = copy.deepcopy(model)
        lab = sl.wrap(model, tokenizer)
        vocab = model.get_input_embeddings().weight.shape[0]
        g = torch.Generator().manual_seed(7)

        def ids(b, t, pad):
            x = torch.randint(3, min(vocab, 90), (b, t), generator=g)
            m = torch.ones(b, t, dtype=torch.long)
            m[-1, :pad] = 0
            x[m == 0] = 0
            return {"input_ids": x, "attention_mask": m}

        base = base or ids(2, 7, 2)
        source = source or ids(2, 7, 1)
        lab.sites  # noqa: B018 - probe every site's shape now, not inside a counted call
        return cls(model, lab, base, source, ids(2, 5, 0), vocab, lab.d_model, lab.n_layers, reference)

    def site(self, layer: int, name: str) -> str:
        return f"blocks.{min(layer, self.n_layers - 1)}.{name}"

    def bad_inputs(self, inputs: dict) -> dict:
        """``inputs`` with one token id beyond the vocabulary (the model fails in its embedding)."""
        bad = {k: v.clone() for k, v in inputs.items()}
        bad["input_ids"][0, -1] = self.vocab + 5
        return bad


# --------------------------------------------------------------------------- faults
class InjectedFault(RuntimeError):
    """The exception the injectors raise, so a test can tell it from a real bug."""


class _RaiseInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        raise InjectedFault("injected: backward failed")


@dataclass(frozen=True)
class Fault:
    """One way a call can go wrong.

    ``channel``: where it enters (``"intervention"``, ``"source"``,
    ``"kwargs"``, ``"positions"``, ``"generate"``, ``"backward"``, or
    ``"context"``, which every call type supports). ``expect``: the exception
    the call must raise, or ``None`` if it must complete (``check`` then
    inspects the faulty result against the clean one).
    """

    name: str
    channel: str
    expect: type[BaseException] | None
    match: str | None = None
    make_iv: Callable[[str, Scenario], sl.Intervention] | None = None
    make_context: Callable[[Scenario], contextlib.AbstractContextManager] | None = None
    check: Callable[[Tensor, Tensor], None] | None = None

    # -- injection points a call type asks -----------------------------------
    def interventions(self, sc: Scenario, site: str) -> list[sl.Intervention]:
        if self.channel in ("intervention", "backward") and self.make_iv is not None:
            return [self.make_iv(site, sc)]
        return []

    def source_inputs(self, sc: Scenario, inputs: dict) -> dict:
        return sc.bad_inputs(inputs) if self.channel == "source" else inputs

    def model_kwargs(self, sc: Scenario, *, generate: bool = False) -> dict:
        if self.channel != "kwargs":
            return {}
        if generate:
            return {"not_a_model_argument": 1}  # generate() rejects unused model kwargs
        return {"position_ids": torch.arange(sc.base["input_ids"].shape[1] + 4)[None].repeat(3, 1)}

    def positions(self, sc: Scenario) -> Tensor | None:
        """Per-call positions ``[batch, 1]``, one beyond example 1's real tokens."""
        if self.channel != "positions":
            return None
        return torch.tensor([[0], [int(sc.base["attention_mask"][1].sum()) + 3]])

    def generate_kwargs(self, sc: Scenario) -> dict:
        if self.channel != "generate" or self.make_iv is not None:
            return {}
        from transformers import StoppingCriteria, StoppingCriteriaList

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                raise InjectedFault("injected: stopping criterion failed")

        return {"stopping_criteria": StoppingCriteriaList([_Stop()])}

    def backward_wrap(self, loss: Tensor) -> Tensor:
        return _RaiseInBackward.apply(loss) if self.channel == "backward" and self.make_iv is None else loss

    def context(self, sc: Scenario) -> contextlib.AbstractContextManager:
        if self.make_context is not None and self.channel in ("context", "source_run"):
            return self.make_context(sc)
        return contextlib.nullcontext()

    def __repr__(self) -> str:
        return self.name


NO_FAULT = Fault("no_fault", "none", None)


def _raise(exc: BaseException):
    def fn(h):
        raise exc

    return fn


def _nan(h: Tensor) -> Tensor:
    return h * float("nan")  # still a function of h, so a training step can backpropagate through it


def _reentrant(site: str, sc: Scenario) -> sl.Intervention:
    depth = [0]

    def fn(h):
        if depth[0] == 0:  # call the model once more (another length) from inside the forward
            depth[0] += 1
            try:
                with torch.no_grad():
                    sc.model(**sc.other)
            finally:
                depth[0] -= 1
        return h

    return sl.Lambda(site, fn)


def _decode_step_raiser(site: str, sc: Scenario) -> sl.Intervention:
    calls = [0]

    def fn(h):
        calls[0] += 1
        if calls[0] >= 2:  # prefill passes; the first decode step fails
            raise InjectedFault("injected: failure at a decode step")
        return h

    return sl.Lambda(site, fn)


@contextlib.contextmanager
def _user_hook_raising(sc: Scenario, exc: BaseException):
    block = sc.lab.layers[sc.n_layers // 2]

    def hook(module, args, out):
        raise exc

    h = block.register_forward_hook(hook)
    try:
        yield
    finally:
        h.remove()


@contextlib.contextmanager
def _module_raising(sc: Scenario):
    """A module deep in the model fails mid-forward (an out-of-memory error)."""
    mlp = sc.lab.resolve(sc.site(sc.n_layers // 2, "mlp.out")).module
    assert "forward" not in vars(mlp)

    def forward(*args, **kwargs):
        raise torch.OutOfMemoryError("injected: out of memory in the MLP")

    mlp.forward = forward
    try:
        yield
    finally:
        del mlp.forward


def _expect_nan(result: Tensor, clean: Tensor) -> None:
    # logits turn NaN; token sequences (generate) change
    assert torch.isnan(result).any() if result.is_floating_point() else not torch.equal(result, clean), "the NaN fault did not reach the output"


def _expect_same(result: Tensor, clean: Tensor) -> None:
    assert torch.equal(result, clean), f"max diff {(result.float() - clean.float()).abs().max()}"


FAULTS: dict[str, Fault] = {
    f.name: f
    for f in [
        Fault("iv_raises", "intervention", InjectedFault, "injected: intervention",
              make_iv=lambda site, sc: sl.Lambda(site, _raise(InjectedFault("injected: intervention failed")))),
        Fault("iv_wrong_shape", "intervention", sl.ShapeMismatch, "returned shape",
              make_iv=lambda site, sc: sl.Lambda(site, lambda h: h[..., :-1])),
        Fault("iv_not_a_tensor", "intervention", sl.ShapeMismatch, "returned float",
              make_iv=lambda site, sc: sl.Lambda(site, lambda h: 0.5)),
        Fault("iv_nan", "intervention", None, make_iv=lambda site, sc: sl.Lambda(site, _nan), check=_expect_nan),
        Fault("iv_wrong_dtype", "intervention", None, make_iv=lambda site, sc: sl.Lambda(site, lambda h: h.double()), check=_expect_same),
        Fault("iv_keyboard_interrupt", "intervention", KeyboardInterrupt,
              make_iv=lambda site, sc: sl.Lambda(site, _raise(KeyboardInterrupt()))),
        Fault("iv_reentrant", "intervention", None, make_iv=_reentrant, check=_expect_same),
        Fault("iv_backward_raises", "backward", InjectedFault, "injected: backward",
              make_iv=lambda site, sc: sl.Lambda(site, _RaiseInBackward.apply)),
        Fault("loss_backward_raises", "backward", InjectedFault, "injected: backward"),
        Fault("decode_step_raises", "generate", InjectedFault, "decode step", make_iv=_decode_step_raiser),
        Fault("stopping_criterion_raises", "generate", InjectedFault, "stopping criterion"),
        Fault("bad_source_inputs", "source", IndexError, "index out of range"),
        Fault("bad_model_kwargs", "kwargs", Exception),
        Fault("positions_out_of_range", "positions", sl.PositionOutOfRange, "real tokens"),
        Fault("user_hook_raises", "context", InjectedFault, "user hook",
              make_context=lambda sc: _user_hook_raising(sc, InjectedFault("injected: user hook failed"))),
        Fault("keyboard_interrupt_mid_forward", "context", KeyboardInterrupt,
              make_context=lambda sc: _user_hook_raising(sc, KeyboardInterrupt())),
        Fault("model_raises_mid_forward", "context", torch.OutOfMemoryError, "out of memory", make_context=_module_raising),
    ]
}


@contextlib.contextmanager
def _source_run_raising(sc: Scenario, exc: BaseException):
    """The model fails (``exc``) in a forward that runs the source: any row of its input ids is the source's first."""
    row = sc.source["input_ids"][0]

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(ids, Tensor) and ids.dim() == 2 and ids.shape[1] == row.shape[0] and bool((ids.cpu() == row).all(1).any()):
            raise exc

    h = sc.model.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
    try:
        yield
    finally:
        h.remove()


def _interrupt_faults() -> dict[str, Fault]:
    """RELIABILITY row 15: ``KeyboardInterrupt``, ``SystemExit`` and ``GeneratorExit`` raised from a hook
    (the user's, mid-forward), from an intervention, and from a source run."""
    out = {}
    for exc in (KeyboardInterrupt, SystemExit, GeneratorExit):
        name = {"KeyboardInterrupt": "keyboard_interrupt", "SystemExit": "system_exit", "GeneratorExit": "generator_exit"}[exc.__name__]
        out[f"{name}_in_hook"] = Fault(f"{name}_in_hook", "context", exc, make_context=lambda sc, e=exc: _user_hook_raising(sc, e()))
        out[f"{name}_in_intervention"] = Fault(f"{name}_in_intervention", "intervention", exc,
                                               make_iv=lambda site, sc, e=exc: sl.Lambda(site, _raise(e())))
        out[f"{name}_in_source_run"] = Fault(f"{name}_in_source_run", "source_run", exc, make_context=lambda sc, e=exc: _source_run_raising(sc, e()))
    return out


#: the interrupt battery (kept apart from FAULTS: it runs through :func:`check_interrupt`)
INTERRUPTS: dict[str, Fault] = _interrupt_faults()

# the two "generate" faults split: one is an intervention failing at a decode step, one generate's own loop
_GEN_IV = {"decode_step_raises"}


def _generate_ivs(fault: Fault, sc: Scenario, site: str) -> list[sl.Intervention]:
    if fault.name in _GEN_IV:
        return [fault.make_iv(site, sc)]  # type: ignore[misc]
    return fault.interventions(sc, site)


# --------------------------------------------------------------------------- call types
@dataclass(frozen=True)
class CallType:
    """A kind of call the library offers: ``fn(scenario, fault) -> Tensor``.

    ``channels``: the fault channels it honours besides ``"context"``.
    ``needs_lm``: only for models with a language-model head (generate).
    """

    name: str
    fn: Callable[[Scenario, Fault], Tensor]
    channels: frozenset[str]
    needs_lm: bool = False
    #: a context in which the model is plain again (an attached call type's interventions set aside)
    plain: Callable[[Scenario], contextlib.AbstractContextManager] | None = None

    def plain_context(self, sc: Scenario) -> contextlib.AbstractContextManager:
        return self.plain(sc) if self.plain is not None else contextlib.nullcontext()

    def __repr__(self) -> str:
        return self.name


CALL_TYPES: dict[str, CallType] = {}


def register_call_type(call: CallType) -> CallType:
    CALL_TYPES[call.name] = call
    return call


def _vec(sc: Scenario, scale: float = 1.0) -> Tensor:
    g = torch.Generator().manual_seed(3)
    return scale * torch.randn(sc.width, generator=g)


def _call_run(sc: Scenario, f: Fault) -> Tensor:
    ivs = [
        sl.Interchange(sc.site(0, "resid_post"), positions=[0, -1], source=f.source_inputs(sc, sc.source)),
        sl.Add(sc.site(1, "resid_post"), _vec(sc), positions=[-1]),
        *f.interventions(sc, sc.site(1, "resid_mid")),  # an in-place site
    ]
    pos = f.positions(sc)  # per-call positions override every intervention's
    return sc.lab.run(sc.base, ivs, positions=pos, **f.model_kwargs(sc)).logits


def _call_execute(sc: Scenario, f: Fault) -> Tensor:
    g = sl.Graph()
    clean = g.run(f.source_inputs(sc, sc.source), name="clean")
    clean2 = g.run({k: v.flip(0) for k, v in sc.source.items()}, name="clean2")  # same shape: batched with clean
    mid = g.run(
        sc.base,
        [
            sl.Interchange(sc.site(0, "attn.z"), heads=[1], positions=[-1], source=clean),
            sl.Interchange(sc.site(0, "mlp.out"), positions=[-1], source=clean2),
            *f.interventions(sc, sc.site(1, "attn.z")),  # a per-head site
        ],
        name="mid",
    )
    out = g.run(sc.base, [sl.Interchange(sc.site(2, "resid_post"), positions=[-1], source=mid)], name="out")  # path patching
    res = sc.lab.execute(g, positions=f.positions(sc), **f.model_kwargs(sc))
    return res[out].logits


def _call_collect(sc: Scenario, f: Fault) -> Tensor:
    cache = sc.lab.collect(f.source_inputs(sc, sc.base), ["blocks.*.resid_post", sc.site(1, "attn.z")])
    return torch.cat([cache.stack("blocks.*.resid_post").flatten(), cache[sc.site(1, "attn.z")].flatten()])


def _call_generate(sc: Scenario, f: Fault) -> Tensor:
    ivs = [
        sl.Interchange(sc.site(0, "resid_post"), positions=[-1], source=f.source_inputs(sc, sc.source)),
        sl.Add(sc.site(1, "resid_post"), _vec(sc, 0.5), positions=[-1]),
        *_generate_ivs(f, sc, sc.site(1, "mlp.out")),
    ]
    gen = sc.lab.generate(
        sc.base, ivs, decode=True, positions=f.positions(sc), max_new_tokens=3, do_sample=False,
        pad_token_id=0, **f.generate_kwargs(sc), **f.model_kwargs(sc, generate=True),
    )
    return gen.sequences


def _call_attached_step(sc: Scenario, f: Fault) -> Tensor:
    """A training step with interventions attached (a Trainer's or a hand loop's)."""
    torch.manual_seed(0)
    sv = sc.lab.source_value(sl.SubspaceInterchange(sc.site(0, "resid_post"), size=2, positions=[-1], source=f.source_inputs(sc, sc.source)))
    steer = sl.Add(sc.site(1, "resid_post"), positions=[-1], trainable=True, width=sc.width)
    das = sl.SubspaceInterchange(sc.site(0, "resid_post"), size=2, width=sc.width, positions=[-1], source=sv)
    opt = torch.optim.SGD([*steer.parameters(), *das.parameters()], lr=0.1)
    kwargs = dict(f.model_kwargs(sc))
    pos = f.positions(sc)
    if pos is not None:
        kwargs["intervention_positions"] = pos  # checked inside the forward: a late discovery
    with sc.lab.attach([das, steer, *f.interventions(sc, sc.site(1, "resid_post"))]):
        out = sc.model(**sc.base, **kwargs)
        logits = out.logits
        loss = f.backward_wrap(torch.nn.functional.cross_entropy(logits[:, -1].float(), torch.tensor([5, 9])))
        loss.backward()
        opt.step()
    return torch.cat([logits.detach().flatten(), steer.vector.detach(), das.R.detach().flatten()])


def _call_das_step(sc: Scenario, f: Fault) -> Tensor:
    """One DAS optimisation step: a SubspaceInterchange from a cached SourceValue, resumed from a Prefix."""
    torch.manual_seed(0)
    site = sc.site(1, "resid_post")
    sv = sc.lab.source_value(sl.SubspaceInterchange(site, size=2, positions=[-1], source=f.source_inputs(sc, sc.source)))
    prefix = sc.lab.prefix(sc.base, 1)
    das = sl.SubspaceInterchange(site, size=2, width=sc.width, positions=[-1], source=sv)
    opt = torch.optim.Adam(das.parameters(), lr=0.05)
    res = sc.lab.run(sc.base, [das, *f.interventions(sc, sc.site(2, "mlp.out"))], prefix=prefix, positions=f.positions(sc), **f.model_kwargs(sc))
    loss = f.backward_wrap(torch.nn.functional.cross_entropy(res.logits[:, -1].float(), torch.tensor([5, 9])))
    loss.backward()
    opt.step()
    return torch.cat([res.logits.detach().flatten(), das.R.detach().flatten()])


_ALL = frozenset({"intervention", "source", "kwargs", "positions"})
register_call_type(CallType("run", _call_run, _ALL | {"source_run"}))
register_call_type(CallType("execute", _call_execute, _ALL | {"source_run"}))
register_call_type(CallType("collect", _call_collect, frozenset({"source"})))
register_call_type(CallType("generate", _call_generate, _ALL | {"generate", "source_run"}, needs_lm=True))
register_call_type(CallType("attached_step", _call_attached_step, _ALL | {"backward", "source_run"}))
register_call_type(CallType("das_step", _call_das_step, _ALL | {"backward", "source_run"}))


def _call_sweep(sc: Scenario, f: Fault) -> Tensor:
    """A site sweep (an in-place site among them) and a head sweep, positions counted on each side."""
    pos = f.positions(sc)  # the battery's per-example positions, one beyond example 1: as a list here
    positions = [0, -1] if pos is None else [0, int(pos[1, 0])]
    source = f.source_inputs(sc, sc.source)
    metric = sl.metrics.logit_diff(5, 7)
    a = sl.sweep(sc.lab, sc.base, source, sites=[sc.site(0, "resid_mid"), sc.site(1, "resid_post")], positions=positions, metric=metric, configs_per_forward=3)
    b = sl.sweep(sc.lab, sc.base, source, sites=sc.site(1, "attn.z"), heads="all", positions=positions[-1:], metric=metric, configs_per_forward=3)
    return torch.cat([a.per_example.flatten(), b.per_example.flatten()])


def _call_execute_nnsight(sc: Scenario, f: Fault) -> Tensor:
    """The ``execute`` graph (batched sources, heads, an in-place site, path patching) through the nnsight engine."""
    g = sl.Graph()
    clean = g.run(f.source_inputs(sc, sc.source), name="clean")
    clean2 = g.run({k: v.flip(0) for k, v in sc.source.items()}, name="clean2")
    mid = g.run(
        sc.base,
        [
            sl.Interchange(sc.site(0, "attn.z"), heads=[1], positions=[-1], source=clean),
            sl.Interchange(sc.site(0, "mlp.out"), positions=[-1], source=clean2),
            *f.interventions(sc, sc.site(1, "resid_mid")),  # an in-place site
        ],
        name="mid",
    )
    out = g.run(sc.base, [sl.Interchange(sc.site(2, "resid_post"), positions=[-1], source=mid)], name="out")
    return sc.lab.execute(g, positions=f.positions(sc), engine="nnsight", **f.model_kwargs(sc))[out].logits


def attached_reft(sc: Scenario):
    """The scenario's long-lived ReftModel (LoReFT at two layers, first and last token, untied):
    attached across calls, as in a notebook or a Trainer (stacked on the scenario's lab)."""
    if "rm" not in sc._memo:
        from steerlab import reft

        torch.manual_seed(1)
        sc._memo["rm"] = reft.get_reft_model(sc.model, reft.ReftConfig(layers=[0, 1], rank=2, positions="f1+l1", tied=False), stack=True)
    return sc._memo["rm"]


def _reft_positions(sc: Scenario, f: Fault) -> Tensor:
    from steerlab import reft

    pos = f.positions(sc)
    if pos is not None:
        return pos[:, None, :].expand(-1, 2, -1)  # one beyond example 1, in both groups
    return reft.prompt_positions(sc.base["attention_mask"].sum(-1), "f1+l1", tied=False)


def _call_reft_forward(sc: Scenario, f: Fault) -> Tensor:
    """A forward of an attached ReftModel (per-example positions, two weight groups)."""
    rm = attached_reft(sc)
    with sc.lab.attach(f.interventions(sc, sc.site(1, "mlp.out"))), torch.no_grad():
        return rm(**sc.base, intervention_positions=_reft_positions(sc, f), **f.model_kwargs(sc)).logits


def _call_reft_generate(sc: Scenario, f: Fault) -> Tensor:
    """``generate`` of an attached ReftModel (prompt positions per example; the fault's intervention at every step)."""
    rm = attached_reft(sc)
    with sc.lab.attach(_generate_ivs(f, sc, sc.site(1, "mlp.out")), decode=True):
        gen = rm.generate(sc.base, max_new_tokens=3, do_sample=False, pad_token_id=0, **f.generate_kwargs(sc), **f.model_kwargs(sc, generate=True))
    return gen.sequences


def _call_reft_train_step(sc: Scenario, f: Fault) -> Tensor:
    """One step of ``steerlab.reft.train`` on a fresh ReftModel (stacked on the scenario's lab), unwrapped after."""
    from steerlab import reft

    torch.manual_seed(0)
    rm = reft.get_reft_model(sc.model, reft.ReftConfig(layers=[0, 1], rank=2, positions="f1+l1"), stack=True)
    try:
        pos = _reft_positions(sc, f)[:, :1]
        labels = sc.base["input_ids"].masked_fill(sc.base["attention_mask"] == 0, -100)
        rows = [{"input_ids": sc.base["input_ids"][i], "attention_mask": sc.base["attention_mask"][i], "labels": labels[i],
                 "intervention_positions": pos[i]} for i in range(2)]
        collate = lambda b: {k: torch.stack([r[k] for r in b]) for k in b[0]}  # noqa: E731
        with sc.lab.attach(f.interventions(sc, sc.site(1, "mlp.out"))):
            reft.train(rm, rows, collator=collate, batch_size=2, max_steps=1, lr=0.1, shuffle=False)
        with torch.no_grad():
            out = rm(**sc.base, intervention_positions=pos).logits
        return torch.cat([out.flatten(), *(p.detach().flatten() for p in rm.interventions.parameters())])
    finally:
        rm.unwrap()


_WITH_SOURCE = _ALL | {"source_run"}
register_call_type(CallType("sweep", _call_sweep, frozenset({"source", "positions", "source_run"})))
register_call_type(CallType("execute_nnsight", _call_execute_nnsight, _WITH_SOURCE))
register_call_type(CallType("reft_forward", _call_reft_forward, frozenset({"intervention", "kwargs", "positions"}),
                            plain=lambda sc: attached_reft(sc).disabled()))
register_call_type(CallType("reft_generate", _call_reft_generate, frozenset({"intervention", "generate"}), needs_lm=True,
                            plain=lambda sc: attached_reft(sc).disabled()))
register_call_type(CallType("reft_train_step", _call_reft_train_step, frozenset({"intervention", "positions"})))


def fault_cases(call_types: list[str] | None = None, faults: list[str] | None = None) -> Iterator[tuple[CallType, Fault]]:
    """Every (call type, fault) pair where the call type honours the fault's channel."""
    for c in call_types or list(CALL_TYPES):
        call = CALL_TYPES[c]
        for f in faults or list(FAULTS):
            fault = FAULTS[f]
            if fault.channel == "context" or fault.channel in call.channels:
                yield call, fault


def interrupt_cases(call_types: list[str]) -> Iterator[tuple[CallType, Fault]]:
    """Every (call type, interrupt) pair where the call type honours the interrupt's channel."""
    for c in call_types:
        call = CALL_TYPES[c]
        for fault in INTERRUPTS.values():
            if fault.channel == "context" or fault.channel in call.channels:
                yield call, fault


# --------------------------------------------------------------------------- the check
def check_fault(sc: Scenario, call: CallType, fault: Fault, *, clean: Tensor | None = None, user_hooks: UserHooks | None = None) -> None:
    """Run ``call`` with ``fault``; then the model must be exactly as before, the
    outputs bit-identical to the untouched copy, and the clean call reproducible."""
    if clean is None:
        clean = sc.clean(call)
    n_att = len(sc.lab.attachments)
    before = snapshot(sc.model)
    result = None
    with fault.context(sc):
        if fault.expect is None:
            result = call.fn(sc, fault)
        else:
            try:
                call.fn(sc, fault)
            except fault.expect as e:
                if fault.match is not None:
                    assert fault.match in str(e), f"{call.name}/{fault.name}: unexpected message {str(e)!r}"
            else:
                raise AssertionError(f"{call.name}/{fault.name}: expected {fault.expect.__name__}, nothing was raised")
    if result is not None and fault.check is not None:
        fault.check(result, clean)
    assert_unchanged(sc.model, before, what=f"{call.name} with fault {fault.name}")
    assert len(sc.lab.attachments) == n_att, "an attachment outlived the call"
    torch.testing.assert_close(plain_logits(sc.model, sc.base), sc.reference_logits(), rtol=0, atol=0)
    again = call.fn(sc, NO_FAULT)
    assert torch.equal(again, clean), f"{call.name} after fault {fault.name} differs from before (max {(again - clean).abs().max()})"
    if user_hooks is not None:
        check_user_hooks(user_hooks, sc.model, sc.base)


class _Allocations(TorchDispatchMode):
    """Weak references to every tensor the ATen operators return while active."""

    def __init__(self):
        super().__init__()
        self.refs: list[weakref.ref] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, Tensor):
                self.refs.append(weakref.ref(t))
        return out


def _known_tensors(*roots) -> set[int]:
    """Ids of the tensors that exist before a call (inputs, parameters, buffers, their grads, memos)."""
    known: set[int] = set()

    def add(x) -> None:
        if isinstance(x, Tensor):
            known.add(id(x))
            if x.grad is not None:
                known.add(id(x.grad))
        elif isinstance(x, dict):
            for v in x.values():
                add(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                add(v)
        elif isinstance(x, nn.Module):
            for t in x.state_dict(keep_vars=True).values():
                add(t)

    for r in roots:
        add(r)
    return known


def check_interrupt(sc: Scenario, call: CallType, fault: Fault, *, clean: Tensor | None = None) -> None:
    """RELIABILITY row 15: ``call`` interrupted by ``fault`` (a ``BaseException``); then no tensor of the
    failed call is alive, the model is exactly as before (hooks, flags, tensors), the plain model equals the
    untouched copy, and the next call's outputs equal the clean call's bit for bit."""
    if clean is None:
        clean = sc.clean(call)
    n_att = len(sc.lab.attachments)
    before = snapshot(sc.model)
    known = _known_tensors(sc.base, sc.source, sc.other, sc.model, sc._memo)
    seen = _Allocations()
    raised = False
    with fault.context(sc):
        try:
            with seen:
                call.fn(sc, fault)
        except fault.expect:  # type: ignore[misc]
            raised = True
    assert raised, f"{call.name}/{fault.name}: expected {fault.expect.__name__}, nothing was raised"  # type: ignore[union-attr]
    gc.collect()
    left = [t for t in (r() for r in seen.refs) if t is not None and id(t) not in known]
    assert not left, f"{call.name}/{fault.name}: {len(left)} tensors of the failed call are still alive: " + ", ".join(
        f"{tuple(t.shape)} {t.dtype}" for t in left[:8])
    assert_unchanged(sc.model, before, what=f"{call.name} interrupted by {fault.name}")
    assert len(sc.lab.attachments) == n_att, "an attachment outlived the call"
    with call.plain_context(sc):
        torch.testing.assert_close(plain_logits(sc.model, sc.base), sc.reference_logits(), rtol=0, atol=0)
    again = call.fn(sc, NO_FAULT)
    assert torch.equal(again, clean), f"{call.name} after {fault.name} differs from before (max {(again.float() - clean.float()).abs().max()})"


# --------------------------------------------------------------------------- speed
def _one_thread():
    # one intra-op thread: tiny models are overhead-bound (25x faster on a loaded 2-core box), and
    # even SmolLM2-135M ran 15x faster than with 2 threads while other jobs shared the cores
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def one_thread_fixture():
    """An autouse fixture for a test module: its tests run with one intra-op thread.
    In the module: ``_one_thread = one_thread_fixture()``."""
    import pytest

    return pytest.fixture(autouse=True)(_one_thread)
