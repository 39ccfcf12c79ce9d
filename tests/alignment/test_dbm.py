"""Desiderata-based masking on networks whose units are known by construction (neurons, positions),
and on a tiny LLaMA's heads checked against the plain engine."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import steerlab as sl
from steerlab.alignment import DBM, CausalModel, CounterfactualDataset, Encoder, mask_tradeoff
from steerlab.interventions.errors import ConfigError
from tests.alignment.test_controls import _iia_by_hand, _xor_task
from tests.reliability import one_thread_fixture

_one_thread = one_thread_fixture()


def test_neuron_masks_find_the_known_units():
    _, data, lab = _xor_task(400)
    dbm = DBM(lab, site="module:layer:output", sparsity=0.3, epochs=6, batch_size=32, lr=0.1, seed=0)
    r = dbm.fit(data)
    # coordinate 2 carries A, coordinate 0 carries B; 4 mixes both (a + b), 1 and 3 are constants
    assert r.units == {"VA": [2], "VB": [0]}, str(r)
    assert r.iia["all"].value == 1.0
    # the hard masks' IIA, recomputed with Interchange(site, dims=...) from the inputs
    assert _iia_by_hand(lab, data, r.units, range(len(data))) == 1.0
    assert r.random_mask["all"].value < 0.9 and r.localist["all"].value == 1.0
    assert r.random_init_scope.startswith("all modules re-initialised")
    sub = r.subspace("VA")
    assert torch.equal(sub.basis, torch.eye(5)[[2]]) and sub.metadata["method"] == "DBM"
    assert "DBM over the neurons of 'module:layer:output'" in str(r)
    fig = r.plot()
    assert [list(t.y) for t in fig.data] == [r.soft["VA"], r.soft["VB"]]


def test_tradeoff_curve_closes_units_as_sparsity_grows():
    _, data, lab = _xor_task(400)
    curve = mask_tradeoff(lab, data, site="module:layer:output", sparsities=[0.0, 0.3, 5.0], epochs=6, batch_size=32, lr=0.1)
    units = [row["units"] for row in curve.rows()]
    assert units[0] > units[1] == 2 and units[2] == 0  # nothing pressing: extra units open; a huge weight shuts all
    assert curve.rows()[1]["iia"] == 1.0
    fig = curve.plot()
    assert list(fig.data[0].x) == sorted(units)


class _Tokens(Encoder):
    """Inputs are four tokens ``T0..T3`` (ids 0..3), no padding; the answer is read at the last position."""

    labels = (0, 1)

    def encode(self, settings):
        ids = torch.tensor([[s[f"T{i}"] for i in range(4)] for s in settings])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def lengths(self, encoded):
        return encoded["attention_mask"].sum(-1)

    def scores(self, output):
        return output if isinstance(output, torch.Tensor) else output.logits


class _ReadsPosition2(nn.Module):
    """Embeds four tokens, then answers ``T2 is odd``: only position 2 of the embedding matters."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(4, 3)
        with torch.no_grad():
            self.emb.weight.copy_(torch.tensor([[0.0, 1, 0], [1, 0, 0], [0, 0, 1], [1, 1, 1]]))

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        odd = h[:, 2, 0]
        return torch.stack([0.5 - odd, odd - 0.5], -1)


def test_position_masks_find_the_read_position():
    values = {f"T{i}": (0, 1, 2, 3) for i in range(4)}
    cm = CausalModel({**values, "P": (0, 1), "O": (0, 1)}, {"P": ["T2"], "O": ["P"]}, {"P": lambda t: t % 2, "O": lambda p: p})
    data = CounterfactualDataset.sample(cm, _Tokens(), 300, intervene="P", seed=0)
    lab = sl.wrap(_ReadsPosition2(), example_input={"input_ids": torch.zeros(1, 4, dtype=torch.long)})
    r = DBM(lab, site="module:emb:output", units="positions", sparsity=0.3, epochs=6, batch_size=32, lr=0.1,
            controls=False).fit(data)
    assert r.units == {"P": [2]} and r.n_units == 4 and r.iia["all"].value == 1.0
    with pytest.raises(ConfigError, match="a positions mask selects positions, not a subspace"):
        r.subspace()


def test_head_masks_agree_with_the_plain_engine():
    from tests.archs import tiny_model

    model = tiny_model("llama")
    lab = sl.wrap(model)
    values = {f"T{i}": (5, 6, 7, 8) for i in range(4)}
    cm = CausalModel({**values, "P": (0, 1), "O": (0, 1)}, {"P": ["T1"], "O": ["P"]}, {"P": lambda t: t % 2, "O": lambda p: p})

    class Enc(_Tokens):
        def scores(self, output):
            return output.logits[:, -1, :2]

    data = CounterfactualDataset.sample(cm, Enc(), 120, intervene="P", seed=1)
    site = "blocks.1.attn.z"
    n_heads = lab.facts.site_shape(lab.resolve(site))[0]
    r = DBM(lab, site=site, units="heads", sparsity=0.05, epochs=3, batch_size=32, lr=0.1, controls=False).fit(data)
    assert r.n_units == n_heads and len(r.soft["P"]) == n_heads
    heads = r.units["P"]
    # the reported IIA of the hard head mask, recomputed by an Interchange over those heads from the inputs
    batch = data.collate(range(len(data)))
    if heads:
        out = lab.run(batch.base, [sl.Interchange(site, heads=heads, source=batch.sources["P"])]).logits[:, -1, :2]
    else:
        out = lab.run(batch.base, []).logits[:, -1, :2]
    assert (out.argmax(-1) == batch.labels).float().mean().item() == pytest.approx(r.iia["all"].value, abs=1e-9)
    # a partial hard mask through the cached runner equals Interchange(heads=...) from the inputs, logit for logit
    from steerlab.alignment._activations import Runner
    from steerlab.alignment.das import store_for
    from steerlab.alignment.dbm import UnitMask

    d_head = lab.facts.site_shape(lab.resolve(site))[1]
    m = UnitMask(site, (n_heads, 1), width=d_head, init=-1.0)
    m.hard = True
    with torch.no_grad():
        m.logits[[0, 2]] = 1.0
    runner = Runner(store_for(lab, [data], [site]), data, site, None)
    cached = runner.run(torch.arange(len(data)), [m])
    plain = lab.run(batch.base, [sl.Interchange(site, heads=[0, 2], source=batch.sources["P"])]).logits[:, -1, :2]
    torch.testing.assert_close(cached, plain, atol=1e-5, rtol=0)
    assert (cached - lab.run(batch.base, []).logits[:, -1, :2]).abs().max() > 1e-4  # the edit acted


def test_bad_dbm_arguments():
    _, data, lab = _xor_task(50)
    with pytest.raises(ConfigError, match=r"units='channels': expected one of \['neurons', 'heads', 'positions'\]"):
        DBM(lab, site="module:layer:output", units="channels")
    with pytest.raises(ConfigError, match=r"units='heads' needs a per-head site"):
        DBM(lab, site="module:layer:output", units="heads").fit(data)
    with pytest.raises(AttributeError, match=r"not fitted yet"):
        DBM(lab, site="module:layer:output").result
