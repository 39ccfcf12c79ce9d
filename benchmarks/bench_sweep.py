"""Patching sweep (all layers × all positions) ÷ the same patched forwards one by one, in one process.

For each model, ``sl.sweep(lab, base, source, sites="blocks.*.resid_post",
positions="all")`` against:

* **serial patched forwards**: one ``lab.run(base, [Interchange(site,
  positions=p, source=SourceValue)])`` per configuration, the source values
  precomputed (the floor a loop can reach: one forward per configuration);
* **naive loop**: one ``lab.run(base, [Interchange(..., source=source)])`` per
  configuration, as a user first writes it (each call also runs the source,
  stopping early after the patched layer);
* the sweep with ``configs_per_forward=1``: prefix reuse alone, no packing.

Two models: SmolLM2-135M (compute-bound on a CPU) and a narrow, deep random
LLaMA (width 64, 30 layers) where per-forward overhead dominates. The same
script runs unchanged on a GPU (``--device cuda``).

Usage::

    python benchmarks/bench_sweep.py                 # CPU, fp32, 1 thread
    python benchmarks/bench_sweep.py --device cuda --dtype bfloat16
    python benchmarks/bench_sweep.py --quick         # every 3rd layer, fewer rounds
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _models  # noqa: E402
from _timing import Bench, Row, print_table  # noqa: E402

import steerlab as sl  # noqa: E402
from steerlab.interventions.inputs import Inputs  # noqa: E402

deep_llama, smollm = _models.patching_deep, _models.patching_smollm  # (lab, base, source, metric) loaders


def bench_model(name: str, loader, args) -> None:
    lab, base, source, metric = loader(torch.device(args.device), getattr(torch, args.dtype))
    sites = [f"blocks.{i}.resid_post" for i in range(0, lab.n_layers, args.every or (3 if args.quick else 1))]
    probe = sl.sweep(lab, base, source, sites=sites, metric=metric)  # warm-up, and the shape of the grid
    n_pos = len(probe.positions)
    configs = [(s, p) for s in sites for p in range(n_pos)]
    kw = {"use_cache": False}
    values = lab.collect(source, sites)  # the floor gets its source values for free
    floors = {(s, p): sl.SourceValue(values[s][:, p : p + 1]) for s, p in configs}
    bound, inputs = metric.bind(lab), Inputs.of(base, tokenizer=lab.tokenizer, device=lab.device)

    def serial():
        for s, p in configs:
            bound(lab.run(base, [sl.Interchange(s, positions=p, source=floors[(s, p)])], **kw).output, inputs)

    def naive():
        for s, p in configs:
            bound(lab.run(base, [sl.Interchange(s, positions=p, source=source)], **kw).output, inputs)

    bench = Bench(device=args.device, rounds=args.rounds, warmup=0, min_round_s=0.0)  # its calibration call warms up
    bench.add("sweep", lambda: sl.sweep(lab, base, source, sites=sites, metric=metric))
    bench.add("sweep C=1", lambda: sl.sweep(lab, base, source, sites=sites, metric=metric, configs_per_forward=1))
    bench.add("serial", serial)
    bench.add("naive", naive)
    t = bench.run()
    n = len(configs)
    note = f"{probe.forwards} packed forwards of {probe.configs_per_forward} configs"
    print_table(
        f"{name}: patching sweep, {len(sites)} layers × {n_pos} positions = {n} configurations ({args.device}, {args.dtype})",
        [
            Row(f"sweep ÷ {n} serial patched forwards", t["sweep"], t["serial"], None, note),
            Row(f"sweep ÷ {n} naive lab.run calls (source run each)", t["sweep"], t["naive"], None, ""),
            Row("sweep, 1 config per forward ÷ serial patched forwards", t["sweep C=1"], t["serial"], None, "prefix reuse alone"),
            Row("sweep ÷ sweep with 1 config per forward", t["sweep"], t["sweep C=1"], None, "what packing adds"),
        ],
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--models", default="deep,smollm", help="comma-separated: deep, smollm")
    p.add_argument("--quick", action="store_true", help="every 3rd layer, fewer rounds (noisier)")
    p.add_argument("--every", type=int, default=None, metavar="N", help="sweep every N-th layer (default: 1; 3 with --quick)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default on CPU: 1, robust on a shared machine)")
    args = p.parse_args(argv)
    args.rounds = 2 if args.quick else 3
    torch.set_grad_enabled(False)
    threads = args.threads or (1 if args.device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)  # OpenMP threads that outnumber free cores spin
    loaders = {"deep": ("narrow deep LLaMA (d=64, 30 layers)", deep_llama), "smollm": ("SmolLM2-135M", smollm)}
    for key in args.models.split(","):
        name, loader = loaders[key.strip()]
        bench_model(name, loader, args)


if __name__ == "__main__":
    main()
