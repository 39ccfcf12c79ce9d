"""RELIABILITY row 1: hook hygiene under faults, every fault kind x every call type.

After each faulty call: every module's hook registries, instance attributes,
flags and tensors exactly as before; plain outputs bit-identical to an
untouched deep copy; the same call without the fault reproducing its earlier
result bit for bit (a fault must not corrupt later calls).
"""

from __future__ import annotations

import pytest
import torch

import steerlab as sl
from tests.archs import tiny_model
from tests.reliability import (
    CALL_TYPES,
    FAULTS,
    NO_FAULT,
    Scenario,
    UserHooks,
    assert_unchanged,
    check_fault,
    fault_cases,
    one_thread_fixture,
    plain_logits,
    snapshot,
)

_one_thread = one_thread_fixture()

_SCENARIOS: dict[str, tuple[Scenario, UserHooks]] = {}
_CLEAN: dict[tuple[str, str], object] = {}


def scenario(arch: str) -> tuple[Scenario, UserHooks]:
    if arch not in _SCENARIOS:
        model = tiny_model(arch)
        sc = Scenario.of(model)
        hooks = UserHooks().install(model, sc.lab.layers, [sc.lab.resolve(sc.site(1, "mlp.out")).module])
        _SCENARIOS[arch] = (sc, hooks)
    return _SCENARIOS[arch]


def clean(arch: str, call) -> object:
    key = (arch, call.name)
    if key not in _CLEAN:
        sc, _ = scenario(arch)
        _CLEAN[key] = call.fn(sc, NO_FAULT)
    return _CLEAN[key]


BASE_CALLS = ["run", "execute", "collect", "generate", "attached_step", "das_step"]  # other layers register theirs
CASES = [pytest.param(c, f, id=f"{c.name}-{f.name}") for c, f in fault_cases(BASE_CALLS)]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("call,fault", CASES)
def test_fault_leaves_model_as_found(arch, call, fault):
    sc, hooks = scenario(arch)
    check_fault(sc, call, fault, clean=clean(arch, call), user_hooks=hooks)


def test_the_matrix_is_wide():
    """>= 10 fault kinds, each call type meets >= 8 of them, and every fault kind meets >= 2 call types."""
    pairs = list(fault_cases(BASE_CALLS))
    assert len(FAULTS) >= 10 and set(BASE_CALLS) <= set(CALL_TYPES)
    for name in BASE_CALLS:
        n = sum(c.name == name for c, _ in pairs)
        assert n >= (4 if name == "collect" else 8), (name, n)
    for f in FAULTS:
        assert sum(ff.name == f for _, ff in pairs) >= 2 or f in ("stopping_criterion_raises", "decode_step_raises"), f


# --------------------------------------------------------------------------- re-entrancy semantics
def _nested_call(model, inputs, box):
    """A Lambda body that calls the model from inside the forward (once) and keeps the result."""

    def fn(h):
        if "logits" not in box:
            box["logits"] = None
            with torch.no_grad():
                box["logits"] = model(**inputs).logits
        return h

    return fn


@pytest.mark.parametrize("with_prefix", [False, True])
def test_a_forward_nested_in_a_per_call_run_is_not_intervened(with_prefix):
    """The per-call lifetime covers the call's own forward; a forward an intervention starts
    inside it (another batch shape) runs the plain model, every block included."""
    sc, _ = scenario("llama")
    add = lambda: sl.Add(sc.site(2, "resid_post"), torch.full((sc.width,), 3.0), positions=[-1])  # noqa: E731
    prefix = sc.lab.prefix(sc.base, 2) if with_prefix else None
    box: dict = {}
    got = sc.lab.run(sc.base, [sl.Lambda(sc.site(2, "attn.out"), _nested_call(sc.model, sc.other, box)), add()], prefix=prefix).logits
    want = sc.lab.run(sc.base, [add()], prefix=prefix).logits
    assert torch.equal(got, want)
    assert torch.equal(box["logits"], plain_logits(sc.reference, sc.other))


def test_a_forward_nested_in_an_attached_forward_is_intervened():
    """Attached interventions act on every forward, a nested one included, each with its own positions."""
    sc, _ = scenario("llama")
    v = torch.full((sc.width,), 3.0)
    box: dict = {}
    with sc.lab.attach([sl.Lambda(sc.site(0, "attn.out"), _nested_call(sc.model, sc.other, box)), sl.Add(sc.site(1, "resid_post"), v, positions=[-1])]):
        with torch.no_grad():
            got = sc.model(**sc.base).logits
    assert torch.equal(got, sc.lab.run(sc.base, [sl.Add(sc.site(1, "resid_post"), v, positions=[-1])]).logits)
    assert torch.equal(box["logits"], sc.lab.run(sc.other, [sl.Add(sc.site(1, "resid_post"), v, positions=[-1])]).logits)
    assert not torch.equal(box["logits"], plain_logits(sc.reference, sc.other))


# --------------------------------------------------------------------------- the checker itself can fail
def _leak_hook(m):
    m.model.layers[0].register_forward_hook(lambda *a: None)


def _leak_kw_pre_hook(m):
    m.model.norm.register_forward_pre_hook(lambda *a, **k: None, with_kwargs=True)


def _leak_backward_hook(m):
    m.lm_head.register_full_backward_hook(lambda *a: None)


def _patch_forward(m):
    m.model.layers[1].forward = lambda *a, **k: None


def _flip_requires_grad(m):
    w = m.model.layers[0].mlp.up_proj.weight
    w.requires_grad_(not w.requires_grad)


def _edit_in_place(m):
    with torch.no_grad():
        m.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3


def _train_mode(m):
    m.model.layers[2].train()


def _global_hook(m):
    return torch.nn.modules.module.register_module_forward_hook(lambda *a: None)


def _new_attribute(m):
    m.model.layers[0]._steerlab_state = 1


@pytest.mark.parametrize("leak", [_leak_hook, _leak_kw_pre_hook, _leak_backward_hook, _patch_forward, _flip_requires_grad,
                                  _edit_in_place, _train_mode, _global_hook, _new_attribute], ids=lambda f: f.__name__)
def test_the_snapshot_sees_every_kind_of_leftover(leak):
    model = tiny_model("llama")
    before = snapshot(model)
    assert_unchanged(model, before)
    handle = leak(model)
    try:
        with pytest.raises(AssertionError, match="left the model changed"):
            assert_unchanged(model, before)
    finally:
        if handle is not None:
            handle.remove()


# --------------------------------------------------------------------------- real weights
@pytest.fixture(scope="module")
def smollm_scenario(smollm):
    model, tok = smollm
    sc = Scenario.of(model, tok)
    hooks = UserHooks().install(model, sc.lab.layers, [sc.lab.resolve(sc.site(1, "mlp.out")).module])
    yield sc, hooks
    hooks.remove()
    sc.lab.unwrap()


SMOLLM_CASES = [
    ("run", "model_raises_mid_forward"),
    ("execute", "iv_reentrant"),
    ("collect", "keyboard_interrupt_mid_forward"),
    ("generate", "decode_step_raises"),
    ("attached_step", "iv_backward_raises"),
    ("das_step", "user_hook_raises"),
]


@pytest.mark.parametrize("call,fault", SMOLLM_CASES, ids=[f"{c}-{f}" for c, f in SMOLLM_CASES])
def test_fault_on_smollm(smollm_scenario, call, fault):
    sc, hooks = smollm_scenario
    check_fault(sc, CALL_TYPES[call], FAULTS[fault], user_hooks=hooks)


def test_collect_stops_after_the_last_collected_site():
    """A collect is a source-like run: it stops right after its last site (the engine's early exit)."""
    sc, _ = scenario("llama")
    ran = []
    handles = [layer.register_forward_pre_hook(lambda m, a, i=i: ran.append(i)) for i, layer in enumerate(sc.lab.layers)]
    try:
        cache = sc.lab.collect(sc.base, ["blocks.0.resid_post", "blocks.1.attn.z"])
    finally:
        for h in handles:
            h.remove()
    assert ran == [0, 1]
    assert set(cache.keys()) == {"blocks.0.resid_post", "blocks.1.attn.z"}
