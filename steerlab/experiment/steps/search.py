"""``[search]``: DAS over sites × positions × sizes, with controls and the full-vector upper bound."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from steerlab.experiment.core import Context, Step, StepOutput, register_step
from steerlab.experiment.steps._common import boolean, int_list, positive_float, positive_int, sites, task_position

KEYS = {
    "sites": "site names or patterns, e.g. \"blocks.*.resid_post\" or a list (or give layers)",
    "layers": "shorthand: a list of layers, each blocks.L.resid_post",
    "positions": "a list of positions (last, a template field's name, one of [task.positions], an integer, \"none\"); default [\"last\"]",
    "sizes": "subspace sizes to try (default [1, 4])",
    "epochs": "training epochs per candidate (default 3)",
    "batch_size": "counterfactuals per step (default 32)",
    "lr": "learning rate (default 0.01)",
    "controls": "random-init and localist controls for every candidate (default true)",
    "localist_samples": "neuron subsets tried for the localist control (default 16)",
}


@dataclass
class SearchConfig:
    sites: list[str]
    positions: list[Any]
    sizes: list[int]
    epochs: int
    batch_size: int
    lr: float
    controls: bool
    localist_samples: int


def parse(table: dict, ctx: Context) -> SearchConfig:
    where = f"{ctx.experiment.where} [search]"
    pos = table.get("positions", ["last"])
    pos = pos if isinstance(pos, list) else [pos]
    sizes = int_list(table.get("sizes", [1, 4]), "sizes", where)
    if min(sizes) < 1:
        from steerlab.interventions.errors import ConfigError

        raise ConfigError(f"{where}.sizes = {sizes}: expected positive subspace sizes")
    return SearchConfig(
        sites=sites(table, where), positions=[task_position(ctx.task, p, f"{where}.positions") for p in pos], sizes=sizes,
        epochs=positive_int(table, "epochs", 3, where), batch_size=positive_int(table, "batch_size", 32, where),
        lr=positive_float(table, "lr", 1e-2, where), controls=boolean(table, "controls", True, where),
        localist_samples=positive_int(table, "localist_samples", 16, where),
    )


def plan(c: SearchConfig) -> str:
    return (f"DAS search over sites {c.sites} × positions {c.positions} × sizes {c.sizes}: {c.epochs} epochs each"
            + ("; controls for every candidate" if c.controls else "; no controls"))


def run(c: SearchConfig, ctx: Context) -> StepOutput:
    from steerlab.alignment import search
    from steerlab.viz import save_html

    train, test = ctx.datasets()
    res = search(ctx.lab, train, test, sites=c.sites, positions=c.positions, sizes=c.sizes, controls=c.controls, epochs=c.epochs,
                 batch_size=c.batch_size, lr=c.lr, seed=ctx.seed, localist_samples=c.localist_samples)
    folder = ctx.out / "search"
    res.save(folder / "result")
    fig = res.plot()
    best = res.best()
    summary = {"candidates": len(res.results), "best_site": best.site, "best_positions": best.positions,
               "best_sizes": dict(best.sizes), "best_iia": best.iia["all"].value, "chance": res.chance,
               "rows": [{k: v for k, v in r.items() if k != "seconds"} for r in res.rows()]}
    return StepOutput(summary=summary, figures={"IIA over sites and sizes, with controls": fig},
                      files=[folder / "result", save_html(fig, folder / "iia.html")], text=str(res), result=res)


register_step(Step("search", parse=parse, run=run, plan=plan, keys=KEYS, order=30,
                   doc="DAS over a grid with controls; saves search/result and search/iia.html"))
