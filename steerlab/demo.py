"""``steerlab demo``: locate a causal subspace with DAS, then steer the model with it through LoReFT.

On SmolLM2-135M-Instruct, offline, on CPU:

1. **The behaviour.** ``"Review: The {noun} was {adjective}.\\nSentiment:"`` — the model answers
   " Positive" or " Negative" by the adjective's polarity (a variable that is no token of the prompt).
2. **Locate.** :func:`steerlab.alignment.search` trains DAS for ``POLARITY`` at the answer position of
   each layer of a small grid, with its controls (the same training on a randomly re-initialised
   model; the best neuron-aligned subspace of the same size) and the full-vector interchange (the
   upper bound) beside it, on held-out adjectives. The chosen subspace is the lowest layer with the
   best IIA whose IIA does not exceed the full-vector interchange (that would suggest an illusion).
3. **Steer.** ``LoReFT.from_subspace`` puts a LoReFT on exactly that subspace (``R`` frozen to the DAS
   basis; only ``W`` and ``b`` train) at the last prompt token and trains it on a few training reviews
   of both polarities to answer the target polarity. The control: the same LoReFT on a random
   subspace of the same size, trained identically.
4. **Measure.** Greedy generations before and after on held-out reviews (templated ones with held-out
   adjectives, and free-form ones); the steering rate is the fraction of the held-out reviews of the
   *other* polarity whose generated answer begins with the target word (case-insensitive).
5. **Report.** One HTML file: IIA with controls, the DAS and LoReFT training curves, the held-out
   representations projected onto the subspace coloured by POLARITY, the per-token effect of the
   steer, and the generations table.

``fast=True`` runs the same code with a smaller grid and fewer examples (the test suite uses it).
"""

from __future__ import annotations

import contextlib
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from steerlab.interventions.errors import ConfigError

__all__ = ["DemoSettings", "DemoResult", "run_demo", "FULL", "FAST", "FREE_FORM"]

#: hand-written held-out reviews outside the template (polarity, text)
FREE_FORM = (
    ("positive", "The staff were friendly and the room was spotless."),
    ("negative", "The room was dirty and the staff ignored us."),
    ("positive", "I loved every minute of this film."),
    ("negative", "I walked out of the film after half an hour."),
    ("positive", "A beautiful album that I will play again and again."),
    ("negative", "The songs all sound the same and the lyrics are lazy."),
    ("positive", "The food was fresh and the service was quick."),
    ("negative", "Cold food, long waits and a rude waiter."),
)


@dataclass(frozen=True)
class DemoSettings:
    """The grid and budgets of one demo run."""

    layers: tuple[int, ...]
    size: int
    n_train: int
    n_test: int
    das_epochs: int
    reft_examples: int
    reft_epochs: int
    reft_lr: float
    templated: int
    free_form: int
    max_new_tokens: int
    effects: int


FULL = DemoSettings(layers=(6, 10, 14, 18, 22, 26), size=4, n_train=64, n_test=64, das_epochs=3, reft_examples=16, reft_epochs=30,
                    reft_lr=2e-2, templated=12, free_form=8, max_new_tokens=8, effects=3)
FAST = DemoSettings(layers=(10, 22), size=4, n_train=32, n_test=32, das_epochs=2, reft_examples=8, reft_epochs=20,
                    reft_lr=2e-2, templated=6, free_form=4, max_new_tokens=4, effects=1)


@dataclass
class DemoResult:
    """Everything the demo computed (also what its report shows)."""

    search: Any
    chosen: Any
    train: dict[str, Any]
    generations: list[dict[str, Any]]
    rates: dict[str, tuple[int, int]]
    overall: dict[str, tuple[int, int]]
    target: str
    rate_line: str
    report: Path
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)


def answer(text: str) -> str:
    """The first word of a generated answer, lower-cased (``""`` if there is none)."""
    m = re.search(r"[A-Za-z]+", text)
    return m[0].lower() if m else ""


def _held_out(task, s: DemoSettings, seed: int) -> list[dict[str, str]]:
    """Templated reviews with held-out adjectives (polarities alternating), then free-form ones."""
    rng = random.Random(seed + 7)
    pos = [a for a in task.splits["test"] if task.polarity[a] == "positive"]
    neg = [a for a in task.splits["test"] if task.polarity[a] == "negative"]
    adjectives = [a for pair in zip(pos, neg) for a in pair][: s.templated]
    rows = [{"review": f"The {rng.choice(task.nouns)} was {a}.", "polarity": task.polarity[a], "kind": "templated"} for a in adjectives]
    rows += [{"review": text, "polarity": pol, "kind": "free-form"} for pol, text in FREE_FORM[: s.free_form]]
    return rows


def _prompt(review: str) -> str:
    return f"Review: {review}\nSentiment:"


def _locate(lab, task, s: DemoSettings, seed: int, log: Callable[[str], None]):
    from steerlab.alignment import search

    train, test = task.datasets(lab, n_train=s.n_train, n_test=s.n_test, seed=seed)
    log(f"[2/4] DAS search for POLARITY at the answer position (the last token): layers {', '.join(map(str, s.layers))}, "
        f"subspace size {s.size}; {len(train)} training / {len(test)} held-out counterfactuals (held-out adjectives)")
    res = search(lab, train, test, sites=[f"blocks.{L}.resid_post" for L in s.layers], positions="last", sizes=[s.size],
                 epochs=s.das_epochs, batch_size=16, seed=seed, localist_samples=8, selection_size=s.n_train, eval_size=s.n_test)
    rows = [r for r in res.rows() if r["variable"] == "POLARITY"]
    log("      layer  DAS IIA (± se)   random-init  localist  full vector (upper bound)")
    for r in rows:
        flag = "  <- above the full vector: suspect an illusion" if r["above_full_vector"] else ""
        log(f"      {r['layer']:>5}  {r['iia']:.3f} ± {r['se']:.3f}    {r['random_init']:.3f}        {r['localist']:.3f}     {r['full_vector']:.3f}{flag}")
    ok = [r for r in rows if not r["above_full_vector"]] or rows
    best = max(r["iia"] for r in ok)
    pick = next(r for r in ok if r["iia"] == best)
    chosen = res.get(pick["site"], "last", s.size)
    log(f"      chance {res.chance:.2f}; chosen: layer {pick['layer']} (the lowest layer with the best IIA, {best:.3f}, "
        "not above its full-vector interchange)")
    return res, chosen, test


def _train_steer(model, tok, iv, prompts: list[str], target_word: str, s: DemoSettings):
    from steerlab import reft

    rm = reft.get_reft_model(model, [iv], tokenizer=tok)
    data = reft.InstructionDataset(tok, prompts, [f" {target_word}"] * len(prompts), positions="l1", chat_template=False, add_eos=False)
    result = reft.train(rm, data, epochs=s.reft_epochs, lr=s.reft_lr, batch_size=len(data), cache_prefix=True)
    return rm, result


def _training_prompts(task, s: DemoSettings, seed: int) -> list[str]:
    """``reft_examples`` templated training reviews, half of each polarity (training adjectives only)."""
    rng = random.Random(seed + 11)
    half = s.reft_examples // 2
    pos = [a for a in task.splits["train"] if task.polarity[a] == "positive"]
    neg = [a for a in task.splits["train"] if task.polarity[a] == "negative"]
    chosen = rng.sample(pos, half) + rng.sample(neg, s.reft_examples - half)
    return [task.template.format(noun=rng.choice(task.nouns), adjective=a) for a in chosen]


def _generate(rm, prompts: list[str], s: DemoSettings) -> list[str]:
    return rm.generate(prompts, max_new_tokens=s.max_new_tokens, do_sample=False).texts


def _count(rows: list[dict], key: str, target: str, *, flip_only: bool) -> tuple[int, int]:
    sel = [r for r in rows if (r["polarity"] != target) or not flip_only]
    return sum(answer(r[key]) == target for r in sel), len(sel)


def _steer(model, tok, task, chosen, rows: list[dict], target: str, s: DemoSettings, seed: int, log: Callable[[str], None]):
    """Train the seeded LoReFT and its random-subspace control; generate with each; the effects of the seeded one."""
    from steerlab import reft

    word = target.capitalize()  # the model's own spelling of its answers (" Positive", " Negative")
    prompts = [_prompt(r["review"]) for r in rows]
    train_prompts = _training_prompts(task, s, seed)
    sub = chosen.subspaces["POLARITY"]
    runs = {
        "DAS subspace": lambda: reft.LoReFT.from_subspace(sub, positions="l1"),
        "random subspace": lambda: reft.LoReFT(sub.site, rank=sub.size, width=sub.width, positions="l1", train_rotation=False),
    }
    trained, effects = {}, []
    for i, (name, make) in enumerate(runs.items()):
        torch.manual_seed(seed)
        rm, result = _train_steer(model, tok, make(), train_prompts, word, s)
        try:
            if i == 0:
                trainable = sum(p.numel() for p in rm.parameters() if p.requires_grad)
                log(f"[3/4] LoReFT on the layer-{chosen.site.split('.')[1]} subspace, R frozen to the DAS basis ({trainable:,d} trainable "
                    f"parameters: W and b), trained on {len(train_prompts)} templated training reviews (both polarities) to answer "
                    f"'{word}'; control: the same on a random {sub.size}-dimensional subspace")
                with rm.disabled():
                    for r, text in zip(rows, _generate(rm, prompts, s), strict=True):
                        r["before"] = text
            for r, text in zip(rows, _generate(rm, prompts, s), strict=True):
                r[name] = text
            if i == 0:
                flip = [r for r in rows if r["polarity"] != target][: s.effects]
                effects = [reft.steering_effect(rm, _prompt(r["review"]), max_new_tokens=s.max_new_tokens) for r in flip]
        finally:
            rm.unwrap()
        trained[name] = result
        log(f"      {name}: loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f} in {result.steps} steps ({result.seconds:.1f} s)")
    return trained, effects


def run_demo(*, fast: bool = False, out: str | Path = "steerlab-demo.html", target: str = "negative", seed: int = 0,
             log: Callable[[str], None] = print, progress: bool | None = None) -> DemoResult:
    """Run the demo (see the module docstring); print its steps with ``log``; write the report to ``out``.

    ``progress``: bars for the long steps (the model conversion, the DAS search, the LoReFT
    trainings) on stderr; default: when the output is a terminal or a notebook."""
    from steerlab.interventions import progress as bars

    if target not in ("positive", "negative"):
        raise ConfigError(f"target={target!r}: expected 'positive' or 'negative'")
    if Path(out).suffix.lower() not in (".html", ".htm"):
        raise ConfigError(f"the report {str(out)!r} is an HTML file: expected a name ending in .html")
    with bars.default(progress) if progress is not None else contextlib.nullcontext():
        return _run(fast, Path(out).absolute(), target, seed, log)  # printed at the end: a path the user can open from anywhere


def _run(fast: bool, out: Path, target: str, seed: int, log: Callable[[str], None]) -> DemoResult:
    import steerlab as sl
    from steerlab.alignment import tasks

    s = FAST if fast else FULL
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    model, tok = sl.load("smollm2-135m")
    task = tasks.sentiment(seed=seed)
    log(f"steerlab demo{' --fast' if fast else ''}: locate a causal subspace with DAS, then steer with it (SmolLM2-135M-Instruct, "
        f"CPU, {torch.get_num_threads()} threads)")
    log(f"[1/4] the behaviour: {task.template!r} -> ' Positive' / ' Negative', by the adjective's polarity (POLARITY, "
        "a variable that is no token of the prompt)")
    lab = sl.wrap(model, tok)
    try:
        res, chosen, test = _locate(lab, task, s, seed, log)
        timings["search"] = time.perf_counter() - t0
        figures = {"iia": res.plot(), "das": chosen.plot(), "projection": sl.viz.subspace_projection(chosen, lab, test)}
    finally:
        lab.unwrap()
    rows = _held_out(task, s, seed)
    t1 = time.perf_counter()
    trained, effects = _steer(model, tok, task, chosen, rows, target, s, seed, log)
    timings["steer"] = time.perf_counter() - t1
    return _finish(res, chosen, trained, effects, figures, rows, target, s, out, t0, timings, log)


def _rate(counts: tuple[int, int]) -> str:
    k, n = counts
    return f"{k}/{n} ({100 * k / n:.0f}%)" if n else "0/0"


def _finish(res, chosen, trained, effects, figures, rows, target, s, out, t0, timings, log) -> DemoResult:
    word = target.capitalize()
    keys = {"before": "before", "DAS subspace": "LoReFT on the DAS subspace", "random subspace": "on a random subspace"}
    rates = {k: _count(rows, k, target, flip_only=True) for k in keys}
    overall = {k: _count(rows, k, target, flip_only=False) for k in keys}
    other = "positive" if target == "negative" else "negative"
    correct = sum(answer(r["before"]) == r["polarity"] for r in rows)
    log(f"[4/4] greedy generations on {len(rows)} held-out reviews ({s.templated} templated with held-out adjectives, "
        f"{s.free_form} free-form); the model alone answers {correct}/{len(rows)} correctly")
    for i, r in enumerate(rows):
        log(f"  [{i:2d}] ({r['kind']}, {r['polarity']}) {r['review']}")
        log(f"       before: {r['before']!r}")
        log(f"       after:  {r['DAS subspace']!r}   (random-subspace control: {answer(r['random subspace']) or '-'!r})")
    rate_line = (f"steering rate (the generated answer begins with '{word}'; on the {rates['before'][1]} held-out {other} reviews): "
                 + ", ".join(f"{keys[k]} {_rate(v)}" for k, v in rates.items()))
    overall_line = (f"all {len(rows)} held-out reviews answered '{word}': "
                    + ", ".join(f"{keys[k]} {_rate(v)}" for k, v in overall.items()))
    log(rate_line)
    log(overall_line)
    table = [{"#": i, "kind": r["kind"], "polarity": r["polarity"], "review": r["review"], "before": r["before"],
              "after (DAS subspace)": r["DAS subspace"], "after (random subspace)": r["random subspace"]} for i, r in enumerate(rows)]
    path = _write_report(res, chosen, trained, effects, figures, table, rate_line, overall_line, s, out)
    seconds = time.perf_counter() - t0
    log(f"report: {path} (IIA with controls, DAS and LoReFT training curves, projection onto the subspace, per-token steering "
        f"effect, generations table)")
    log(f"done in {seconds:.0f} s")
    return DemoResult(res, chosen, trained, rows, rates, overall, target, rate_line, path, seconds, timings)


def _write_report(res, chosen, trained, effects, figures, table, rate_line, overall_line, s, out) -> Path:
    import steerlab as sl

    layer = chosen.site.split(".")[1]
    iia = chosen.iia["all"]
    search_rows = [{k: r[k] for k in ("layer", "size", "iia", "se", "random_init", "localist", "full_vector", "chance", "above_full_vector")}
                   for r in res.rows() if r["variable"] == "POLARITY"]
    sections = [
        ("1. Where is POLARITY? DAS with its controls", [
            "For each layer, DAS trains a subspace at the answer position (the prompt's last token) so that interchanging it "
            "from a source review makes the model answer the source's polarity. Beside it: the same training on a randomly "
            "re-initialised model, the best neuron-aligned subspace of the same size, and the interchange of the whole vector "
            "(the upper bound). IIA is measured on counterfactuals built from adjectives never used in training.",
            figures["iia"], search_rows,
            f"Chosen: layer {layer}, IIA {iia.value:.3f} ± {iia.se:.3f} (n={iia.n}).",
        ]),
        (f"2. DAS training at layer {layer}", [figures["das"]]),
        (f"3. Held-out representations at layer {layer} projected onto the found subspace", [
            "Each point is a held-out review's last-token representation in the coordinates of the DAS subspace, coloured by "
            "the polarity the causal model assigns it.", figures["projection"]]),
        ("4. Steering: a LoReFT on that subspace, and a control", [
            f"LoReFT.from_subspace keeps R equal to the DAS basis and trains W and b only, at the last prompt token, on "
            f"{s.reft_examples} templated training reviews of both polarities. The control is the same LoReFT on a random "
            f"subspace of the same size, trained the same way.",
            sl.viz.reft_training_curve(trained)]),
        ("5. Per-token effect of the steer", [
            "Log-probabilities of the steered generation's tokens with and without the LoReFT (teacher-forced).",
            sl.viz.token_effects(effects)]),
        ("6. Generations before and after", [rate_line, overall_line, table]),
    ]
    intro = ("Locate a causal subspace with DAS, then steer SmolLM2-135M-Instruct with it through LoReFT. The behaviour: "
             "'Review: The {noun} was {adjective}.\\nSentiment:' answered ' Positive' or ' Negative'.")
    return sl.viz.report([], out, title="steerlab demo: from a DAS subspace to a LoReFT steer", intro=intro, sections=sections)
