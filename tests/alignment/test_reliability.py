"""RELIABILITY row 1 for the alignment layer: a DAS step through steerlab.alignment (activation
store, cached prefix, KV-cache suffix, cached source slices) under every fault that can reach it."""

from __future__ import annotations

import pytest
import torch

from steerlab.alignment import CausalModel, CounterfactualDataset, Encoder
from steerlab.alignment._activations import Runner
from steerlab.alignment.das import build_subspace_interventions, store_for
from tests.archs import tiny_model
from tests.reliability import NO_FAULT, CallType, Scenario, check_fault, fault_cases, one_thread_fixture, register_call_type

_one_thread = one_thread_fixture()


class _Rows(Encoder):
    """Inputs are rows of a fixed padded batch; the answer is read at the last real token."""

    labels = (0, 1)

    def __init__(self, table: dict):
        self.table = table

    def encode(self, settings):
        rows = [s["I"] for s in settings]
        return {k: v[rows] for k, v in self.table.items()}

    def lengths(self, encoded):
        return encoded["attention_mask"].sum(-1)

    def positions(self, name, settings, encoded):
        return (self.lengths(encoded) - 1)[:, None]

    def scores(self, output):
        return output.logits[:, -1, :2]


def _call_alignment_das_step(sc: Scenario, f) -> torch.Tensor:
    torch.manual_seed(0)
    source = f.source_inputs(sc, sc.source)
    table = {k: torch.cat([sc.base[k], source[k]]) for k in ("input_ids", "attention_mask")}
    cm = CausalModel({"I": (0, 1, 2, 3), "P": (0, 1)}, {"P": ["I"]}, {"P": lambda i: i % 2})
    data = CounterfactualDataset.from_pairs(cm, _Rows(table), [{"I": 0}, {"I": 1}], {"P": [{"I": 2}, {"I": 3}]})
    site = sc.site(1, "resid_post")
    runner = Runner(store_for(sc.lab, [data], [site]), data, site, "last")
    assert runner.start > 0  # the KV-cache suffix path
    ivs = build_subspace_interventions(site, {"P": 2}, sc.width, seed=0)
    opt = torch.optim.Adam(ivs[0].parameters(), lr=0.05)
    rows = torch.arange(2)
    scores = runner.run(rows, [*ivs, *f.interventions(sc, sc.site(2, "mlp.out"))])
    loss = f.backward_wrap(torch.nn.functional.cross_entropy(scores.float(), runner.labels(rows)))
    loss.backward()
    opt.step()
    return torch.cat([scores.detach().flatten(), ivs[0].R.detach().flatten()])


CALL = register_call_type(CallType("alignment_das_step", _call_alignment_das_step, frozenset({"intervention", "source", "backward"})))
CASES = [pytest.param(c, f, id=f"{c.name}-{f.name}") for c, f in fault_cases([CALL.name])]
_SCENARIOS: dict[str, Scenario] = {}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("call,fault", CASES)
def test_alignment_das_step_under_faults(arch, call, fault):
    if arch not in _SCENARIOS:
        _SCENARIOS[arch] = Scenario.of(tiny_model(arch))
    sc = _SCENARIOS[arch]
    check_fault(sc, call, fault)


def test_the_step_trains():
    sc = Scenario.of(tiny_model("llama"))
    a = _call_alignment_das_step(sc, NO_FAULT)
    assert torch.isfinite(a).all()
    assert torch.equal(a, _call_alignment_das_step(sc, NO_FAULT))  # reproducible bit for bit
    init = build_subspace_interventions(sc.site(1, "resid_post"), {"P": 2}, sc.width, seed=0)[0].R.detach().flatten()
    after = a[-init.numel():]
    assert (after - init).abs().max() > 1e-4  # the optimiser step moved R
    r = after.view(2, sc.width)
    torch.testing.assert_close(r @ r.T, torch.eye(2), atol=1e-5, rtol=0)  # and R stayed orthonormal
