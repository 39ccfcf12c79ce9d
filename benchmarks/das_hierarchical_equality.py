"""The DAS paper's hierarchical-equality table (Geiger et al. 2023), over seeds and layers, with the
new DAS beside cross-entropy DAS, pyvene's DAS and the controls.

For each seed: train the 3-layer MLP (hidden size 16) to >= 99% accuracy on held-out entities,
then at each hidden layer align the two equality relations WX and YZ to disjoint 8-dimensional
subspaces, on the same counterfactuals (IIA on held-out entities, over WX, YZ and both):

* ``random start``  — steerlab's DAS with its defaults (objective, selection on training
  counterfactuals) from a random rotation: the guarantee column (DAS >= the best localist
  alignment within one standard error of their difference, and >= 0.97 at layer 1);
* ``localist start`` — the same from the best localist subspace;
* ``selected``      — of those two, the one with the higher IIA on training counterfactuals
  (what ``DAS(init="localist", restarts=1)`` reports);
* ``CE``            — steerlab's DAS as the paper trains it (cross-entropy, last step, random start);
* ``pyvene``        — pyvene 0.1.8's ``RotatedSpaceIntervention`` on the same MLP, data, optimiser,
  schedule, batch size and epochs (cross-entropy);
* ``localist``      — the best of all 12,870 8+8 neuron assignments (chosen on training data);
* ``random-init``   — the default DAS on the re-initialised MLP.

Run: ``python benchmarks/das_hierarchical_equality.py [--seeds 0,1,2] [--layers 1,2,3]``
(about 30 minutes on 2 quiet cores; ``--quick`` is a 2-minute smoke run).
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
import types

import torch
import torch.nn.functional as F

import steerlab as sl
from steerlab.alignment import DAS, tasks
from steerlab.alignment.tasks.hierarchical_equality import PAPER


def pyvene_das(mlp, layer: int, train, test, task, *, epochs: int, batch: int, lr: float, seed: int) -> float:
    """pyvene's full-rotation DAS with the two relations as partitions of one rotation (its DAS tutorial's set-up)."""
    import pyvene as pv

    torch.manual_seed(seed)
    model = copy.deepcopy(mlp)
    model.config = types.SimpleNamespace(to_dict=lambda: {})  # pyvene reads a config; a plain MLP has none
    comp = f"layers[{layer - 1}].output"
    rot = pv.RotatedSpaceIntervention(embed_dim=16)
    rep = {"component": comp, "unit": "t", "subspace_partition": [[0, 8], [8, 16]], "intervention_link_key": 0, "intervention": rot}
    ivm = pv.IntervenableModel(pv.IntervenableConfig(representations=[rep, dict(rep)], intervention_types=pv.RotatedSpaceIntervention),
                               model)
    ivm.disable_model_gradients()

    def arrays(ds):
        t = ds.table()
        x = task.encoder.encode(t.inputs)
        src = torch.where(t.sources >= 0, t.sources, t.base[:, None])
        return x[t.base], x[src[:, 0]], x[src[:, 1]], t.labels

    def run(b, w, yz):
        _, out = ivm({"x": b}, [{"x": w}, {"x": yz}], subspaces=[[[0]] * b.shape[0], [[1]] * b.shape[0]])
        return out

    xb, xw, xy, y = arrays(train)
    params = list({id(p): p for p in ivm.get_trainable_parameters()}.values())  # the linked rotation once
    opt = torch.optim.Adam(params, lr=lr)
    n = y.shape[0]
    steps = math.ceil(n / batch) * epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / steps)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for a in range(0, n, batch):
            r = perm[a : a + batch]
            loss = F.cross_entropy(run(xb[r], xw[r], xy[r]), y[r])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    tb, tw, ty, tl = arrays(test)
    with torch.no_grad():
        pred = torch.cat([run(tb[a : a + 512], tw[a : a + 512], ty[a : a + 512]).argmax(-1) for a in range(0, tl.shape[0], 512)])
    return float((pred == tl).float().mean())


def run(seed: int, layers: list[int], args) -> dict:
    task = tasks.hierarchical_equality()
    t0 = time.perf_counter()
    mlp, acc = task.train_model(seed=seed, n_train=args.mlp_n_train)
    t_mlp = time.perf_counter() - t0
    lab = sl.wrap(mlp, example_input=task.example_input())
    train, test = task.datasets(n_train=args.n_train, n_test=args.n_test, seed=seed)
    common = dict(site=None, size=8, epochs=args.epochs, batch_size=64, lr=0.01, seed=seed)
    out = {"acc": acc, "t_mlp": t_mlp, "layers": {}}
    for layer in layers:
        site = task.site(layer)
        kw = {**common, "site": site}
        t0 = time.perf_counter()
        rnd = DAS(lab, **kw).fit(train, test)  # defaults, random start, with controls
        t_rnd = time.perf_counter() - t0
        t0 = time.perf_counter()
        loc = DAS(lab, init="localist", controls=False, **kw).fit(train, test)
        t_loc = time.perf_counter() - t0
        sel = max((rnd, loc), key=lambda r: r.selection.iia)  # ties to the random start
        t0 = time.perf_counter()
        ce = DAS(lab, objective="cross_entropy", select="final", controls=False, **kw).fit(train, test)
        t_ce = time.perf_counter() - t0
        t0 = time.perf_counter()
        pv_iia = pyvene_das(mlp, layer, train, test, task, epochs=args.epochs, batch=64, lr=0.01, seed=seed) if args.pyvene else None
        t_pv = time.perf_counter() - t0
        lo = rnd.localist["all"]
        row = {
            "random": rnd.iia["all"].value, "random_se": rnd.iia["all"].se, "localist_start": loc.iia["all"].value,
            "selected": sel.iia["all"].value, "selected_from": "localist" if sel is loc else "random",
            "ce": ce.iia["all"].value, "pyvene": pv_iia, "localist": lo.value, "localist_se": lo.se,
            "random_init": rnd.random_init["all"].value, "random_init_near_chance": rnd.random_init["all"].near_chance,
            "seconds": {"random start (with controls)": t_rnd, "localist start": t_loc, "CE": t_ce, "pyvene": t_pv},
            "selection": rnd.selection.describe(),
        }
        # within one standard error of the difference between the two estimates
        row["ok"] = row["random"] >= lo.value - (lo.se**2 + rnd.iia["all"].se ** 2) ** 0.5 and (layer != 1 or row["random"] >= 0.97)
        out["layers"][layer] = row
        print(f"  seed {seed} layer {layer}: random start {row['random']:.3f}, localist start {row['localist_start']:.3f}, "
              f"selected {row['selected']:.3f} ({row['selected_from']}), CE {row['ce']:.3f}, "
              f"pyvene {'-' if pv_iia is None else f'{pv_iia:.3f}'}, localist {lo.value:.3f} ± {lo.se:.3f}, "
              f"random-init {row['random_init']:.3f}; guarantee {'held' if row['ok'] else 'MISSED'} "
              f"({', '.join(f'{k} {v:.0f}s' for k, v in row['seconds'].items())})", flush=True)
    return out


def table(results: list[dict], layers: list[int], seeds: list[int]) -> None:
    def ms(xs):
        xs = [x for x in xs if x is not None]
        if not xs:
            return "-"
        return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"

    accs = [r["acc"] for r in results]
    print(f"\n== hierarchical equality, 8 + 8 dims, seeds {seeds}: IIA on held-out entities (mean ± sd over seeds)")
    print(f"MLP accuracy on held-out entities: {ms(accs)} (min {min(accs):.4f})")
    cols = ["random start", "localist start", "selected", "CE (paper's)", "pyvene (CE)", "localist", "random-init", "paper DAS",
            "guarantee"]
    print("| layer | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for layer in layers:
        rows = [r["layers"][layer] for r in results]
        held = sum(r["ok"] for r in rows)
        paper = f"{PAPER['das_layer1_size8']:.2f}" if layer == 1 else "—"
        cells = [ms([r["random"] for r in rows]), ms([r["localist_start"] for r in rows]), ms([r["selected"] for r in rows]),
                 ms([r["ce"] for r in rows]), ms([r["pyvene"] for r in rows]), ms([r["localist"] for r in rows]),
                 ms([r["random_init"] for r in rows]), paper, f"{held}/{len(rows)}"]
        print(f"| {layer} | " + " | ".join(cells) + " |")
    print("\nper seed (random start vs localist ± 1 s.e.):")
    for s, r in zip(seeds, results):
        print(f"  seed {s}: " + "; ".join(f"L{L} {r['layers'][L]['random']:.3f} vs {r['layers'][L]['localist']:.3f} ± "
                                           f"{r['layers'][L]['localist_se']:.3f}" for L in layers))
    print(f"paper localist: {PAPER['localist_brute_force']:.2f} (brute force) / {PAPER['localist_closest']:.2f} (closest); chance 0.5")
    secs = {}
    for r in results:
        for row in r["layers"].values():
            for k, v in row["seconds"].items():
                secs.setdefault(k, []).append(v)
    print("mean seconds per fit: " + ", ".join(f"{k} {statistics.mean(v):.0f}" for k, v in secs.items()))
    print(f"selection (seed {seeds[0]}, layer {layers[0]}): {results[0]['layers'][layers[0]]['selection']}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--layers", default="1,2,3")
    ap.add_argument("--n-train", type=int, default=20_000)
    ap.add_argument("--n-test", type=int, default=4_000)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--mlp-n-train", type=int, default=300_000)
    ap.add_argument("--no-pyvene", dest="pyvene", action="store_false")
    ap.add_argument("--quick", action="store_true", help="one seed, layers 1-2, small data: a smoke run")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)  # a 16-wide MLP is overhead-bound: one thread is fastest
    if args.quick:
        args.seeds, args.layers, args.n_train, args.n_test, args.epochs, args.mlp_n_train = "0", "1,2", 3000, 1000, 2, 100_000
    seeds = [int(s) for s in args.seeds.split(",")]
    layers = [int(x) for x in args.layers.split(",")]
    t0 = time.perf_counter()
    results = [run(s, layers, args) for s in seeds]
    table(results, layers, seeds)
    print(f"\ntotal {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
