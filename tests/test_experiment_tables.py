"""The ``[steer_eval]`` and ``[attribution]`` tables of the experiment file.

A tiny file per table run through ``steerlab run`` gives exactly (bit for bit) the numbers the
library gives for the same settings called from Python; the run folder holds each result in the
file format, its figures in the report, and its inputs in the manifest; ``steerlab validate``
prints their plan; bad tables are one-line errors naming the key.
"""

from __future__ import annotations

import hashlib
import json
import math
import textwrap
import tomllib
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import steerlab as sl
from steerlab.alignment import DASResult
from steerlab.cli import main
from steerlab.experiment import Experiment
from steerlab.interventions import AttributionResult, SweepResult, fileformat, metrics
from steerlab.models import embedded_path
from steerlab.reft import SteerEvalResult

STEER = """\
name = "steer"
[model]
name = "smollm2-135m"

[steer_eval]
concepts = ["french"]
methods = ["prompt", "diffmean"]
layer = 8
factors = [0.2, 0.6]
n_train = 8
n_test_examples = 4
n_val_instructions = 1
n_test_instructions = 2
max_new_tokens = 4
"""

TEMPLATE = "After work, {name} walked to the {place}, where"
TASK = f"""\
name = "pronoun"
[model]
name = "smollm2-135m"

[task]
template = "{TEMPLATE}"
intervene = "GENDER"
n_train = 32
n_test = 16

[task.variables]
NAME = ["John", "Michael", "David", "Mary", "Sarah", "Emma"]
PLACE = ["store", "park"]

[task.mechanisms.GENDER]
parents = ["NAME"]
map = {{ John = "male", Michael = "male", David = "male", Mary = "female", Sarah = "female", Emma = "female" }}

[task.mechanisms.PRONOUN]
parents = ["GENDER"]
map = {{ male = "he", female = "she" }}

[task.answers]
he = " he"
she = " she"
"""
DAS = """
[das]
layer = 12
positions = "name"
size = 1
epochs = 1
controls = false
"""
ATTRIBUTION = """
[attribution]
families = ["resid_post", "attn.q"]
layers = [3, 12]
qk_fix = true
grad_drop = true
refine = 2
exact = true
top_k = 5
ig_steps = 4
base = { NAME = "John", PLACE = "park" }
source = { NAME = "Mary", PLACE = "park" }
"""
SITES = ["blocks.3.resid_post", "blocks.12.resid_post", "blocks.3.attn.q", "blocks.12.attn.q"]


def write(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "exp.toml").write_text(text)
    return folder / "exp.toml"


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def one_thread():
    """Both sides at one torch thread (``--threads 1``): a matmul's reduction order, and so its last bit, can depend on it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def same(a, b) -> bool:
    """Equal, NaN equal to NaN (JSON records and tensors)."""
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(((a == b) | (a.isnan() & b.isnan())).all())
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


# -- [steer_eval] ----------------------------------------------------------------------------------------------


def test_steer_eval_table_gives_what_compare_gives(tmp_path, capsys, smollm, minilm, one_thread):
    from steerlab.reft.concepts import concept
    from steerlab.steering import compare

    out = tmp_path / "out"
    code, text, err = run_cli(capsys, "run", write(tmp_path, STEER), "--output-dir", out, "--threads", "1", "--no-progress")
    assert code == 0, err
    saved = SteerEvalResult.load(out / "steer_eval" / "result")

    lab, emb = sl.wrap(*smollm), sl.wrap(*minilm)
    try:
        want = compare(lab, concepts=["french"], methods=["prompt", "diffmean"], seeds=[0], embedder=emb, progress=False, layer=8,
                       factors=[0.2, 0.6], n_train=8, n_test_examples=4, n_val_instructions=1, n_test_instructions=2, max_new_tokens=4)
    finally:
        lab.unwrap()
        emb.unwrap()
    assert {r["method"] for r in want.rows} == {"none", "prompt", "diffmean"}
    assert len(want.rows) == 3 + 2 + 4  # none on val and test, prompt on test, diffmean on val at two factors and on test
    assert same(saved.rows, want.rows)  # every response and every score, exactly
    assert same(saved.detection, want.detection) and want.detection[0]["n_pos"] == 4
    assert same(saved.judges, want.judges) and saved.dropped == want.dropped == {}
    assert saved.table() == want.table() and want.table() in text

    manifest = json.loads((out / "manifest.json").read_text())
    data = hashlib.sha256(json.dumps(asdict(concept("french")), sort_keys=True).encode()).hexdigest()
    assert manifest["inputs"]["steer_eval:concept:french"] == data
    weights = (embedded_path("minilm-l6") / "model.safetensors").read_bytes()
    assert manifest["inputs"]["steer_eval:embedder:minilm-l6"]["files"]["model.safetensors"] == hashlib.sha256(weights).hexdigest()
    summary = manifest["steps"]["steer_eval"]
    assert same(summary["cells"], json.loads(json.dumps(want.cells())))
    assert summary["judges"] == {"french": [round(j["accuracy"], 4) for j in want.judges["french"]]}
    page = (out / "report.html").read_text()
    for heading in ("method × concept", "french: factor sweep", "concept detection AUROC", "table (judge accuracy"):
        assert f"<h2>steer_eval: {heading}" in page, heading
    assert page.count("plotly-graph-div") >= 3
    assert (out / "steer_eval" / "report.html").is_file() and (out / "steer_eval" / "concept_detection_auroc.html").is_file()


# -- [attribution] -----------------------------------------------------------------------------------------------


def test_attribution_table_gives_what_the_library_gives(tmp_path, capsys, smollm, one_thread):
    from steerlab.interventions import attribution_patching, direction_logits, integrated_gradients, subspace_attribution, sweep

    out = tmp_path / "out"
    code, text, err = run_cli(capsys, "run", write(tmp_path, TASK + DAS + ATTRIBUTION), "--output-dir", out, "--threads", "1",
                              "--no-progress")
    assert code == 0, err
    lab = sl.wrap(*smollm)
    fp = lab.fingerprint()
    try:
        base, source = TEMPLATE.format(name="John", place="park"), TEMPLATE.format(name="Mary", place="park")
        m = metrics.logit_diff(" she", " he")  # the source's answer over the base's
        est = attribution_patching(lab, base, source, metric=m, sites=SITES, qk_fix=True, grad_drop=True, refine=2)
        exact = sweep(lab, base, source, metric=m, sites=SITES)
        subspace = DASResult.load(out / "das" / "result", fingerprint=fp).subspaces["GENDER"]
        inside = subspace_attribution(lab, base, subspace, metric=m, source=source)
        name_at = [lab.tokenizer.decode([t]) for t in lab.tokenizer(base)["input_ids"]].index(" John")
        ig = integrated_gradients(lab, base, source, subspace, metric=m, steps=4, positions=name_at)
        writes = direction_logits(lab, subspace, inputs=base, metric=m)
    finally:
        lab.unwrap()

    got = AttributionResult.load(out / "attribution" / "result", fingerprint=fp)
    assert got.method == est.method == "AtP*" and got.sites == SITES and got.tokens == est.tokens
    for name in ("per_example", "base_metric", "source_metric", "score", "exact"):
        assert same(getattr(got, name), getattr(est, name)), name
    assert int((~est.exact.isnan()).sum()) == 2  # refine = 2 patched two cells exactly
    got_exact = SweepResult.load(out / "attribution" / "exact", fingerprint=fp)
    assert same(got_exact.per_example, exact.per_example)
    cmp = est.compare(exact, k=5)
    summary = json.loads((out / "manifest.json").read_text())["steps"]["attribution"]
    assert (summary["spearman"], summary["pearson"], summary["overlap"]) == (cmp.spearman, cmp.pearson, cmp.overlap)
    assert summary["base"] == base and summary["source"] == source and summary["metric"] == m.name
    assert summary["top"] == [list(t) for t in est.top(5)]

    meta, t = fileformat.load(out / "attribution" / "subspace_GENDER", kind="subspace_attribution", fingerprint=fp,
                              nonfinite=("inside", "outside", "directions"))
    for name in ("inside", "outside", "directions", "base_metric", "source_metric"):
        assert same(t[name], getattr(inside, name)), name
    assert meta["config"]["sites"] == inside.sites and len(inside.sites) == 30  # the subspace's kind of site at every layer
    meta, t = fileformat.load(out / "attribution" / "ig_GENDER", kind="integrated_gradients", fingerprint=fp)
    assert same(t["attributions"], ig.attributions) and meta["config"]["positions"] == name_at
    assert ig.completeness() < 1e-2  # the attributions sum to the exact interchange effect
    sub = summary["subspace"]["GENDER"]
    assert sub["ig_completeness"] == ig.completeness() and sub["promoted"] == [[tok for tok, _ in p] for p in writes.promoted]

    page = (out / "report.html").read_text()
    for heading in ("AtP* estimate", "AtP* vs exact patching", "attribution inside the GENDER subspace",
                    "integrated gradients inside the GENDER subspace", "what each GENDER direction writes"):
        assert f"<h2>attribution: {heading}" in page, heading
    assert (out / "attribution" / "atp_vs_exact_patching.html").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    pair = {"base": {"NAME": "John", "PLACE": "park"}, "source": {"NAME": "Mary", "PLACE": "park"}, "base_text": base,
            "source_text": source, "metric": m.name}
    assert manifest["inputs"]["attribution:pair"] == hashlib.sha256(json.dumps(pair, sort_keys=True).encode()).hexdigest()
    assert cmp.table() in text


# -- validate, the pair, bad tables --------------------------------------------------------------------------------


def test_validate_prints_the_plan_of_both_tables(tmp_path, capsys):
    code, out, err = run_cli(capsys, "validate", write(tmp_path / "s", STEER))
    assert code == 0, err
    assert ("[steer_eval] steering evaluation of ['prompt', 'diffmean'] on concepts ['french'], seeds [0]: blocks.8.resid_post, "
            "factors [0.2, 0.6] chosen on 1 validation instructions, 2 test instructions, 4 new tokens, positions 'both'") in out
    code, out, err = run_cli(capsys, "validate", write(tmp_path / "a", TASK + DAS + ATTRIBUTION), "--no-model", "--json")
    assert code == 0, err
    plan = dict((s["step"], s["plan"]) for s in json.loads(out)["steps"])
    assert list(plan) == ["das", "attribution"]  # in run order: the subspace exists before it is attributed
    assert plan["attribution"] == (
        f"AtP* at {SITES}, positions default, on base {{'NAME': 'John', 'PLACE': 'park'}} and source {{'NAME': 'Mary', 'PLACE': 'park'}}; "
        "metric logit_diff of the answers; exact sweep of the same cells (top-5 overlap); the top 2 cells patched exactly; "
        "the [das] subspace per layer × token, integrated gradients (4 steps), direct logits")


def test_the_drawn_pair_is_patchs_pair_with_equal_token_counts(smollm):
    from steerlab.experiment.steps._common import draw_pair

    _, tok = smollm
    task = Experiment.from_dict(tomllib.loads(TASK + "[attribution]\n")).task
    for seed in range(4):
        b, s = draw_pair(task, seed, "[attribution]", tokenizer=tok)
        assert sum(b[v] != s[v] for v in b) == 1 and task.causal_model.run(b)["PRONOUN"] != task.causal_model.run(s)["PRONOUN"]
        enc = task.encoder(tok)
        assert len(tok(enc.text(b))["input_ids"]) == len(tok(enc.text(s))["input_ids"])
        assert (b, s) == draw_pair(task, seed, "[patch]")  # [patch] draws without the length filter; these names are one token each: every pair qualifies, so [patch]'s pair is kept


@pytest.mark.parametrize("table, message", [
    ("[attribution]\nheads = \"all\"\nneurons = true\n", "give heads or neurons, not both"),
    ("[attribution]\nneurons = [1, 2]\nsites = \"blocks.*.mlp.post\"\nexact = true\n", "a neuron grid has no batched sweep"),
    ("[attribution]\nsubspace = true\n", "subspace = true attributes the subspace of the file's [das] step; add a [das] table"),
    ("[attribution]\ntokens = [\" he\"]\n", "tokens = [' he']: logit_diff takes 2 token strings"),
    ("[attribution]\nmetric = \"kl\"\n", "metric = 'kl': expected one of logit_diff, logit, prob, logprob"),
    ("[attribution]\npositions = \"middle\"\n", "positions = 'middle': expected \"all\", \"none\""),
    ("[attribution]\nlayers = [3]\n", "layers selects the layers of families"),
    ("[attribution]\nrefine = -1\n", "refine = -1: expected the number of top cells"),
    ("[attribution]\nbase = { NAME = \"John\", PLACE = \"park\" }\nsource = { NAME = \"David\", PLACE = \"park\" }\n",
     "base and source have the same answer 'he'"),
    ("[attribution]\nbase = { NAME = \"Zed\", PLACE = \"park\" }\nsource = { NAME = \"Mary\", PLACE = \"park\" }\n", "[attribution].base"),
    ("[steer_eval]\nmethods = [\"prompt\", \"magic\"]\n", "unknown ['magic']"),
    ("[steer_eval]\nmethods = [\"das\"]\nconcepts = [\"french\"]\n", "steer with the subspace of the file's [das] step; add a [das] table"),
    ("[steer_eval]\nconcepts = [\"klingon\"]\n", "concepts = ['klingon']: unknown ['klingon']"),
    ("[steer_eval]\nfactors = []\n", "factors = []: expected a list of numbers"),
    ("[steer_eval]\npositions = \"everywhere\"\n", "positions='everywhere'"),
    ("[steer_eval]\nseeds = [-1]\n", "seeds = [-1]: expected a list of non-negative integers"),
    ("[steer_eval]\nn_train = 0\n", "n_train = 0: expected a positive integer"),
    ("[steer_eval]\ndas_concept = \"french\"\n", "das_concept = 'french' without the das or loreft_das method"),
    ("[steer_eval]\nlayers = 3\n", "unknown key 'layers'"),
])
def test_bad_tables_are_one_line_errors_naming_the_key(tmp_path, capsys, table, message):
    code, _, err = run_cli(capsys, "validate", write(tmp_path, TASK + "\n" + table), "--no-model")
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("steerlab: error: ") and message in lines[0], err


def test_das_methods_steer_with_the_files_das_subspace_for_the_named_concept(tmp_path):
    table = "[steer_eval]\nmethods = [\"prompt\", \"das\", \"loreft_das\"]\nconcepts = [\"french\", \"sentiment\"]\n"
    with pytest.raises(sl.ConfigError, match="das_concept = None: name the concept"):
        Experiment.from_toml(write(tmp_path, TASK + DAS + table))
    exp = Experiment.from_toml(write(tmp_path, TASK + DAS + table + "das_concept = \"sentiment\"\n"))
    assert exp.configs["steer_eval"].das_concept == "sentiment"
    assert "the [das] subspace steers 'sentiment'" in dict(exp.plan())["steer_eval"]
    one = Experiment.from_toml(write(tmp_path, TASK + DAS + textwrap.dedent("""\
        [steer_eval]
        methods = ["das"]
        concepts = ["sentiment"]
        """)))
    assert one.configs["steer_eval"].das_concept == "sentiment"  # the only concept listed
