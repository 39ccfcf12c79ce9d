"""DAS on the DAS paper's hierarchical-equality task (fast version of benchmarks/das_hierarchical_equality.py).

One trained MLP and one DAS fit (with its controls) are shared by the tests
below; each test checks one property of the result against an independent
computation where one exists.
"""

from __future__ import annotations

import pytest
import torch

import steerlab as sl
from steerlab.alignment import DAS, BoundlessDAS, DASResult
from steerlab.alignment import tasks
from steerlab.interventions.errors import ConfigError, DataError, FingerprintMismatch, SubspaceSizeError
from tests.reliability import assert_unchanged, one_thread_fixture, snapshot

_one_thread = one_thread_fixture()


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    task = tasks.hierarchical_equality()
    mlp, acc = task.train_model(seed=0, n_train=200_000, epochs=3)  # half the recipe: enough for seed 0, half the time
    lab = sl.wrap(mlp, example_input=task.example_input())
    train, test = task.datasets(n_train=8000, n_test=2000, seed=0)
    before = snapshot(mlp)
    result = DAS(lab, site=task.site(1), size=8, epochs=4, batch_size=64, lr=0.01, seed=0).fit(train, test)
    return task, mlp, acc, lab, train, test, result, before


def test_mlp_is_trained_to_99_percent(setup):
    _, _, acc, *_ = setup
    assert acc >= 0.99


def test_das_layer1_both_relations(setup):
    task, _, _, _, _, test, r, _ = setup
    assert r.sizes == {"WX": 8, "YZ": 8}
    assert r.iia["all"].n == len(test) == 2000
    assert r.iia["all"].value >= 0.95, str(r)
    for key in ("WX", "YZ", "WX+YZ"):
        assert r.iia[key].value >= 0.93, str(r)


def test_random_init_control_is_near_chance(setup):
    r = setup[6]
    assert r.random_init is not None and r.chance == 0.5
    assert r.random_init["all"].near_chance, str(r)
    assert abs(r.random_init["all"].value - 0.5) <= 2 * (0.25 / r.random_init["all"].n) ** 0.5


def test_localist_control_is_exhaustive_and_below_das(setup):
    r = setup[6]
    assert r.localist_method == "exhaustive: all 12870 disjoint neuron assignments (sizes 8, 8 of 16)"
    wx, yz = r.localist_dims["WX"], r.localist_dims["YZ"]
    assert len(wx) == len(yz) == 8 and not set(wx) & set(yz)
    # a neuron-aligned subspace is one DAS could have found: the trained DAS must not lose to it
    loc = r.localist["all"]
    assert r.iia["all"].value >= loc.value - 2 * loc.se - 0.01, str(r)


def test_localist_score_equals_dims_interchange(setup):
    """The reported localist IIA is that of Interchange(site, dims=...) run from the inputs (no cache)."""
    task, _, _, lab, _, test, r, _ = setup
    site = task.site(1)
    batch = test.collate(range(300))
    ivs = [sl.Interchange(site, dims=r.localist_dims[v], source=batch.sources[v]) for v in ("WX", "YZ")]
    g = sl.Graph()
    base = g.run(batch.base, ivs)
    pred = lab.execute(g)[base].logits.argmax(-1)
    # rows that do not intervene a variable read the base itself as that variable's source: an identity
    rows = torch.arange(300)
    acc = (pred == batch.labels).float().mean().item()
    from steerlab.alignment._activations import Runner
    from steerlab.alignment.das import store_for
    from steerlab.alignment.iia import evaluate_iia

    store = store_for(lab, [test], [site])
    runner = Runner(store, test, site, None)
    cached = evaluate_iia(
        lambda rr: runner.run(rr, [sl.Interchange(site, dims=r.localist_dims[v]) for v in ("WX", "YZ")],
                              [runner.source_slice(rr, j)[..., r.localist_dims[v]] for j, v in enumerate(("WX", "YZ"))]),
        runner.table.labels, runner.table.intervened, runner.table.variables, rows=rows,
    )["all"].value
    assert acc == pytest.approx(cached, abs=1e-9)
    # and the score the result reports is that interchange's, on every test example
    reported = evaluate_iia(
        lambda rr: runner.run(rr, [sl.Interchange(site, dims=r.localist_dims[v]) for v in ("WX", "YZ")],
                              [runner.source_slice(rr, j)[..., r.localist_dims[v]] for j, v in enumerate(("WX", "YZ"))]),
        runner.table.labels, runner.table.intervened, runner.table.variables,
    )
    assert r.localist["all"].value == pytest.approx(reported["all"].value, abs=1e-9)
    assert r.localist["all"].n == reported["all"].n == len(test)


def test_subspaces_are_disjoint_and_orthonormal(setup):
    r = setup[6]
    a, b = r.subspaces["WX"].basis, r.subspaces["YZ"].basis
    assert a.shape == b.shape == (8, 16)
    torch.testing.assert_close(a @ a.T, torch.eye(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(a @ b.T, torch.zeros(8, 8), atol=1e-5, rtol=0)
    assert r.subspaces["WX"].metadata["variable"] == "WX" and r.subspaces["WX"].site == "module:layers.0:output"


def test_found_subspaces_reproduce_iia_through_the_plain_engine(setup):
    """Independent of the cache: run the found subspaces with sources given as inputs (full forwards)."""
    task, _, _, lab, _, test, r, _ = setup
    n = 400
    batch = test.collate(range(n))
    ivs = [r.intervention(v, source=batch.sources[v]) for v in ("WX", "YZ")]
    pred = lab.run(batch.base, ivs).logits.argmax(-1)
    # examples that do not intervene a variable: its source is the base, the edit the identity
    acc = (pred == batch.labels).float()
    cached = r.iia["all"]  # over all 2000; compare on the same 400 through the cached path
    from steerlab.alignment._activations import Runner
    from steerlab.alignment.das import evaluate, store_for

    runner = Runner(store_for(lab, [test], [task.site(1)]), test, task.site(1), None)
    same = evaluate(runner, [r.intervention(v) for v in ("WX", "YZ")], rows=torch.arange(n))["all"].value
    assert acc.mean().item() == pytest.approx(same, abs=1e-9)
    assert abs(same - cached.value) <= 4 * cached.se + 0.02


def test_learning_curve(setup):
    r = setup[6]
    steps = r.curve.epoch_step
    assert len(r.curve.epoch_iia) == 4 and steps == [125, 250, 375, 500]
    assert len(r.curve.loss) == 500
    first, last = sum(r.curve.loss[:125]) / 125, sum(r.curve.loss[-125:]) / 125
    assert last < first
    assert r.random_init_curve is not None and len(r.random_init_curve.epoch_iia) == 4


def test_model_left_as_found(setup):
    mlp, before = setup[1], setup[7]
    assert_unchanged(mlp, before, what="DAS.fit with controls")


def test_save_and_load_round_trip(setup, tmp_path):
    task, _, _, lab, _, test, r, _ = setup
    r.save(tmp_path / "das")
    back = DASResult.load(tmp_path / "das", fingerprint=lab.fingerprint())
    for v in ("WX", "YZ"):
        assert torch.equal(back.subspaces[v].basis, r.subspaces[v].basis)
    assert {k: x.value for k, x in back.iia.items()} == {k: x.value for k, x in r.iia.items()}
    assert back.localist_dims == r.localist_dims and back.localist_method == r.localist_method
    assert back.curve.loss == r.curve.loss and back.sizes == r.sizes
    assert back.rows() == r.rows()
    batch = test.collate(range(64))
    a = lab.run(batch.base, [r.intervention(v, source=batch.sources[v]) for v in ("WX", "YZ")]).logits
    b = lab.run(batch.base, [back.intervention(v, source=batch.sources[v]) for v in ("WX", "YZ")]).logits
    assert torch.equal(a, b)
    other = dict(lab.fingerprint(), n_layers=5)  # a plain module's fingerprint: no type, width or vocabulary
    with pytest.raises(FingerprintMismatch, match=r"was saved for another model \(n_layers: file 0 vs model 5\)"):
        DASResult.load(tmp_path / "das", fingerprint=other)


def test_table_and_plot(setup):
    r = setup[6]
    rows = r.rows()
    assert [row["variable"] for row in rows] == list(r.iia)
    assert all(set(row) >= {"iia", "se", "random_init", "localist", "full_vector", "chance"} for row in rows)
    text = str(r)
    assert "random_init" in text and "localist: exhaustive" in text
    # the whole layer-1 vector carries both relations: for a WX-only counterfactual it also swaps YZ, so it
    # bounds WX only where the source's YZ equals the base's (then it asks the same answer): scored there only
    test = setup[5]
    want = [i for i, ex in enumerate(test) if ex.intervened == ("WX",)
            and (ex.sources["WX"]["Y"] == ex.sources["WX"]["Z"]) == (ex.base["Y"] == ex.base["Z"])]
    assert r.full_vector["WX"].n == len(want) == r.bounded["WX"].n and 0 < len(want) < r.iia["WX"].n
    assert r.full_vector["WX"].value >= 0.97  # there the whole vector is right, as the network is
    assert not any(row["above_full_vector"] for row in rows) and "illusion" not in text
    fig = r.plot()
    assert fig.layout.title.text.startswith("DAS at module:layers.0:output")
    names = {t.name for t in fig.data}
    assert {"DAS loss", "random-init loss", "DAS IIA", "random-init IIA", "chance", "localist", "full vector"} <= names
    traces = {t.name: t for t in fig.data}
    assert list(traces["DAS loss"].y) == r.curve.loss and list(traces["random-init loss"].y) == r.random_init_curve.loss
    assert list(traces["DAS IIA"].y) == r.curve.epoch_iia and list(traces["random-init IIA"].y) == r.random_init_curve.epoch_iia
    assert set(traces["localist"].y) == {r.localist["all"].value} and set(traces["chance"].y) == {0.5}
    assert traces["full vector"].y[0] == pytest.approx(sum(v.value for v in r.full_vector.values()) / len(r.full_vector))
    assert f"final IIA {r.iia['all'].value:.3f}" in fig.layout.title.text


def test_projection_separates_the_variable(setup):
    task, _, _, lab, _, test, r, _ = setup
    fig = sl.viz.subspace_projection(r, lab, test[:400], variable="WX")
    assert "projected onto the WX subspace" in fig.layout.title.text
    assert {t.name for t in fig.data} == {"WX = True", "WX = False"}
    proj = r.project(lab, test[:400], variable="WX")
    # the points are the bases' layer-1 activations times the WX basis, computed here by hand
    bases = torch.stack(list({tuple(b.tolist()): b for b in test[:400].collate(range(400)).base}.values()))
    with torch.no_grad():
        by_hand = lab.model.layers[0](bases) @ r.subspaces["WX"].basis.T
    assert torch.allclose(proj.coords, by_hand, atol=1e-5)
    for t in fig.data:
        value = t.name == "WX = True"
        idx = [i for i, v in enumerate(proj.values) if v == value]
        assert list(t.x) == pytest.approx(by_hand[idx, 0].tolist(), abs=1e-5)
        assert list(t.y) == pytest.approx(by_hand[idx, 1].tolist(), abs=1e-5)
    # WX is recoverable from its 8 coordinates: a least-squares probe separates the two classes
    y = torch.tensor([1.0 if v else -1.0 for v in proj.values])
    x = torch.cat([proj.coords, torch.ones(len(y), 1)], 1)
    w = torch.linalg.lstsq(x, y[:, None]).solution
    assert ((x @ w).squeeze(1).sign() == y).float().mean() > 0.8


def test_boundless_das_learns_a_size(setup):
    task, _, _, lab, _, _, _, _ = setup
    train, test = task.counterfactuals(3000, intervene="WX", seed=4), task.counterfactuals(1000, split="test", intervene="WX", seed=5)
    r = BoundlessDAS(lab, site=task.site(1), epochs=4, batch_size=64, lr=0.01, temperature=(10.0, 0.05),
                     boundary_penalty=0.05, controls=False).fit(train, test)
    k = r.sizes["WX"]
    assert 1 <= k < 16
    assert r.subspaces["WX"].basis.shape == (k, 16)
    assert r.curve.temperature[0] == pytest.approx(10.0) and r.curve.temperature[-1] == pytest.approx(0.05)
    assert len(r.curve.size) == 4 and r.curve.size[-1] == k
    assert r.iia["WX"].value >= 0.9, str(r)
    assert r.method == "Boundless DAS" and "Boundless DAS" in str(r)


def test_boundless_das_defaults_find_the_layer_1_alignment(setup):
    """With its own defaults (no tuned temperature or penalty), Boundless DAS finds WX at layer 1, where
    DAS of size 1 reaches 0.99. pyvene's schedule (τ 50 → 0.1 over a 16-wide site, penalty 1) left the
    mask a half-blend for most of training and stopped at 0.71-0.73 with the boundary collapsed."""
    task, _, _, lab, _, _, _, _ = setup
    train, test = task.counterfactuals(3000, intervene="WX", seed=4), task.counterfactuals(1000, split="test", intervene="WX", seed=5)
    r = BoundlessDAS(lab, site=task.site(1), epochs=4, batch_size=64, lr=0.01, controls=False).fit(train, test)
    assert r.curve.temperature[0] == pytest.approx(5.0)
    assert r.iia["WX"].value >= 0.95, str(r)
    old = BoundlessDAS(lab, site=task.site(1), epochs=4, batch_size=64, lr=0.01, temperature=(50.0, 0.1), boundary_penalty=1.0,
                       controls=False).fit(train, test)
    assert old.iia["WX"].value < r.iia["WX"].value - 0.1  # the comparison the defaults were chosen on, kept honest


def test_subspace_larger_than_the_site_is_refused_before_compute(setup):
    task, mlp, _, lab, train, test, _, _ = setup
    calls = []
    h = mlp.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        with pytest.raises(SubspaceSizeError, match=r"disjoint subspaces of sizes \{'WX': 9, 'YZ': 9\} \(18 in all\) do not fit site 'module:layers.0:output' of width 16; expected a total <= 16"):
            DAS(lab, site=task.site(1), size=9).fit(train, test)
        with pytest.raises(SubspaceSizeError, match=r"a subspace of size 17 does not fit site 'module:layers.0:output' of width 16"):
            DAS(lab, site=task.site(1), size=17, variables="WX").fit(task.counterfactuals(10, intervene="WX"))
        with pytest.raises(ConfigError, match=r"size=\{'WX': 4\} must give a size for exactly the variables \['WX', 'YZ'\]"):
            DAS(lab, site=task.site(1), size={"WX": 4}).fit(train, test)
        with pytest.raises(DataError, match=r"the training data intervenes \['WX', 'YZ'\] but DAS aligns \['WX'\]"):
            DAS(lab, site=task.site(1), size=4, variables="WX").fit(train, test)
        with pytest.raises(DataError, match=r"variable 'Q' is not in hierarchical equality"):
            DAS(lab, site=task.site(1), size=4, variables=["Q"]).fit(train, test)
        with pytest.raises(ConfigError, match=r"Boundless DAS aligns one variable at a time; got \['WX', 'YZ'\]"):
            BoundlessDAS(lab, site=task.site(1)).fit(train, test)
    finally:
        h.remove()
    assert not calls  # nothing ran


def test_search_over_layers_and_sizes(setup, tmp_path):
    from steerlab.alignment import SearchResult, search

    task, _, _, lab, _, _, _, _ = setup
    res = search(lab, task, sites=[task.site(1), task.site(3)], sizes=[2, 8], n_train=3000, n_test=1000,
                 epochs=2, batch_size=64, seed=1, localist_samples=16, selection_size=256)
    assert len(res.results) == 4 and res.variables == ("WX", "YZ")
    layer1, layer3 = res.get(task.site(1), None, 8), res.get(task.site(3), None, 8)
    # the relations live at layer 1; by layer 3 they have been combined into the output
    assert layer1.iia["all"].value >= 0.85 and layer3.iia["all"].value <= 0.7, str(res)
    assert layer1.iia["all"].value > res.get(task.site(1), None, 2).iia["all"].value
    small = res.get(task.site(1), None, 2)
    import math

    assert small.localist_method == f"exhaustive: all {math.comb(16, 2) * math.comb(14, 2)} disjoint neuron assignments (sizes 2, 2 of 16)"
    assert layer1.localist_method.startswith("exhaustive: all 12870")
    # the full-vector interchange is computed once per site and shared by its sizes
    assert small.full_vector == layer1.full_vector
    rows = res.rows()
    assert len(rows) == 16 and {r["variable"] for r in rows} == {"WX", "YZ", "WX+YZ", "all"}
    assert res.best().site == task.site(1)
    fig = res.plot()
    assert "controls and upper bound, all positions" in [a.text for a in fig.layout.annotations]
    res.save(tmp_path / "search")
    back = SearchResult.load(tmp_path / "search")
    assert back.rows() == rows and back.layers == res.layers
    for a, b in zip(back.results, res.results):
        assert torch.equal(a.subspaces["WX"].basis, b.subspaces["WX"].basis)


def test_das_is_at_least_the_best_localist_alignment_at_every_layer(setup):
    """The guarantee's fast form (benchmarks/das_hierarchical_equality.py has the full table): from a
    random start, the default DAS is at least the exhaustive localist alignment of the same size at
    every layer (within a standard error), and >= 0.97 at layer 1; cross-entropy, the paper's
    objective, loses to it at layer 2."""
    from steerlab.alignment._activations import Runner
    from steerlab.alignment.controls import localist_alignment
    from steerlab.alignment.das import store_for

    task, _, _, lab, train, test, _, _ = setup
    store = store_for(lab, [train, test], [task.site(L) for L in (1, 2, 3)])
    for layer in (1, 2, 3):
        site = task.site(layer)
        r = DAS(lab, site=site, size=8, epochs=4, batch_size=64, lr=0.01, seed=0, controls=False).fit(train, test)
        assert r.selection.starts == ["random (seed 0)"] and r.config["init"] == "random"
        loc = localist_alignment(Runner(store, train, site, None), Runner(store, test, site, None), {"WX": 8, "YZ": 8}, 16,
                                 selection_size=512).iia["all"]
        das = r.iia["all"]
        assert das.value >= loc.value - (loc.se**2 + das.se**2) ** 0.5, (layer, str(r), loc)  # one s.e. of the difference
        if layer == 1:
            assert das.value >= 0.97, str(r)
        if layer == 2:
            ce = DAS(lab, site=site, size=8, epochs=4, batch_size=64, lr=0.01, seed=0, controls=False,
                     objective="cross_entropy", select="final").fit(train, test)
            assert ce.iia["all"].value < loc.value - 0.1, (str(ce), loc)
