"""``steerlab demo --fast``: the README's main command, through the same code path as the full demo.

One run (the CLI, as a user types it) feeds every check: the DAS search picks a layer whose IIA beats its
random-init control; the "before" generations are the untouched model's own greedy generations; the LoReFT
seeded from the found subspace steers the held-out reviews of the other polarity, the random-subspace
control does not; the printed steering rates are recounted from the generations; the one HTML report
renders every figure in headless Chromium.
"""

from __future__ import annotations

import contextlib
import html
import io
import re

import pytest
import torch

import steerlab.demo as demo
from steerlab.cli import main
from steerlab.interventions.errors import ConfigError
from tests.viz.test_browser import figure_parts, render_dom

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    captured = {}
    original = demo.run_demo

    def keep(**kwargs):
        captured["result"] = original(**kwargs)
        return captured["result"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(demo, "run_demo", keep)
        mp.chdir(folder)
        mp.setenv("HF_HUB_OFFLINE", "1")
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            status = main(["demo", "--fast", "--out", "report.html"])
    return status, out.getvalue(), captured["result"], folder


def test_the_command_succeeds_and_prints_its_steps(run):
    status, out, result, folder = run
    assert status == 0, out
    for step in ("[1/4]", "[2/4]", "[3/4]", "[4/4]"):
        assert step in out
    assert result.rate_line in out.splitlines()
    assert result.report == (folder / "report.html").absolute() and result.report.stat().st_size > 1_000_000
    assert tuple(r["layer"] for r in result.search.rows() if r["variable"] == "POLARITY") == demo.FAST.layers


def test_the_chosen_subspace_beats_its_controls(run):
    _, _, result, _ = run
    rows = {r["layer"]: r for r in result.search.rows() if r["variable"] == "POLARITY"}
    layer = int(result.chosen.site.split(".")[1])
    best = rows[layer]
    assert best["iia"] == max(r["iia"] for r in rows.values() if not r["above_full_vector"])
    assert best["iia"] - 2 * best["se"] > best["random_init"]  # a real model, not an artefact of training
    assert abs(best["random_init"] - best["chance"]) <= 2 * (best["chance"] * (1 - best["chance"]) / demo.FAST.n_test) ** 0.5
    assert best["iia"] <= best["full_vector"] + 2 * best["se"]
    sub = result.chosen.subspaces["POLARITY"]
    basis = sub.basis.float()
    assert basis.shape == (demo.FAST.size, 576)
    assert torch.allclose(basis @ basis.T, torch.eye(demo.FAST.size), atol=1e-5)


def test_before_is_the_untouched_models_greedy_generation(run, smollm):
    _, _, result, _ = run
    model, tok = smollm
    for row in result.generations[:4]:
        ids = tok(f"Review: {row['review']}\nSentiment:", return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=demo.FAST.max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        assert tok.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True) == row["before"]


def test_the_seeded_loreft_steers_and_the_random_control_does_not(run):
    _, _, result, _ = run
    target = result.target
    flip = [r for r in result.generations if r["polarity"] != target]

    def said(text: str) -> bool:
        m = re.match(r"\W*([A-Za-z]+)", text)
        return bool(m) and m[1].lower() == target

    counts = {k: sum(said(r[k]) for r in flip) for k in ("before", "DAS subspace", "random subspace")}
    assert {k: v[0] for k, v in result.rates.items()} == counts  # the printed rates are the generations' own
    assert all(v[1] == len(flip) for v in result.rates.values())
    assert counts["before"] <= 1
    assert counts["DAS subspace"] >= 0.6 * len(flip)
    assert counts["DAS subspace"] > counts["random subspace"]


def test_the_report_renders_every_figure_in_chromium(run, tmp_path):
    _, _, result, _ = run
    page = result.report.read_text()
    assert html.escape(result.rate_line) in page
    dom = render_dom(result.report, tmp_path)
    parts = figure_parts(dom)
    assert len(parts) == 5  # IIA with controls, DAS curve, projection, LoReFT curves, per-token effects
    for n, part in parts.items():
        assert 'class="main-svg"' in part, f"figure {n} was not rendered by plotly.js"


def test_bad_arguments_are_one_line_errors_before_any_work(capsys):
    assert main(["demo", "--fast", "--out", "report.pdf"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "steerlab: error: the report 'report.pdf' is an HTML file: expected a name ending in .html"
    assert main(["demo", "--target", "neutral"]) == 2
    assert "invalid choice: 'neutral'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="target='neutral': expected 'positive' or 'negative'"):
        demo.run_demo(fast=True, target="neutral")
