"""``steerlab steer-eval``: the steering comparison from a shell (flags, or a ``[steer_eval]`` table).

::

    steerlab steer-eval smollm2-135m --concepts sentiment,french --methods prompt,diffmean,loreft \\
        --layer 12 --factors 0.1,0.2,0.4 --seeds 0,1,2 --out steer-eval --report steer-eval.html

``--config FILE.toml`` reads the same settings from the file's ``[steer_eval]``
table (keys as the flags, with underscores: ``concepts``, ``methods``,
``layer``, ``factors``, ``seeds``, ``positions``, ``n_train``,
``n_test_examples``, ``max_new_tokens``, ``n_val_instructions``, ``n_test_instructions``,
``epochs``) and the model from ``[model] name``; flags given on the command
line win. Writes the table to stdout, the result (``--out``, the one file
format) and an HTML report (``--report``: the table, the factor sweeps, the
AUROC bars, the judges' accuracies, sample generations).
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path
from typing import Any

from steerlab.interventions.errors import ConfigError

__all__ = ["add_parser", "run"]

_RECIPE_KEYS = ("layer", "factors", "positions", "n_train", "n_test_examples", "max_new_tokens", "n_val_instructions", "n_test_instructions",
                "epochs", "batch_size")
_KEYS = {"concepts", "methods", "seeds", *_RECIPE_KEYS}


def _list(text: str | None, what: str, cast=str) -> list | None:
    if text is None:
        return None
    try:
        items = [cast(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--{what} {text!r}: expected a comma-separated list") from None
    if not items:
        raise ConfigError(f"--{what} {text!r} lists nothing")
    return items


def add_parser(sub) -> None:
    p = sub.add_parser(
        "steer-eval", help="compare steering methods (prompting, DiffMean, PCA, probe, CAA, ActAdd, ReFT-r1, LoReFT, LoRA) on concepts",
        description="AxBench-style comparison on one model: for each concept, generations on held-out instructions at a sweep of "
        "steering factors chosen on validation, scored by an offline judge (concept), MiniLM similarity (relevance) and base-model "
        "perplexity and repetition (fluency), their harmonic mean; and each direction's concept-detection AUROC.",
    )
    p.add_argument("model", nargs="?", metavar="MODEL", help="embedded name (default smollm2-135m) or local directory")
    p.add_argument("--config", metavar="FILE.toml", help="read the [steer_eval] table (and [model] name) of an experiment file")
    p.add_argument("--concepts", help="comma list of shipped concepts: sentiment, french, movies (default: all three)")
    p.add_argument("--methods", help="comma list of prompt, diffmean, pca, probe, caa, actadd, reft_r1, loreft, lora (default: all)")
    p.add_argument("--layer", type=int, help="the layer whose resid_post every intervention edits (default 12)")
    p.add_argument("--factors", help="comma list of steering factors, multiples of the site's median token norm (default 0.05,0.1,0.2,0.4)")
    p.add_argument("--seeds", help="comma list of seeds for the trained methods and PCA (default 0)")
    p.add_argument("--positions", choices=("prompt", "decode", "both"), help="where the edits act while generating (default both)")
    p.add_argument("--n-train", type=int, help="training examples per class (default 32)")
    p.add_argument("--n-test-examples", type=int, help="held-out examples per class for the detection AUROC (default 64)")
    p.add_argument("--max-new-tokens", type=int, help="tokens generated per response (default 32)")
    p.add_argument("--n-val-instructions", type=int, help="instructions for choosing the factor (default 6)")
    p.add_argument("--n-test-instructions", type=int, help="instructions the table reports on (default 12)")
    p.add_argument("--epochs", type=int, help="training epochs of ReFT-r1, LoReFT and LoRA (default 3)")
    p.add_argument("--out", metavar="DIR", help="save the result (steerlab.json; reload with SteerEvalResult.load)")
    p.add_argument("--report", metavar="FILE.html", help="write an HTML report")
    p.set_defaults(func=run)


def _from_file(path: str) -> tuple[str | None, dict[str, Any]]:
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"--config {path!r}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config {path!r} is not valid TOML: {e}") from None
    table = data.get("steer_eval")
    if not isinstance(table, dict):
        raise ConfigError(f"{path} has no [steer_eval] table")
    unknown = sorted(set(table) - _KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown [steer_eval] keys {unknown}; known: {sorted(_KEYS)}")
    model = data.get("model", {}).get("name") if isinstance(data.get("model"), dict) else None
    return model, dict(table)


def _settings(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    model, cfg = _from_file(args.config) if args.config else (None, {})
    flags = {
        "concepts": _list(args.concepts, "concepts"), "methods": _list(args.methods, "methods"),
        "seeds": _list(args.seeds, "seeds", int), "factors": _list(args.factors, "factors", float),
        "layer": args.layer, "positions": args.positions, "n_train": args.n_train, "n_test_examples": args.n_test_examples,
        "max_new_tokens": args.max_new_tokens,
        "n_val_instructions": args.n_val_instructions, "n_test_instructions": args.n_test_instructions, "epochs": args.epochs,
    }
    cfg.update({k: v for k, v in flags.items() if v is not None})
    return args.model or model or "smollm2-135m", cfg


def run(args: argparse.Namespace) -> int:
    import steerlab as sl
    from steerlab.steering import Recipe, compare
    from steerlab.cli_models import load_lab

    from steerlab.reft.concepts import BUILDERS
    from steerlab.steering import check_methods

    model, cfg = _settings(args)
    recipe = Recipe(**{k: cfg[k] for k in _RECIPE_KEYS if k in cfg})
    check_methods(cfg.get("methods", ["prompt"]))  # before any model loads
    unknown = [c for c in cfg.get("concepts", []) if c not in BUILDERS]
    if unknown:
        raise ConfigError(f"concepts {unknown}: the shipped concepts are {sorted(BUILDERS)}")
    args.model = model
    args.dtype, args.device = getattr(args, "dtype", "float32"), getattr(args, "device", None)
    lab = load_lab(args)
    embedder = sl.wrap(*sl.load("minilm-l6"))
    kw = {k: cfg[k] for k in ("concepts", "methods", "seeds") if k in cfg}
    result = compare(lab, recipe=recipe, embedder=embedder, progress=False if getattr(args, "no_progress", False) else None,
                     log=lambda line: print(line, flush=True), **kw)
    print(result.table())
    split = result.time_split()
    print(f"wall {result.info['wall_s']:.0f} s: generation {split['generation_s']:.0f} s, judging {split['judging_s']:.0f} s, "
          f"training {split['training_s']:.0f} s")
    if args.out:
        print(f"saved the result to {result.save(args.out)}")
    if args.report:
        write_report(result, args.report)
        print(f"wrote {args.report}")
    return 0


def write_report(result, path: str) -> None:
    """One self-contained HTML page: the table, sweeps, AUROC bars, judges and sample generations."""
    import steerlab as sl

    figures: dict[str, Any] = {"Method × concept (test, chosen factor)": result.plot("table")}
    for c in result.concepts:
        if c not in result.dropped and result.sweep(c):
            figures[f"{c}: factor sweep (validation)"] = result.plot("sweep", concept=c)
    if result.detection:
        figures["Concept detection"] = result.plot("auroc")
    seen, lines = set(), []
    for r in result.rows:
        key = (r["concept"], r["method"])
        if r["split"] != "test" or not r["selected"] or key in seen:
            continue
        seen.add(key)
        lines.append(f"[{r['concept']} / {r['method']} ×{r['factor']:g}] {r['instruction']}\n    → {r['response']!r}")
    sections = [("Table (judge accuracy on held-out labelled text beside each concept)", sl.viz.Pre(result.table())),
                ("One generation per method and concept", sl.viz.Pre("\n".join(lines)))]
    sl.viz.report(figures, path, title="steerlab steer-eval", sections=sections)
