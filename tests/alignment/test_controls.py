"""The controls mean what they say: each test builds a case whose right answer is known by
construction and checks the control against it (or against a by-hand computation)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import steerlab as sl
from steerlab.alignment import CausalModel, CounterfactualDataset, VectorEncoder
from steerlab.alignment._activations import Runner
from steerlab.alignment.controls import bound_rows, full_vector_bound, localist_alignment, random_init, reinitialise
from steerlab.alignment.das import store_for
from steerlab.interventions.errors import ConfigError
from steerlab.interventions.orthonormal import Orthonormal
from tests.reliability import one_thread_fixture

_one_thread = one_thread_fixture()


class _Xor(nn.Module):
    """``x = [a, b]`` -> site ``h = [b, .3, a, .7, a + b]`` -> logits ``[.25, (h2 - h0)^2]``: the output
    is ``a xor b`` read from coordinates 2 (``A``) and 0 (``B``); coordinate 4 mixes both."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(2, 5)
        with torch.no_grad():
            self.layer.weight.copy_(torch.tensor([[0.0, 1.0], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [1.0, 1.0]]))
            self.layer.bias.copy_(torch.tensor([0.0, 0.3, 0.0, 0.7, 0.0]))

    def forward(self, x):
        h = self.layer(x)
        return torch.stack([torch.full_like(h[:, 0], 0.25), (h[:, 2] - h[:, 0]) ** 2], -1)


def _xor_task(n: int = 200, seed: int = 0):
    cm = CausalModel({"A": (0, 1), "B": (0, 1), "VA": (0, 1), "VB": (0, 1), "O": (0, 1)},
                     {"VA": ["A"], "VB": ["B"], "O": ["VA", "VB"]},
                     {"VA": lambda a: a, "VB": lambda b: b, "O": lambda x, y: x ^ y})
    enc = VectorEncoder(lambda s: torch.tensor([float(s["A"]), float(s["B"])]), labels=(0, 1))
    data = CounterfactualDataset.sample(cm, enc, n, intervene=[["VA", "VB"], ["VA"], ["VB"]], seed=seed)
    lab = sl.wrap(_Xor(), example_input=torch.zeros(1, 2))
    return cm, data, lab


def _iia_by_hand(lab, data, dims: dict[str, list[int]], rows) -> float:
    """Interchange(site, dims=...) run from the inputs (no activation cache)."""
    batch = data.collate([int(r) for r in rows])
    ivs = [sl.Interchange("module:layer:output", dims=d, source=batch.sources[v]) for v, d in dims.items()]
    pred = lab.run(batch.base, ivs).logits.argmax(-1)
    return (pred == batch.labels).float().mean().item()


def test_localist_picks_the_known_best_split_exhaustively():
    _, data, lab = _xor_task()
    site = "module:layer:output"
    runner = Runner(store_for(lab, [data], [site]), data, site, None)
    loc = localist_alignment(runner, runner, {"VA": 1, "VB": 1}, 5, selection_size=10_000)
    assert loc.exhaustive and loc.method == "exhaustive: all 20 disjoint neuron assignments (sizes 1, 1 of 5)"
    assert loc.dims == {"VA": [2], "VB": [0]}  # the construction's answer (the swapped split scores far lower)
    assert loc.selection_iia == 1.0 and loc.iia["all"].value == 1.0
    # every candidate's selection score, recomputed through the plain engine, and the chosen one is the best
    rows = loc.selection_rows
    assert len(loc.candidates) == 20
    by_hand = [_iia_by_hand(lab, data, {"VA": list(a), "VB": list(b)}, rows) for a, b in loc.candidates]
    assert loc.scores.tolist() == pytest.approx(by_hand, abs=1e-9)
    best = max(by_hand)
    assert [c for c, x in zip(loc.candidates, by_hand) if x == best] == [[(2,), (0,)]]
    assert _iia_by_hand(lab, data, {"VA": [0], "VB": [2]}, rows) < 0.8  # the wrong order really is worse


def test_sampled_localist_picks_the_best_sample_and_says_so():
    _, data, lab = _xor_task()
    site = "module:layer:output"
    runner = Runner(store_for(lab, [data], [site]), data, site, None)
    loc = localist_alignment(runner, runner, {"VA": 2, "VB": 1}, 5, limit=10, samples=6, seed=3, selection_size=10_000)
    assert not loc.exhaustive
    assert loc.method == "best of 6 sampled neuron subsets (sizes 2, 1 of 5; 30 possible; seed 3)"
    assert len(loc.candidates) == 6 and len({tuple(c) for c in loc.candidates}) == 6
    by_hand = [_iia_by_hand(lab, data, {"VA": list(a), "VB": list(b)}, loc.selection_rows) for a, b in loc.candidates]
    assert loc.scores.tolist() == pytest.approx(by_hand, abs=1e-9)
    assert loc.selection_iia == max(by_hand)
    chosen = [list(loc.dims["VA"]), list(loc.dims["VB"])]
    assert chosen in [[list(a), list(b)] for (a, b), x in zip(loc.candidates, by_hand) if x == max(by_hand)]


def test_full_vector_bound_counts_every_variable_at_the_site():
    cm, data, lab = _xor_task(300)
    assert cm.side_variables("VA") == ("B", "VB") and cm.ancestors("O") == ("A", "B", "VA", "VB")
    rows = bound_rows(data, "VA")
    # kept: VA-only examples whose source agrees with the base on B (then moving B and VB too asks the same)
    want = [i for i, ex in enumerate(data) if ex.intervened == ("VA",) and ex.sources["VA"]["B"] == ex.base["B"]]
    assert rows.tolist() == want and 0 < len(want) < sum(ex.intervened == ("VA",) for ex in data)
    site = "module:layer:output"
    runner = Runner(store_for(lab, [data], [site]), data, site, None)
    bound = full_vector_bound(runner, data)
    iia, kept = bound["VA"]
    assert kept.tolist() == want and iia.n == len(want)
    # on those rows the whole vector swaps A (and B, equal there): it asks exactly what VA does, so IIA 1
    assert iia.value == 1.0
    # over every VA-only example it would have been far lower: the old, unbounded reading
    every = [i for i, ex in enumerate(data) if ex.intervened == ("VA",)]
    assert _iia_by_hand(lab, data, {"VA": [0, 1, 2, 3, 4]}, every) < 0.8


def test_full_vector_flag_on_a_subspace_that_beats_the_whole_vector():
    """A DAS-like edit scored above the full vector on the bounded rows raises the flag; the same
    numbers on unbounded rows (another variable moving too) do not."""
    from steerlab.alignment import DASResult, IIA
    from steerlab.alignment.results import Curve

    def result(bounded_value):
        return DASResult(site="s", positions=None, variables=("VA",), sizes={"VA": 1}, subspaces={},
                         iia={"VA": IIA(0.95, 400, 0.5), "all": IIA(0.95, 400, 0.5)},
                         full_vector={"VA": IIA(0.6, 200, 0.5)}, bounded={"VA": IIA(bounded_value, 200, 0.5)}, curve=Curve())

    assert [r["above_full_vector"] for r in result(0.95).rows()] == [True]
    assert "suspect an illusion" in str(result(0.95))
    assert [r["above_full_vector"] for r in result(0.62).rows()] == [False]


def test_orthonormal_init_returns_it_exactly():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    for k in (1, 4, 16):
        b = q[:, :k].T.contiguous() * torch.tensor([1.0, -1.0] * 8)[:k, None]  # rows of both signs
        for basis in (b, -b):
            got = Orthonormal(16, k, init=basis)()
            torch.testing.assert_close(got, basis, atol=10 * 16 * torch.finfo(torch.float32).eps, rtol=0)


def test_loreft_from_subspace_keeps_the_basis():
    from steerlab.reft import LoReFT

    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(32, 4, generator=g))
    basis = (q.T * torch.tensor([1.0, -1.0, -1.0, 1.0])[:, None]).contiguous()
    sub = sl.Subspace(basis, "blocks.1.resid_post", positions=-1)
    iv = LoReFT.from_subspace(sub)
    torch.testing.assert_close(iv.R, sub.basis, atol=10 * 32 * torch.finfo(torch.float32).eps, rtol=0)
    assert not iv.rotation.weight.requires_grad


def _tiny_hf(tmp_path):
    import transformers as T

    cfg = T.LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                        intermediate_size=32)
    torch.manual_seed(0)
    T.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "m")
    return T.AutoModelForCausalLM.from_pretrained(tmp_path / "m")  # loaded weights, as a user's are


def test_random_init_scopes(tmp_path):
    model = _tiny_hf(tmp_path)
    model.model.embed_tokens.weight.requires_grad_(False)  # the user froze the embeddings
    lab = sl.wrap(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def changed(ri):
        return {n for n, p in ri.lab.model.named_parameters() if not torch.equal(p, before[n])}

    every = random_init(lab, scope="all")
    # every weight matrix of a loaded checkpoint is re-drawn
    mats = {n for n, p in model.named_parameters() if p.dim() == 2}
    assert mats <= changed(every)
    assert every.description.startswith("all modules re-initialised (") and "seed 0" in every.description
    trained = random_init(lab, scope="trained")
    assert "model.embed_tokens.weight" not in changed(trained) and mats - {"model.embed_tokens.weight", "lm_head.weight"} <= changed(trained)
    assert trained.description.startswith("the ") and "modules with trained parameters re-initialised" in trained.description
    named = random_init(lab, scope=["model.layers.1"])
    assert changed(named) and all(n.startswith("model.layers.1.") for n in changed(named))
    assert {n for n in mats if n.startswith("model.layers.1.")} <= changed(named)
    assert named.description.startswith("modules model.layers.1 re-initialised (")
    pattern = random_init(lab, scope=["model.layers.*.mlp"])
    assert pattern.modules == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert all(".mlp." in n for n in changed(pattern))
    # the lab's own model is untouched and still frozen
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(ConfigError, match=r"random-init scope: no submodule matches 'model.layer.1'; did you mean"):
        random_init(lab, scope=["model.layer.1"])
    with pytest.raises(ConfigError, match=r"random-init scope 'everything': expected 'all', 'trained' or a list of module paths"):
        random_init(lab, scope="everything")
    lab.unwrap()


def test_reinitialise_refuses_a_module_it_cannot_change():
    class Frozen(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

    with pytest.raises(ConfigError, match=r"could not re-initialise Frozen: none of the modules there has reset_parameters"):
        reinitialise(Frozen())


def test_das_reports_its_controls():
    """DAS on the xor network: the result names its random-init scope and its localist search, the
    localist cell in the printed table says exhaustive, and the full-vector bound sits on its rows."""
    from steerlab.alignment import DAS

    _, data, lab = _xor_task(300)
    das = DAS(lab, site="module:layer:output", size=1, epochs=2, batch_size=32, random_init_scope=["layer"])
    with pytest.raises(AttributeError, match=r"is not fitted yet: call fit\(train, test\) first"):
        das.subspaces
    r = das.fit(data)
    assert das.result is r and das.subspaces is r.subspaces and das.iia is r.iia
    assert r.random_init_scope.startswith("modules layer re-initialised (15 of 15 parameters; seed 0)")
    text = str(r)
    assert "random-init: modules layer re-initialised" in text and "(exhaustive)" in text
    rows = {row["variable"]: row for row in r.rows()}
    assert rows["VA"]["localist_search"] == "exhaustive"
    assert rows["VA"]["full_vector_n"] == len(bound_rows(data, "VA")) and rows["VA+VB"]["full_vector"] is None
    assert set(r.bounded) == {"VA", "VB"} and r.bounded["VA"].n == rows["VA"]["full_vector_n"]
