"""The base layer's hot loop, measured as issue 10 asks: ratios in one process, the median of interleaved
rounds, repeated over several fresh processes with the spread reported.

1. **A DAS step** ÷ pyvene's (``LowRankRotatedSpaceIntervention``) on SmolLM2-135M, adjective-polarity
   prompts, site ``blocks.L.resid_post`` at the last position, size 16, batch 8, layers 6 / 15 / 25:
   ``uncached`` (sources as inputs; target <= 0.6) and ``cached`` (prefix + source slices cached, what
   every DAS epoch after the first does; target <= 0.3). The **floor** is the frozen model's forward +
   backward of the same batch (a zero added at the site so the backward reaches it, no source run): a step
   cannot cost less than that, so ``floor ÷ pyvene`` says how low ``uncached ÷ pyvene`` can go, and
   ``ours ÷ floor`` what the step adds to the frozen model's own work.
2. **Steered ÷ plain** on a narrow, deep random LLaMA (width 64, 30 layers), an edit at every layer at
   the first 3 and last 3 real tokens: an ``Add``, and a rank-4 subspace edit (target <= 1.05).
3. **ATen operators per call**, load-independent (``torch.utils._python_dispatch`` counting): for (2)
   per layer beyond the plain forward, and for the DAS steps.

Run::

    python benchmarks/bench_core.py --runs 3                  # ~10 min on an idle CPU core
    python benchmarks/bench_core.py --runs 1 --quick --layers 15 --no-das   # a smoke test
    PYTHONPATH=<older tree> python benchmarks/bench_core.py --runs 3      # the same on older code

Only public API is used, so the script measures older trees too (the "before" of a before → after table).
``--json FILE`` writes every run's raw figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _models  # noqa: E402
from _timing import Bench, count_ops  # noqa: E402

SIZE, BATCH = 16, 8


# -- 1. the DAS step --------------------------------------------------------------------------------


def _floor(lab, model, batch, layer: int, ids, labels):
    """The frozen forward + backward of the same batch: a zero added at the site, so the backward runs
    from the loss down to the site as a DAS step's does, and nothing else."""
    module = lab.resolve(f"blocks.{layer}.resid_post").module
    z = torch.zeros(1, 1, lab.d_model, requires_grad=True)

    def add(m, args, out):
        return (out[0] + z, *out[1:]) if isinstance(out, tuple) else out + z

    def step():
        h = module.register_forward_hook(add)
        try:
            out = model(**batch.base, logits_to_keep=1, use_cache=False)
        finally:
            h.remove()
        torch.nn.functional.cross_entropy(out.logits[:, -1, ids], labels).backward()
        z.grad = None

    return step


def das_cases(lab, model, task, layer: int, pyvene_model) -> dict:
    import pyvene as pv
    from steerlab.alignment._activations import Runner
    from steerlab.alignment.das import build_subspace_interventions, store_for

    data = task.counterfactuals(BATCH, lab.tokenizer, seed=layer)
    site = f"blocks.{layer}.resid_post"
    batch = data.collate(range(BATCH), positions="last")
    labels, ids, rows = batch.labels, data.encoder.label_ids, torch.arange(BATCH)
    cached = Runner(store_for(lab, [data], [site]), data, site, "last", suffix=False)

    def ours(run, source=None):
        ivs = build_subspace_interventions(site, {"POLARITY": SIZE}, lab.d_model, seed=0)
        ivs[0].source = source  # the user's declaration, made once (the cached runner binds sources per step itself)
        opt = torch.optim.Adam(ivs[0].parameters(), lr=1e-3)

        def step():
            loss = torch.nn.functional.cross_entropy(run(ivs), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    def uncached(ivs):
        return lab.run(batch.base, ivs, positions=-1, source_positions=-1, logits_to_keep=1).logits[:, -1, ids]

    cfg = pv.IntervenableConfig([{"layer": layer, "component": "block_output", "low_rank_dimension": SIZE,
                                  "intervention_type": pv.LowRankRotatedSpaceIntervention}])
    ivm = pv.IntervenableModel(cfg, pyvene_model)
    ivm.disable_model_gradients()
    piv = next(iter(ivm.interventions.values()))
    piv = piv[0] if isinstance(piv, tuple) else piv
    popt = torch.optim.Adam(piv.parameters(), lr=1e-3)
    seq = batch.base["input_ids"].shape[1]
    loc = [[[seq - 1] for _ in range(BATCH)]]

    def pyvene_step():
        _, out = ivm(batch.base, [batch.sources["POLARITY"]], unit_locations={"sources->base": (loc, loc)})
        loss = torch.nn.functional.cross_entropy(out.logits[:, -1, ids], labels)
        popt.zero_grad(set_to_none=True)
        loss.backward()
        popt.step()

    return {
        "pyvene": pyvene_step,
        "floor": _floor(lab, model, batch, layer, ids, labels),
        "uncached": ours(uncached, batch.sources["POLARITY"]),
        "cached": ours(lambda ivs: cached.run(rows, ivs)),
    }


def measure_das(layers: list[int], quick: bool) -> dict:
    import copy

    import steerlab as sl
    from steerlab.alignment import tasks

    model, tok = sl.load("smollm2-135m")
    pyvene_model = copy.deepcopy(model)  # pyvene removes every hook of the model it wraps: keep ours apart
    lab = sl.wrap(model, tok)
    task = tasks.sentiment()
    out = {}
    for layer in layers:
        cases = das_cases(lab, model, task, layer, pyvene_model)
        bench = Bench(rounds=3 if quick else 7, warmup=1, min_round_s=0.3 if quick else 0.5)
        for name, fn in cases.items():
            bench.add(name, fn)
        t = bench.run()
        out[f"L{layer}"] = {
            "times": t,
            "ops": {name: count_ops(fn) for name, fn in cases.items()},
        }
    return out


# -- 2. steered ÷ plain on the narrow deep model ----------------------------------------------------


def measure_deep(quick: bool) -> dict:
    import steerlab as sl

    model = _models.deep_llama("cpu", torch.float32)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 500, (4, 32), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, :5] = 0
    ids[mask == 0] = 0
    inp = {"input_ids": ids, "attention_mask": mask}
    lab = sl.wrap(model)
    n, d = lab.n_layers, lab.d_model
    g = torch.Generator().manual_seed(2)
    adds = [sl.Add(f"blocks.{i}.resid_post", torch.randn(d, generator=g) * 0.1, positions="f3+l3") for i in range(n)]
    das = [sl.SubspaceInterchange(f"blocks.{i}.resid_post", size=4, positions="f3+l3",
                                  source=sl.SourceValue(torch.randn(4, 6, d, generator=g))) for i in range(n)]
    cases = {
        "plain": lambda: model(**inp, use_cache=False),
        "empty run": lambda: lab.run(inp, [], use_cache=False),
        "add all": lambda: lab.run(inp, adds, use_cache=False),
        "subspace all": lambda: lab.run(inp, das, use_cache=False),
    }
    bench = Bench(rounds=5 if quick else 9, min_round_s=0.1 if quick else 0.25)
    with torch.no_grad():
        for name, fn in cases.items():
            bench.add(name, fn)
        t = bench.run()
        ops = {name: count_ops(fn) for name, fn in cases.items()}
    return {"times": t, "ops": ops, "layers": n}


# -- runs, aggregation, table ------------------------------------------------------------------------


def one_run(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(True)
    out: dict = {"deep": measure_deep(args.quick)}
    if args.das:
        out["das"] = measure_das([int(x) for x in args.layers.split(",")], args.quick)
    return out


def _ratios(run: dict) -> dict[str, float]:
    r: dict[str, float] = {}
    deep = run["deep"]["times"]
    r["deep: Add on every layer ÷ plain"] = deep["add all"] / deep["plain"]
    r["deep: subspace edit on every layer ÷ plain"] = deep["subspace all"] / deep["plain"]
    r["deep: empty lab.run ÷ plain"] = deep["empty run"] / deep["plain"]
    for layer, v in run.get("das", {}).items():
        t = v["times"]
        r[f"DAS {layer}: floor ÷ pyvene"] = t["floor"] / t["pyvene"]
        r[f"DAS {layer}: uncached ÷ pyvene"] = t["uncached"] / t["pyvene"]
        r[f"DAS {layer}: uncached ÷ floor"] = t["uncached"] / t["floor"]
        r[f"DAS {layer}: cached ÷ pyvene"] = t["cached"] / t["pyvene"]
        r[f"DAS {layer}: cached ÷ floor"] = t["cached"] / t["floor"]
    return r


def _ops(run: dict) -> dict[str, float]:
    deep, n = run["deep"]["ops"], run["deep"]["layers"]
    o = {
        "deep: plain forward": deep["plain"],
        "deep: empty lab.run, extra": deep["empty run"] - deep["plain"],
        "deep: Add on every layer, extra per layer": (deep["add all"] - deep["empty run"]) / n,
        "deep: subspace edit on every layer, extra per layer": (deep["subspace all"] - deep["empty run"]) / n,
    }
    for layer, v in run.get("das", {}).items():
        for case in ("floor", "uncached", "cached", "pyvene"):
            o[f"DAS {layer}: {case} step"] = v["ops"][case]
    return o


TARGETS = {"Add on every layer ÷ plain": 1.05, "subspace edit on every layer ÷ plain": 1.05, "uncached ÷ pyvene": 0.6, "cached ÷ pyvene": 0.3}


def report(runs: list[dict]) -> None:
    ratios = [_ratios(r) for r in runs]
    print(f"\n== ratios: median over {len(runs)} run(s) of the median of interleaved rounds [min – max]")
    for key in ratios[0]:
        vals = [r[key] for r in ratios]
        target = next((f"<= {v:.2f}" for k, v in TARGETS.items() if key.endswith(k)), "")
        print(f"{key:<52} {statistics.median(vals):7.3f}  [{min(vals):.3f} – {max(vals):.3f}]  {target}")
    print("\n== ATen operators per call (load-independent)")
    for key, v in _ops(runs[0]).items():
        print(f"{key:<52} {v:9.1f}")
    sys.stdout.flush()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=3, help="fresh processes (each: interleaved rounds, median)")
    p.add_argument("--layers", default="6,15,25")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-das", dest="das", action="store_false")
    p.add_argument("--json", default=None, help="write every run's raw figures here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        Path(args.child).write_text(json.dumps(one_run(args)))
        return
    runs = []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "run.json"
            cmd = [sys.executable, __file__, "--child", str(out), "--layers", args.layers, "--threads", str(args.threads)]
            cmd += (["--quick"] if args.quick else []) + ([] if args.das else ["--no-das"])
            subprocess.run(cmd, check=True)
            runs.append(json.loads(out.read_text()))
        print(f"run {i + 1}/{args.runs} done", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))
    report(runs)


if __name__ == "__main__":
    main()
