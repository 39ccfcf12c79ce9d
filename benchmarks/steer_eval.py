"""Which steering method works on SmolLM2-135M-Instruct? AxBench's comparison, offline, on three concepts.

Every method of :mod:`steerlab.steering` (prompting, DiffMean, PCA, linear
probe, CAA, ActAdd, ReFT-r1, LoReFT, LoRA; plus a DAS subspace for sentiment
with ``--das``) on the shipped concepts (sentiment, French, films), three
seeds for the trained methods and PCA: factors chosen on validation
instructions, harmonic mean of concept score, relevance and fluency on test
instructions, concept-detection AUROC for every direction. Prints the table
(Markdown, for benchmarks/README.md), the judges' accuracies, the wall time
and its split (generation / judging / training), and generation under
interventions ÷ plain generation on the same batch.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 nice -n 10 python benchmarks/steer_eval.py --out steer-eval-bench

Default size: ≤ 60 minutes on 2 CPU cores (6 validation and 12 test
instructions, 32 new tokens, 32 training pairs, 3 epochs). On a GPU, scale up
with ``--device cuda --n-test-instructions 48 --n-val-instructions 16
--max-new-tokens 128 --n-train 256 --epochs 6 --batch-size 64`` (AxBench uses
128-token generations and hundreds of training pairs). ``--tiny`` is the
smoke setting the tests run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import steerlab as sl  # noqa: E402
from steerlab.steering import METHODS, Recipe, compare  # noqa: E402

AXBENCH = """AxBench (Wu et al. 2025, Gemma-2-2B/9B, 500 concepts): steering (harmonic mean) ranks prompting first, then
finetuning (LoReFT, LoRA, SFT), then the representation methods (ReFT-r1 best among them, DiffMean, probes, PCA lower);
SAEs trail. Detection (ROC AUC): DiffMean, probes and ReFT-r1 ≈ 0.94–0.95, PCA and LAT below, SAEs trail."""


def generation_ratio(lab, direction, *, n: int = 8, tokens: int = 32, repeats: int = 2) -> tuple[float, float, float]:
    """Seconds for plain greedy generation and with a steering Add at every position (prompt and decode),
    the same batch, best of ``repeats``; and their ratio."""
    from steerlab.reft import format_prompt, steering_add
    from steerlab.reft.concepts import INSTRUCTIONS

    prompts = [format_prompt(lab.tokenizer, x) for x in INSTRUCTIONS[:n]]
    iv = steering_add(direction, 0.0)  # factor 0: the same tokens, so both runs decode equally long

    def timed(ivs):
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            lab.generate(prompts, ivs, decode=bool(ivs), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            best = min(best, time.perf_counter() - t0)
        return best

    plain = timed([])
    steered = timed([iv])
    return plain, steered, steered / plain


def das_subspace(lab, layer: int):
    """The polarity subspace DAS finds at the adjective position of the shipped sentiment task (size 1)."""
    from steerlab.alignment import DAS, tasks

    task = tasks.sentiment()
    train, test = task.datasets(lab, n_train=64, n_test=32)
    das = DAS(lab, site=f"blocks.{layer}.resid_post", size=1, positions="{adjective}", epochs=2, batch_size=16, localist_samples=8)
    return das.fit(train, test).subspaces["POLARITY"]  # its own positions are overridden by the steering recipes


def report(result, wall: float) -> None:
    """The table, the Markdown table, the judges, every AUROC, the wall time and its split."""
    print("\n" + result.table())
    print("\n" + result.markdown())
    for c, checks in result.judges.items():
        print(f"judge for {c}: " + "; ".join(f"{k['data']}: {k['accuracy']:.3f} ({k['correct']}/{k['n']})" for k in checks))
    for d in sorted(result.detection, key=lambda d: (d["concept"], d["method"], d["seed"] or 0)):
        print(f"AUROC {d['concept']:<10} {d['method']:<9} seed {d['seed']}: {d['auroc']:.3f}")
    split = result.time_split()
    print(f"\nwall {wall:.0f} s (evaluation {result.info['wall_s']:.0f} s): generation {split['generation_s']:.0f} s, "
          f"judging {split['judging_s']:.0f} s, training and direction finding {split['training_s']:.0f} s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--concepts", default="sentiment,french,movies")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--layer", type=int, default=12)
    p.add_argument("--factors", default="0.05,0.1,0.2,0.4")
    p.add_argument("--positions", default="both", choices=("prompt", "decode", "both"))
    p.add_argument("--n-train", type=int, default=32)
    p.add_argument("--n-val-instructions", type=int, default=6)
    p.add_argument("--n-test-instructions", type=int, default=12)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default=None)
    p.add_argument("--das", action="store_true", help="for sentiment, add the DAS polarity subspace (adjective position) as an Add "
                   "direction and as a LoReFT.from_subspace")
    p.add_argument("--tiny", action="store_true", help="the smoke setting: one concept, few methods, tiny generations")
    p.add_argument("--out", help="save the result here (SteerEvalResult.load reads it)")
    p.add_argument("--report", help="write an HTML report")
    args = p.parse_args(argv)
    if args.tiny:
        args.concepts, args.methods, args.seeds = "french", "prompt,diffmean,reft_r1", "0"
        args.n_train, args.n_val_instructions, args.n_test_instructions, args.max_new_tokens, args.epochs = 8, 2, 2, 8, 1
        args.factors = "0.2,0.8"
    t0 = time.perf_counter()
    model, tok = sl.load("smollm2-135m", device=args.device)
    lab = sl.wrap(model, tok)
    embedder = sl.wrap(*sl.load("minilm-l6", device=args.device))
    recipe = Recipe(layer=args.layer, factors=tuple(float(f) for f in args.factors.split(",")), positions=args.positions,
                    n_train=args.n_train, n_val_instructions=args.n_val_instructions, n_test_instructions=args.n_test_instructions,
                    max_new_tokens=args.max_new_tokens, epochs=args.epochs, batch_size=args.batch_size)
    methods = args.methods.split(",")
    das = None
    if args.das:
        das = {"sentiment": das_subspace(lab, args.layer)}
        methods += ["das", "loreft_das"]
    result = compare(lab, concepts=args.concepts.split(","), methods=methods, seeds=[int(s) for s in args.seeds.split(",")],
                     recipe=recipe, embedder=embedder, das=das, log=lambda line: print(line, flush=True))
    report(result, time.perf_counter() - t0)
    from steerlab.alignment import directions

    d = directions.diff_mean(lab, f"blocks.{args.layer}.resid_post", ["Love and joy."] * 2, ["Hate and anger."] * 2)
    plain, steered, ratio = generation_ratio(lab, d, tokens=args.max_new_tokens)
    print(f"generation under a steering Add (every position) ÷ plain, same batch of 8 × {args.max_new_tokens} tokens: "
          f"{steered:.2f} s / {plain:.2f} s = {ratio:.3f}")
    print("\n" + AXBENCH)
    if args.out:
        result.info["generation_ratio"] = ratio
        print(f"saved {result.save(args.out)}")
    if args.report:
        from steerlab.steer_eval_cli import write_report

        write_report(result, args.report)
    return 0


if __name__ == "__main__":
    torch.set_num_threads(int(__import__("os").environ.get("OMP_NUM_THREADS", "1")))
    sys.exit(main())
