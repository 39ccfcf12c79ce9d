"""``steerlab search`` / ``steerlab das``: the printed IIA tables (with controls and the full-vector upper
bound) are those of the library computing the same thing; figures and saved results hold them."""

from __future__ import annotations

import json

import pytest
import torch

import steerlab as sl
from steerlab.alignment import DAS, DASResult, SearchResult, search, tasks
from steerlab.cli import main

pytestmark = pytest.mark.slow


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_search_on_hierarchical_equality_equals_the_library(capsys, tmp_path):
    torch.set_num_threads(1)
    code, out, err = run_cli(capsys, "search", "--task", "hierarchical-equality", "--layers", "1,3", "--sizes", "8",
                             "--n-train", "1500", "--n-test", "600", "--epochs", "2", "--mlp-examples", "60000",
                             "--out", str(tmp_path / "search.html"), "--save", str(tmp_path / "search"))
    assert code == 0, err
    saved = SearchResult.load(tmp_path / "search")
    # the same search by hand: the task's MLP trained with the same seed, the same datasets and settings
    task = tasks.hierarchical_equality(seed=0)
    mlp, acc = task.train_model(seed=0, n_train=60_000)
    assert f"held-out accuracy {acc:.4f}" in out
    lab = sl.wrap(mlp, example_input=task.example_input())
    train, test = task.datasets(n_train=1500, n_test=600, seed=0)
    want = search(lab, train, test, sites=[task.site(1), task.site(3)], positions=[None], sizes=[8], epochs=2, seed=0,
                  localist_samples=16)
    lab.unwrap()
    assert saved.rows() == [dict(r, seconds=s["seconds"]) for r, s in zip(want.rows(), saved.rows(), strict=True)]
    for line in str(want).splitlines()[1:]:  # every row of the table, seconds aside
        assert line.rsplit(None, 1)[0] in out
    layer1 = want.get(task.site(1), None, 8)
    assert layer1.iia["all"].value > want.get(task.site(3), None, 8).iia["all"].value
    assert layer1.iia["all"].value > layer1.random_init["all"].value
    assert f"best: {task.site(1)} positions None sizes {{'WX': 8, 'YZ': 8}}: IIA {layer1.iia['all'].value:.3f}" in out
    page = (tmp_path / "search.html").read_text()
    assert "Distributed alignment search" in page and "random-init size 8" in page and "localist size 8" in page


def test_das_on_sentiment_equals_the_library(capsys, tmp_path, smollm):
    args = ["--task", "sentiment", "--layer", "22", "--size", "4", "--n-train", "32", "--n-test", "32", "--epochs", "2",
            "--batch-size", "16", "--localist-samples", "4"]
    code, out, err = run_cli(capsys, "das", "smollm2-135m", *args, "--out", str(tmp_path / "curve.html"), "--save", str(tmp_path / "das"))
    assert code == 0, err
    saved = DASResult.load(tmp_path / "das")
    lab = sl.wrap(*smollm)
    try:
        task = tasks.sentiment(seed=0)
        train, test = task.datasets(lab, n_train=32, n_test=32, seed=0)
        want = DAS(lab, site="blocks.22.resid_post", size=4, positions="last", epochs=2, batch_size=16, seed=0,
                   localist_samples=4).fit(train, test)
    finally:
        lab.unwrap()
    assert str(want) in out
    assert saved.rows() == want.rows() and torch.equal(saved.subspaces["POLARITY"].basis, want.subspaces["POLARITY"].basis)
    assert want.full_vector["POLARITY"].value >= 0.9 and want.random_init["POLARITY"].value < want.iia["POLARITY"].value
    page = (tmp_path / "curve.html").read_text()
    assert "held-out IIA per epoch" in page and json.dumps(want.curve.epoch_iia[-1]) in page


def test_alignment_errors_are_one_line(capsys):
    cases = [
        (["search", "smollm2-135m", "--task", "hierarchical-equality", "--layers", "1"], "trains its own MLP; give no MODEL"),
        (["search", "--task", "sentiment", "--layers", "ten"], "--layers 'ten': expected a comma list of integers"),
        (["search", "--task", "sentiment", "--layers", "10", "--n-train", "0"], "--n-train 0: expected a positive number"),
        (["das", "--task", "sentiment", "--layer", "10", "--out", "x.svg"], "--out 'x.svg': expected a .html or .png file name"),
        (["das", "--task", "hierarchical-equality", "--layer", "1", "--positions", "last"], "have no position axis"),
    ]
    for argv, message in cases:
        code, out, err = run_cli(capsys, *argv)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 1 and len(lines) == 1 and message in lines[0], (argv, err)
    code, out, err = run_cli(capsys, "search", "--layers", "1")
    assert code == 2 and "--task" in err
