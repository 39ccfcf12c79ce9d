"""``[patch]``: an activation-patching sweep from a source prompt of the task into a base prompt."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from steerlab.experiment.core import Context, Step, StepOutput, register_step
from steerlab.experiment.steps._common import boolean, sites
from steerlab.interventions.errors import ConfigError

KEYS = {
    "sites": "site names or patterns (default \"blocks.*.resid_post\"), or give layers",
    "layers": "shorthand: a list of layers, each blocks.L.resid_post",
    "positions": "\"all\" (each position in turn, default), \"none\" (all at once), a spec such as \"l3\", or a list of integers",
    "base": "table: the base prompt's input values, e.g. { NAME = \"John\" } (default: drawn from the task)",
    "source": "table: the source prompt's input values, whose answer differs from the base's (default: drawn)",
    "normalised": "plot (patched - base) / (source - base): 0 = base, 1 = source (default true)",
}


@dataclass
class PatchConfig:
    sites: list[str]
    positions: Any
    base: dict | None
    source: dict | None
    normalised: bool


def parse(table: dict, ctx: Context) -> PatchConfig:
    where = f"{ctx.experiment.where} [patch]"
    pos = table.get("positions", "all")
    if pos == "none":
        pos = None
    elif not (isinstance(pos, str) or (isinstance(pos, list) and all(isinstance(p, int) and not isinstance(p, bool) for p in pos))):
        raise ConfigError(f"{where}.positions = {pos!r}: expected \"all\", \"none\", a spec such as \"l3\", or a list of integers")
    pair = {}
    for key in ("base", "source"):
        if key in table:
            if not isinstance(table[key], dict):
                raise ConfigError(f"{where}.{key}: expected a table of input values, e.g. {{ NAME = \"John\" }}")
            try:
                ctx.task.causal_model.check_input(table[key])
            except Exception as e:
                raise ConfigError(f"{where}.{key}: {e}") from None
        pair[key] = table.get(key)
    if (pair["base"] is None) != (pair["source"] is None):
        raise ConfigError(f"{where}: give both base and source, or neither (then a pair is drawn from the task)")
    if pair["base"] is not None and _answer(ctx.task, pair["base"]) == _answer(ctx.task, pair["source"]):
        raise ConfigError(f"{where}: base and source have the same answer {_answer(ctx.task, pair['base'])!r}; patching would show nothing")
    return PatchConfig(sites(table, where, "blocks.*.resid_post"), pos, pair["base"], pair["source"], boolean(table, "normalised", True, where))


def _answer(task, setting):
    return task.causal_model.run(setting)[task.output]


def _pair(task, seed: int) -> tuple[dict, dict]:
    """A base and a source of equal prompt length whose answers differ (so position-wise patching lines up)."""
    rng = random.Random(seed)
    inputs = task.inputs(limit=2048, seed=seed)
    rng.shuffle(inputs)
    for b in inputs:
        for s in inputs:
            if _answer(task, b) != _answer(task, s) and sum(b[v] != s[v] for v in b) == 1:
                return b, s
    raise ConfigError("[patch]: no base/source pair of inputs differing in one variable has different answers; give base and source")


def plan(c: PatchConfig) -> str:
    pair = f"base {c.base} and source {c.source}" if c.base else "a base/source pair drawn from the task"
    return f"activation patching at {c.sites}, positions {c.positions!r}, on {pair}; metric: the answers' logit difference"


def run(c: PatchConfig, ctx: Context) -> StepOutput:
    from steerlab.interventions import metrics, sweep
    from steerlab.viz import patching_heatmap, save_html

    task = ctx.task
    base, source = (c.base, c.source) if c.base else _pair(task, ctx.seed)
    enc = task.encoder(ctx.lab.tokenizer)
    good, bad = task.answers[_answer(task, source)], task.answers[_answer(task, base)]
    result = sweep(ctx.lab, enc.text(base), enc.text(source), metric=metrics.logit_diff(good, bad), sites=c.sites, positions=c.positions)
    folder = ctx.out / "patch"
    result.save(folder / "result", fingerprint=ctx.lab.fingerprint())
    fig = patching_heatmap(result, value="normalised" if c.normalised else "values")
    summary = {"base": enc.text(base), "source": enc.text(source), "metric": result.metric,
               "base_value": round(float(result.base_value), 6), "source_value": round(float(result.source_value), 6)}
    return StepOutput(summary=summary, figures={"activation patching": fig}, files=[folder / "result", save_html(fig, folder / "patching.html")],
                      text=result.table(normalised=c.normalised), result=result)


register_step(Step("patch", parse=parse, run=run, plan=plan, keys=KEYS, order=10,
                   doc="an activation-patching sweep on one base/source pair of the task; saves patch/result and patch/patching.html"))
