"""RELIABILITY row 15: interrupts. ``KeyboardInterrupt``, ``SystemExit`` and ``GeneratorExit``, raised
from a hook (the user's, mid-forward), from an intervention and from a source run, in every call type:
per-call (run, execute, collect, generate, sweep, a DAS step, the nnsight engine, a ``reft.train``
step) and attached (a ReftModel's forward and generate, its interventions attached across calls).

PyTorch runs ``always_call`` forward hooks on ``Exception`` only, so an interrupt skips every
post-hook of the forward it stops. After each interrupted call: no tensor the failed call made is
still alive (weak references to every tensor its operators returned), the model's hooks, flags and
tensors are as before, the plain model equals an untouched copy bit for bit, and the next call's
outputs equal the same call's before the interrupt, bit for bit (per-example positions included:
the bug this row was written for dropped them after an interrupt, for good).
"""

from __future__ import annotations

import pytest
import torch

from tests.archs import tiny_model
from tests.reliability import INTERRUPTS, NO_FAULT, Scenario, attached_reft, check_interrupt, interrupt_cases, one_thread_fixture

_one_thread = one_thread_fixture()

PER_CALL = ["run", "execute", "collect", "generate", "sweep", "das_step", "attached_step", "execute_nnsight", "reft_train_step"]
ATTACHED = ["reft_forward", "reft_generate"]
CASES = [pytest.param(c, f, id=f"{c.name}-{f.name}") for c, f in interrupt_cases(PER_CALL + ATTACHED)]
_SC: dict[str, Scenario] = {}
_CLEAN: dict[tuple[str, str], torch.Tensor] = {}


def _scenario(kind: str) -> Scenario:
    """One scenario for per-call types and one for attached ones (whose ReftModel stays attached)."""
    if kind not in _SC:
        _SC[kind] = Scenario.of(tiny_model("llama"))
        if kind == "attached":
            attached_reft(_SC[kind])
    return _SC[kind]


@pytest.mark.parametrize("call,fault", CASES)
def test_interrupt_leaves_nothing_behind(call, fault):
    sc = _scenario("attached" if call.name in ATTACHED else "per_call")
    key = (call.name, "llama")
    if key not in _CLEAN:
        _CLEAN[key] = call.fn(sc, NO_FAULT)
    check_interrupt(sc, call, fault, clean=_CLEAN[key])


def test_the_battery_is_complete():
    """Three interrupt kinds x three places; every call type meets every place it has."""
    assert len(INTERRUPTS) == 9
    pairs = list(interrupt_cases(PER_CALL + ATTACHED))
    for name in PER_CALL + ATTACHED:
        n = sum(c.name == name for c, _ in pairs)
        assert n >= (3 if name == "collect" else 6), (name, n)  # hook, and intervention where the call takes one
    assert sum(f.channel == "source_run" for _, f in pairs) >= 3 * 6


def _interrupt_mid_forward(sc: Scenario, run) -> None:
    block = sc.lab.layers[1]
    h = block.register_forward_hook(lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        with pytest.raises(KeyboardInterrupt):
            run()
    finally:
        h.remove()


def test_an_interrupted_reft_forward_keeps_per_example_positions():
    """A ``KeyboardInterrupt`` inside an attached ReftModel's forward (the notebook case): the next
    forwards with per-example positions give exactly the uninterrupted numbers."""
    sc = _scenario("attached")
    rm = attached_reft(sc)
    pos = torch.tensor([[[0], [6]], [[1], [4]]])  # example 1 has 5 real tokens
    with torch.no_grad():
        want = rm(**sc.base, intervention_positions=pos).logits
        _interrupt_mid_forward(sc, lambda: rm(**sc.base, intervention_positions=pos))
        assert torch.equal(rm(**sc.base, intervention_positions=pos).logits, want)
        with rm.disabled():
            assert torch.equal(sc.model(**sc.base).logits, sc.reference_logits())


def test_an_interrupted_raw_forward_while_attached_is_harmless():
    """The same with a plain ``model(...)`` forward while interventions are attached (only the
    pre-hook ran; its context is recognised as left over and dropped by the next forward)."""
    import steerlab as sl

    sc = _scenario("per_call")
    add = sl.Add(sc.site(1, "resid_post"), torch.full((sc.width,), 2.0), positions=[0])
    pos = torch.tensor([[6], [4]])  # overrides [0] for every forward: a dropped override would silently edit position 0
    with sc.lab.attach(add, positions=pos), torch.no_grad():
        want = sc.model(**sc.base).logits
        _interrupt_mid_forward(sc, lambda: sc.model(**sc.base))
        assert torch.equal(sc.model(**sc.base).logits, want)
        assert not torch.equal(sc.lab.run(sc.base, [sl.Add(add.site, add.vector, positions=[0])]).logits, want)


_LEAK: list = []


def _leaky(sc: Scenario, f) -> torch.Tensor:
    """A call that keeps a tensor of its forward in a global (or state on the model) and is then interrupted."""
    out = sc.lab.run(sc.base).logits
    if f is not NO_FAULT:
        _LEAK.append(out * 2)
        raise KeyboardInterrupt
    return out


def test_the_checker_sees_a_tensor_left_alive():
    from tests.reliability import CallType, Fault

    sc = _scenario("per_call")
    call = CallType("leaky", _leaky, frozenset())
    fault = Fault("kbd", "context", KeyboardInterrupt)
    with pytest.raises(AssertionError, match="tensors of the failed call are still alive"):
        check_interrupt(sc, call, fault)
    _LEAK.clear()
    check_interrupt(sc, CallType("clean", lambda sc, f: _leaky(sc, NO_FAULT) if f is NO_FAULT else (_ for _ in ()).throw(KeyboardInterrupt()),
                                 frozenset()), fault)
