"""DAS objectives × tasks: held-out IIA and wall time per variant, through steerlab's DAS.

Every variant is a :class:`~steerlab.alignment.DAS` configuration (objective, start, restarts,
selection rule) run on the same counterfactuals:

* hierarchical equality: the 3-layer MLP (seed ``--seed``), WX and YZ at 8 + 8 dims, layers 1-3;
* SmolLM2-135M adjective polarity: POLARITY at the answer position, size 4, at ``--lm-layers``
  (the demo's budget: 64 + 64 counterfactuals, 3 epochs, batch 16);
* Boundless DAS on hierarchical equality's WX alone (the size learned), default objective
  against cross-entropy.

Each row: IIA on held-out counterfactuals (± s.e.), the localist control and the full-vector
interchange beside it, and the seconds the fit took, so the cost of restarts and of the
selection checkpoints is on the same line as what they buy. The default is the first variant.

Run: ``python benchmarks/das_objectives.py [--tasks equality,polarity]`` (about 25 minutes on 2
quiet cores; ``--quick``: layer 2 and layer 22 only, small data).
"""

from __future__ import annotations

import argparse
import time

import torch

import steerlab as sl
from steerlab.alignment import DAS, tasks
from steerlab.alignment.controls import localist_alignment
from steerlab.alignment.objectives import default_objective

VARIANTS = {
    "default (CE then smooth 0-1, select on train)": {},
    "cross-entropy, last step (before)": {"objective": "cross_entropy", "select": "final"},
    "cross-entropy, select on train": {"objective": "cross_entropy"},
    "default, last step (no selection)": {"select": "final"},
    "smooth 0-1 alone (3 -> 0.1)": {"objective": {"name": "smooth_zero_one", "temperature": 3.0, "final_temperature": 0.1}},
    "default, localist start": {"init": "localist"},
    "default, 2 restarts": {"restarts": 2},
}


def fit(lab, train, test, site, size, positions, variant, **kw):
    t0 = time.perf_counter()
    r = DAS(lab, site=site, size=size, positions=positions, controls=False, **variant, **kw).fit(train, test)
    return r, time.perf_counter() - t0


def equality(args) -> list[dict]:
    task = tasks.hierarchical_equality()
    mlp, _ = task.train_model(seed=args.seed, n_train=args.mlp_n_train)
    lab = sl.wrap(mlp, example_input=task.example_input())
    train, test = task.datasets(n_train=args.n_train, n_test=args.n_test, seed=args.seed)
    rows = []
    for layer in args.he_layers:
        site = task.site(layer)
        for name, v in VARIANTS.items():
            r, secs = fit(lab, train, test, site, 8, None, v, epochs=args.epochs, batch_size=64, lr=0.01, seed=args.seed)
            rows.append(_row("hierarchical equality", f"L{layer}", name, r, secs, lab, train, test, site, None, 8))
    return rows


BOUNDLESS = {
    "Boundless, default objective": {},
    "Boundless, cross-entropy": {"objective": "cross_entropy"},
}


def boundless_equality(args) -> list[dict]:
    """Boundless DAS on one relation (WX), the size learned: IIA and the size it settles on."""
    from steerlab.alignment import BoundlessDAS

    task = tasks.hierarchical_equality()
    mlp, _ = task.train_model(seed=args.seed, n_train=args.mlp_n_train)
    lab = sl.wrap(mlp, example_input=task.example_input())
    train = task.counterfactuals(args.n_train // 2, intervene="WX", seed=args.seed)
    test = task.counterfactuals(args.n_test // 2, split="test", intervene="WX", seed=args.seed + 1)
    rows = []
    penalty = {} if args.boundary_penalty is None else {"boundary_penalty": args.boundary_penalty}
    for layer in args.he_layers:
        for name, v in BOUNDLESS.items():
            t0 = time.perf_counter()
            r = BoundlessDAS(lab, site=task.site(layer), epochs=args.epochs, batch_size=64, lr=0.01, seed=args.seed,
                             controls=False, **v, **penalty).fit(train, test)
            secs = time.perf_counter() - t0
            print(f"  hierarchical equality  L{layer} WX    {name:<40} IIA {r.iia['all'].value:.3f} ± {r.iia['all'].se:.3f}  "
                  f"size {r.sizes['WX']:>2} of 16  {secs:6.1f}s", flush=True)
            rows.append({"task": "hierarchical equality (WX)", "where": f"L{layer}", "variant": f"{name} (size {r.sizes['WX']})",
                         "iia": r.iia["all"].value, "se": r.iia["all"].se, "localist": float("nan"), "full": None, "seconds": secs})
    return rows


def polarity(args) -> list[dict]:
    model, tok = sl.load("smollm2-135m")
    lab = sl.wrap(model, tok)
    task = tasks.sentiment()
    train, test = task.datasets(lab, n_train=args.lm_n, n_test=args.lm_n, seed=args.seed)
    rows = []
    try:
        for layer in args.lm_layers:
            site = f"blocks.{layer}.resid_post"
            for name, v in VARIANTS.items():
                r, secs = fit(lab, train, test, site, 4, "last", v, epochs=3, batch_size=16, lr=0.01, seed=args.seed,
                              localist_samples=8, selection_size=len(train))
                rows.append(_row("SmolLM2 polarity", f"L{layer} last", name, r, secs, lab, train, test, site, "last", 4))
    finally:
        lab.unwrap()
    return rows


_LOCALIST: dict = {}


def _row(task, where, name, r, secs, lab, train, test, site, positions, size) -> dict:
    key = (task, where)
    if key not in _LOCALIST:  # the localist control once per place, as DAS would compute it
        from steerlab.alignment._activations import Runner
        from steerlab.alignment.das import store_for

        store = store_for(lab, [train, test], [site])
        rt, re_ = Runner(store, train, site, positions), Runner(store, test, site, positions)
        width = lab.facts.site_shape(lab.resolve(site))[0]
        _LOCALIST[key] = localist_alignment(rt, re_, dict(r.sizes), width, samples=8 if width > 16 else 64,
                                            selection_size=min(len(train), 512)).iia["all"].value
    full = [v.value for v in r.full_vector.values()]
    row = {"task": task, "where": where, "variant": name, "iia": r.iia["all"].value, "se": r.iia["all"].se,
           "localist": _LOCALIST[key], "full": sum(full) / len(full) if full else None, "seconds": secs,
           "chosen": r.selection.starts[r.selection.chosen_run]}
    full_text = "-" if row["full"] is None else f"{row['full']:.3f}"
    print(f"  {task:<22} {where:<9} {name:<40} IIA {row['iia']:.3f} ± {row['se']:.3f}  localist {row['localist']:.3f}  "
          f"full {full_text}  {secs:6.1f}s  ({row['chosen']})", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default="equality,polarity,boundless")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--he-layers", default="1,2,3")
    ap.add_argument("--lm-layers", default="14,18,22")
    ap.add_argument("--n-train", type=int, default=20_000)
    ap.add_argument("--n-test", type=int, default=4_000)
    ap.add_argument("--lm-n", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--mlp-n-train", type=int, default=300_000)
    ap.add_argument("--boundary-penalty", type=float, default=None, help="default: BoundlessDAS's own")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.he_layers, args.lm_layers, args.n_train, args.n_test, args.epochs, args.mlp_n_train = "2", "22", 3000, 1000, 2, 100_000
    args.he_layers = [int(x) for x in str(args.he_layers).split(",")]
    args.lm_layers = [int(x) for x in str(args.lm_layers).split(",")]
    t0 = time.perf_counter()
    rows = []
    if "equality" in args.tasks:
        rows += equality(args)
    if "polarity" in args.tasks:
        rows += polarity(args)
    if "boundless" in args.tasks:
        rows += boundless_equality(args)
    print(f"\n== DAS variants (default objective: {default_objective().describe()}); held-out IIA, seconds per fit")
    print("| task | where | variant | IIA | localist | full vector | seconds |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        full = "—" if r["full"] is None else f"{r['full']:.3f}"
        loc = "—" if r["localist"] != r["localist"] else f"{r['localist']:.3f}"
        print(f"| {r['task']} | {r['where']} | {r['variant']} | {r['iia']:.3f} ± {r['se']:.3f} | {loc} | {full} | {r['seconds']:.1f} |")
    print(f"\ntotal {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
