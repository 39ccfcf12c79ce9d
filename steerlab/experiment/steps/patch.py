"""``[patch]``: an activation-patching sweep from a source prompt of the task into a base prompt."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from steerlab.experiment.core import Context, Step, StepOutput, register_step
from steerlab.experiment.steps._common import answer, boolean, draw_pair, pair_table, sites
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
    base, source = pair_table(table, ctx, where, "patching would show nothing")
    return PatchConfig(sites(table, where, "blocks.*.resid_post"), pos, base, source, boolean(table, "normalised", True, where))


def plan(c: PatchConfig) -> str:
    pair = f"base {c.base} and source {c.source}" if c.base else "a base/source pair drawn from the task"
    return f"activation patching at {c.sites}, positions {c.positions!r}, on {pair}; metric: the answers' logit difference"


def run(c: PatchConfig, ctx: Context) -> StepOutput:
    from steerlab.interventions import metrics, sweep
    from steerlab.viz import patching_heatmap, save_html

    task = ctx.task
    base, source = (c.base, c.source) if c.base else draw_pair(task, ctx.seed, "[patch]")
    enc = task.encoder(ctx.lab.tokenizer)
    good, bad = task.answers[answer(task, source)], task.answers[answer(task, base)]
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
