"""``[steer_eval]``: which steering method works on this model? :func:`steerlab.steering.compare` as a table.

The keys are those of ``steerlab steer-eval`` (its flags with underscores); the
model is the file's ``[model]``. With a ``[das]`` table in the same file, the
methods ``das`` (an ``Add`` along the DAS subspace's first direction) and
``loreft_das`` (a LoReFT whose ``R`` is that subspace) join the comparison for
the concept named by ``das_concept``: "locate → steer" ends in a measured answer.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from steerlab.experiment.core import Context, Step, StepOutput, model_hash, register_step
from steerlab.experiment.steps._common import positive_int
from steerlab.experiment.steps._figures import save_figures
from steerlab.interventions.errors import ConfigError

#: the methods that need the file's [das] subspace
DAS_METHODS = ("das", "loreft_das")
EMBEDDER = "minilm-l6"  # instruction relevance and the topic judge read this encoder

KEYS = {
    "concepts": "shipped concepts to steer toward: sentiment, french, movies (default: all three)",
    "methods": "prompt, diffmean, pca, probe, caa, actadd, reft_r1, loreft, lora (default: all); das and loreft_das use the file's [das] subspace",
    "seeds": "seeds of the trained methods and PCA (default: [the experiment's seed])",
    "layer": "the layer whose resid_post every steering intervention edits (default 12)",
    "factors": "steering factors, multiples of the site's median token norm, chosen among on validation (default [0.05, 0.1, 0.2, 0.4])",
    "positions": "where the edits act while generating: prompt, decode or both (default both)",
    "n_train": "training examples per class for the direction finders and trained methods (default 32)",
    "n_test_examples": "held-out examples per class for the concept-detection AUROC (default 64)",
    "max_new_tokens": "tokens generated per response (default 32)",
    "n_val_instructions": "instructions the factor is chosen on (default 6)",
    "n_test_instructions": "held-out instructions the table reports on (default 12)",
    "epochs": "training epochs of ReFT-r1, LoReFT and LoRA (default 3)",
    "batch_size": "prompts generated per batch (default 16)",
    "das_concept": "the concept the [das] subspace stands for (methods das, loreft_das; default: the only concept listed)",
}


@dataclass
class SteerEvalConfig:
    concepts: list[str]
    methods: list[str]
    seeds: list[int]
    recipe: dict[str, Any]  # steerlab.steering.Recipe fields
    das_concept: str | None


def _names(table: dict, key: str, default: list[str], known, where: str) -> list[str]:
    value = table.get(key, default)
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(x, str) for x in items):
        raise ConfigError(f"{where}.{key} = {value!r}: expected a list of names, e.g. {default[:2]!r}")
    bad = [x for x in items if x not in known]
    if bad:
        raise ConfigError(f"{where}.{key} = {value!r}: unknown {bad}; expected some of {list(known)}")
    return list(dict.fromkeys(items))


def _recipe(table: dict, where: str) -> dict[str, Any]:
    from steerlab.steering import Recipe

    out: dict[str, Any] = {}
    for key in ("n_train", "n_test_examples", "max_new_tokens", "n_val_instructions", "n_test_instructions", "epochs", "batch_size"):
        if key in table:
            out[key] = positive_int(table, key, 1, where)
    if "layer" in table:
        if not isinstance(table["layer"], int) or isinstance(table["layer"], bool):
            raise ConfigError(f"{where}.layer = {table['layer']!r}: expected an integer (the layer whose resid_post is edited)")
        out["layer"] = table["layer"]
    if "factors" in table:
        f = table["factors"]
        f = f if isinstance(f, list) else [f]
        if not f or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in f):
            raise ConfigError(f"{where}.factors = {table['factors']!r}: expected a list of numbers, e.g. [0.1, 0.2, 0.4]")
        out["factors"] = [float(x) for x in f]
    if "positions" in table:
        out["positions"] = table["positions"]
    try:
        Recipe(**out)  # positions and factors checked as compare() checks them
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return out


def parse(table: dict, ctx: Context) -> SteerEvalConfig:
    from steerlab.reft.concepts import BUILDERS
    from steerlab.steering import METHODS

    where = f"{ctx.experiment.where} [steer_eval]"
    concepts = _names(table, "concepts", list(BUILDERS), sorted(BUILDERS), where)
    methods = _names(table, "methods", list(METHODS), [*METHODS, *DAS_METHODS], where)
    seeds = table.get("seeds", [ctx.seed])
    seeds = seeds if isinstance(seeds, list) else [seeds]
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise ConfigError(f"{where}.seeds = {table.get('seeds')!r}: expected a list of non-negative integers, e.g. [0, 1, 2]")
    das_concept = table.get("das_concept")
    if any(m in DAS_METHODS for m in methods):
        if "das" not in ctx.experiment.configs:
            raise ConfigError(f"{where}: methods {[m for m in methods if m in DAS_METHODS]} steer with the subspace of the file's "
                              "[das] step; add a [das] table (or drop those methods)")
        if das_concept is None and len(concepts) == 1:
            das_concept = concepts[0]
        if das_concept not in concepts:
            raise ConfigError(f"{where}.das_concept = {das_concept!r}: name the concept (one of {concepts}) the [das] subspace stands for")
    elif das_concept is not None:
        raise ConfigError(f"{where}.das_concept = {das_concept!r} without the das or loreft_das method: add one to methods")
    return SteerEvalConfig(concepts, methods, list(dict.fromkeys(seeds)), _recipe(table, where), das_concept)


def plan(c: SteerEvalConfig) -> str:
    from steerlab.steering import Recipe

    r = Recipe(**c.recipe)
    das = f"; the [das] subspace steers {c.das_concept!r}" if c.das_concept else ""
    return (f"steering evaluation of {c.methods} on concepts {c.concepts}, seeds {c.seeds}: blocks.{r.layer}.resid_post, "
            f"factors {list(r.factors)} chosen on {r.n_val_instructions} validation instructions, {r.n_test_instructions} test "
            f"instructions, {r.max_new_tokens} new tokens, positions {r.positions!r}{das}")


def _das_subspace(ctx: Context, c: SteerEvalConfig) -> dict[str, Any] | None:
    if c.das_concept is None:
        return None
    result = ctx.outputs["das"].result
    variable = next(iter(result.subspaces))
    return {c.das_concept: result.subspaces[variable]}


def concept_sha256(name: str) -> str:
    """SHA-256 of a shipped concept's data as plain JSON (examples, instructions, prompts, judge name, sources)."""
    from steerlab.reft.concepts import concept

    return hashlib.sha256(json.dumps(asdict(concept(name)), sort_keys=True).encode()).hexdigest()


def run(c: SteerEvalConfig, ctx: Context) -> StepOutput:
    import steerlab as sl
    from steerlab.steer_eval_cli import write_report
    from steerlab.steering import Recipe, compare
    from steerlab.viz import Pre

    if ctx.lab.tokenizer.pad_token is None:
        ctx.lab.tokenizer.pad_token = ctx.lab.tokenizer.eos_token
    embedder = sl.wrap(*sl.load(EMBEDDER))
    try:
        result = compare(ctx.lab, concepts=c.concepts, methods=c.methods, seeds=c.seeds, recipe=Recipe(**c.recipe),
                         embedder=embedder, das=_das_subspace(ctx, c), log=ctx.log)
    finally:
        embedder.unwrap()
    folder = ctx.out / "steer_eval"
    files = [result.save(folder / "result")]
    figures: dict[str, Any] = {"method × concept (test, chosen factor)": result.plot("table")}
    for concept in result.concepts:
        if concept not in result.dropped and result.sweep(concept):
            figures[f"{concept}: factor sweep (validation)"] = result.plot("sweep", concept=concept)
    if result.detection:
        figures["concept detection AUROC"] = result.plot("auroc")
    files += save_figures(figures, folder)
    write_report(result, str(folder / "report.html"))
    files.append(folder / "report.html")
    figures["table (judge accuracy on held-out labelled text beside each concept)"] = Pre(result.table())
    inputs = {f"steer_eval:concept:{n}": concept_sha256(n) for n in c.concepts}
    inputs[f"steer_eval:embedder:{EMBEDDER}"] = model_hash(EMBEDDER)
    return StepOutput(summary=_summary(result), figures=figures, files=files, text=result.table(), result=result, inputs=inputs)


def _summary(result) -> dict[str, Any]:
    split = result.time_split()
    return {
        "cells": result.cells(), "detection": result.detection, "dropped": result.dropped,
        "judges": {k: [round(j["accuracy"], 4) for j in v] for k, v in result.judges.items()},
        "generation_s": round(split["generation_s"], 2), "judging_s": round(split["judging_s"], 2), "training_s": round(split["training_s"], 2),
    }


register_step(Step("steer_eval", parse=parse, run=run, plan=plan, keys=KEYS, order=50, needs_task=False,
                   doc="the steering comparison of steerlab steer-eval; saves steer_eval/result (SteerEvalResult.load), its figures "
                       "and steer_eval/report.html"))
