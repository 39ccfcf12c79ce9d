"""``[das]``: DAS at one site, with its controls, on the task's counterfactuals."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from steerlab.experiment.core import Context, Step, StepOutput, register_step
from steerlab.experiment.steps._common import boolean, positive_float, positive_int, sites, task_position
from steerlab.interventions.errors import ConfigError

KEYS = {
    "site": "the site, e.g. \"blocks.20.resid_post\" (or give layer)",
    "layer": "shorthand for site = \"blocks.LAYER.resid_post\"",
    "positions": "where in the prompt: last (default), a template field's name, one of [task.positions], an integer, or \"none\"",
    "size": "subspace dimensions per aligned variable (default 4)",
    "epochs": "training epochs (default 3)",
    "batch_size": "counterfactuals per step (default 32)",
    "lr": "learning rate (default 0.01)",
    "controls": "also train on a re-initialised model and search neuron-aligned subspaces (default true)",
    "localist_samples": "neuron subsets tried for the localist control when they are too many to enumerate (default 16)",
}


@dataclass
class DASConfig:
    site: str
    positions: Any
    size: int
    epochs: int
    batch_size: int
    lr: float
    controls: bool
    localist_samples: int


def parse(table: dict, ctx: Context) -> DASConfig:
    where = f"{ctx.experiment.where} [das]"
    if "site" in table and "layer" in table:
        raise ConfigError(f"{where}: give site or layer, not both")
    if "site" in table:
        site = sites({"sites": table["site"]}, where)
        if len(site) != 1 or "*" in site[0]:
            raise ConfigError(f"{where}.site = {table['site']!r}: expected one site name (a pattern or list belongs in [search])")
    elif "layer" in table:
        site = sites({"layers": table["layer"]}, where)
        if len(site) != 1:
            raise ConfigError(f"{where}.layer = {table['layer']!r}: expected one integer (several belong in [search])")
    else:
        raise ConfigError(f"{where} has no site: expected site = \"blocks.20.resid_post\" or layer = 20")
    return DASConfig(
        site=site[0], positions=task_position(ctx.task, table.get("positions", "last"), f"{where}.positions"),
        size=positive_int(table, "size", 4, where), epochs=positive_int(table, "epochs", 3, where),
        batch_size=positive_int(table, "batch_size", 32, where), lr=positive_float(table, "lr", 1e-2, where),
        controls=boolean(table, "controls", True, where), localist_samples=positive_int(table, "localist_samples", 16, where),
    )


def plan(c: DASConfig) -> str:
    return (f"DAS at {c.site}, positions {c.positions!r}, size {c.size}: {c.epochs} epochs of batches of {c.batch_size}, lr {c.lr}"
            + ("; controls: random-init model, localist subspaces, full-vector interchange" if c.controls else "; no controls"))


def run(c: DASConfig, ctx: Context) -> StepOutput:
    from steerlab.alignment import DAS
    from steerlab.viz import save_html, subspace_projection

    train, test = ctx.datasets()
    das = DAS(ctx.lab, site=c.site, size=c.size, positions=c.positions, epochs=c.epochs, batch_size=c.batch_size, lr=c.lr,
              seed=ctx.seed, controls=c.controls, localist_samples=c.localist_samples)
    result = das.fit(train, test)
    folder = ctx.out / "das"
    result.save(folder / "result")
    figures = {"training curve and controls": result.plot(),
               "held-out representations on the subspace": subspace_projection(result, ctx.lab, test)}
    files = [folder / "result"] + [save_html(f, folder / f"{n.split()[0]}.html") for n, f in zip(("curve", "projection"), figures.values())]
    return StepOutput(summary=_summary(result), figures=figures, files=files, text=str(result), result=result)


def _summary(result) -> dict[str, Any]:
    def v(d, k):  # the values as computed, unrounded: a result names exactly what it found
        return None if d is None or k not in d else d[k].value

    out: dict[str, Any] = {"site": result.site, "positions": result.positions, "sizes": dict(result.sizes)}
    for k, iia in result.iia.items():
        out[f"iia[{k}]"] = iia.value
        out[f"se[{k}]"] = iia.se
    out["iia"] = result.iia["all"].value
    out["random_init"] = v(result.random_init, "all")
    out["localist"] = v(result.localist, "all")
    full = [x.value for x in result.full_vector.values()]
    out["full_vector"] = sum(full) / len(full) if full else None
    out["chance"] = result.chance
    return out


register_step(Step("das", parse=parse, run=run, plan=plan, keys=KEYS, order=20,
                   doc="DAS at one site with its controls; saves das/result (the file format), das/curve.html, das/projection.html"))
