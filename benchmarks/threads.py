"""Torch threads on this machine, as it is now: a SmolLM2 forward + backward at 1, 2, ... threads.

Why ``steerlab``'s commands default to ``steerlab.threads.default_threads()``
(min(physical cores, 4, cores minus the load average), or OMP_NUM_THREADS)
and not torch's one-thread-per-core: on a machine whose cores are busy, extra
OpenMP threads wait for each other. The cases are timed round-robin in one
process (``_timing.Bench``), so each sees the same load; the machine's load
average before and after is printed beside the table.

    python benchmarks/threads.py                 # 1, 2, ... up to the logical cores (at most 4)
    python benchmarks/threads.py --threads 1,2,4 --batch 8 --seq 64
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import Row, print_table  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", default=None, help="comma list of thread counts (default: 1..min(cores, 4))")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--model", default="smollm2-135m", help="an embedded name or a local model folder")
    args = p.parse_args(argv)
    import steerlab as sl
    from steerlab.threads import default_threads, physical_cores

    counts = [int(x) for x in args.threads.split(",")] if args.threads else list(range(1, min(os.cpu_count() or 1, 4) + 1))
    model, tok = sl.load(args.model)
    ids = torch.randint(0, tok.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    for prm in model.parameters():
        prm.requires_grad_(False)
    emb = model.get_input_embeddings()

    def step() -> None:  # what a training step costs: forward and backward through every block
        x = emb(ids).detach().requires_grad_(True)
        model(inputs_embeds=x).logits[:, -1].float().logsumexp(-1).sum().backward()

    samples: dict[int, list[float]] = {n: [] for n in counts}
    for n in counts:  # warm-up, once per count
        torch.set_num_threads(n)
        step()
    before = os.getloadavg()[0]
    for _ in range(args.rounds):  # round-robin: every count sees the same spells of load
        for n in counts:
            torch.set_num_threads(n)
            t0 = time.perf_counter()
            step()
            samples[n].append(time.perf_counter() - t0)
    after = os.getloadavg()[0]
    print(f"{args.model} forward + backward, batch {args.batch} x {args.seq} tokens; logical CPUs {os.cpu_count()}, "
          f"physical cores {physical_cores()}, load average {before:.2f} before / {after:.2f} after; "
          f"default_threads() now: {default_threads()}")
    ref = statistics.median(samples[counts[0]])
    rows = [Row(f"{n} thread{'s' if n > 1 else ''}", statistics.median(samples[n]), ref,
                note=f"spread {min(samples[n]) * 1e3:.0f}-{max(samples[n]) * 1e3:.0f} ms over {args.rounds} rounds") for n in counts]
    print_table(f"step time ÷ {counts[0]} thread{'s' if counts[0] > 1 else ''}", rows)

if __name__ == "__main__":
    main()
