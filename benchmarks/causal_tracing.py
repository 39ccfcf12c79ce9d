"""Causal tracing on SmolLM2-135M (Meng et al. 2022, Fig. 1 and 2), and its speed.

1. **Facts.** Every shipped candidate (``steerlab.alignment.tasks.FACTS``) asked greedily;
   the rate SmolLM2 answers correctly, per relation.
2. **Trace.** ``--facts`` of the known facts (a seeded sample), ``--samples`` noise draws each
   (3 × the subject embeddings' std), every layer × token: hidden states, MLP and attention
   outputs alone and over 10-layer windows. The average indirect effect per token class and
   layer; where the paper's two sites are (the early site: MLPs at the last subject token;
   the late site: the last token's hidden states) and their effect sizes.
3. **Speed.** For ``--speed-facts`` facts at every ``--speed-layers``-th layer: ``trace`` (the
   packed sweep, prefix reuse) ÷ the same restorations run one by one (``lab.run`` with the
   noise and the clean values, precomputed, patched in), the numbers checked equal.

Usage::

    python benchmarks/causal_tracing.py                      # 24 facts x 1 draw (77 min on the busy shared machine)
    python benchmarks/causal_tracing.py --facts 100 --samples 3   # closer to the paper (about 12x longer)
    python benchmarks/causal_tracing.py --fast               # a tiny setting (a few minutes)
    python benchmarks/causal_tracing.py --html trace.html    # also the figures
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import steerlab as sl  # noqa: E402
from steerlab.alignment import trace  # noqa: E402
from steerlab.alignment.causal_tracing import KINDS, TOKEN_CLASSES, noise_scale  # noqa: E402
from steerlab.alignment.tasks import known_facts  # noqa: E402

PAPER = {  # Meng et al. 2022, §2.1 and Fig. 2: GPT-2 XL (48 layers), 1000 facts, 10 noise draws each
    "ate": "18.6 %",
    "hidden": "last subject token: AIE 8.7 % at layer 15 (early-to-middle layers); last token: strong in the late layers",
    "mlp window": "last subject token: peak AIE 6.6 % around layer 15 (middle layers); little at the last token",
    "attn window": "last subject token: small (1.6 %); last token: the late layers",
}


def screen(lab) -> list:
    t0 = time.perf_counter()
    known = known_facts(lab)
    print(f"## Facts ({time.perf_counter() - t0:.0f} s)\n")
    print(known.table())
    print(f"\nkept {len(known.kept)} of {len(known.candidates)} (rate {known.rate:.3f})\n")
    return known.kept


def trace_table(res) -> None:
    print(res.table())
    print("\n| component (window) | token class | peak layer | AIE | AIE ÷ ATE | paper (GPT-2 XL) |")
    print("|---|---|---|---|---|---|")
    for kind in ("hidden", "mlp window", "attn window", "mlp", "attn"):
        if kind not in res.scores:
            continue
        for cls in ("last subject token", "last token"):
            L, v = res.peak(kind, cls)
            paper = PAPER.get(kind, "—") if cls == "last subject token" else "—"
            print(f"| {kind} | {cls} | {L} | {v:.3f} | {v / res.ate:.2f} | {paper} |")
    print(f"\nATE {res.ate:.3f} (paper {PAPER['ate']}); clean p {float(res.clean.mean()):.3f}, corrupted p {float(res.corrupted.mean()):.3f}")
    for name, (kind, L, v) in res.sites().items():
        print(f"{name} site: {kind} peaks at layer {L} with AIE {v:.3f}")


def serial(lab, fact, res, samples: int, seed: int) -> tuple[float, float]:
    """The same restorations one ``lab.run`` each; (seconds, largest |difference| from ``res``)."""
    tok = lab.tokenizer
    ids = torch.tensor([tok(fact.prompt).input_ids], device=lab.device).repeat(samples, 1)
    subject = fact.subject_tokens(tok)
    noise = sl.Noise("embed", std=res.noise_std, seed=seed * 1_000_003, positions=subject)  # trace's draw for batch 0
    metric = sl.metrics.prob(fact.target, tokenizer=tok)
    n = lab.n_layers
    entries = [(k, [KINDS[k].format(L)]) for k in ("hidden", "mlp", "attn") for L in res.layers]
    entries += [(f"{k} window", [KINDS[k].format(i) for i in range(max(0, L - 5), min(n, L + 5))]) for k in ("mlp", "attn") for L in res.layers]
    clean = lab.collect({"input_ids": ids}, sorted({s for _, sites in entries for s in sites}))
    worst, t0 = 0.0, time.perf_counter()
    rows = {k: 0 for k in res.scores}
    with torch.no_grad():
        for kind, sites in entries:
            j = rows[kind]
            rows[kind] += 1
            for t in range(ids.shape[1]):
                patches = [sl.Interchange(s, positions=[t], source=sl.SourceValue(clean[s][:, t : t + 1])) for s in sites]
                p = metric(lab.run({"input_ids": ids}, [noise, *patches], **lab.facts.no_cache).output, None).mean()
                worst = max(worst, abs(float(p) - float(res.scores[kind][0][j, t])))
    return time.perf_counter() - t0, worst


def speed(lab, facts, samples: int, seed: int, layers) -> None:
    print("\n## Speed: trace (packed sweep) ÷ the same restorations one by one\n")
    print("| fact | tokens | restorations | sweep (s) | one by one (s) | ratio | largest difference |")
    print("|---|---|---|---|---|---|---|")
    ratios = []
    for f in facts:
        std = noise_scale(lab, [f])
        t0 = time.perf_counter()
        res = trace(lab, [f], samples=samples, seed=seed, std=std, layers=layers)
        t_sweep = time.perf_counter() - t0
        t_loop, worst = serial(lab, f, res, samples, seed)
        T = len(res.tokens[0])
        ratios.append(t_sweep / t_loop)
        print(f"| {f.prompt!r} | {T} | {len(res.scores) * len(res.layers) * T} | {t_sweep:.1f} | {t_loop:.1f} | {t_sweep / t_loop:.3f} | {worst:.1e} |")
    print(f"\nsweep ÷ one by one: {sum(ratios) / len(ratios):.3f} (mean over {len(ratios)} facts)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--facts", type=int, default=24)
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--speed-facts", type=int, default=1)
    ap.add_argument("--speed-layers", type=int, default=3, help="the speed comparison traces every n-th layer")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fast", action="store_true", help="4 facts, every 5th layer, 1 fact for speed")
    ap.add_argument("--html", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = sl.load("smollm2-135m")
    lab = sl.wrap(model, tok)
    kept = screen(lab)
    n = 4 if args.fast else args.facts
    chosen = sorted(random.Random(args.seed).sample(range(len(kept)), min(n, len(kept))))
    facts = [kept[i] for i in chosen]
    layers = list(range(0, lab.n_layers, 5)) if args.fast else None
    t0 = time.perf_counter()
    res = trace(lab, facts, samples=args.samples, seed=args.seed, layers=layers, progress=False)
    print(f"## Trace: {len(facts)} facts × {args.samples} draws, {res.forwards} packed forwards, {time.perf_counter() - t0:.0f} s\n")
    trace_table(res)
    if args.html:
        figs = {"Average indirect effect": res.plot()} | {f"{f.prompt!r}": res.plot(fact=i) for i, f in enumerate(facts[:3])}
        sl.viz.report(figs, args.html, title="Causal tracing on SmolLM2-135M-Instruct")
        print(f"wrote {args.html}")
    speed(lab, facts[: 1 if args.fast else args.speed_facts], args.samples, args.seed, layers or list(range(0, lab.n_layers, args.speed_layers)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
