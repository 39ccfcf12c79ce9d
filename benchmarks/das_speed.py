"""DAS speed: a training step against pyvene's low-rank DAS, and search wall time against the number of sites.

1. **A DAS step** (forward with the distributed interchange, cross-entropy over
   the task's label tokens at the last position, backward, Adam) on
   SmolLM2-135M, adjective-polarity prompts, site ``blocks.L.resid_post`` at
   the last position, subspace size 16, batch 8 — against
   ``pyvene.LowRankRotatedSpaceIntervention`` on the same model, site, size,
   batch and prompts (pyvene runs the source and the base in full every
   step). Ours three ways:

   * ``uncached``: sources given as inputs (the engine stops each source run
     right after the site, and keeps only the last position's logits);
   * ``cached``: the base resumes from a cached prefix (blocks below L are
     skipped) and the source slice is a cached ``SourceValue`` — what every
     DAS epoch after the first does;
   * ``cached + KV``: also the first positions come from a KV cache, so the
     step runs only the last position above L (what ``steerlab.alignment``
     does for an edit at the last position).

   Targets: uncached <= 0.6x pyvene, cached <= 0.3x pyvene. Beside pyvene, two floors
   written in plain torch (a forward hook adding a trainable vector at the site, no
   library): ``floor`` is the frozen model's forward + backward of the same batch
   (last-position logits only); ``floor + source`` also runs the source batch up to the
   site under ``no_grad``, the least an uncached interchange step can do. A target below
   the floor cannot be met by any implementation: the table shows both ratios. The ATen
   operators one step dispatches (load-independent) are counted per case.

2. **Search wall time** against the number of candidate sites: the cache
   (one forward per model for all sites) and each candidate's time beside
   the number of blocks run above its site.

Run: ``python benchmarks/das_speed.py [--layers 6,15,25] [--threads 1] [--quick]``; on a GPU
``--device cuda --dtype bfloat16`` (SmolLM2 from ``_models.smollm``: real weights, or its shape
with random weights where the model package cannot travel; ``--no-search`` there, the search
needs the real model's answers).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import _models  # noqa: E402
from _timing import Bench, Row, count_ops, print_table  # noqa: E402

import steerlab as sl  # noqa: E402
from steerlab.alignment import search, tasks  # noqa: E402
from steerlab.alignment._activations import Runner  # noqa: E402
from steerlab.alignment.das import build_subspace_interventions, store_for  # noqa: E402

SIZE, BATCH = 16, 8


class _Stop(Exception):
    """Raised by the floor's hook to end a source run at the site."""


def _frozen_copy(model):
    import copy

    m = copy.deepcopy(model)
    m.requires_grad_(False)
    return m


def _block(model, layer: int):
    return model.model.layers[layer]


def _to(inputs: dict, device) -> dict:
    return {k: v.to(device) for k, v in inputs.items()}


def step_cases(lab, model, task, layer: int, pyvene_model, n: int = BATCH) -> dict:
    import pyvene as pv

    tok = lab.tokenizer
    data = task.counterfactuals(n, tok, seed=layer)
    site = f"blocks.{layer}.resid_post"
    enc = data.encoder
    batch = data.collate(range(n), positions="last")
    dev = lab.device
    labels = batch.labels.to(dev)
    ids = enc.label_ids
    rows = torch.arange(n)
    store = store_for(lab, [data], [site])
    cached, cached_kv = Runner(store, data, site, "last", suffix=False), Runner(store, data, site, "last")
    assert cached_kv.start > 0

    def ours_step(run):
        ivs = build_subspace_interventions(site, {"POLARITY": SIZE}, lab.d_model, seed=0)
        opt = torch.optim.Adam(ivs[0].parameters(), lr=1e-3)

        def step():
            loss = torch.nn.functional.cross_entropy(run(ivs).float(), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    def uncached(ivs):
        iv = ivs[0]
        iv.source = source
        out = lab.run(base, [iv], positions=-1, source_positions=-1, logits_to_keep=1)
        return out.logits[:, -1, ids]

    base, source = _to(batch.base, dev), _to(batch.sources["POLARITY"], dev)
    cfg = pv.IntervenableConfig([{"layer": layer, "component": "block_output", "low_rank_dimension": SIZE,
                                  "intervention_type": pv.LowRankRotatedSpaceIntervention}])
    ivm = pv.IntervenableModel(cfg, pyvene_model)
    ivm.set_device(dev)
    ivm.disable_model_gradients()
    piv = next(iter(ivm.interventions.values()))
    piv = piv[0] if isinstance(piv, tuple) else piv
    opt = torch.optim.Adam(piv.parameters(), lr=1e-3)
    seq = batch.base["input_ids"].shape[1]
    assert bool(batch.base["attention_mask"].all()) and batch.sources["POLARITY"]["input_ids"].shape[1] == seq  # no padding
    loc = [[[seq - 1] for _ in range(n)]]  # pyvene's positions: the last token of base and source

    def pyvene_step():
        _, out = ivm(base, [source], unit_locations={"sources->base": (loc, loc)})
        loss = torch.nn.functional.cross_entropy(out.logits[:, -1, ids].float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    floor_model = _frozen_copy(model)
    block = _block(floor_model, layer)
    delta = torch.zeros(lab.d_model, device=dev, dtype=next(floor_model.parameters()).dtype, requires_grad=True)
    fopt = torch.optim.Adam([delta], lr=1e-3)

    def add_delta(_mod, _args, out):
        return (out[0] + delta, *out[1:]) if isinstance(out, tuple) else out + delta

    def stop(_mod, _args, out):
        raise _Stop

    def floor_step(with_source: bool):
        def step():
            if with_source:
                h = block.register_forward_hook(stop)
                try:
                    with torch.no_grad():
                        floor_model(**source, use_cache=False)
                except _Stop:
                    pass
                finally:
                    h.remove()
            h = block.register_forward_hook(add_delta)
            try:
                out = floor_model(**base, use_cache=False, logits_to_keep=1)
            finally:
                h.remove()
            loss = torch.nn.functional.cross_entropy(out.logits[:, -1, ids].float(), labels)
            fopt.zero_grad(set_to_none=True)
            loss.backward()
            fopt.step()

        return step

    return {
        "floor": floor_step(False),
        "floor + source": floor_step(True),
        "pyvene": pyvene_step,
        "uncached": ours_step(uncached),
        "cached": ours_step(lambda ivs: cached.run(rows, ivs)),
        "cached + KV": ours_step(lambda ivs: cached_kv.run(rows, ivs)),
    }


def bench_steps(layers: list[int], quick: bool, device: str = "cpu", dtype: torch.dtype = torch.float32, n: int = BATCH) -> None:
    import copy

    model, tok, note = _models.smollm(device, dtype)
    pyvene_model = copy.deepcopy(model)  # pyvene removes every hook of the model it wraps: keep ours apart
    lab = sl.wrap(model, tok)
    task = tasks.sentiment()
    rows = []
    for layer in layers:
        cases = step_cases(lab, model, task, layer, pyvene_model, n)
        bench = Bench(device=device, rounds=3 if quick else 7, warmup=1, min_round_s=0.5)
        for name, fn in cases.items():
            bench.add(name, fn)
        t = bench.run()
        ops = {name: count_ops(fn) for name, fn in cases.items()} if device == "cpu" else {}
        rows.append(Row(f"L{layer}: floor + source ÷ pyvene", t["floor + source"], t["pyvene"], 0.6))
        rows.append(Row(f"L{layer}: uncached ÷ pyvene", t["uncached"], t["pyvene"], 0.6))
        rows.append(Row(f"L{layer}: uncached ÷ floor + source", t["uncached"], t["floor + source"]))
        rows.append(Row(f"L{layer}: cached prefix + source ÷ pyvene", t["cached"], t["pyvene"], 0.3))
        rows.append(Row(f"L{layer}: cached prefix + source ÷ floor", t["cached"], t["floor"]))
        rows.append(Row(f"L{layer}: cached + KV suffix ÷ pyvene", t["cached + KV"], t["pyvene"], 0.3))
        if ops:
            print(f"L{layer} ATen operators per step: " + ", ".join(f"{k} {v}" for k, v in ops.items()), flush=True)
    where = f"{device}, {str(dtype).removeprefix('torch.')}" + (f", {torch.get_num_threads()} thread(s)" if device == "cpu" else "")
    print_table(f"DAS step on SmolLM2-135M ({note}; size {SIZE}, batch {n}, last position; {where})", rows)


def bench_search(quick: bool) -> None:
    model, tok = sl.load("smollm2-135m")
    lab = sl.wrap(model, tok)
    task = tasks.sentiment()
    train, test = task.datasets(lab, n_train=32, n_test=32, seed=0)
    grids = [[20], [20, 24], [16, 20, 24, 28]] if quick else [[20], [20, 24], [16, 20, 24, 28], [8, 12, 16, 20, 24, 28]]
    print("\n== search wall time vs candidate sites (SmolLM2-135M, last position, size 4, no controls, 2 epochs of 32)")
    print(f"{'sites':<26} {'cache s':>8} {'candidates s':>13} {'blocks above (sum)':>19} {'s per block above':>18}")
    for layers in grids:
        sites = [f"blocks.{x}.resid_post" for x in layers]
        t0 = time.perf_counter()
        res = search(lab, train, test, sites=sites, positions="last", sizes=[4], controls=False, epochs=2, batch_size=16, eval_size=32)
        total = time.perf_counter() - t0
        above = sum(lab.n_layers - 1 - x for x in layers)
        cand = res.timings["candidates"]
        print(f"{','.join(map(str, layers)):<26} {res.timings['cache']:8.2f} {cand:13.2f} {above:19d} {cand / above:18.3f}   (total {total:.1f}s)")
    print("(the cache is one forward to the highest site whatever the number of sites; a candidate's cost follows the blocks above it)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="6,15,25")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (ignored on a GPU)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-search", action="store_true")
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    bench_steps([int(x) for x in args.layers.split(",")], args.quick, args.device, getattr(torch, args.dtype), args.batch)
    if not args.no_search:
        bench_search(args.quick)


if __name__ == "__main__":
    main()
