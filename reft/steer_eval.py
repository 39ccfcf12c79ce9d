"""The steering evaluation: every contender on one concept, factors chosen on validation, scored on test.

A :class:`Contender` is anything that makes a model respond to instructions:
a direction (a size-1 :class:`~steerlab.interventions.Subspace`) steered by an
``Add`` at a sweep of factors, any interventions built from a factor, a
:class:`~steerlab.reft.ReftModel`, a system prompt (the prompting baseline),
or any generate function (a peft LoRA model). :func:`evaluate` runs, for one
concept and its judge:

1. the unsteered model on the validation and test instructions (the
   reference perplexity of the fluency score);
2. for each contender with several factors, generations on the validation
   instructions at every factor and the factor with the best mean harmonic
   mean (ties: the smaller factor) — never chosen on test, as AxBench does;
3. generations on the test instructions at that factor, scored (concept,
   relevance, fluency, harmonic mean: :mod:`steerlab.reft.steer_metrics`);
4. for each contender with a direction, the concept-detection AUROC of its
   max-pooled projections on held-out positives vs negatives.

Generation is batched and greedy, with the contender's interventions at the
chosen positions: ``"prompt"`` (prompt tokens only), ``"decode"`` (each new
token only) or ``"both"`` (AxBench's choice, the default). The result is a
:class:`~steerlab.reft.steer_result.SteerEvalResult`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from steerlab.interventions import Add, Intervention, Lab, Subspace
from steerlab.interventions.errors import ConfigError
from steerlab.reft.concepts import ConceptSplit
from steerlab.reft.data import format_prompt
from steerlab.reft.judges import JUDGE_FLOOR, Judge, JudgeCheck
from steerlab.reft.steer_metrics import auroc, fluency, harmonic_mean, max_projection, relevance, repetition_rate, response_perplexity
from steerlab.reft.steer_result import SteerEvalResult

__all__ = ["Contender", "steering_add", "evaluate", "POSITIONS", "GenerationSettings"]

#: where a contender's interventions act during generation
POSITIONS = ("prompt", "decode", "both")


def steering_add(direction: Subspace, factor: float, *, positions=None) -> Add:
    """``Add`` of ``factor · norm · v`` at the direction's site: ``h' = h + factor · norm · v``.

    ``v = direction.basis[0]``; ``norm`` is ``direction.metadata["norm"]`` (the
    site's typical token norm, which the direction finders record), so a
    factor is a fraction of a typical activation's length and factors compare
    across methods (1 without that metadata). At factor 0 the model is unsteered exactly.
    """
    if not isinstance(direction, Subspace) or direction.size != 1:
        raise ConfigError(f"steering_add takes a Subspace of size 1 (a direction); got {direction!r}")
    norm = float(direction.metadata.get("norm", 1.0))
    return Add(direction.site, direction.basis[0] * norm, alpha=float(factor), positions=positions)


@dataclass
class GenerationSettings:
    """Greedy decoding of ``max_new_tokens`` in batches of ``batch_size`` (chat template on)."""

    max_new_tokens: int = 32
    batch_size: int = 16


GenerateFn = Callable[[list[str], float, GenerationSettings], list[str]]


@dataclass
class Contender:
    """One way of steering: ``generate(instructions, factor, settings) -> responses``.

    Build with :meth:`direction`, :meth:`interventions`, :meth:`reft`,
    :meth:`prompt`, :meth:`unsteered` or :meth:`custom`.
    """

    name: str
    generate: GenerateFn
    factors: tuple[float, ...] = (1.0,)
    direction_: Subspace | None = None
    seed: int | None = None
    train_seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not self.factors or not all(isinstance(f, (int, float)) and math.isfinite(f) for f in self.factors):
            raise ConfigError(f"contender {self.name!r}: factors must be a non-empty list of finite numbers; got {self.factors!r}")
        self.factors = tuple(float(f) for f in self.factors)

    # -- builders -----------------------------------------------------------------
    @classmethod
    def direction(cls, lab: Lab, name: str, direction: Subspace, factors: Sequence[float], *, positions: str = "both", **kw) -> Contender:
        """Steer along a size-1 subspace with :func:`steering_add` at each factor."""
        return cls.interventions(lab, name, lambda f: [steering_add(direction, f, positions=_iv_positions(positions))], factors,
                                 positions=positions, direction_=direction, **kw)

    @classmethod
    def interventions(cls, lab: Lab, name: str, build: Callable[[float], Sequence[Intervention]], factors: Sequence[float] = (1.0,),
                      *, positions: str = "both", **kw) -> Contender:
        """Generate with the interventions ``build(factor)`` returns (fresh for each factor)."""
        _check_positions(positions)

        def gen(instructions: list[str], factor: float, s: GenerationSettings) -> list[str]:
            prompts = [format_prompt(lab.tokenizer, x) for x in instructions]
            return _batched(prompts, s, lambda batch: _lab_generate(lab, batch, list(build(factor)), positions, s))

        return cls(name, gen, tuple(factors), info={"positions": positions}, **kw)

    @classmethod
    def reft(cls, name: str, model, *, decode: bool = False, **kw) -> Contender:
        """A trained :class:`~steerlab.reft.ReftModel` (enabled only while it generates)."""
        model.disable()  # the other contenders, the judges and the perplexities see the base model

        def gen(instructions: list[str], factor: float, s: GenerationSettings) -> list[str]:
            prompts = [format_prompt(model.tokenizer, x) for x in instructions]
            model.enable()
            try:
                return _batched(prompts, s, lambda b: model.generate(b, decode=decode, max_new_tokens=s.max_new_tokens, do_sample=False).texts)
            finally:
                model.disable()

        return cls(name, gen, (1.0,), info={"positions": "both" if decode else "prompt"}, **kw)

    @classmethod
    def prompt(cls, lab: Lab, system: str, *, name: str = "prompt", **kw) -> Contender:
        """The prompting baseline: the concept stated in the system prompt, no intervention."""

        def gen(instructions: list[str], factor: float, s: GenerationSettings) -> list[str]:
            prompts = [format_prompt(lab.tokenizer, x, system=system) for x in instructions]
            return _batched(prompts, s, lambda b: lab.generate(b, max_new_tokens=s.max_new_tokens, do_sample=False).texts)

        return cls(name, gen, (1.0,), info={"system": system}, **kw)

    @classmethod
    def unsteered(cls, lab: Lab, *, name: str = "none") -> Contender:
        """The model as it is (the reference row)."""
        return cls.interventions(lab, name, lambda f: [], (0.0,), positions="prompt")

    @classmethod
    def custom(cls, name: str, generate: Callable[[list[str], GenerationSettings], list[str]], **kw) -> Contender:
        """Any function of (instructions, settings) -> responses, e.g. a peft model's generate."""
        return cls(name, lambda xs, f, s: generate(xs, s), (1.0,), **kw)


def _check_positions(positions: str) -> None:
    if positions not in POSITIONS:
        raise ConfigError(f"positions={positions!r}: expected one of {POSITIONS} (prompt tokens, each new token, or both)")


def _iv_positions(positions: str):
    return "per-call" if positions == "decode" else None


def _lab_generate(lab: Lab, prompts: list[str], ivs: list[Intervention], positions: str, s: GenerationSettings) -> list[str]:
    kw: dict[str, Any] = {"max_new_tokens": s.max_new_tokens, "do_sample": False}
    if not ivs:
        return lab.generate(prompts, **kw).texts
    if positions == "decode":  # no prompt slot (-1 everywhere); decode steps edit each new token
        return lab.generate(prompts, ivs, decode=True, positions=torch.full((len(prompts), 1), -1), **kw).texts
    return lab.generate(prompts, ivs, decode=positions == "both", **kw).texts


def _batched(prompts: list[str], s: GenerationSettings, fn: Callable[[list[str]], list[str]]) -> list[str]:
    out: list[str] = []
    for i in range(0, len(prompts), s.batch_size):
        out += list(fn(prompts[i : i + s.batch_size]))
    return out


@dataclass
class _Scorer:
    """Scores responses; keeps the time it spends (the 'judging' share of the wall time)."""

    lab: Lab
    embedder: Lab
    judge: Judge
    seconds: float = 0.0
    reference: dict[str, float] = field(default_factory=dict)

    def score(self, instructions: list[str], responses: list[str], ref: float | None) -> dict[str, list[float]]:
        t0 = time.perf_counter()
        prompts = [format_prompt(self.lab.tokenizer, x) for x in instructions]
        concept = [float(v) for v in self.judge.score(responses)]
        rel = relevance(self.embedder, instructions, responses)
        ppl = response_perplexity(self.lab, prompts, responses)
        rep = [repetition_rate(r) for r in responses]
        ref = ref if ref is not None else _geomean(ppl)
        flu = [fluency(p, r, ref) if math.isfinite(p) else 0.0 for p, r in zip(ppl, rep)]
        hm = [harmonic_mean(c, r, f) for c, r, f in zip(concept, rel, flu)]
        self.seconds += time.perf_counter() - t0
        return {"concept_score": concept, "relevance": rel, "fluency": flu, "perplexity": ppl, "repetition": rep, "hm": hm}


def _geomean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v) and v > 0]
    return math.exp(sum(map(math.log, finite)) / len(finite)) if finite else 1.0


def _mean(xs: Sequence[float]) -> float:
    finite = [x for x in xs if math.isfinite(x)]
    return sum(finite) / len(finite) if finite else math.nan


def evaluate(
    lab: Lab,
    concept: str,
    split: ConceptSplit,
    contenders: Sequence[Contender],
    judge: Judge,
    *,
    embedder: Lab,
    judge_checks: Sequence[JudgeCheck] = (),
    floor: float = JUDGE_FLOOR,
    settings: GenerationSettings | None = None,
    progress: bool | None = None,
    result: SteerEvalResult | None = None,
) -> SteerEvalResult:
    """Evaluate ``contenders`` on one concept (see the module docstring); append to ``result`` if given.

    A judge whose accuracy on any of ``judge_checks`` is below ``floor`` makes
    the concept count for nothing: it is recorded as dropped and not evaluated.
    """
    settings = settings or GenerationSettings()
    result = result if result is not None else SteerEvalResult()
    names = [(c.name, c.seed) for c in contenders]
    if len(set(names)) != len(names):
        raise ConfigError(f"contenders repeat a (name, seed): {names}")
    result.judges[concept] = [vars(c) | {"accuracy": c.accuracy} for c in judge_checks]
    failed = [c for c in judge_checks if not c.passes(floor)]
    if failed or not judge_checks:
        why = "; ".join(str(c) for c in failed) if failed else "its judge was not checked on labelled text"
        result.dropped[concept] = f"judge below the floor {floor:.2f}: {why}"
        return result
    scorer = _Scorer(lab, embedder, judge)
    bar = _progress(progress, sum(len(c.factors) if len(c.factors) > 1 else 0 for c in contenders) + len(contenders) + 2, concept)
    run = _Run(concept, split, settings, scorer, result, bar)
    run.reference(Contender.unsteered(lab))
    for c in contenders:
        run.contender(lab, c)
    bar.close()
    result.timings.append({"concept": concept, "method": "*", "seed": None, "generation_s": run.gen_seconds, "judging_s": scorer.seconds})
    return result


@dataclass
class _Run:
    """One concept's evaluation in progress: generate, score, record; time the generations."""

    concept: str
    split: ConceptSplit
    settings: GenerationSettings
    scorer: _Scorer
    result: SteerEvalResult
    bar: Any
    gen_seconds: float = 0.0
    refs: dict[str, float] = field(default_factory=dict)

    def _scored(self, c: Contender, xs: list[str], factor: float, split: str, ref: float | None) -> dict[str, list[float]]:
        t0 = time.perf_counter()
        out = c.generate(xs, factor, self.settings)
        self.gen_seconds += time.perf_counter() - t0
        scores = self.scorer.score(xs, out, ref)
        self.result.add_rows(self.concept, c.name, c.seed, split, factor, xs, out, scores, selected=split == "test")
        self.bar.update(1)
        return scores

    def reference(self, base: Contender) -> None:
        """The unsteered model on validation and test (an earlier seed's run is reused): the reference perplexities."""
        for split_name, xs in (("val", self.split.val_instructions), ("test", self.split.test_instructions)):
            prior = [r for r in self.result.rows if r["concept"] == self.concept and r["method"] == "none" and r["split"] == split_name]
            if prior and [r["instruction"] for r in prior] == list(xs):
                self.refs[split_name] = _geomean([r["perplexity"] for r in prior])
                self.bar.update(1)
                continue
            self.refs[split_name] = _geomean(self._scored(base, list(xs), 0.0, split_name, None)["perplexity"])

    def contender(self, lab: Lab, c: Contender) -> None:
        """The factor with the best mean harmonic mean on validation (ties: the smaller), then test; detection."""
        best = c.factors[0]
        if len(c.factors) > 1:
            means = [_mean(self._scored(c, self.split.val_instructions, f, "val", self.refs["val"])["hm"]) for f in c.factors]
            best = c.factors[max(range(len(means)), key=lambda i: (means[i], -i))]
        self._scored(c, self.split.test_instructions, best, "test", self.refs["test"])
        if c.direction_ is not None:
            t0 = time.perf_counter()
            pos = max_projection(lab, self.split.test_positives, c.direction_)
            neg = max_projection(lab, self.split.test_negatives, c.direction_)
            self.result.detection.append({"concept": self.concept, "method": c.name, "seed": c.seed, "auroc": auroc(pos, neg),
                                          "n_pos": len(pos), "n_neg": len(neg)})
            self.scorer.seconds += time.perf_counter() - t0
        self.result.timings.append({"concept": self.concept, "method": c.name, "seed": c.seed, "train_s": c.train_seconds})


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(progress: bool | None, total: int, concept: str):
    """tqdm.auto where wanted (``None``: when stderr is a terminal or in a notebook)."""
    import sys

    if progress is False or (progress is None and not sys.stderr.isatty() and "ipykernel" not in sys.modules):
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"steer-eval {concept}", leave=False)
