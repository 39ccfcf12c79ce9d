"""RELIABILITY row 12: files saved by each released file-format version still load, with today's code,
and reproduce the outputs stored beside them (``make_fixtures.py`` wrote them; they are never rewritten)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as T
from safetensors.torch import load_file

import steerlab as sl
from steerlab import reft
from steerlab.alignment import DASResult, SearchResult
from steerlab.interventions import fileformat
from tests.regression.make_fixtures import inputs, logits_with, sweep_source

HERE = Path(__file__).resolve().parent
VERSIONS = sorted(p for p in HERE.iterdir() if p.is_dir() and p.name.startswith("v"))
LATER = [p for p in VERSIONS if p.name != "v1"]  # from version 2 on: results and sweeps too


def test_every_released_version_has_fixtures():
    assert [p.name for p in VERSIONS] == [f"v{n}" for n in range(1, fileformat.FORMAT_VERSION + 1)]


@pytest.fixture(params=VERSIONS, ids=[p.name for p in VERSIONS])
def saved(request):
    folder = request.param
    model = T.LlamaForCausalLM.from_pretrained(folder / "model").eval()
    return folder, model, load_file(str(folder / "expected.safetensors"))


def _assert_reproduces(got: torch.Tensor, want: torch.Tensor) -> None:
    # the same arithmetic as when saved; a tolerance only for another CPU's kernels
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()


def test_interventions_reproduce_their_outputs(saved):
    folder, model, expected = saved
    base, source = inputs()
    lab = sl.wrap(model)
    ivs = lab.load_interventions(folder / "interventions")
    records = json.loads((folder / "interventions" / fileformat.CONFIG_NAME).read_text())["config"]["interventions"]
    assert [iv.type_name for iv in ivs] == [r["type"] for r in records] == [
        "interchange", "subspace_interchange", "boundless_subspace_interchange", "sigmoid_mask", "add", "zero", "mean", "scale", "noise"]
    plain = lab.run(base).logits
    got = logits_with(lab, ivs, base, source)
    assert not torch.allclose(got, plain, atol=1e-3)  # the saved interventions do change the outputs
    _assert_reproduces(got, expected["interventions"])
    lab.unwrap()


def test_graph_reproduces_its_output(saved):
    folder, model, expected = saved
    lab = sl.wrap(model)
    g = lab.load_graph(folder / "graph")
    (last,) = [r for r in g.runs if r.name == "patched"]
    _assert_reproduces(lab.execute(g)[last].logits, expected["graph"])
    lab.unwrap()


def test_subspace_reproduces_its_output(saved):
    folder, model, expected = saved
    base, source = inputs()
    sub = sl.Subspace.load(folder / "subspace")
    assert sub.metadata["variable"] == "X" and sub.basis.shape == (4, 32)
    lab = sl.wrap(model)
    _assert_reproduces(logits_with(lab, [sub.intervention()], base, source), expected["subspace"])
    lab.unwrap()


def test_reft_model_reproduces_its_output(saved):
    folder, model, expected = saved
    base, _ = inputs()
    rm = reft.from_pretrained(folder / "reft", model)
    assert [type(iv).__name__ for iv in rm.interventions] == ["LoReFT", "DiReFT"]
    with torch.no_grad():
        _assert_reproduces(rm(**base).logits, expected["reft"])
    rm.unwrap()


def test_results_and_sweeps_are_saved_from_version_2_on():
    assert [p.name for p in LATER] == [f"v{n}" for n in range(2, fileformat.FORMAT_VERSION + 1)]
    for p in LATER:
        assert {"das_result", "das_search", "sweep"} <= {q.name for q in p.iterdir()}


@pytest.fixture(params=LATER, ids=[p.name for p in LATER])
def saved_later(request):
    return _saved(request.param)


def _saved(folder):
    model = T.LlamaForCausalLM.from_pretrained(folder / "model").eval()
    return folder, model, load_file(str(folder / "expected.safetensors"))


def test_das_result_and_search_reproduce_their_output(saved_later):
    folder, model, expected = saved_later
    base, source = inputs()
    lab = sl.wrap(model)
    res = DASResult.load(folder / "das_result", fingerprint=lab.fingerprint())
    assert res.sizes == {"X": 2, "Y": 3} and res.iia["all"].value == 0.79 and res.localist_dims == {"X": [0, 1], "Y": [2, 3, 4]}
    search = SearchResult.load(folder / "das_search", fingerprint=lab.fingerprint())
    assert torch.equal(search.results[0].subspaces["Y"].basis, res.subspaces["Y"].basis)
    for r in (res, search.results[0]):
        _assert_reproduces(logits_with(lab, [r.intervention("X")], base, source), expected["das_result"])
    lab.unwrap()


def test_sweep_reproduces_its_values(saved_later):
    folder, model, expected = saved_later
    lab = sl.wrap(model)
    sweep = sl.SweepResult.load(folder / "sweep", fingerprint=lab.fingerprint())
    assert sweep.filled is not None and not bool(sweep.filled.all())  # the padded example leaves cells empty
    torch.testing.assert_close(sweep.values, expected["sweep"], equal_nan=True, rtol=0, atol=0)
    base, source = inputs()
    again = sl.sweep(lab, base, sweep_source(base, source), sites=sweep.sites, metric=sl.metrics.logit_diff(5, 7))
    torch.testing.assert_close(again.values, sweep.values, equal_nan=True, rtol=1e-5, atol=1e-5)
    lab.unwrap()
