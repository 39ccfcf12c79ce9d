"""The ``steerlab`` command: each subcommand on the real SmolLM2-135M, checked against the library
computing the same thing directly; errors are one line with the right exit status."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import steerlab as sl
from steerlab.cli import build_parser, main

ITALY, FRANCE = "The capital of Italy is", "The capital of France is"


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got:\n{err}"
    assert "Traceback" not in err
    return lines[0]


# -- sites ----------------------------------------------------------------------


def test_sites_table_matches_the_model_config(capsys, smollm):
    model, _ = smollm
    cfg = model.config
    code, out, err = run_cli(capsys, "sites", "smollm2-135m", "--filter", "blocks.7.*")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"smollm2-135m: llama, {cfg.num_hidden_layers} layers, d_model {cfg.hidden_size}, 333 sites (11 shown)"
    rows = {line.split()[0]: line for line in lines[2:]}
    assert list(rows) == [f"blocks.7.{s}" for s in ("resid_pre", "attn.q", "attn.k", "attn.v", "attn.z", "attn.out",
                                                    "resid_mid", "mlp.pre", "mlp.post", "mlp.out", "resid_post")]
    d_head = cfg.hidden_size // cfg.num_attention_heads
    assert f"[batch, pos, {cfg.num_attention_heads}, {d_head}]" in rows["blocks.7.attn.q"]
    assert f"[batch, pos, {cfg.num_key_value_heads}, {d_head}]" in rows["blocks.7.attn.k"]
    assert f"[batch, pos, {cfg.intermediate_size}]" in rows["blocks.7.mlp.post"]
    assert rows["blocks.7.mlp.post"].endswith("model.layers.7.mlp.down_proj:input")


def test_sites_json_lists_every_site_and_what_bert_lacks(capsys, minilm):
    model, _ = minilm
    code, out, err = run_cli(capsys, "sites", "minilm-l6", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["model_type"] == "bert"
    names = [r["name"] for r in data["sites"]]
    assert names == sl.wrap(model).sites.names()
    assert {"name": "blocks.5.resid_post", "shape": ["batch", "pos", model.config.hidden_size]}.items() <= next(
        r for r in data["sites"] if r["name"] == "blocks.5.resid_post"
    ).items()
    assert data["missing"], "MiniLM is post-LN: the catalog says which canonical sites it lacks"


# -- patch ----------------------------------------------------------------------


def test_patch_equals_patching_by_hand(capsys, tmp_path, smollm):
    model, tok = smollm
    code, out, err = run_cli(
        capsys, "patch", "smollm2-135m", "--base", ITALY, "--source", FRANCE, "--good", " Paris", "--bad", " Rome",
        "--sites", "blocks.3.resid_post", "--sites", "blocks.25.resid_post", "--positions=-2,-1", "--save", str(tmp_path / "sweep"),
    )
    assert code == 0, err
    assert out.splitlines()[0].startswith("logit_diff(' Paris', ' Rome'): base ")
    result = sl.SweepResult.load(tmp_path / "sweep")
    assert result.sites == ["blocks.3.resid_post", "blocks.25.resid_post"]
    lab = sl.wrap(model, tok)
    paris, rome = tok(" Paris").input_ids[0], tok(" Rome").input_ids[0]
    for i, site in enumerate(result.sites):
        for j, pos in enumerate((-2, -1)):
            logits = lab.run(ITALY, [sl.Interchange(site, positions=pos, source=FRANCE)]).logits[0, -1]
            expected = (logits[paris] - logits[rome]).item()
            assert result.values[i, j].item() == pytest.approx(expected, abs=1e-3)
            assert f"{result.values[i, j].item():.3f}" in out  # the printed table holds the same numbers
    assert result.values[1, 1] > 0 > result.base_value  # France at the last token, layer 25, flips the answer


def test_patch_writes_the_heatmap_of_the_sweep(capsys, tmp_path):
    code, out, err = run_cli(
        capsys, "patch", "smollm2-135m", "--base", ITALY, "--source", FRANCE, "--good", " Paris", "--bad", " Rome",
        "--sites", "blocks.2[45].resid_post", "--positions=-2,-1", "--out", str(tmp_path / "sweep.html"), "--save", str(tmp_path / "sweep"),
    )
    assert code == 0, err
    assert out.splitlines()[-1] == f"wrote {tmp_path / 'sweep.html'}"
    page = (tmp_path / "sweep.html").read_text()
    assert "<script src=" not in page
    m = re.search(r'Plotly\.newPlot\(\s*"[^"]+",\s*(\[.*?\]),\s*\{', page, flags=re.S)
    (heat,) = [t for t in json.loads(m.group(1)) if t["type"] == "heatmap"]
    result = sl.SweepResult.load(tmp_path / "sweep")
    # the heatmap shows the normalised effect (0 = base, 1 = source), the raw metric beside it in the hover data
    assert torch.allclose(torch.tensor(heat["z"]), result.normalised.float(), atol=1e-6)
    assert torch.allclose(torch.tensor([[c[1] for c in row] for row in heat["customdata"]]), result.values.float(), atol=1e-6)
    assert result.tokens == [" Italy", " is"]


def test_options_survive_nnsight_adding_save_to_every_object(capsys, tmp_path, monkeypatch):
    # nnsight (imported by the nnsight engine) sets object.save; argparse then skipped the default of any
    # option whose dest is "save", and a bound method stood in for "no --save given"
    import nnsight  # noqa: F401

    assert hasattr(object(), "save")
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "patch", "smollm2-135m", "--base", ITALY, "--source", FRANCE, "--good", " Paris", "--bad", " Rome",
                             "--sites", "blocks.25.resid_post", "--positions=-1")
    assert code == 0, err
    assert "saved" not in out and list(tmp_path.iterdir()) == []
    parser = build_parser()
    for sub in parser._subparsers._group_actions[0].choices.values():
        clashes = [a.dest for a in sub._actions if hasattr(object, a.dest)]
        assert clashes == [], f"{sub.prog}: option dests {clashes} shadowed by attributes of object"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--base", ITALY, "--source", FRANCE], "patch needs a metric: give --good TOKEN --bad TOKEN"),
        (["--base", ITALY, "--source", FRANCE, "--good", " Paris", "--metric", "logit-diff"], "--metric logit-diff needs --bad TOKEN"),
        (["--base", ITALY, "--base", ITALY, "--base", ITALY, "--source", FRANCE, "--source", FRANCE, "--good", " Paris", "--bad", " Rome"],
         "patch got 3 --base and 2 --source texts; expected one source per base, or one for all"),
        (["--base", ITALY, "--source", FRANCE, "--good", " Paris", "--bad", " Rome", "--out", "x.pdf"], "--out 'x.pdf': expected a .html or .png"),
        (["--base", ITALY, "--source", FRANCE, "--good", " Parisian", "--bad", " Rome", "--sites", "blocks.0.resid_post"],
         "good=' Parisian' is 2 tokens under this tokenizer"),
        (["--base", ITALY, "--source", FRANCE, "--good", " Paris", "--bad", " Rome", "--sites", "blocks.0.resid_pots"],
         "unknown site 'blocks.0.resid_pots'"),
        (["--base", ITALY, "--source", FRANCE, "--good", " Paris", "--bad", " Rome", "--heads", "two"], "--heads 'two': expected 'all'"),
    ],
)
def test_patch_errors_are_one_line(capsys, argv, message):
    code, out, err = run_cli(capsys, "patch", "smollm2-135m", *argv)
    assert code == 1
    line = one_error_line(err)
    assert line.startswith("steerlab: error: ") and message in line


# -- generate -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def steering_dir(tmp_path_factory, smollm):
    """An Add steering vector at layer 10 (the direction from ' Rome' to ' Paris' in the unembedding), saved."""
    model, tok = smollm
    lab = sl.wrap(model, tok)
    W = model.lm_head.weight
    v = W[tok(" Paris").input_ids[0]] - W[tok(" Rome").input_ids[0]]
    iv = sl.Add("blocks.10.resid_post", vector=32.0 * v / v.norm(), positions=None)
    path = lab.save(tmp_path_factory.mktemp("steer") / "add", [iv])
    lab.unwrap()
    return path, iv


def _generations(out: str) -> list[tuple[str, str]]:
    before = [ast.literal_eval(line.split(":", 1)[1].strip()) for line in out.splitlines() if line.startswith("  before:")]
    after = [ast.literal_eval(line.split(":", 1)[1].strip()) for line in out.splitlines() if line.startswith("  after:")]
    return list(zip(before, after, strict=True))


def test_generate_with_saved_steering_equals_the_library(capsys, smollm, steering_dir):
    model, tok = smollm
    path, iv = steering_dir
    prompts = [ITALY, "My favourite city is"]
    code, out, err = run_cli(capsys, "generate", "smollm2-135m", *prompts, "--interventions", str(path), "--compare",
                             "--max-new-tokens", "6", "--decode")
    assert code == 0, err
    assert out.splitlines()[0] == f"# 1 intervention from {path}: Add@blocks.10.resid_post"
    got = _generations(out)
    # before: plain transformers, greedy, on each prompt alone (no padding involved)
    for (before, _), p in zip(got, prompts, strict=True):
        ids = tok(p, return_tensors="pt")
        plain = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        assert before == tok.decode(plain[0, ids.input_ids.shape[1]:], skip_special_tokens=True)
    # after: the library with the same vector
    lab = sl.wrap(model, tok)
    steered = lab.generate(prompts, [iv], decode=True, max_new_tokens=6, do_sample=False).texts
    lab.unwrap()
    assert [a for _, a in got] == steered
    assert any(b != a for b, a in got), "the steering vector changed no generation"


def test_generate_fills_the_source_of_a_saved_interchange(capsys, tmp_path, smollm):
    model, tok = smollm
    lab = sl.wrap(model, tok)
    path = lab.save(tmp_path / "swap", [sl.Interchange("blocks.25.resid_post", positions=-1)])
    code, out, err = run_cli(capsys, "generate", "smollm2-135m", ITALY, "--interventions", str(path), "--source", FRANCE,
                             "--compare", "--max-new-tokens", "3")
    assert code == 0, err
    ((before, after),) = _generations(out)
    expected = lab.generate(ITALY, [sl.Interchange("blocks.25.resid_post", positions=-1, source=FRANCE)], max_new_tokens=3, do_sample=False)
    lab.unwrap()
    assert after == expected.texts[0] and after != before
    assert "Paris" in after and "Rome" in before

    code, out, err = run_cli(capsys, "generate", "smollm2-135m", ITALY, "--interventions", str(path))
    assert code == 1
    assert one_error_line(err) == "steerlab: error: the saved Interchange at 'blocks.25.resid_post' reads from a source run: give --source TEXT"


def test_generate_refuses_interventions_made_for_another_model(capsys, tmp_path, minilm):
    model, tok = minilm
    path = sl.wrap(model, tok).save(tmp_path / "bert", [sl.Zero("blocks.1.resid_post")])
    code, out, err = run_cli(capsys, "generate", "smollm2-135m", ITALY, "--interventions", str(path))
    assert code == 1
    line = one_error_line(err)
    assert line.startswith("steerlab: error: ") and str(path) in line and "width" in line


# -- usage and errors ------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "steerlab: error: the following arguments are required: COMMAND"),
        (["sitez", "smollm2-135m"], "steerlab: error: argument COMMAND: invalid choice: 'sitez'"),
        (["sites"], "steerlab sites: error: the following arguments are required: MODEL"),
        (["sites", "smollm2-135m", "--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
        (["patch", "smollm2-135m", "--base", ITALY], "the following arguments are required: --source"),
        (["generate", "smollm2-135m", "hi", "--max-new-tokens", "many"], "argument --max-new-tokens: invalid int value: 'many'"),
    ],
)
def test_usage_errors_exit_2_with_one_line(capsys, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert message in one_error_line(err)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sites", "no-such-model"], "steerlab: error: model 'no-such-model' is not an embedded name (minilm-l6, smollm2-135m) nor a local directory, and the hub is offline (HF_HUB_OFFLINE=1)"),
        (["sites", "smollm2-135m", "--filter", "blocks.99.*"], "steerlab: error: --filter 'blocks.99.*' matches no site of smollm2-135m"),
        (["generate", "smollm2-135m", "hi", "--compare"], "steerlab: error: --compare shows generations with and without --interventions DIR"),
        (["generate", "smollm2-135m", "hi", "--max-new-tokens", "0"], "steerlab: error: --max-new-tokens 0: expected a positive number"),
        (["generate", "smollm2-135m", "hi", "--interventions", "/no/such/dir"], "steerlab: error: /no/such/dir is not a steerlab directory"),
        (["generate", "minilm-l6", "hi"], "steerlab: error: generate needs a model with a language-model head; minilm-l6 (BertModel) cannot generate text"),
    ],
)
def test_steerlab_errors_exit_1_with_one_line(capsys, argv, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out, err = run_cli(capsys, *argv)
    assert code == 1
    assert one_error_line(err).startswith(message)


def test_a_folder_that_is_not_a_model_is_one_line(capsys, tmp_path):
    code, out, err = run_cli(capsys, "sites", str(tmp_path))
    assert code == 1
    assert one_error_line(err) == (
        f"steerlab: error: model directory {str(tmp_path)!r} has no config.json: expected a Hugging Face model folder (model.save_pretrained)"
    )
    (tmp_path / "config.json").write_text("{}")  # a config transformers cannot use: its multi-line error becomes one line
    code, out, err = run_cli(capsys, "sites", str(tmp_path))
    assert code == 1
    assert one_error_line(err).startswith(f"steerlab: error: cannot load model {str(tmp_path)!r}: ")


def test_debug_shows_the_exception(capsys):
    with pytest.raises(sl.ConfigError, match="--filter 'nothing' matches no site"):
        main(["--debug", "sites", "smollm2-135m", "--filter", "nothing"])


def test_help_and_version(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and all(c in out for c in ("sites", "patch", "generate"))
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.strip() == f"steerlab {sl.__version__}"


def test_the_installed_command_runs_as_a_process():
    """`python -m steerlab` and the `steerlab` console script, in real processes (exit codes, stderr)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    ok = subprocess.run([sys.executable, "-m", "steerlab", "sites", "smollm2-135m", "--filter", "blocks.29.resid_*"],
                        capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert [line.split()[0] for line in ok.stdout.splitlines()[2:]] == ["blocks.29.resid_pre", "blocks.29.resid_mid", "blocks.29.resid_post"]
    script = Path(sys.executable).with_name("steerlab")
    bad = subprocess.run([str(script), "sites", "nope"], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [
        "steerlab: error: model 'nope' is not an embedded name (minilm-l6, smollm2-135m) nor a local directory, and the hub is offline "
        "(HF_HUB_OFFLINE=1) with no cached copy of it"
    ]
