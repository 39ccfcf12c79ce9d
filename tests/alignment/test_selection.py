"""DAS objectives, starts, restarts and selection on the xor network of test_controls (its
alignment is known: VA is coordinate 2, VB coordinate 0), and the objectives' maths by hand."""

from __future__ import annotations

import math
import re

import pytest
import torch

import steerlab as sl
from steerlab.alignment import DAS, BoundlessDAS
from steerlab.alignment.objectives import CrossEntropy, Hinge, SmoothZeroOne, label_margin, objective
from steerlab.alignment.selection import Selection
from steerlab.interventions.errors import ConfigError, SubspaceSizeError
from tests.alignment.test_controls import _xor_task
from tests.reliability import one_thread_fixture

_one_thread = one_thread_fixture()
SITE = "module:layer:output"


def test_objectives_by_hand():
    z = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, 1.0]])
    y = torch.tensor([0, 2])
    assert label_margin(z, y).tolist() == [1.5, -2.0]
    sig = SmoothZeroOne(0.5)
    assert sig(z, y).item() == pytest.approx((1 / (1 + math.exp(3.0)) + 1 / (1 + math.exp(-4.0))) / 2)
    annealed = SmoothZeroOne(1.0, 0.01)
    assert annealed.tau(0.0) == 1.0 and annealed.tau(1.0) == pytest.approx(0.01) and annealed.tau(0.5) == pytest.approx(0.1)
    # as the temperature falls the loss becomes the error rate
    assert SmoothZeroOne(1e-4)(z, y).item() == pytest.approx(0.5)
    assert Hinge(1.0)(z, y).item() == pytest.approx((0 + 3.0) / 2)
    assert CrossEntropy()(z, y).item() == pytest.approx(torch.nn.functional.cross_entropy(z, y).item())
    assert objective({"name": "smooth_zero_one", "temperature": 2.0, "final_temperature": None}).temperature == 2.0
    assert isinstance(objective("cross_entropy"), CrossEntropy)
    with pytest.raises(ConfigError, match=r"objective='mse': expected one of"):
        objective("mse")
    with pytest.raises(ConfigError, match=r"temperature -1: expected a positive number"):
        SmoothZeroOne(-1)


def test_a_known_start_is_kept_when_training_cannot_beat_it():
    """Started at the right coordinates (IIA 1), selection on training data reports IIA 1 whatever the
    objective does afterwards; the Selection says which run and step won."""
    _, data, lab = _xor_task(300)
    e = torch.eye(5)
    start = {"VA": sl.Subspace(e[[2]], SITE), "VB": sl.Subspace(e[[0]], SITE)}
    for obj in ("cross_entropy", "smooth_zero_one"):
        r = DAS(lab, site=SITE, size=1, epochs=2, batch_size=32, lr=0.5, controls=False, objective=obj, init=start,
                restarts=1).fit(data)
        sel = r.selection
        assert isinstance(sel, Selection) and sel.starts == ["given subspace", "random (seed 1)"]
        assert sel.start_iia[0] == 1.0 and sel.iia == 1.0 and r.iia["all"].value == 1.0
        assert len(sel.final_iia) == 2 and sel.checks >= 4
        assert "trained: " in str(r) and "given subspace" in str(r)
        assert r.config["objective"] == objective(obj).describe() and r.config["restarts"] == 1


def test_selection_never_reports_below_its_start_on_the_selection_rows():
    _, data, lab = _xor_task(300)
    for select in ("train_iia", "final"):
        r = DAS(lab, site=SITE, size=1, epochs=1, batch_size=64, lr=1e-3, controls=False, init="localist", select=select,
                restarts=2).fit(data)
        sel = r.selection
        assert sel.starts[0] == "localist" and sel.start_iia[0] == 1.0  # the localist start is the known answer
        if select == "train_iia":
            assert sel.iia >= max(sel.start_iia) and sel.iia >= max(sel.final_iia)
        else:
            assert sel.iia == max(sel.final_iia) and sel.chosen_step == len(r.curve.loss)


def test_the_result_records_and_reloads_its_selection(tmp_path):
    _, data, lab = _xor_task(200)
    r = DAS(lab, site=SITE, size=1, epochs=1, batch_size=64, controls=False).fit(data)
    r.save(tmp_path / "r")
    back = sl.alignment.DASResult.load(tmp_path / "r")
    assert back.selection == r.selection and back.selection.describe() == r.selection.describe()


def test_bad_options_are_refused_before_compute():
    _, data, lab = _xor_task(50)
    lab.facts.site_shape(lab.resolve(SITE))  # the lab's one shape probe, before counting forwards
    calls = []
    h = lab.model.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        with pytest.raises(ConfigError, match=r"init='best': expected 'random', 'localist', a Subspace"):
            DAS(lab, site=SITE, size=1, init="best")
        with pytest.raises(ConfigError, match=r"restarts=-1: expected a non-negative int"):
            DAS(lab, site=SITE, size=1, restarts=-1)
        with pytest.raises(ConfigError, match=r"select='test_iia': expected one of \['train_iia', 'final'\]"):
            DAS(lab, site=SITE, size=1, select="test_iia")
        wrong = {"VA": sl.Subspace(torch.eye(5)[[0, 1]], SITE), "VB": sl.Subspace(torch.eye(5)[[2]], SITE)}
        with pytest.raises(SubspaceSizeError, match=r"init\['VA'\] is 2 x 5; expected 1 x 5"):
            DAS(lab, site=SITE, size=1, init=wrong, controls=False).fit(data)
        with pytest.raises(ConfigError, match=r"init gives subspaces for \['VA'\]; expected one for each of \['VA', 'VB'\]"):
            DAS(lab, site=SITE, size=1, init={"VA": wrong["VB"]}, controls=False).fit(data)
        with pytest.raises(ConfigError, match=r"Boundless DAS learns the size, so it has no localist start"):
            BoundlessDAS(lab, site=SITE, init="localist")
    finally:
        h.remove()
    assert not calls


def test_search_takes_the_same_options():
    from steerlab.alignment import search

    _, data, lab = _xor_task(200)
    res = search(lab, data, sites=[SITE], sizes=[1], epochs=1, batch_size=64, init="localist", restarts=1,
                 objective="cross_entropy", localist_samples=8)
    (r,) = res.results
    assert r.selection.starts == ["localist", "random (seed 1)"] and r.selection.start_iia[0] == 1.0
    assert r.iia["all"].value == 1.0  # the localist start is the known answer and selection keeps it
    assert r.config["objective"] == "cross-entropy" and res.config["init"] == "localist"
    with pytest.raises(ConfigError, match=r"init='given': search starts each candidate at 'random' or 'localist'"):
        search(lab, data, sites=[SITE], sizes=[1], init="given")


def test_cross_entropy_hands_over_to_the_smooth_loss():
    from steerlab.alignment.objectives import CrossEntropyThenSmooth, default_objective

    z = torch.tensor([[2.0, -1.0], [0.0, 3.0], [1.0, 0.5]])
    y = torch.tensor([0, 0, 1])
    blend = CrossEntropyThenSmooth(0.5, 3.0, 0.1)
    ce = torch.nn.functional.cross_entropy(z, y).item()
    assert blend(z, y, 0.0).item() == pytest.approx(ce)
    assert blend(z, y, 0.25).item() == pytest.approx(0.5 * ce + 0.5 * SmoothZeroOne(3.0, 0.1)(z, y, 0.25).item())
    assert blend(z, y, 0.8).item() == pytest.approx(SmoothZeroOne(3.0, 0.1)(z, y, 0.8).item())
    assert objective(blend.to_json()).to_json() == blend.to_json()
    assert default_objective().to_json() == CrossEntropyThenSmooth(0.1, 3.0, 0.1).to_json()


def test_positions_at_a_site_without_a_position_axis_are_refused_not_ignored():
    """Issue 9 item 10: ``DAS(positions=50)`` on an MLP's hidden layer (value ``[batch, width]``) was
    silently ignored; DAS, search and every runner now refuse it before any compute."""
    from steerlab.alignment import DAS, tasks
    from steerlab.alignment._activations import Runner
    from steerlab.alignment.das import store_for
    from steerlab.interventions.errors import UnitError

    task = tasks.hierarchical_equality()
    lab = sl.wrap(task.model(seed=0), example_input=task.example_input())
    for positions in (50, [0], "last"):
        with pytest.raises(UnitError, match=re.escape(f"positions={positions!r} at ") + ".*no position axis"):
            DAS(lab, site=task.site(1), size=8, positions=positions)
    train, _ = task.datasets(n_train=16, n_test=8, seed=0)
    store = store_for(lab, [train], [task.site(1)])
    with pytest.raises(UnitError, match="no position axis"):
        Runner(store, train, task.site(1), 3)
    DAS(lab, site=task.site(1), size=8, positions=None)  # the whole vector: fine
