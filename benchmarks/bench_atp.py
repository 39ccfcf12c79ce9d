"""Attribution patching ÷ the exact batched sweep of the same cells, and the backward's memory.

For each model and grid, in one process (interleaved rounds, medians):

* **speed-up** = time of ``sl.sweep`` (packed, prefix reused: about ``cells / C`` forwards) ÷ time of
  ``sl.attribution_patching`` (one source forward, one base forward + backward) over the same cells,
  with the rank correlation (Spearman) of the two grids beside it;
* grids: layers × positions (``resid_post``), layers × heads (``attn.z``, all positions at once),
  layers × heads × positions (``attn.z``, each position in turn) — the speed-up grows with the cells;
* **memory**: bytes held for the backward pass (tensors autograd saves in the forward, the taps and the
  gradients returned) of attribution patching at every layer's ``resid_post`` ÷ the same for a plain
  backward (the metric's gradient with respect to the input embeddings, nothing else kept). Counted
  with ``torch.autograd.graph.saved_tensors_hooks`` (unique storages), so it is the same on any device;
  on CUDA the peak allocated memory ratio is printed too.

Two models: SmolLM2-135M (9-token prompts) and the narrow deep LLaMA (d=64, 30 layers; 2 prompts of
12 tokens). The same script runs on a GPU (``--device cuda``).

Usage::

    python benchmarks/bench_atp.py                 # CPU, fp32, 1 thread (~25 min on a quiet 2-core machine)
    python benchmarks/bench_atp.py --quick         # every 5th layer, 1 round (what benchmarks/gpu.sh runs)
    python benchmarks/bench_atp.py --device cuda --dtype bfloat16

Each model's table is also recorded for ``gpu.sh`` (``_timing.record``) when ``STEERLAB_BENCH_JSON`` is set.
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _models  # noqa: E402
from _timing import Bench, record  # noqa: E402

import steerlab as sl  # noqa: E402
from steerlab.interventions.gradients import logit_window, metric_inputs  # noqa: E402
from steerlab.interventions.inputs import Inputs  # noqa: E402

deep_llama, smollm = _models.patching_deep, _models.patching_smollm  # (lab, base, source, metric) loaders


@contextmanager
def saved_bytes(counter: dict):
    """Count the bytes of every distinct storage autograd saves for backward inside the block."""
    seen = set()

    def pack(t):
        try:
            key = (t.untyped_storage().data_ptr(), t.device)
            if key not in seen:
                seen.add(key)
                counter["bytes"] = counter.get("bytes", 0) + t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


def memory(lab, base, metric, sites) -> tuple[float, float | None]:
    """(saved-for-backward bytes of AtP's forward + taps + gradients) ÷ (the same for a plain backward);
    and on CUDA the ratio of peak allocated memory."""
    inp = lab.facts.inputs(base)
    m = metric.bind(lab)
    cuda = lab.device.type == "cuda"

    window = logit_window(lab, inp.mask_info(), m)  # both compute only the logits the metric reads
    keep = {"logits_to_keep": window} if window else {}

    def plain():
        emb = lab.model.get_input_embeddings()(inp.kwargs["input_ids"]).detach().requires_grad_(True)
        counter = {}
        with torch.enable_grad(), saved_bytes(counter):
            out = lab.model(inputs_embeds=emb, attention_mask=inp.kwargs.get("attention_mask"), use_cache=False, **keep)
            value = m(out.logits, metric_inputs(inp, window)).sum()
        (g,) = torch.autograd.grad(value, emb)
        return counter["bytes"] + g.numel() * g.element_size()

    def atp():
        counter = {}
        with saved_bytes(counter):
            grads = sl.metric_gradients(lab, inp, sites, m)
        extra = sum(v.numel() * v.element_size() for v in grads.grads.values())  # the taps and their gradients
        return counter["bytes"] + 2 * extra

    ratios = []
    for fn in (plain, atp):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
        b = fn()
        peak = (torch.cuda.max_memory_allocated() - start) if cuda else None
        ratios.append((b, peak))
    (pb, pp), (ab, ap) = ratios
    return ab / pb, (ap / pp if cuda and pp else None)


def grids(n_layers: int, step: int):
    layers = list(range(0, n_layers, step))
    z = [f"blocks.{i}.attn.z" for i in layers]
    return [
        ("layers × positions (resid_post)", {"sites": [f"blocks.{i}.resid_post" for i in layers], "positions": "all"}),
        ("layers × heads (attn.z, all positions at once)", {"sites": z, "heads": "all", "positions": None}),
        ("layers × heads × positions (attn.z)", {"sites": z, "heads": "all", "positions": "all"}),
    ]


def bench_model(name: str, loader, args) -> list[dict]:
    lab, base, source, metric = loader(torch.device(args.device), getattr(torch, args.dtype))
    rows = []
    for title, kw in grids(lab.n_layers, 5 if args.quick else 1):
        exact = sl.sweep(lab, base, source, metric=metric, **kw)
        est = sl.attribution_patching(lab, base, source, metric=metric, **kw)
        c = est.compare(exact, k=10)
        bench = Bench(device=args.device, rounds=args.rounds, warmup=0, min_round_s=0.0)
        bench.add("sweep", lambda kw=kw: sl.sweep(lab, base, source, metric=metric, **kw))
        bench.add("atp", lambda kw=kw: sl.attribution_patching(lab, base, source, metric=metric, **kw))
        t = bench.run()
        cells = exact.per_example[..., 0].numel()
        rows.append({"measure": f"{title}: sweep ÷ AtP", "cells": cells, "sweep_forwards": exact.forwards,
                     "ratio": t["sweep"] / t["atp"], "atp_ms": t["atp"] * 1e3, "sweep_ms": t["sweep"] * 1e3,
                     "spearman": c.spearman, "pearson": c.pearson, "top10_overlap": c.overlap})
        r = rows[-1]
        print(f"| {name} | {title} | {cells} | {exact.forwards} | {r['ratio']:.1f}× | {c.spearman:.3f} | {c.pearson:.3f} | "
              f"{c.overlap:.2f} | {r['atp_ms']:.0f} ms / {r['sweep_ms']:.0f} ms |", flush=True)
    sites = [f"blocks.{i}.resid_post" for i in range(lab.n_layers)]
    saved, peak = memory(lab, base, metric, sites)
    rows.append({"measure": "memory: AtP's backward (every resid_post) ÷ a plain backward", "ratio": saved, "peak_ratio": peak})
    print(f"| {name} | memory: AtP's backward (every resid_post) ÷ a plain backward | | | {saved:.2f}× saved bytes"
          + (f", {peak:.2f}× peak" if peak is not None else "") + " | | | | |", flush=True)
    record(f"attribution patching ÷ exact sweep: {name} ({args.device}, {args.dtype})", rows)
    lab.unwrap()
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--models", default="deep,smollm", help="comma-separated: deep, smollm")
    p.add_argument("--quick", action="store_true", help="every 5th layer, one round (noisy: a smoke test)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default on CPU: 1)")
    p.add_argument("--rounds", type=int, default=None, help="timing rounds (default 3; --quick: 1)")
    args = p.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 3)
    threads = args.threads or (1 if args.device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    loaders = {"deep": ("narrow deep LLaMA", deep_llama), "smollm": ("SmolLM2-135M", smollm)}
    print(f"\n== attribution patching ÷ exact batched sweep ({args.device}, {args.dtype}, {threads or 'default'} threads)")
    print("| model | grid | cells | sweep forwards | sweep ÷ AtP time | Spearman | Pearson | top-10 overlap | AtP / sweep |")
    print("|---|---|---|---|---|---|---|---|---|")
    for key in args.models.split(","):
        name, loader = loaders[key.strip()]
        bench_model(name, loader, args)


if __name__ == "__main__":
    main()
