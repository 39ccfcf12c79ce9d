"""``steerlab steer-eval``: flags and the ``[steer_eval]`` table, a tiny run writing the table, the result and the report."""

from __future__ import annotations

import argparse

import pytest

from steerlab.cli import build_parser, main
from steerlab.reft import SteerEvalResult
from steerlab.steer_eval_cli import _settings


def _args(*argv):
    return build_parser().parse_args(["steer-eval", *argv])


def test_flags_and_the_experiment_table_merge_with_flags_winning(tmp_path):
    f = tmp_path / "exp.toml"
    f.write_text('[model]\nname = "smollm2-135m"\n\n[steer_eval]\nconcepts = ["french"]\nmethods = ["prompt", "diffmean"]\n'
                 "layer = 9\nfactors = [0.1, 0.3]\nseeds = [0, 1]\n")
    model, cfg = _settings(_args("--config", str(f), "--layer", "4", "--factors", "0.5,1"))
    assert model == "smollm2-135m"
    assert cfg == {"concepts": ["french"], "methods": ["prompt", "diffmean"], "layer": 4, "factors": [0.5, 1.0], "seeds": [0, 1]}


def test_bad_settings_are_one_line_errors(tmp_path, capsys):
    f = tmp_path / "bad.toml"
    f.write_text("[steer_eval]\nlayers = 3\n")
    assert main(["steer-eval", "--config", str(f)]) == 1
    assert "unknown [steer_eval] keys ['layers']" in capsys.readouterr().err
    (tmp_path / "none.toml").write_text("[model]\nname='x'\n")
    assert main(["steer-eval", "--config", str(tmp_path / "none.toml")]) == 1
    assert "has no [steer_eval] table" in capsys.readouterr().err
    assert main(["steer-eval", "--seeds", "a,b"]) == 1
    assert "--seeds 'a,b'" in capsys.readouterr().err
    assert main(["steer-eval", "smollm2-135m", "--methods", "prompt,magic", "--concepts", "french"]) == 1
    assert "methods=['prompt', 'magic']" in capsys.readouterr().err


def test_a_tiny_run_writes_the_table_the_result_and_the_report(tmp_path, capsys):
    out, report = tmp_path / "res", tmp_path / "r.html"
    code = main(["steer-eval", "smollm2-135m", "--concepts", "french", "--methods", "prompt,diffmean", "--factors", "0.2,0.6",
                 "--layer", "8", "--n-train", "8", "--n-val-instructions", "1", "--n-test-instructions", "2", "--max-new-tokens", "4",
                 "--no-progress", "--out", str(out), "--report", str(report)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "judges: french" in text and "diffmean" in text and "generation" in text
    result = SteerEvalResult.load(out)
    assert {r["method"] for r in result.rows} == {"none", "prompt", "diffmean"}
    page = report.read_text()
    assert "steerlab steer-eval" in page and "factor sweep" in page and page.count("plotly-graph-div") >= 3
    assert isinstance(_args("--no-progress"), argparse.Namespace)
