"""Experiment files (``steerlab explain / validate / run``) and the first-hour fixes of the CLI.

The file's [task] table builds the same task as the Python API with functions as mechanisms; a [das]
table gives the IIA the library gives for the same settings; the run folder holds the file, a
manifest of input hashes that match the inputs, the saved result and a report; an old ``steerlab
train`` run file runs as a [train] step with the weights ``steerlab train`` gets; bad files are
one-line errors naming the key; model names that cannot be found fail at once with the near match.
"""

from __future__ import annotations

import hashlib
import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import steerlab as sl
from steerlab.alignment import DAS, DASResult
from steerlab.cli import main
from steerlab.experiment import Experiment, PromptTask, registered_steps
from steerlab.experiment.task import TASK_KEYS
from steerlab.models import ModelNotFound

MALE = ["John", "Michael", "David", "James", "Peter", "Paul"]
FEMALE = ["Mary", "Sarah", "Emma", "Anna", "Julia", "Karen"]
TEMPLATE = "After work, {name} walked to the {place}, where"


def task_toml(*, extra: str = "", answers: str = 'he = " he"\nshe = " she"') -> str:
    gender = "\n".join(f'{n} = "{"male" if n in MALE else "female"}"' for n in MALE + FEMALE)
    return textwrap.dedent(f"""\
        name = "pronoun"
        [model]
        name = "smollm2-135m"

        [task]
        template = "{TEMPLATE}"
        intervene = "GENDER"
        n_train = 32
        n_test = 16

        [task.variables]
        NAME = {json.dumps(MALE + FEMALE)}
        PLACE = ["store", "park", "office"]

        [task.mechanisms.GENDER]
        parents = ["NAME"]
        [task.mechanisms.GENDER.map]
        """) + gender + textwrap.dedent("""

        [task.mechanisms.PRONOUN]
        parents = ["GENDER"]
        map = { male = "he", female = "she" }

        [task.answers]
        """) + answers + textwrap.dedent("""

        [task.test_values]
        NAME = ["Paul", "Karen"]
        """) + extra


def python_task() -> PromptTask:
    """The same task from Python: functions as mechanisms."""
    return PromptTask(
        template=TEMPLATE,
        variables={"NAME": MALE + FEMALE, "PLACE": ["store", "park", "office"]},
        mechanisms={"GENDER": (["NAME"], lambda n: "male" if n in MALE else "female"),
                    "PRONOUN": (["GENDER"], lambda g: {"male": "he", "female": "she"}[g])},
        answers={"he": " he", "she": " she"}, intervene="GENDER", test_values={"NAME": ["Paul", "Karen"]},
        n_train=32, n_test=16, name="pronoun",
    )


def write(folder: Path, text: str, name: str = "exp.toml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)
    return folder / name


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if not line.startswith("Loading weights")]
    assert len(lines) == 1, err
    return lines[0]


# -- the task ---------------------------------------------------------------------------------------------------


def test_the_task_table_is_the_python_task(tmp_path, smollm):
    _, tok = smollm
    from_file = Experiment.from_toml(write(tmp_path, task_toml(extra="[das]\nlayer = 20\n"))).task
    from_python = python_task()
    assert from_file.sha256() == from_python.sha256()  # the same definition, mechanisms compared as full tables
    a, b = from_file.datasets(tok), from_python.datasets(tok)
    for x, y in zip(a, b, strict=True):
        assert [(e.base, e.sources, e.label) for e in x.examples] == [(e.base, e.sources, e.label) for e in y.examples]
    train, test = a
    assert {e.base["NAME"] for e in test.examples} <= {"Paul", "Karen"}  # the held-out names only
    assert not {e.base["NAME"] for e in train.examples} & {"Paul", "Karen"}
    assert not {s["NAME"] for e in train.examples for s in e.sources.values()} & {"Paul", "Karen"}
    assert sorted({e.label for e in train.examples}) == ["he", "she"]
    assert sum(e.label == "he" for e in train.examples) == len(train) // 2  # label-balanced


def test_explain_lists_every_table_and_key(capsys):
    code, out, _ = run_cli(capsys, "explain")
    assert code == 0
    for name, step in registered_steps().items():
        assert f"[{name}]" in out and all(k in out for k in step.keys)
    assert all(k in out for k in TASK_KEYS)


# -- validate and run ----------------------------------------------------------------------------------------------


def test_validate_reports_the_models_accuracy_and_the_plan(capsys, tmp_path):
    path = write(tmp_path, task_toml(extra="[das]\nlayer = 20\npositions = \"name\"\nsize = 1\n"))
    code, out, err = run_cli(capsys, "validate", path, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["accuracy"] == 1.0 and report["ok"] is True and report["wrong"] == []
    assert report["steps"] == [{"step": "das", "plan": report["steps"][0]["plan"]}]
    assert "DAS at blocks.20.resid_post, positions 'name', size 1" in report["steps"][0]["plan"]
    # the answers swapped: the model "fails" every input, and validate says so and exits 1
    swapped = write(tmp_path / "swapped", task_toml(extra="[das]\nlayer = 20\n", answers='he = " she"\nshe = " he"'))
    code, out, err = run_cli(capsys, "validate", swapped)
    assert code == 1
    assert "the model answers 0.0% of the task's inputs correctly" in out
    assert error_line(err).startswith("steerlab: error: the model answers only 0.0% of the task's inputs correctly, below min_accuracy = 0.8")


def test_the_readme_shows_what_validate_prints(capsys, monkeypatch):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("$ steerlab validate tutorials/11_your_own_concept.toml\n", 1)[1].split("\n$ ", 1)[0]
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    code, out, err = run_cli(capsys, "validate", "tutorials/11_your_own_concept.toml")
    assert code == 0, err
    assert out.splitlines() == block.splitlines()


@pytest.mark.slow
def test_run_das_gives_the_librarys_iia_and_hashes_every_input(capsys, tmp_path, smollm):
    settings = dict(layer=24, positions="name", size=1, epochs=1, batch_size=16, controls=False)
    extra = "[das]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in settings.items()) + "\n"
    path = write(tmp_path, task_toml(extra=extra))
    code, out, err = run_cli(capsys, "run", path, "--output-dir", tmp_path / "out")
    assert code == 0, err
    out_dir = tmp_path / "out"
    manifest = json.loads((out_dir / "manifest.json").read_text())
    # the library, called directly with the same settings on the Python twin of the task
    lab = sl.wrap(*smollm)
    try:
        train, test = python_task().datasets(lab)
        direct = DAS(lab, site="blocks.24.resid_post", size=1, positions="name", epochs=1, batch_size=16, controls=False).fit(train, test)
    finally:
        lab.unwrap()
    assert manifest["steps"]["das"]["iia"] == pytest.approx(direct.iia["all"].value, abs=1e-9)
    saved = DASResult.load(out_dir / "das" / "result")
    assert saved.iia["all"].value == direct.iia["all"].value
    assert torch.allclose(saved.subspaces["GENDER"].basis, direct.subspaces["GENDER"].basis, atol=1e-6)
    # provenance: the file as given and a hash of every input, each recomputed here
    assert (out_dir / "experiment.toml").read_text() == path.read_text()
    inputs = manifest["inputs"]
    assert inputs["experiment.toml"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert inputs["task"] == python_task().sha256()
    weights = next(p for p in sl.models.embedded_path("smollm2-135m").glob("*.safetensors"))
    assert inputs["model"]["files"][weights.name] == hashlib.sha256(weights.read_bytes()).hexdigest()
    from steerlab.experiment.core import dataset_hash

    assert inputs["counterfactuals"] == {"train": dataset_hash(train), "test": dataset_hash(test)}
    assert manifest["steerlab"] == sl.__version__ and manifest["model"] == {"name": "smollm2-135m"}
    page = (out_dir / "report.html").read_text()
    assert page.count('id="steerlab-figure-') == 2  # the DAS curve and the projection
    # a second run into the same folder is refused; --overwrite allows it
    code, _, err = run_cli(capsys, "run", path, "--output-dir", out_dir)
    assert code == 1 and "already holds a run (manifest.json); choose another output_dir or pass --overwrite" in error_line(err)


@pytest.mark.slow
def test_run_patch_sweeps_the_pair_it_names(capsys, tmp_path):
    from steerlab.interventions import SweepResult

    extra = ('[patch]\nlayers = [10, 29]\npositions = "all"\n'
             'base = { NAME = "John", PLACE = "park" }\nsource = { NAME = "Mary", PLACE = "park" }\n')
    code, _, err = run_cli(capsys, "run", write(tmp_path, task_toml(extra=extra)), "--output-dir", tmp_path / "out")
    assert code == 0, err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["steps"]["patch"]["base"] == "After work, John walked to the park, where"
    assert manifest["steps"]["patch"]["metric"] == "logit_diff(' she', ' he')"
    res = SweepResult.load(tmp_path / "out" / "patch" / "result")
    assert res.base_value < 0 < res.source_value  # the base says he, the source she
    # the last block's output at the last position is all the logits read: patching it gives the source's answer
    assert res.normalised[-1, -1].item() == pytest.approx(1.0, abs=1e-4)
    assert abs(res.normalised[0, -1].item()) < 0.1  # layer 10's last token does not carry the name's gender yet


@pytest.mark.slow
def test_an_old_train_run_file_runs_as_the_train_step(capsys, tmp_path, minilm):
    from tests.test_cli_train import write_run

    old = write_run(tmp_path / "a", kind="classification", epochs=1, checkpoint_every=100)
    code, _, err = run_cli(capsys, "train", old)
    assert code == 0, err
    code, _, err = run_cli(capsys, "run", old, "--output-dir", tmp_path / "b")
    assert code == 0, err
    from tests.test_cli_train import assert_same_weights

    assert_same_weights(tmp_path / "a" / "out" / "final", tmp_path / "b" / "train" / "final")
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    data = tmp_path / "a" / "data.jsonl"
    assert manifest["inputs"]["data:data.jsonl"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert manifest["steps"]["train"]["steps"] == 4


# -- bad files -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        ("[dass]\nlayer = 20\n", "unknown table [dass]; did you mean [das]"),
        ("[das]\nlayer = 20\nsize = 0\n", "[das].size = 0: expected a positive integer"),
        ("[das]\nlayr = 20\n", "[das]: unknown key 'layr'; known: "),
        ("[das]\nlayer = 20\npositions = \"adjective\"\n", "position 'adjective'; expected one the task names (last, name, place)"),
        ("[das]\nsite = \"blocks.*.resid_post\"\n", "expected one site name (a pattern or list belongs in [search])"),
        ("", "has no step to run: add one of [patch], [das], [search], [attribution], [train], [steer_eval]"),
        ("[patch]\nbase = { NAME = \"John\", PLACE = \"park\" }\nsource = { NAME = \"Peter\", PLACE = \"park\" }\n",
         "base and source have the same answer 'he'; patching would show nothing"),
    ],
)
def test_bad_tables_are_one_line_errors_before_any_model_loads(capsys, tmp_path, extra, message):
    path = write(tmp_path, task_toml(extra=extra))
    code, _, err = run_cli(capsys, "validate", path, "--no-model")
    assert code == 1
    assert message in error_line(err)


def test_bad_tasks_name_the_key(capsys, tmp_path):
    cases = [
        (task_toml(extra="[das]\nlayer = 1\n").replace('template = "', 'templat = "'), "[task]: unknown key 'templat'"),
        (task_toml(extra="[das]\nlayer = 1\n").replace('Mary = "female"\n', ""), "the mechanism of 'GENDER' raised KeyError"),
        (task_toml(extra="[das]\nlayer = 1\n", answers='he = " he"'), "answers has no answer for ['she'] of 'PRONOUN'"),
        (task_toml(extra="[das]\nlayer = 1\n").replace('NAME = ["Paul", "Karen"]', 'NAME = ["Zoe"]'), "test_values.NAME holds ['Zoe']"),
        ("[model]\nname = \"smollm2-135m\"\n[das]\nlayer = 1\n", "the [das] step needs a [task] table"),
        ("[das]\nlayer = 1\n", "has no [model] table"),
        ("[model\n", "is not valid TOML"),
    ]
    for i, (text, message) in enumerate(cases):
        code, _, err = run_cli(capsys, "validate", write(tmp_path / str(i), text), "--no-model")
        assert code == 1 and message in error_line(err), (message, err)


def test_a_file_imports_code_only_with_allow_code(capsys, tmp_path):
    text = task_toml(extra="[das]\nlayer = 20\n").replace('[task.mechanisms.PRONOUN]\nparents = ["GENDER"]\nmap = { male = "he", female = "she" }',
                                                           '[task.mechanisms.PRONOUN]\nparents = ["GENDER"]\npython = "pronoun.py:pronoun"')
    path = write(tmp_path, text)
    (tmp_path / "pronoun.py").write_text("import pathlib\npathlib.Path(__file__).with_name('ran').write_text('yes')\n"
                                         "def pronoun(g):\n    return {'male': 'he', 'female': 'she'}[g]\n")
    code, _, err = run_cli(capsys, "explain", path)
    assert code == 1 and "imports code from" in error_line(err) and "pass --allow-code" in error_line(err)
    assert not (tmp_path / "ran").exists()  # refused before the file was read
    code, out, err = run_cli(capsys, "explain", path, "--allow-code")
    assert code == 0, err
    assert (tmp_path / "ran").read_text() == "yes"
    exp = Experiment.from_toml(path, allow_code=True)
    assert exp.task.sha256() == python_task().sha256()  # the imported function computes the same table


# -- data formats ---------------------------------------------------------------------------------------------------


def test_csv_and_tsv_rows_read_as_jsonl_rows(tmp_path):
    from steerlab.training import load_rows

    rows = [{"prompt": "Review: great, really\nSentiment:", "response": " Positive"}, {"prompt": "Q: 1+1?", "response": " 2"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "d.csv").write_text('prompt,response\n"Review: great, really\nSentiment:", Positive\nQ: 1+1?, 2\n')
    (tmp_path / "d.json").write_text(json.dumps(rows))
    assert load_rows(tmp_path / "d.csv") == load_rows(tmp_path / "d.jsonl") == load_rows(tmp_path / "d.json")
    (tmp_path / "c.tsv").write_text("text\tlabel\ngood film\t1\nbad film\t0\n")
    assert load_rows(tmp_path / "c.tsv") == ("classification", [{"text": "good film", "label": 1}, {"text": "bad film", "label": 0}])
    (tmp_path / "bad.csv").write_text("text,label\ngood film,one\n")
    with pytest.raises(sl.DataError, match=r"bad.csv line 2: label 'one'; expected a class index"):
        load_rows(tmp_path / "bad.csv")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(sl.DataError, match=r"unknown data format '.txt'; expected one of .jsonl, .json, .csv, .tsv"):
        load_rows(tmp_path / "d.txt")


# -- model names, --debug, PNG before compute --------------------------------------------------------------------------


def test_model_names_that_cannot_be_found_fail_at_once(monkeypatch, tmp_path):
    with pytest.raises(ModelNotFound, match=r"unknown model 'smollm2-135'; did you mean 'smollm2-135m'\? \(embedded: minilm-l6, smollm2-135m\)"):
        sl.load("smollm2-135")
    with pytest.raises(OSError, match=r"model 'org/some-model' is not an embedded name .* the hub is offline \(HF_HUB_OFFLINE=1\)"):
        sl.load("org/some-model")
    # no network: a hub endpoint that refuses the connection (a closed port on this machine) is named, with no retries
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(ModelNotFound, match=r"the hub \(http://127.0.0.1:9\) cannot be reached from here"):
        sl.load("org/some-model")
    with pytest.raises(ModelNotFound, match=r"model path '.*x.bin' has no config.json"):
        (tmp_path / "x.bin").write_bytes(b"")
        sl.load(str(tmp_path / "x.bin"))


def test_debug_is_accepted_after_the_command(capsys):
    with pytest.raises(sl.ConfigError, match="--filter 'nothing' matches no site"):
        main(["sites", "smollm2-135m", "--filter", "nothing", "--debug"])
    code, _, err = run_cli(capsys, "sites", "smollm2-135m", "--filter", "nothing")
    assert code == 1 and "--debug" not in err


def test_a_png_that_cannot_be_written_fails_before_any_compute(capsys, monkeypatch):
    import steerlab.interventions as interventions

    monkeypatch.setitem(sys.modules, "kaleido", None)
    monkeypatch.setattr(interventions, "sweep", lambda *a, **k: pytest.fail("the sweep ran before the PNG check"))
    monkeypatch.setattr(sl, "load", lambda *a, **k: pytest.fail("the model loaded before the PNG check"))
    code, _, err = run_cli(capsys, "patch", "smollm2-135m", "--base", "a", "--source", "b", "--good", " x", "--bad", " y", "--out", "f.png")
    assert code == 1
    assert error_line(err) == ("steerlab: error: PNG export of 'f.png' needs the 'kaleido' package: pip install 'kaleido>=1.0' "
                               "(in a clone of steerlab: pip install -e '.[png]'); or write HTML, which always works")


def test_allow_code_given_as_a_string_is_refused(tmp_path):
    """``allow_code="false"`` would read as True and import the experiment's code: a named error instead."""
    from steerlab.experiment import Experiment
    from steerlab.interventions.errors import ConfigError

    path = tmp_path / "e.toml"
    path.write_text('[model]\nname = "smollm2-135m"\n')
    with pytest.raises(ConfigError, match="allow_code='false': expected True or False"):
        Experiment.from_toml(path, allow_code="false")
    with pytest.raises(ConfigError, match="allow_code='no': expected True or False"):
        Experiment.from_dict({"model": {"name": "smollm2-135m"}}, allow_code="no")
