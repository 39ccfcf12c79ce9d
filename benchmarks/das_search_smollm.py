"""DAS search on SmolLM2-135M for adjective polarity: a stated grid, with controls, under 15 minutes.

Grid: 6 layers (resid_post of blocks 0, 5, 10, 15, 20, 25) × 2 positions
(the adjective's token, the final answer position) × subspace sizes {4, 64}
= 24 candidates. Each gets DAS IIA on held-out adjectives beside the
random-init control (the same training on a re-initialised SmolLM2), the best
of 8 sampled localist neuron subsets of the same size, and the full-vector
interchange at the same site and positions (the upper bound). Expected
shape: at the adjective position the polarity is there early and leaves
late; at the answer position it arrives around the middle layers.

Run: ``python benchmarks/das_search_smollm.py [--html out.html]``.
"""

from __future__ import annotations

import argparse
import time

import torch

import steerlab as sl
from steerlab.alignment import search, tasks

LAYERS = (0, 5, 10, 15, 20, 25)
POSITIONS = ("adjective", "last")
SIZES = (4, 64)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-train", type=int, default=64)
    ap.add_argument("--n-test", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--html", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tok = sl.load("smollm2-135m")
    lab = sl.wrap(model, tok)
    task = tasks.sentiment()
    res = search(lab, task, sites=[f"blocks.{x}.resid_post" for x in LAYERS], positions=list(POSITIONS), sizes=list(SIZES),
                 n_train=args.n_train, n_test=args.n_test, epochs=args.epochs, batch_size=16, lr=1e-2,
                 localist_samples=8, selection_size=32, eval_size=32, progress=True)
    total = time.perf_counter() - t0
    print(f"\n== DAS search, SmolLM2-135M, adjective polarity: {len(LAYERS)} layers x {len(POSITIONS)} positions x sizes {list(SIZES)}")
    print(res)
    print(f"\ncache {res.timings['cache']:.0f}s, random-init cache {res.timings['random_init_cache']:.0f}s, "
          f"candidates {res.timings['candidates']:.0f}s; total wall time {total:.0f}s (target < 900s)")
    if args.html:
        sl.viz.save_html(res.plot(), args.html)
        print(f"figure: {args.html}")


if __name__ == "__main__":
    main()
