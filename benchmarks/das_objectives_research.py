"""Research: which DAS objective, start and selection rule hold on hierarchical equality?

A fast, self-contained copy of DAS's maths for the hierarchical-equality MLP (plain
torch on cached layer activations: no hooks, so one fit takes seconds), used to
choose steerlab's defaults by measurement. The same maths as steerlab's DAS:
``R`` (k × d, orthonormal rows, steerlab's :class:`Orthonormal` QR map), the
distributed interchange ``h' = h + (s - h) Rᵀ R`` per variable on disjoint row
blocks of one rotation, Adam with linear decay, batch 64.

Objectives (``z`` = the label logits, ``m = z_y - max_{j != y} z_j`` the label margin):

* ``ce``       cross-entropy (today's DAS)
* ``sig:T``    smooth 0-1 loss ``sigmoid(-m / T)``
* ``anneal:A:B`` smooth 0-1 with ``T`` falling geometrically from ``A`` to ``B``
* ``hinge:M``  ``relu(M - m)``
* ``ce>sig:T`` cross-entropy for the first half of training, then ``sig:T``

Starts: ``random`` (seeded), ``localist`` (the best neuron-aligned split, chosen on
training counterfactuals). Selection: ``final`` (the last step) or ``best`` (the
checkpoint with the highest IIA on training counterfactuals, evaluated at the
start and every ``--evals-per-epoch`` of an epoch, over every restart).

Run: ``python benchmarks/das_objectives_research.py --seeds 0,1,2 --layers 1,2,3``
(prints one line per (seed, layer, variant) and a summary table).
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from steerlab.alignment import tasks
from steerlab.interventions.orthonormal import Orthonormal


@dataclass
class Split:
    h: torch.Tensor  # [n_inputs, 16] layer activations of the distinct inputs
    base: torch.Tensor  # [n]
    src: torch.Tensor  # [n, vars] (the base where a variable is not intervened)
    labels: torch.Tensor  # [n]


def mlp_for(task, seed: int, cache: Path | None, n_train: int, epochs: int = 3, weight_decay: float = 0.3):
    if cache is not None:
        tag = "" if (epochs, weight_decay) == (3, 0.3) else f"_e{epochs}_wd{weight_decay}"
        f = cache / f"he_mlp_seed{seed}_n{n_train}{tag}.pt"
        if f.exists():
            mlp = task.model(seed=seed)
            mlp.load_state_dict(torch.load(f, weights_only=True))
            mlp.eval()
            return mlp, task.accuracy(mlp, seed=seed + 1)
    mlp, acc = task.train_model(seed=seed, n_train=n_train, epochs=epochs, weight_decay=weight_decay)
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        torch.save(mlp.state_dict(), f)
    return mlp, acc


def split_of(task, mlp, ds, layer: int) -> Split:
    t = ds.table()
    x = task.encoder.encode(t.inputs)
    with torch.no_grad():
        h = x
        for m in mlp.layers[:layer]:
            h = m(h)
    src = torch.where(t.sources >= 0, t.sources, t.base[:, None])
    return Split(h, t.base, src, t.labels)


def upper(mlp, layer: int):
    mods = list(mlp.layers[layer:]) + [mlp.head]

    def f(h):
        for m in mods:
            h = m(h)
        return h

    return f


def logits_of(sp: Split, rows, rs: list[torch.Tensor], up) -> torch.Tensor:
    hb = sp.h[sp.base[rows]]
    out = hb
    for j, r in enumerate(rs):
        hs = sp.h[sp.src[rows, j]]
        out = out + (hs - hb) @ r.T @ r
    return up(out)


def iia(sp: Split, rs, up, rows=None) -> float:
    with torch.no_grad():
        rows = torch.arange(sp.base.shape[0]) if rows is None else rows
        z = logits_of(sp, rows, rs, up)
        return float((z.argmax(-1) == sp.labels[rows]).float().mean())


def margin(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    zy = z.gather(1, y[:, None]).squeeze(1)
    other = z.masked_fill(F.one_hot(y, z.shape[1]).bool(), float("-inf")).max(1).values
    return zy - other


def loss_fn(spec: str, frac: float):
    kind, *args = spec.split(":")
    if kind == "ce":
        return lambda z, y: F.cross_entropy(z, y)
    if kind == "sig":
        t = float(args[0])
        return lambda z, y: torch.sigmoid(-margin(z, y) / t).mean()
    if kind == "anneal":
        a, b = float(args[0]), float(args[1])
        t = a * (b / a) ** frac
        return lambda z, y: torch.sigmoid(-margin(z, y) / t).mean()
    if kind == "hinge":
        m0 = float(args[0])
        return lambda z, y: F.relu(m0 - margin(z, y)).mean()
    if kind == "ce>sig":
        t = float(args[0])
        if frac < 0.5:
            return lambda z, y: F.cross_entropy(z, y)
        return lambda z, y: torch.sigmoid(-margin(z, y) / t).mean()
    if kind == "blend":  # cross-entropy handing over to the smooth 0-1 loss by `handover`, tau annealed a -> b
        h, a, b = (float(x) for x in args)
        w = min(frac / h, 1.0)
        t = a * (b / a) ** frac
        return lambda z, y: (1 - w) * F.cross_entropy(z, y) + w * torch.sigmoid(-margin(z, y) / t).mean()
    if kind == "ce+sig":
        t = float(args[0])
        return lambda z, y: F.cross_entropy(z, y) + torch.sigmoid(-margin(z, y) / t).mean()
    raise ValueError(spec)


def best_localist(sp: Split, up, sizes: list[int], sel_rows) -> list[list[int]]:
    """Exhaustive: every disjoint assignment of ``sizes`` coordinates, scored on ``sel_rows``."""
    d = sp.h.shape[1]
    cands = []
    for a in itertools.combinations(range(d), sizes[0]):
        rest = [x for x in range(d) if x not in a]
        if len(sizes) == 1:
            cands.append([list(a)])
        else:
            for b in itertools.combinations(rest, sizes[1]):
                cands.append([list(a), list(b)])
    hb = sp.h[sp.base[sel_rows]]
    hs = [sp.h[sp.src[sel_rows, j]] for j in range(len(sizes))]
    y = sp.labels[sel_rows]
    best, best_acc = None, -1.0
    with torch.no_grad():
        for i in range(0, len(cands), 256):
            chunk = cands[i : i + 256]
            m = torch.zeros(len(chunk), len(sizes), d)
            for c, a in enumerate(chunk):
                for j, dims in enumerate(a):
                    m[c, j, dims] = 1
            out = hb[None].expand(len(chunk), *hb.shape).clone()
            for j in range(len(sizes)):
                out = out + m[:, j, None, :] * (hs[j] - hb)[None]
            acc = (up(out).argmax(-1) == y[None]).float().mean(1)
            k = int(acc.argmax())
            if float(acc[k]) > best_acc:
                best, best_acc = chunk[k], float(acc[k])
    return best


def fit(sp: Split, up, sizes: list[int], spec: str, *, init: torch.Tensor | None, seed: int, epochs: int, lr: float,
        batch: int, sel_rows, evals_per_epoch: int):
    """Train one rotation; return (final Rs, best Rs by training IIA, best training IIA, final training IIA)."""
    total = sum(sizes)
    d = sp.h.shape[1]
    g = torch.Generator().manual_seed(seed)
    rot = Orthonormal(d, total, init, generator=g)
    opt = torch.optim.Adam(rot.parameters(), lr=lr)
    n = sp.base.shape[0]
    per = math.ceil(n / batch)
    steps = per * epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / max(steps, 1))
    bounds = list(itertools.accumulate([0] + sizes))

    def rs():
        r = rot()
        return [r[bounds[i] : bounds[i + 1]] for i in range(len(sizes))]

    with torch.no_grad():
        best_rs = [r.detach().clone() for r in rs()]
    best_acc = iia(sp, best_rs, up, sel_rows)
    start_acc = best_acc
    every = max(1, per // evals_per_epoch)
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for a in range(0, n, batch):
            rows = perm[a : a + batch]
            z = logits_of(sp, rows, rs(), up)
            loss = loss_fn(spec, step / steps)(z, sp.labels[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % every == 0 or step == steps:
                with torch.no_grad():
                    cur = [r.detach().clone() for r in rs()]
                acc = iia(sp, cur, up, sel_rows)
                if acc > best_acc:
                    best_acc, best_rs = acc, cur
    with torch.no_grad():
        final = [r.detach().clone() for r in rs()]
    return final, best_rs, best_acc, iia(sp, final, up, sel_rows), start_acc


def localist_init(dims: list[list[int]], d: int) -> torch.Tensor:
    rows = [torch.eye(d)[x] for a in dims for x in a]
    return torch.stack(rows)


def run_case(task, mlp, layer, train_ds, test_ds, variants, args, seed) -> list[dict]:
    tr, te = split_of(task, mlp, train_ds, layer), split_of(task, mlp, test_ds, layer)
    up = upper(mlp, layer)
    for p in mlp.parameters():
        p.requires_grad_(False)
    n = tr.base.shape[0]
    g = torch.Generator().manual_seed(seed + 2)
    sel = torch.randperm(n, generator=g)[: args.selection_size]
    sizes = [8, 8]
    t0 = time.perf_counter()
    loc = best_localist(tr, up, sizes, sel[:512])
    t_loc = time.perf_counter() - t0
    loc_rs = [torch.eye(16)[a] for a in loc]
    loc_test, loc_train = iia(te, loc_rs, up), iia(tr, loc_rs, up, sel)
    out = []
    for v in variants:
        spec, start, restarts = v["loss"], v["start"], v["restarts"]
        t0 = time.perf_counter()
        fits = []
        for r in range(restarts):
            init = localist_init(loc, 16) if start == "localist" else None
            fits.append(fit(tr, up, sizes, spec, init=init, seed=seed * 100 + r, epochs=args.epochs, lr=v.get("lr", args.lr),
                            batch=args.batch, sel_rows=sel, evals_per_epoch=args.evals_per_epoch))
        secs = time.perf_counter() - t0
        final = fits[0][0]
        best = max(fits, key=lambda f: f[2])
        row = {
            "seed": seed, "layer": layer, "variant": f"{spec}/{start}/x{restarts}",
            "final_test": iia(te, final, up), "final_train": fits[0][3],
            "best_test": iia(te, best[1], up), "best_train": best[2],
            "start_train": fits[0][4],
            "localist_test": loc_test, "localist_train": loc_train, "seconds": secs, "localist_seconds": t_loc,
        }
        out.append(row)
        print(f"seed {seed} L{layer} {row['variant']:<22} final {row['final_test']:.3f} (train {row['final_train']:.3f})  "
              f"selected {row['best_test']:.3f} (train {row['best_train']:.3f})  localist {loc_test:.3f} (train {loc_train:.3f})  "
              f"{secs:.1f}s", flush=True)
    return out


def summary(rows: list[dict]) -> None:
    print("\n== summary: test IIA, mean over seeds (min), and how often >= localist - 1 s.e.")
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    layers = sorted({r["layer"] for r in rows})
    head = f"{'variant':<24}" + "".join(f"{'L' + str(L) + ' final':>16}{'L' + str(L) + ' selected':>19}" for L in layers) + f"{'ok(final)':>10}{'ok(sel)':>9}{'s/fit':>7}"
    print(head)
    for v in variants:
        line = f"{v:<24}"
        okf = oks = tot = 0
        secs = []
        for L in layers:
            rs = [r for r in rows if r["variant"] == v and r["layer"] == L]
            if not rs:
                line += " " * 35
                continue
            f = [r["final_test"] for r in rs]
            b = [r["best_test"] for r in rs]
            line += f"{statistics.mean(f):>10.3f} ({min(f):.2f})"[:16].rjust(16) + f"{statistics.mean(b):>13.3f} ({min(b):.2f})".rjust(19)
            for r in rs:
                se = math.sqrt(r["localist_test"] * (1 - r["localist_test"]) / 4000)
                okf += r["final_test"] >= r["localist_test"] - se
                oks += r["best_test"] >= r["localist_test"] - se
                tot += 1
                secs.append(r["seconds"])
        line += f"{f'{okf}/{tot}':>10}{f'{oks}/{tot}':>9}{statistics.mean(secs):>7.1f}"
        print(line)
    locs = {L: statistics.mean(r["localist_test"] for r in rows if r["layer"] == L and r["variant"] == variants[0]) for L in layers}
    print("localist (test): " + ", ".join(f"L{L} {x:.3f}" for L, x in locs.items()))


def parse_variants(text: str) -> list[dict]:
    out = []
    for item in text.split(","):
        parts = item.split("/")
        spec = parts[0]
        start = parts[1] if len(parts) > 1 else "random"
        restarts = int(parts[2]) if len(parts) > 2 else 1
        v = {"loss": spec, "start": start, "restarts": restarts}
        if len(parts) > 3:
            v["lr"] = float(parts[3])
        out.append(v)
    return out


# -- Boundless DAS on one relation (WX), plain torch --------------------------------------------------------------


def boundless_fit(sp: Split, up, spec: str, *, seed, epochs, lr, batch, penalty=1.0, t=(50.0, 0.1), boundary_lr=0.01):
    d = sp.h.shape[1]
    g = torch.Generator().manual_seed(seed)
    rot = Orthonormal(d, d, generator=g)
    b = torch.nn.Parameter(torch.tensor(0.5))
    opt = torch.optim.Adam([{"params": rot.parameters(), "lr": lr}, {"params": [b], "lr": boundary_lr}])
    n = sp.base.shape[0]
    steps = math.ceil(n / batch) * epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / max(steps, 1))
    idx = torch.arange(d, dtype=torch.float32)
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for a in range(0, n, batch):
            rows = perm[a : a + batch]
            tau = t[0] * (t[1] / t[0]) ** (step / max(steps - 1, 1))
            m = torch.sigmoid((b.clamp(0, 1) * d - idx) / tau)
            r = rot()
            hb, hs = sp.h[sp.base[rows]], sp.h[sp.src[rows, 0]]
            z = up(hb + ((hs - hb) @ r.T * m) @ r)
            loss = loss_fn(spec, step / steps)(z, sp.labels[rows]) + penalty * b.clamp(0, 1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
    k = max(int(round(float(b.detach().clamp(0, 1)) * d)), 1)
    return rot().detach()[:k], k


def run_boundless(args, variants) -> None:
    task = tasks.hierarchical_equality()
    for seed in [int(x) for x in args.seeds.split(",")]:
        mlp, _ = mlp_for(task, seed, Path(args.cache) if args.cache else None, args.mlp_n_train)
        for p in mlp.parameters():
            p.requires_grad_(False)
        train = task.counterfactuals(args.n_train, intervene="WX", seed=seed)
        test = task.counterfactuals(args.n_test, split="test", intervene="WX", seed=seed + 1)
        for layer in [int(x) for x in args.layers.split(",")]:
            tr, te = split_of(task, mlp, train, layer), split_of(task, mlp, test, layer)
            up = upper(mlp, layer)
            for v in variants:
                for pen in (float(x) for x in args.penalties.split(",")):
                    t0 = time.perf_counter()
                    r, k = boundless_fit(tr, up, v["loss"], seed=seed, epochs=args.epochs, lr=args.lr, batch=args.batch, penalty=pen)
                    print(f"seed {seed} L{layer} boundless {v['loss']:<14} penalty {pen:<5g} size {k:>2}  test IIA {iia(te, [r], up):.3f}  "
                          f"{time.perf_counter() - t0:.1f}s", flush=True)


# -- SmolLM2 polarity: steerlab's cached runner, a copy of the training loop with the objective swapped ------------


def lm_spec_objective(spec: str):
    from steerlab.alignment.objectives import CrossEntropy, Hinge, SmoothZeroOne

    kind, *a = spec.split(":")
    if kind == "ce":
        return CrossEntropy()
    if kind == "sig":
        return SmoothZeroOne(float(a[0]))
    if kind == "anneal":
        return SmoothZeroOne(float(a[0]), float(a[1]))
    if kind == "hinge":
        return Hinge(float(a[0]))
    if kind == "ce>sig":
        ce, sig = CrossEntropy(), SmoothZeroOne(float(a[0]))
        return lambda z, y, p: ce(z, y, p) if p < 0.5 else sig(z, y, p)
    if kind == "blend":
        from steerlab.alignment.objectives import CrossEntropyThenSmooth

        return CrossEntropyThenSmooth(float(a[0]), float(a[1]), float(a[2]))
    raise ValueError(spec)


def lm_fit(runner, site, width, k, spec, *, init, seed, epochs, lr, batch, sel_rows, evals_per_epoch):
    from steerlab.alignment.das import evaluate
    from steerlab.interventions.ops import SubspaceInterchange

    g = torch.Generator().manual_seed(seed)
    if init is None:
        init = Orthonormal(width, k, generator=g)().detach()
    iv = SubspaceInterchange(site, size=k, width=width, init=init)
    obj = lm_spec_objective(spec)
    opt = torch.optim.Adam(iv.parameters(), lr=lr)
    n = len(runner)
    per = math.ceil(n / batch)
    steps = per * epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / max(steps, 1))

    def train_iia():
        iv.eval()
        out = evaluate(runner, [iv], rows=sel_rows)["all"].value
        iv.train()
        return out

    best_a, best = iv.rotation.weight.detach().clone(), train_iia()
    start = best
    every = max(1, per // evals_per_epoch)
    step = 0
    iv.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for a in range(0, n, batch):
            rows = perm[a : a + batch]
            loss = obj(runner.run(rows, [iv]), runner.labels(rows), step / steps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % every == 0 or step == steps:
                acc = train_iia()
                if acc > best:
                    best, best_a = acc, iv.rotation.weight.detach().clone()
    iv.eval()
    final = SubspaceInterchange(site, size=k, width=width, init=iv.R.detach())
    with torch.no_grad():
        iv.rotation.weight.copy_(best_a)
    chosen = SubspaceInterchange(site, size=k, width=width, init=iv.R.detach())
    return final, chosen, best, start


def run_polarity(args, variants) -> list[dict]:
    import steerlab as sl
    from steerlab.alignment._activations import Runner
    from steerlab.alignment.controls import full_vector_bound, localist_alignment
    from steerlab.alignment.das import evaluate, store_for

    model, tok = sl.load("smollm2-135m")
    lab = sl.wrap(model, tok)
    task = tasks.sentiment()
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        train, test = task.datasets(lab, n_train=args.n_train, n_test=args.n_test, seed=seed)
        sites = [f"blocks.{L}.resid_post" for L in [int(x) for x in args.layers.split(",")]]
        store = store_for(lab, [train, test], sites)
        for site in sites:
            for pos in args.positions.split(","):
                rt, re_ = Runner(store, train, site, pos), Runner(store, test, site, pos)
                full = full_vector_bound(re_, test)["POLARITY"][0].value
                loc = localist_alignment(rt, re_, {"POLARITY": args.size}, 576, samples=8, selection_size=len(train), seed=seed)
                sel = torch.arange(len(train))
                for v in variants:
                    t0 = time.perf_counter()
                    fits = []
                    for r in range(v["restarts"]):
                        init = torch.eye(576)[loc.dims["POLARITY"]] if v["start"] == "localist" else None
                        fits.append(lm_fit(rt, site, 576, args.size, v["loss"], init=init, seed=seed * 100 + r, epochs=args.epochs,
                                           lr=v.get("lr", args.lr), batch=args.batch, sel_rows=sel, evals_per_epoch=args.evals_per_epoch))
                    secs = time.perf_counter() - t0
                    best = max(fits, key=lambda f: f[2])
                    row = {"seed": seed, "layer": site, "pos": pos, "variant": f"{v['loss']}/{v['start']}/x{v['restarts']}",
                           "final_test": evaluate(re_, [fits[0][0]])["all"].value, "best_test": evaluate(re_, [best[1]])["all"].value,
                           "best_train": best[2], "start_train": fits[0][3], "localist_test": loc.iia["all"].value, "full": full,
                           "seconds": secs}
                    rows.append(row)
                    print(f"seed {seed} {site} {pos:<9} {row['variant']:<22} final {row['final_test']:.3f}  selected {row['best_test']:.3f} "
                          f"(train {row['best_train']:.3f})  localist {row['localist_test']:.3f}  full {full:.3f}  {secs:.1f}s", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="equality", choices=("equality", "polarity", "boundless"))
    ap.add_argument("--penalties", default="1.0,0.1")
    ap.add_argument("--positions", default="last")
    ap.add_argument("--size", type=int, default=4)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--layers", default="1,2,3")
    ap.add_argument("--variants", default="ce,sig:1,sig:0.3,anneal:3:0.1,hinge:1,ce>sig:0.3")
    ap.add_argument("--n-train", type=int, default=20_000)
    ap.add_argument("--n-test", type=int, default=4_000)
    ap.add_argument("--mlp-n-train", type=int, default=300_000)
    ap.add_argument("--mlp-epochs", type=int, default=3)
    ap.add_argument("--mlp-wd", type=float, default=0.3)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--selection-size", type=int, default=2048)
    ap.add_argument("--evals-per-epoch", type=int, default=4)
    ap.add_argument("--cache", default="/tmp/steerlab-das-research")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    variants = parse_variants(args.variants)
    if args.task == "boundless":
        run_boundless(args, variants)
        return
    if args.task == "polarity":
        t0 = time.perf_counter()
        rows = run_polarity(args, variants)
        print("\n== summary (mean over rows): variant, final test, selected test, seconds")
        for v in dict.fromkeys(r["variant"] for r in rows):
            rs = [r for r in rows if r["variant"] == v]
            print(f"{v:<24} {statistics.mean(r['final_test'] for r in rs):.3f} {statistics.mean(r['best_test'] for r in rs):.3f} "
                  f"{statistics.mean(r['seconds'] for r in rs):.1f}")
        print(f"total {time.perf_counter() - t0:.0f}s")
        return
    task = tasks.hierarchical_equality()
    rows = []
    t0 = time.perf_counter()
    for seed in [int(s) for s in args.seeds.split(",")]:
        mlp, acc = mlp_for(task, seed, Path(args.cache) if args.cache else None, args.mlp_n_train, args.mlp_epochs, args.mlp_wd)
        print(f"seed {seed}: MLP held-out accuracy {acc:.4f}", flush=True)
        train, test = task.datasets(n_train=args.n_train, n_test=args.n_test, seed=seed)
        for layer in [int(x) for x in args.layers.split(",")]:
            rows += run_case(task, mlp, layer, train, test, variants, args, seed)
    summary(rows)
    print(f"total {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
