"""Indirect object identification on SmolLM2-135M (Wang et al. 2022): the circuit and its faithfulness.

1. **Behaviour.** Logit difference ``logit(IO) − logit(S)`` and accuracy on the train and test
   prompts (disjoint names), and on their ABC corruptions.
2. **Name movers.** Path patching from every head to the logits on the train prompts (every
   other head frozen): the heads whose path carries the most logit difference.
3. **S-inhibition.** Path patching from every head below them to the name movers' queries at
   the last token: the heads that move the subject's duplication to where the name is read.
4. **Duplication.** Path patching from every head below those to the S-inhibition heads' keys
   and values at the subject's second mention: induction / duplicate-token heads.
5. **Faithfulness.** The circuit (name movers, negative name movers, S-inhibition and
   duplication heads), every other head
   mean-ablated (the mean over the ABC prompts of the same template), on held-out test
   prompts: ``mean F(circuit) / mean F(model)``, beside random circuits of the same size
   and the empty circuit. The paper: 87 % for GPT-2 small's 26-head circuit.

Usage::

    python benchmarks/ioi_circuit.py                 # 30 train / 60 test prompts, every head (~40 min on a quiet core)
    python benchmarks/ioi_circuit.py --fast          # 6 / 24 prompts, a few layers per step (as tutorial 09's fast mode)
    python benchmarks/ioi_circuit.py --html ioi.html
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import steerlab as sl  # noqa: E402
from steerlab.alignment import Circuit, Receiver, faithfulness, path_patching  # noqa: E402
from steerlab.alignment.tasks import ioi  # noqa: E402


def behaviour(lab, name: str, data) -> None:
    with torch.no_grad():
        clean = data.metric(lab.run(data.encode(), **lab.facts.no_cache).output, data.encode())
        bad = data.metric(lab.run(data.encode(corrupted=True), **lab.facts.no_cache).output, data.encode(corrupted=True))
    print(f"| {name} | {len(data)} | {clean.mean():.2f} ± {clean.std() / len(clean) ** 0.5:.2f} | {(clean > 0).float().mean():.0%} | {bad.mean():.2f} |")


def choose(result, k: int, threshold: float) -> list:
    """The ``k`` most negative heads whose relative effect is below ``-threshold``."""
    return [h for h, v in result.top(k) if v < -threshold]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=30)
    ap.add_argument("--test", type=int, default=60)
    ap.add_argument("--name-movers", type=int, default=6, help="at most this many name movers")
    ap.add_argument("--s-inhibition", type=int, default=4, help="at most this many S-inhibition heads")
    ap.add_argument("--duplication", type=int, default=8, help="at most this many induction / duplicate-token heads")
    ap.add_argument("--threshold", type=float, default=0.01, help="a head counts when its path lowers the logit difference by more than this share")
    ap.add_argument("--negative-threshold", type=float, default=0.02, help="a negative name mover raises it by more than this share")
    ap.add_argument("--random", type=int, default=20, help="random circuits of the same size")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fast", action="store_true")
    ap.add_argument("--html", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = sl.load("smollm2-135m")
    lab = sl.wrap(model, tok)
    H = lab.resolve("blocks.0.attn.z").n_heads
    n_train, n_test = (6, 24) if args.fast else (args.train, args.test)
    task = ioi()
    train = task.prompts(n_train, tok, split="train", seed=1)
    test = task.prompts(n_test, tok, split="test", seed=2)
    print("## Behaviour\n\n| prompts | n | logit diff IO − S (± se) | accuracy | ABC logit diff |\n|---|---|---|---|---|")
    behaviour(lab, "train names", train)
    behaviour(lab, "test names", test)

    low = 21 if args.fast else 0
    t0 = time.perf_counter()
    movers = path_patching(lab, train.encode(), train.encode(corrupted=True), metric=train.metric,
                           senders=[(L, h) for L in range(low, lab.n_layers) for h in range(H)])
    print(f"\n## Name movers: path patching to the logits ({len(movers.senders)} senders, {movers.forwards} forwards, {time.perf_counter() - t0:.0f} s)\n")
    print(movers.table(12))
    nm = choose(movers, args.name_movers, args.threshold)
    negative = [h for h, v in movers.top(3, sign=1) if v > args.negative_threshold]
    print(f"\nname movers: {', '.join(f'{L}.{h}' for L, h in nm)}; negative name movers: {', '.join(f'{L}.{h}' for L, h in negative)}")

    end = train.positions("END")
    receivers = [Receiver(L, tuple(hs), "q", positions=end) for L, hs in Circuit.of(nm).by_layer().items()]
    top = min(L for L, _ in nm)
    lo2 = max(0, top - 4) if args.fast else 0
    t0 = time.perf_counter()
    inhibition = path_patching(lab, train.encode(), train.encode(corrupted=True), metric=train.metric, receivers=receivers,
                               senders=[(L, h) for L in range(lo2, top) for h in range(H)])
    print(f"\n## S-inhibition: path patching to the name movers' queries at END ({len(inhibition.senders)} senders, {inhibition.forwards} forwards, {time.perf_counter() - t0:.0f} s)\n")
    print(inhibition.table(12))
    si = choose(inhibition, args.s_inhibition, args.threshold)
    print(f"\nS-inhibition heads: {', '.join(f'{L}.{h}' for L, h in si)}")

    group = H // lab.resolve("blocks.0.attn.k").n_heads
    s2 = train.positions("S2")
    receivers3 = [Receiver(L, (h // group,), kind, positions=s2) for L, h in si for kind in ("k", "v")]
    top3 = min(L for L, _ in si)
    lo3 = max(0, top3 - 4) if args.fast else 0
    t0 = time.perf_counter()
    duplication = path_patching(lab, train.encode(), train.encode(corrupted=True), metric=train.metric, receivers=receivers3,
                                senders=[(L, h) for L in range(lo3, top3) for h in range(H)])
    print(f"\n## Duplication: path patching to the S-inhibition heads' keys and values at S2 ({len(duplication.senders)} senders, {duplication.forwards} forwards, {time.perf_counter() - t0:.0f} s)\n")
    print(duplication.table(12))
    dup = choose(duplication, args.duplication, args.threshold)
    print(f"\ninduction / duplicate-token heads: {', '.join(f'{L}.{h}' for L, h in dup)}")

    circuit = Circuit.of(nm + negative, "name movers") | Circuit.of(si, "S-inhibition") | Circuit.of(dup, "duplication")
    steps = [Circuit.of(nm, "name movers"), Circuit.of(nm + negative, "+ negative"), Circuit.of(nm + negative + si, "+ S-inhibition"), circuit]
    t0 = time.perf_counter()
    on_test = faithfulness(lab, circuit, test.encode(), test.encode(corrupted=True), metric=test.metric, groups=test.templates,
                           random_circuits=5 if args.fast else args.random)
    on_train = faithfulness(lab, circuit, train.encode(), train.encode(corrupted=True), metric=train.metric, groups=train.templates, random_circuits=0)
    print(f"\n## Faithfulness under mean ablation ({time.perf_counter() - t0:.0f} s)\n")
    print(on_test.table())
    print("\n| circuit | heads | faithfulness (test names) |\n|---|---|---|")
    for c in steps[:-1]:
        f = faithfulness(lab, c, test.encode(), test.encode(corrupted=True), metric=test.metric, groups=test.templates, random_circuits=0)
        print(f"| {c.name} | {len(c)} | {f.score:.1%} ± {f.se:.1%} |")
    print(f"| all | {len(circuit)} | {on_test.score:.1%} ± {on_test.se:.1%} |")
    rs = on_test.random_scores
    print("\n| circuit | heads | faithfulness, train prompts | held-out (test names) | random circuits of the same size (mean / best) | no head | paper (GPT-2 small) |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {circuit.name} | {len(circuit)} | {on_train.score:.1%} | {on_test.score:.1%} ± {on_test.se:.1%} | "
          f"{sum(rs) / len(rs):.1%} / {max(rs):.1%} | {on_test.empty_score:.1%} | 87 % (26 heads) |")
    if args.html:
        figs = {"Name movers": movers.plot(), "S-inhibition": inhibition.plot(), "Duplication": duplication.plot(), "Faithfulness": on_test.plot()}
        sl.viz.report(figs, args.html,
                      title="IOI on SmolLM2-135M-Instruct")
        print(f"wrote {args.html}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
