"""Reproduce the DAS paper's hierarchical-equality table (Geiger et al. 2023), over several seeds.

For each seed: train the 3-layer MLP (hidden size 16) to >= 99% accuracy on
held-out entities, then at each hidden layer align the two equality relations
WX and YZ to disjoint 8-dimensional subspaces with DAS, beside the controls
(the best localist alignment of the same sizes, exhaustive over all 12,870
neuron assignments; the same DAS on a randomly re-initialised network) and
the full-vector interchange. IIA is on held-out counterfactuals (entities
never seen in training), over all three intervention types (WX, YZ, both).

The MLP recipe matters for what DAS and the localist search find (see
``HierarchicalEquality.train_model``): ``--weight-decay 0.3`` (the default)
gives DAS >= 0.95 at layer 1; ``--also-no-decay`` adds the same table for a
network trained without weight decay.

Run: ``python benchmarks/das_hierarchical_equality.py [--seeds 0,1,2] [--layers 1,2,3]`` (about 10 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import steerlab as sl
from steerlab.alignment import DAS, tasks
from steerlab.alignment.tasks.hierarchical_equality import PAPER


def run(seed: int, layers: list[int], weight_decay: float, n_train: int, n_test: int, epochs: int) -> dict:
    task = tasks.hierarchical_equality()
    t0 = time.perf_counter()
    mlp, acc = task.train_model(seed=seed, weight_decay=weight_decay)
    t_mlp = time.perf_counter() - t0
    lab = sl.wrap(mlp, example_input=task.example_input())
    train, test = task.datasets(n_train=n_train, n_test=n_test, seed=seed)
    out = {"acc": acc, "t_mlp": t_mlp, "layers": {}}
    for layer in layers:
        t0 = time.perf_counter()
        r = DAS(lab, site=task.site(layer), size=8, epochs=epochs, batch_size=64, lr=0.01, seed=seed).fit(train, test)
        out["layers"][layer] = {
            "das": r.iia["all"].value, "das_se": r.iia["all"].se,
            "wx": r.iia["WX"].value, "yz": r.iia["YZ"].value, "both": r.iia["WX+YZ"].value,
            "localist": r.localist["all"].value, "random": r.random_init["all"].value,
            "random_near_chance": r.random_init["all"].near_chance,
            "full": statistics.mean(v.value for v in r.full_vector.values()), "seconds": time.perf_counter() - t0,
        }
        print(f"  seed {seed} layer {layer}: DAS {r.iia['all'].value:.3f} (WX {r.iia['WX'].value:.3f}, YZ {r.iia['YZ'].value:.3f}, "
              f"both {r.iia['WX+YZ'].value:.3f}), localist {r.localist['all'].value:.3f}, random-init {r.random_init['all'].value:.3f}, "
              f"full vector {out['layers'][layer]['full']:.3f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    return out


def table(results: list[dict], layers: list[int], title: str) -> None:
    def ms(xs):
        return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"

    print(f"\n== {title}")
    accs = [r["acc"] for r in results]
    print(f"MLP accuracy on held-out entities: {ms(accs)} (min {min(accs):.4f}; paper: trained to ~100%)")
    head = f"{'layer':<6} {'DAS (ours)':>16} {'paper DAS':>10} {'localist (ours)':>16} {'paper localist':>16} {'random-init (ours)':>19} {'near chance':>12} {'full vector':>14}"
    print(head)
    for layer in layers:
        rows = [r["layers"][layer] for r in results]
        paper_das = f"{PAPER['das_layer1_size8']:.2f}" if layer == 1 else "-"
        paper_loc = f"{PAPER['localist_brute_force']:.2f}/{PAPER['localist_closest']:.2f}" if layer == 1 else "-"
        near = sum(r["random_near_chance"] for r in rows)
        print(f"{layer:<6} {ms([r['das'] for r in rows]):>16} {paper_das:>10} {ms([r['localist'] for r in rows]):>16} {paper_loc:>16} "
              f"{ms([r['random'] for r in rows]):>19} {f'{near}/{len(rows)}':>12} {ms([r['full'] for r in rows]):>14}")
    print("DAS: both relations, 8 dims each (IIA over WX, YZ and both interventions); localist: best of all 12,870 8+8 neuron "
          "assignments (chosen on training counterfactuals); paper localist: brute force / closest; chance 0.5")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--layers", default="1,2,3")
    ap.add_argument("--weight-decay", type=float, default=0.3)
    ap.add_argument("--also-no-decay", action="store_true")
    ap.add_argument("--n-train", type=int, default=20_000)
    ap.add_argument("--n-test", type=int, default=4_000)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)  # a 16-wide MLP is overhead-bound: one thread is fastest
    seeds = [int(s) for s in args.seeds.split(",")]
    layers = [int(x) for x in args.layers.split(",")]
    t0 = time.perf_counter()
    recipes = [args.weight_decay] + ([0.0] if args.also_no_decay else [])
    for wd in recipes:
        print(f"MLP weight decay {wd}:")
        results = [run(s, layers, wd, args.n_train, args.n_test, args.epochs) for s in seeds]
        table(results, layers, f"hierarchical equality, MLP weight decay {wd}, seeds {seeds}")
    print(f"\ntotal {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
