"""RELIABILITY rows 1 and 2 for ReFT: a ReftModel training step under every fault the battery knows.

The call type ``reft_step`` builds a ReftModel (LoReFT at two layers, per-example
positions), runs one forward / backward / optimiser step with the fault's
injections, and unwraps it, even when the step raised. Afterwards the model
must be exactly as found (hooks, flags, tensors), the user's hooks still
registered and firing, and a clean step must reproduce bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from steerlab import reft
from tests.archs import tiny_model
from tests.reliability import (
    NO_FAULT,
    CallType,
    Fault,
    Scenario,
    UserHooks,
    check_fault,
    fault_cases,
    one_thread_fixture,
    register_call_type,
)

_one_thread = one_thread_fixture()


def _call_reft_step(sc: Scenario, f: Fault) -> torch.Tensor:
    torch.manual_seed(0)
    rm = reft.get_reft_model(sc.model, reft.ReftConfig(layers=[0, 1], rank=2, positions="f1+l1"), stack=True)  # the scenario's lab wraps it too
    try:
        opt = torch.optim.AdamW([p for p in rm.parameters() if p.requires_grad], lr=0.1)
        lengths = sc.base["attention_mask"].sum(-1)
        pos = f.positions(sc)
        pos = reft.prompt_positions(lengths, rm.positions) if pos is None else pos  # a bad one is found in the forward
        with sc.lab.attach(f.interventions(sc, sc.site(1, "mlp.out"))):
            out = rm(**sc.base, intervention_positions=pos, **f.model_kwargs(sc))
            loss = f.backward_wrap(torch.nn.functional.cross_entropy(out.logits[:, -1].float(), torch.tensor([5, 9])))
            loss.backward()
            opt.step()
        return torch.cat([out.logits.detach().flatten(), *(p.detach().flatten() for p in rm.interventions.parameters())])
    finally:
        rm.unwrap()


REFT_STEP = register_call_type(CallType("reft_step", _call_reft_step, frozenset({"intervention", "kwargs", "positions", "backward"})))
CASES = [pytest.param(c, f, id=f.name) for c, f in fault_cases(["reft_step"])]
_SCENARIOS: dict[str, tuple[Scenario, UserHooks, torch.Tensor]] = {}


def _scenario(arch: str) -> tuple[Scenario, UserHooks, torch.Tensor]:
    if arch not in _SCENARIOS:
        model = tiny_model(arch)
        sc = Scenario.of(model)
        hooks = UserHooks().install(model, sc.lab.layers, [sc.lab.resolve(sc.site(1, "mlp.out")).module])
        _SCENARIOS[arch] = (sc, hooks, REFT_STEP.fn(sc, NO_FAULT))
    return _SCENARIOS[arch]


def test_the_reft_step_meets_enough_faults():
    assert len(CASES) >= 12


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("call,fault", CASES)
def test_reft_step_fault_leaves_model_as_found(arch, call, fault):
    sc, hooks, clean = _scenario(arch)
    check_fault(sc, call, fault, clean=clean, user_hooks=hooks)
