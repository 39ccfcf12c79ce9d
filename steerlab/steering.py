"""Which steering method works on my model? One call: :func:`compare`.

This module composes the layers (``alignment`` finds directions, ``reft``
trains ReFT interventions and evaluates; neither imports the other) into the
AxBench-style comparison on one model::

    import steerlab as sl
    from steerlab.steering import compare

    result = compare("smollm2-135m", concepts=["sentiment", "french"], layer=12, seeds=[0, 1, 2])
    print(result.table())        # method × concept: harmonic mean (± sd over seeds), factor, AUROC
    result.plot("sweep")         # concept score vs fluency along each factor sweep

Methods (:data:`METHODS`), each a thin recipe producing a saveable intervention
on the base layer (or, for prompting and LoRA, a way to generate):

============  =================================================================
``prompt``    the concept stated in the system prompt (the baseline every table carries)
``diffmean``  ``Add`` along the difference of class means (``alignment.directions.diff_mean``)
``pca``       ``Add`` along the first PC of paired differences (``directions.pca``)
``probe``     ``Add`` along a logistic-regression weight (``directions.probe``)
``caa``       ``Add`` along the A/B answer-letter contrast (``directions.caa``)
``actadd``    ``Add`` along one prompt pair's difference (``directions.actadd``)
``reft_r1``   ``ReFTr1`` trained with ``reft.train``, then an ``Add`` along its direction
``loreft``    ``LoReFT`` (rank 4, prompt positions ``f5+l5``) trained with ``reft.train``
``lora``      LoRA (peft, rank 4 on q/v of every layer) trained on the same data
``das``       ``Add`` along a DAS ``Subspace`` (its first direction) given by the caller
``loreft_das``  ``LoReFT.from_subspace`` of that DAS ``Subspace`` (``R`` frozen to its basis), trained
============  =================================================================

Directions, ReFT-r1 and the DAS subspace get a factor sweep (chosen on
validation); ReFT-r1, LoReFT and LoRA train on ``n_train`` (instruction,
positive example) pairs per seed. Every direction also gets the
concept-detection AUROC.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from steerlab.interventions import Lab, Subspace
from steerlab.interventions.errors import ConfigError

__all__ = ["METHODS", "DEFAULT_FACTORS", "Recipe", "compare", "contenders", "build_judge", "check_methods"]

METHODS = ("prompt", "diffmean", "pca", "probe", "caa", "actadd", "reft_r1", "loreft", "lora")
TRAINED = ("reft_r1", "loreft", "lora")
#: steering factors (multiples of the site's median token norm) swept on validation
DEFAULT_FACTORS = (0.05, 0.1, 0.2, 0.4)


@dataclass
class Recipe:
    """Sizes and training settings of a comparison (the knobs that scale it up on a GPU)."""

    layer: int = 12
    factors: Sequence[float] = DEFAULT_FACTORS  # kept as a tuple
    positions: str = "both"
    n_train: int = 32
    n_test_examples: int = 64
    n_val_instructions: int = 6
    n_test_instructions: int = 12
    max_new_tokens: int = 32
    batch_size: int = 16
    epochs: int = 3
    lr: dict[str, float] = field(default_factory=lambda: {"reft_r1": 4e-3, "loreft": 4e-3, "lora": 1e-3})
    rank: int = 4

    def __post_init__(self):
        from steerlab.reft.steer_eval import POSITIONS

        if self.positions not in POSITIONS:
            raise ConfigError(f"positions={self.positions!r}: expected one of {POSITIONS}")
        if not self.factors or any(not isinstance(f, (int, float)) for f in self.factors):
            raise ConfigError(f"factors={self.factors!r}: expected a non-empty list of numbers")
        self.factors = tuple(float(f) for f in self.factors)


def check_methods(methods: Sequence[str]) -> list[str]:
    """The methods, deduplicated; an unknown name raises ``ConfigError`` naming the known ones."""
    bad = [m for m in methods if m not in METHODS and m not in ("das", "loreft_das")]
    if bad or not methods:
        raise ConfigError(f"methods={list(methods)!r}: expected some of {list(METHODS)} (and 'das', 'loreft_das' with a DAS subspace)")
    return list(dict.fromkeys(methods))


def build_judge(judge: str, lab: Lab, embedder: Lab, *, progress=None):
    """``(judge, checks)`` for a shipped concept's judge name, the checks measured on held-out labelled text."""
    from steerlab.reft import judges

    return judges.shipped(judge, lab=lab, embedder=embedder)


def _train_data(lab: Lab, split, positions: str):
    from steerlab.reft import InstructionDataset

    xs = [split.train_instructions[i % len(split.train_instructions)] for i in range(len(split.train_positives))]
    return InstructionDataset(lab.tokenizer, xs, split.train_positives, positions=positions, max_length=160)


def _reft_model(lab: Lab, ivs):
    from steerlab.reft import get_reft_model

    # the comparison's lab holds the model for the whole run: each trained method stacks on it, on purpose,
    # and is unwrapped (in any order) when its generations are done
    return get_reft_model(lab.model, list(ivs), tokenizer=lab.tokenizer, stack=True)


def _train_reft(lab: Lab, kind: str, split, recipe: Recipe, seed: int, das: Subspace | None = None):
    """A trained ReftModel (``loreft``, ``reft_r1``, or ``loreft_das``: R frozen to the DAS basis), disabled,
    and its training seconds."""
    from steerlab.reft import LoReFT, ReFTr1, train

    torch.manual_seed(seed)
    site = f"blocks.{recipe.layer}.resid_post"
    spec = "f5+l5"
    if kind == "loreft_das":
        iv = LoReFT.from_subspace(das, positions=spec)
    else:
        iv = LoReFT(site, rank=recipe.rank, positions=spec) if kind == "loreft" else ReFTr1(site, positions=spec)
    rm = _reft_model(lab, [iv])
    t0 = time.perf_counter()
    try:
        train(rm, _train_data(lab, split, spec), epochs=recipe.epochs, lr=recipe.lr[kind], batch_size=8, seed=seed)
    except BaseException:
        rm.unwrap()
        raise
    rm.disable()
    return rm, time.perf_counter() - t0


def _train_lora(lab: Lab, split, recipe: Recipe, seed: int):
    """A peft LoRA copy of the model trained on the same pairs; ``(generate_fn, seconds)``."""
    from peft import LoraConfig, get_peft_model

    from steerlab.reft import ReftDataCollator, format_prompt

    torch.manual_seed(seed)
    model = copy.deepcopy(lab.model)  # peft edits the modules it wraps: train a copy
    for p in model.parameters():
        p.requires_grad_(False)
    pm = get_peft_model(model, LoraConfig(r=recipe.rank, lora_alpha=2 * recipe.rank, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    data = _train_data(lab, split, "l1")
    collate = ReftDataCollator(lab.tokenizer)
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr["lora"], weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    pm.train()
    for _ in range(recipe.epochs):
        order = torch.randperm(len(data), generator=g).tolist()
        for i in range(0, len(order), 8):
            batch = collate([data[j] for j in order[i : i + 8]])
            batch.pop("intervention_positions", None)
            loss = pm(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    pm.eval()
    seconds = time.perf_counter() - t0
    tok = lab.tokenizer

    def generate(instructions, s):
        out = []
        for i in range(0, len(instructions), s.batch_size):
            prompts = [format_prompt(tok, x) for x in instructions[i : i + s.batch_size]]
            enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
            with torch.no_grad():
                seqs = pm.generate(**enc, max_new_tokens=s.max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            out += tok.batch_decode(seqs[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        return out

    return generate, seconds


def _direction(lab: Lab, method: str, concept, split, site: str, seed: int) -> Subspace:
    from steerlab.alignment import directions

    pos, neg = split.train_positives, split.train_negatives
    if method == "diffmean":
        return directions.diff_mean(lab, site, pos, neg)
    if method == "pca":
        return directions.pca(lab, site, pos, neg, seed=seed)
    if method == "probe":
        return directions.probe(lab, site, pos, neg)
    if method == "caa":
        return directions.caa(lab, site, directions.ab_questions(concept.question, pos, neg, seed=seed))
    if method == "actadd":
        return directions.actadd(lab, site, *concept.actadd_pair)
    raise ConfigError(f"{method!r} is not a direction method")


def _typical_norm(lab: Lab, site: str, texts: Sequence[str]) -> float:
    from steerlab.alignment import directions

    acts = directions.token_activations(lab, list(texts), site)
    return float(torch.cat(acts).norm(dim=-1).median())


def contenders(lab: Lab, concept, split, methods: Sequence[str], recipe: Recipe, *, seed: int = 0,
               das: Subspace | None = None) -> tuple[list, list[Callable[[], None]]]:
    """The contenders for one concept and seed, and the clean-ups to run after evaluating them.

    Deterministic methods (prompt and the direction finders other than PCA)
    are built for seed 0 only: other seeds would repeat them exactly.
    """
    from steerlab.reft import Contender

    site = f"blocks.{recipe.layer}.resid_post"
    out, cleanups = [], []
    for m in check_methods(methods):
        again = seed != 0 and m in ("prompt", "diffmean", "probe", "caa", "actadd")
        if again or (m == "das" and seed != 0):
            continue
        s = None if m == "prompt" else seed
        if m == "prompt":
            out.append(Contender.prompt(lab, concept.system_prompt))
        elif m in ("diffmean", "pca", "probe", "caa", "actadd"):
            t0 = time.perf_counter()
            d = _direction(lab, m, concept, split, site, seed)
            out.append(Contender.direction(lab, m, d, recipe.factors, positions=recipe.positions, seed=s, train_seconds=time.perf_counter() - t0))
        elif m == "das":
            if das is None:
                raise ConfigError("method 'das' needs a DAS Subspace: compare(..., das={concept: subspace})")
            basis = das.basis[:1]
            d = Subspace(basis, das.site, metadata={**das.metadata, "method": "das", "norm": _typical_norm(lab, das.site, split.train_positives[:16])})
            out.append(Contender.direction(lab, "das", _oriented(lab, d, split), recipe.factors, positions=recipe.positions, seed=s))
        elif m in ("loreft", "reft_r1", "loreft_das"):
            if m == "loreft_das" and das is None:
                raise ConfigError("method 'loreft_das' needs a DAS Subspace: compare(..., das={concept: subspace})")
            rm, secs = _train_reft(lab, m, split, recipe, seed, das)
            cleanups.append(rm.unwrap)
            if m in ("loreft", "loreft_das"):
                out.append(Contender.reft(m, rm, decode=False, seed=s, train_seconds=secs))
            else:
                norm = _typical_norm(lab, site, split.train_positives[:16])
                d = rm.interventions[0].direction(norm=norm)
                out.append(Contender.direction(lab, "reft_r1", d, recipe.factors, positions=recipe.positions, seed=s, train_seconds=secs))
        elif m == "lora":
            gen, secs = _train_lora(lab, split, recipe, seed)
            out.append(Contender.custom("lora", gen, seed=s, train_seconds=secs))
    return out, cleanups


def _one_concept(lab, embedder, c, methods, seeds, recipe, settings, result, das, progress, log) -> None:
    """Judge (measured), then every seed's contenders, evaluated into ``result``."""
    from steerlab.reft import evaluate

    t0 = time.perf_counter()
    judge, checks = build_judge(c.judge, lab, embedder)
    result.timings.append({"concept": c.name, "method": "judge", "seed": None, "judging_s": time.perf_counter() - t0})
    log(f"{c.name}: judge {judge.name}: " + "; ".join(f"{k.data} {k.accuracy:.3f}" for k in checks))
    split = c.split(n_train=recipe.n_train, n_test=recipe.n_test_examples, n_val_instructions=recipe.n_val_instructions,
                    n_test_instructions=recipe.n_test_instructions, seed=0)
    for seed in seeds:
        cs, cleanups = contenders(lab, c, split, methods, recipe, seed=seed, das=das)
        try:
            evaluate(lab, c.name, split, cs, judge, embedder=embedder, judge_checks=checks, settings=settings, progress=progress,
                     result=result)
        finally:
            for clean in cleanups:
                clean()
        log(f"{c.name} seed {seed}: done ({time.perf_counter() - t0:.0f} s so far)")
        if c.name in result.dropped:
            log(f"{c.name}: dropped ({result.dropped[c.name]})")
            return


def _oriented(lab: Lab, d: Subspace, split) -> Subspace:
    """A DAS basis has no sign: point it toward the positives' side (their mean projection the larger)."""
    from steerlab.reft.steer_metrics import max_projection

    pos = max_projection(lab, split.train_positives[:16], d).mean()
    neg = max_projection(lab, split.train_negatives[:16], d).mean()
    return d if pos >= neg else Subspace(-d.basis, d.site, d.positions, d.heads, dict(d.metadata))


def compare(
    model: str | Lab = "smollm2-135m",
    *,
    concepts: Sequence[str] = ("sentiment", "french", "movies"),
    methods: Sequence[str] = METHODS,
    seeds: Sequence[int] = (0,),
    recipe: Recipe | None = None,
    embedder: Lab | None = None,
    das: dict[str, Subspace] | None = None,
    progress: bool | None = None,
    log: Callable[[str], Any] | None = None,
    **recipe_kwargs,
):
    """Evaluate ``methods`` on each of ``concepts`` (see the module docstring); return a ``SteerEvalResult``.

    ``model``: an embedded name or a :class:`Lab`; ``embedder``: the MiniLM lab
    for relevance and embedding judges (loaded when not given); ``das``:
    concept -> DAS ``Subspace`` for the ``"das"`` method. Other keyword
    arguments set :class:`Recipe` fields (``layer``, ``factors``, ``n_train``,
    ``max_new_tokens``, ...).
    """
    import steerlab as sl
    from steerlab.reft import GenerationSettings, SteerEvalResult
    from steerlab.reft.concepts import concept as shipped_concept

    if recipe is not None and recipe_kwargs:
        raise ConfigError(f"give either recipe= or its fields ({sorted(recipe_kwargs)}), not both")
    recipe = recipe or Recipe(**recipe_kwargs)
    methods = check_methods(methods)
    concept_objs = [shipped_concept(c) if isinstance(c, str) else c for c in concepts]
    lab = model if isinstance(model, Lab) else sl.wrap(*sl.load(model))
    if lab.tokenizer.pad_token is None:
        lab.tokenizer.pad_token = lab.tokenizer.eos_token
    embedder = embedder or sl.wrap(*sl.load("minilm-l6"))
    if not -lab.n_layers <= recipe.layer < lab.n_layers:
        raise ConfigError(f"layer={recipe.layer}: the model has {lab.n_layers} layers")
    log = log or (lambda line: None)
    result = SteerEvalResult(info={"layer": recipe.layer, "factors": list(recipe.factors), "positions": recipe.positions,
                                   "methods": methods, "seeds": list(seeds), "recipe": {k: v for k, v in vars(recipe).items()}})
    settings = GenerationSettings(recipe.max_new_tokens, recipe.batch_size)
    t_all = time.perf_counter()
    for c in concept_objs:
        _one_concept(lab, embedder, c, methods, seeds, recipe, settings, result, (das or {}).get(c.name), progress, log)
    result.info["wall_s"] = time.perf_counter() - t_all
    return result
