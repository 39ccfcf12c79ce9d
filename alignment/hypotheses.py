"""Hypothesis testing: which causal model does an intervention on the network follow?

Several causal models (competing hypotheses about one behaviour) make
predictions about the *same* counterfactual inputs: for a base input and a
source input, hypothesis ``H`` says the network, with its representation at a
site (or in a found subspace) taken from the source, should answer
``H.causal_model.interchange(base, {H.variable: source})[output]``. One
intervened run per example gives the network's answer; each hypothesis gets
its IIA (the share of examples where the answer is the one it predicts) with a
standard error, and each pair of hypotheses a *paired* comparison on the same
examples:

.. math::

    \\Delta = \\mathrm{IIA}_A - \\mathrm{IIA}_B = \\frac{n_{10} - n_{01}}{n}, \\qquad
    \\mathrm{se}(\\Delta) = \\mathrm{sd}(c_A - c_B) / \\sqrt{n}

with ``n10`` the examples only ``A`` predicts, ``n01`` those only ``B``
predicts, and McNemar's exact test (a two-sided binomial test of ``n10``
against ``n10 + n01`` trials at 1/2) for the p-value. Only the examples on
which ``A`` and ``B`` predict different answers can tell them apart; their
count is reported. By default a null hypothesis, "the intervention has no
effect" (the base's own answer), is scored beside the others.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool
from torch import Tensor

from steerlab.alignment._activations import Runner
from steerlab.alignment.causal_model import CausalModel, Setting
from steerlab.alignment.counterfactuals import CounterfactualDataset
from steerlab.alignment.das import store_for
from steerlab.alignment.encoders import Encoder
from steerlab.alignment.iia import IIA
from steerlab.alignment.results import format_table
from steerlab.interventions.errors import CausalModelError, ConfigError, DataError
from steerlab.interventions.lab import Lab
from steerlab.interventions.ops import Interchange, SubspaceInterchange
from steerlab.interventions.subspace import Subspace

__all__ = ["Hypothesis", "HypothesisResult", "PairedComparison", "compare_hypotheses", "NULL"]

#: the name of the null hypothesis (the intervention changes nothing: the base's own answer)
NULL = "no effect (base answer)"


@dataclass(frozen=True)
class Hypothesis:
    """``causal_model`` with ``variable`` realised by the intervention; ``output``: its label
    variable (default: the model's only output)."""

    name: str
    causal_model: CausalModel
    variable: str
    output: str | None = None

    def predict(self, base: Setting, source: Setting) -> Any:
        out = self.output or _only_output(self.causal_model)
        return self.causal_model.interchange(base, {self.variable: source})[out]


@dataclass(frozen=True)
class PairedComparison:
    """``a`` against ``b`` on the same examples (see the module docstring)."""

    a: str
    b: str
    diff: float
    se: float
    n10: int
    n01: int
    differ: int
    n: int
    p_value: float

    @property
    def significant(self) -> bool:
        """McNemar's exact test at the 5% level."""
        return self.p_value < 0.05


@dataclass
class HypothesisResult:
    """IIA per hypothesis and every paired comparison (see the module docstring).

    ``correct[h]`` is the per-example correctness of hypothesis ``h``; ``predictions``
    the label each hypothesis predicts per example; ``answers`` the network's.
    """

    site: str
    positions: Any
    hypotheses: list[str]
    iia: dict[str, IIA]
    pairs: list[PairedComparison]
    correct: dict[str, Bool[Tensor, " example"]]
    answers: Tensor
    predictions: dict[str, Tensor]
    intervention: str
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def chance(self) -> float:
        return next(iter(self.iia.values())).chance

    def best(self) -> str:
        """The hypothesis with the highest IIA."""
        return max(self.hypotheses, key=lambda h: self.iia[h].value)

    def pair(self, a: str, b: str) -> PairedComparison:
        for p in self.pairs:
            if (p.a, p.b) == (a, b):
                return p
            if (p.b, p.a) == (a, b):
                return PairedComparison(a, b, -p.diff, p.se, p.n01, p.n10, p.differ, p.n, p.p_value)
        raise KeyError(f"no comparison of {a!r} with {b!r}; hypotheses: {self.hypotheses}")

    def rows(self) -> list[dict[str, Any]]:
        """One row per hypothesis: IIA, its standard error, n and chance."""
        return [{"hypothesis": h, "iia": self.iia[h].value, "se": self.iia[h].se, "n": self.iia[h].n, "chance": self.iia[h].chance}
                for h in self.hypotheses]

    table = rows

    def pair_rows(self) -> list[dict[str, Any]]:
        """One row per pair: the IIA difference, its paired standard error, the discordant
        counts, how many examples the two hypotheses disagree on, and McNemar's p-value."""
        return [{"a": p.a, "b": p.b, "diff": p.diff, "se": p.se, "only_a": p.n10, "only_b": p.n01, "differ": p.differ,
                 "p_value": p.p_value} for p in self.pairs]

    def to_pandas(self):
        import pandas as pd

        return pd.DataFrame(self.rows()), pd.DataFrame(self.pair_rows())

    def __str__(self) -> str:
        head = f"hypotheses scored by {self.intervention} at {self.site!r}, positions {self.positions!r}"
        pairs = format_table(self.pair_rows(), ["a", "b", "diff", "se", "only_a", "only_b", "differ", "p_value"])
        return "\n".join([head, format_table(self.rows(), ["hypothesis", "iia", "se", "n", "chance"]), "paired comparisons:", pairs])

    def _repr_html_(self) -> str:
        return "<pre>" + str(self).replace("&", "&amp;").replace("<", "&lt;") + "</pre>"

    def plot(self, **kwargs):
        """IIA per hypothesis with error bars, and the paired differences as a matrix."""
        from steerlab.viz import hypothesis_comparison

        return hypothesis_comparison(self, **kwargs)

    def __repr__(self) -> str:
        body = ", ".join(f"{h}={self.iia[h].value:.3f}" for h in self.hypotheses)
        return f"HypothesisResult({self.site!r}: {body})"


def _only_output(cm: CausalModel) -> str:
    if len(cm.outputs) != 1:
        raise CausalModelError(f"{cm.name} has outputs {list(cm.outputs)}; give the Hypothesis an output=")
    return cm.outputs[0]


def mcnemar_p(n10: int, n01: int) -> float:
    """Two-sided exact McNemar p-value: a binomial test of ``n10`` in ``n10 + n01`` trials at 1/2."""
    m = n10 + n01
    if m == 0:
        return 1.0
    k = min(n10, n01)
    tail = sum(math.comb(m, i) for i in range(k + 1)) / 2.0**m
    return min(1.0, 2 * tail)


def paired(a: str, b: str, ca: Tensor, cb: Tensor, pa: Tensor, pb: Tensor) -> PairedComparison:
    d = ca.float() - cb.float()
    n = d.numel()
    se = float(d.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    n10, n01 = int((ca & ~cb).sum()), int((~ca & cb).sum())
    return PairedComparison(a, b, float(d.mean()), se, n10, n01, int((pa != pb).sum()), n, mcnemar_p(n10, n01))


def _check(hypotheses: Sequence[Hypothesis], encoder: Encoder) -> None:
    if not hypotheses:
        raise ConfigError("compare_hypotheses needs at least one Hypothesis")
    names = [h.name for h in hypotheses]
    if len(set(names)) != len(names) or NULL in names:
        raise ConfigError(f"hypothesis names must be distinct (and not {NULL!r}); got {names}")
    inputs = set(hypotheses[0].causal_model.inputs)
    for h in hypotheses:
        if not isinstance(h, Hypothesis):
            raise ConfigError(f"expected Hypothesis objects; got {type(h).__name__}")
        cm = h.causal_model
        if h.variable not in cm.values:
            raise CausalModelError(f"hypothesis {h.name!r}: variable {h.variable!r} is not in {cm.name} (variables: {list(cm.variables)})")
        if set(cm.inputs) != inputs:
            raise CausalModelError(f"hypothesis {h.name!r}: its inputs {list(cm.inputs)} differ from {sorted(inputs)}; "
                                   "hypotheses are scored on the same inputs, so they must share their input variables")
        out = h.output or _only_output(cm)
        extra = [v for v in cm.values[out] if v not in encoder.labels]
        if extra:
            raise DataError(f"hypothesis {h.name!r}: output values {extra} of {out!r} are not among the encoder's labels {list(encoder.labels)}")


def _pairs(hypotheses, n: int, seed: int, sampler) -> tuple[list[Setting], list[Setting]]:
    rng = random.Random(seed)
    cm = hypotheses[0].causal_model
    draw: Callable[[], Setting] = (lambda: dict(sampler(rng))) if sampler is not None else (lambda: cm.sample_input(rng))
    bases, sources = [], []
    for _ in range(n):
        bases.append(draw())
        sources.append(draw())
    return bases, sources


def _predictions(hypotheses: list[Hypothesis], encoder: Encoder, bases, sources, null: bool) -> dict[str, Tensor]:
    """Each hypothesis's predicted label index per example (and the null's: the base's own answer)."""
    out: dict[str, Tensor] = {}
    for h in hypotheses:
        out[h.name] = torch.tensor([encoder.label_index(h.predict(b, s)) for b, s in zip(bases, sources)])
    if null:
        first = hypotheses[0]
        var = first.output or _only_output(first.causal_model)
        out[NULL] = torch.tensor([encoder.label_index(first.causal_model.run(b)[var]) for b in bases])
    return out


# 61 lines with its signature and docstring; the body is under 35
def compare_hypotheses(
    lab: Lab,
    hypotheses: Sequence[Hypothesis],
    encoder: Encoder,
    *,
    site: str,
    positions=None,
    subspace: Subspace | None = None,
    bases: Sequence[Setting] | None = None,
    sources: Sequence[Setting] | None = None,
    n: int = 512,
    seed: int = 0,
    sampler: Callable[[random.Random], Setting] | None = None,
    null: bool = True,
    batch_size: int = 256,
) -> HypothesisResult:
    """Score ``hypotheses`` on the same counterfactual inputs (see the module docstring).

    Args:
        hypotheses: :class:`Hypothesis` objects sharing their input variables.
        encoder: turns inputs into model inputs and outputs into label scores.
        site: where the intervention acts.
        positions: where at the site (as the encoder names them).
        subspace: interchange only this :class:`Subspace` (e.g. a DAS result's); default the whole vector.
        bases: the base inputs (a list aligned with ``sources``); default ``n`` pairs drawn from the
            first hypothesis's input distribution (or ``sampler(rng)``) with ``seed``.
        sources: the source inputs, aligned with ``bases``.
        null: also score "no effect" (the base's own answer under the first hypothesis).
    """
    hypotheses = list(hypotheses)
    _check(hypotheses, encoder)
    name = lab.resolve(site).name
    if bases is None:
        bases, sources = _pairs(hypotheses, n, seed, sampler)
    elif sources is None or len(sources) != len(bases):
        raise DataError("give sources= aligned with bases= (one source per base)")
    first = hypotheses[0]
    data = CounterfactualDataset.from_pairs(first.causal_model, encoder, list(bases), {first.variable: list(sources)},
                                            output=first.output)
    runner = Runner(store_for(lab, [data], [name]), data, name, positions)
    width = lab.facts.site_shape(lab.resolve(name))[-1]
    if subspace is None:
        iv, what = Interchange(name), "the full-vector interchange"
    else:
        if subspace.width != width:
            raise ConfigError(f"the subspace has width {subspace.width} but site {name!r} has width {width}")
        iv = SubspaceInterchange(name, size=subspace.size, width=width, init=subspace.basis)
        what = f"a {subspace.size}-dimensional subspace interchange"
    answers = torch.empty(len(data), dtype=torch.long)
    with torch.no_grad():
        for a in range(0, len(data), batch_size):
            rows = torch.arange(a, min(a + batch_size, len(data)))
            answers[rows] = runner.run(rows, [iv]).argmax(-1).cpu()
    n_labels = len(encoder.labels)
    predictions = _predictions(hypotheses, encoder, bases, sources, null)
    names = list(predictions)
    correct = {h: predictions[h] == answers for h in names}
    iia = {h: IIA(float(c.float().mean()), c.numel(), 1.0 / n_labels) for h, c in correct.items()}
    pairs = [paired(a, b, correct[a], correct[b], predictions[a], predictions[b]) for i, a in enumerate(names) for b in names[i + 1 :]]
    return HypothesisResult(name, positions, names, iia, pairs, correct, answers, predictions, what,
                            {"n": len(data), "seed": seed, "null": null})
