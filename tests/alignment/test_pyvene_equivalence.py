"""The distributed interchange DAS trains equals pyvene's LowRankRotatedSpaceIntervention
(outputs and gradients), on a tiny LLaMA with different base and source positions."""

from __future__ import annotations

import pyvene as pv
import torch

import steerlab as sl
from steerlab.alignment._activations import Runner
from tests.archs import tiny_model
from tests.reliability import one_thread_fixture

_one_thread = one_thread_fixture()

LAYER, K, D = 1, 4, 32
BASE_POS = [[3], [5]]  # per example, real-token indices (no padding: pyvene's indices are padded ones)
SOURCE_POS = [[4], [2]]


def _inputs(seed: int) -> dict:
    ids = torch.randint(3, 90, (2, 7), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_interchange_and_gradient_equal_pyvene():
    ours_model, theirs_model = tiny_model("llama"), tiny_model("llama")
    lab = sl.wrap(ours_model)
    base, source = _inputs(1), _inputs(2)
    R = torch.linalg.qr(torch.randn(D, K, generator=torch.Generator().manual_seed(3)))[0].T.contiguous()
    das = sl.SubspaceInterchange(f"blocks.{LAYER}.resid_post", size=K, width=D, init=R, source=source)
    probe = torch.randn(2, 7, 96, generator=torch.Generator().manual_seed(4))
    used = []  # the R this forward materialised (a forward hook on the map sees each R it hands out)
    handle = das.rotation.register_forward_hook(lambda m, a, r: used.append(r))
    out = lab.run(base, [das], positions=torch.tensor(BASE_POS), source_positions=torch.tensor(SOURCE_POS)).logits
    handle.remove()
    assert len({id(r) for r in used}) == 1  # one R for the whole forward
    r_used = used[0]
    r_used.retain_grad()
    (out * probe).sum().backward()

    cfg = pv.IntervenableConfig([{"layer": LAYER, "component": "block_output", "low_rank_dimension": K,
                                  "intervention_type": pv.LowRankRotatedSpaceIntervention}])
    ivm = pv.IntervenableModel(cfg, theirs_model)
    ivm.disable_model_gradients()
    piv = next(iter(ivm.interventions.values()))
    piv = piv[0] if isinstance(piv, tuple) else piv
    leaf = pv.models.interventions.LowRankRotateLayer(D, K, init_orth=False)
    with torch.no_grad():
        leaf.weight.copy_(R.T)
    piv.rotate_layer = leaf  # the same maths with a plain leaf, so dL/dR compares directly
    _, theirs = ivm(base, [source], unit_locations={"sources->base": ([SOURCE_POS], [BASE_POS])})
    (theirs.logits * probe).sum().backward()

    torch.testing.assert_close(out, theirs.logits, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(r_used.grad, leaf.weight.grad.T, atol=1e-5, rtol=1e-4)
    # and the subspace edit really acted: the intervened output differs from the plain one
    assert (out - ours_model(**base).logits).abs().max() > 1e-3


def test_runner_step_equals_pyvene_on_a_counterfactual_batch():
    """What a DAS step computes from the cache (prefix, cached source slice) equals pyvene's forward."""
    from steerlab.alignment import CausalModel, CounterfactualDataset, Encoder
    from steerlab.alignment.das import store_for

    class Ids(Encoder):  # inputs are fixed token sequences; the label is the token at position 0's parity
        labels = (0, 1)

        def encode(self, settings):
            ids = torch.stack([_inputs(s["I"])["input_ids"][0] for s in settings])
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

        def lengths(self, encoded):
            return encoded["attention_mask"].sum(-1)

        def positions(self, name, settings, encoded):
            return torch.full((len(settings), 1), 5)

        def scores(self, output):
            return output.logits[:, -1, :2]

    cm = CausalModel({"I": tuple(range(6)), "P": (0, 1)}, {"P": ["I"]}, {"P": lambda i: i % 2})
    data = CounterfactualDataset.from_pairs(cm, Ids(), [{"I": i} for i in range(3)], {"P": [{"I": i + 3} for i in range(3)]})
    model, theirs_model = tiny_model("llama"), tiny_model("llama")
    lab = sl.wrap(model)
    site = f"blocks.{LAYER}.resid_post"
    runner = Runner(store_for(lab, [data], [site]), data, site, "five")
    R = torch.linalg.qr(torch.randn(D, K, generator=torch.Generator().manual_seed(3)))[0].T.contiguous()
    ours = runner.run(torch.arange(3), [sl.SubspaceInterchange(site, size=K, width=D, init=R)])

    cfg = pv.IntervenableConfig([{"layer": LAYER, "component": "block_output", "low_rank_dimension": K,
                                  "intervention_type": pv.LowRankRotatedSpaceIntervention}])
    ivm = pv.IntervenableModel(cfg, theirs_model)
    piv = next(iter(ivm.interventions.values()))
    piv = piv[0] if isinstance(piv, tuple) else piv
    leaf = pv.models.interventions.LowRankRotateLayer(D, K, init_orth=False)
    with torch.no_grad():
        leaf.weight.copy_(R.T)
    piv.rotate_layer = leaf
    batch = data.collate(range(3))
    locs = [[[5]] * 3]
    _, out = ivm(batch.base, [batch.sources["P"]], unit_locations={"sources->base": (locs, locs)})
    torch.testing.assert_close(ours, out.logits[:, -1, :2], atol=2e-6, rtol=1e-5)
