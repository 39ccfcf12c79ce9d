"""What DAS minimises: the objective that turns intervened label scores into a loss.

IIA counts errors, and cross-entropy does not: it prefers many mildly wrong
counterfactuals to a few confidently wrong ones. On hierarchical equality at
layer 2 (seed 0, 8 + 8 dims) the neuron-aligned subspace is wrong on 30% of
counterfactuals but confidently (median margin −9.6, cross-entropy 3.34), the
cross-entropy optimum is wrong on 58% but mildly (margin −1.9, cross-entropy
1.94): minimising cross-entropy *lowers* IIA there (0.41 against 0.69). A
smooth 0-1 loss on the label margin counts errors, bounded per example:

.. math::

    m = z_y - \\max_{j \\ne y} z_j, \\qquad
    \\ell_\\tau(z, y) = \\sigma(-m / \\tau)

(``z`` the label scores, ``y`` the counterfactual label). As ``τ → 0`` it is the
0-1 loss (1 − IIA); a large ``τ`` gives the gradient of a linear margin loss.
:class:`SmoothZeroOne` can anneal ``τ`` geometrically from a start to an end
over training. From a random start it is slow (its gradient weighs the right
and the wrong counterfactuals alike), so the default, :class:`CrossEntropyThenSmooth`,
starts with cross-entropy and hands over to it (:func:`default_objective` says
what was measured).

Every objective is an object (``name``, :meth:`Objective.to_json`) so a result
records which one produced it; :func:`objective` builds one from a name.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from steerlab.interventions.errors import ConfigError

__all__ = ["Objective", "CrossEntropy", "SmoothZeroOne", "CrossEntropyThenSmooth", "Hinge", "objective", "label_margin",
           "default_objective"]


def label_margin(scores: Float[Tensor, "batch labels"], labels: Int[Tensor, " batch"]) -> Float[Tensor, " batch"]:
    """``z_y − max_{j≠y} z_j`` per example: positive exactly where the prediction is right."""
    zy = scores.gather(1, labels[:, None]).squeeze(1)
    other = scores.masked_fill(F.one_hot(labels, scores.shape[1]).bool(), float("-inf")).amax(1)
    return zy - other


class Objective:
    """A loss of the intervened label scores; ``progress`` runs from 0 to 1 over training."""

    name = "objective"

    def __call__(self, scores: Float[Tensor, "batch labels"], labels: Int[Tensor, " batch"], progress: float = 0.0) -> Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_json().items() if k != "name")
        return f"{type(self).__name__}({args})"

    def __str__(self) -> str:
        return self.describe()

    def describe(self) -> str:
        return self.name


class CrossEntropy(Objective):
    """Cross-entropy of the label scores (the DAS paper's objective)."""

    name = "cross_entropy"

    def __call__(self, scores, labels, progress=0.0):
        return F.cross_entropy(scores.float(), labels)

    def describe(self) -> str:
        return "cross-entropy"


class SmoothZeroOne(Objective):
    """``sigmoid(−margin / τ)`` averaged over the batch (see the module docstring).

    Args:
        temperature: ``τ`` at the start of training.
        final_temperature: ``τ`` at the end (geometric annealing); ``None`` keeps it fixed.
    """

    name = "smooth_zero_one"

    def __init__(self, temperature: float = 1.0, final_temperature: float | None = None):
        for t in (temperature, final_temperature):
            if t is not None and not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
                raise ConfigError(f"temperature {t!r}: expected a positive number")
        self.temperature = float(temperature)
        self.final_temperature = None if final_temperature is None else float(final_temperature)

    def tau(self, progress: float) -> float:
        if self.final_temperature is None:
            return self.temperature
        p = min(max(progress, 0.0), 1.0)
        return self.temperature * (self.final_temperature / self.temperature) ** p

    def __call__(self, scores, labels, progress=0.0):
        return torch.sigmoid(-label_margin(scores.float(), labels) / self.tau(progress)).mean()

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "temperature": self.temperature, "final_temperature": self.final_temperature}

    def describe(self) -> str:
        if self.final_temperature is None:
            return f"smooth 0-1 loss on the label margin, temperature {self.temperature:g}"
        return f"smooth 0-1 loss on the label margin, temperature {self.temperature:g} -> {self.final_temperature:g}"


class CrossEntropyThenSmooth(Objective):
    """Cross-entropy handing over to the smooth 0-1 loss: ``(1 − w) · CE + w · σ(−m/τ)``,
    ``w`` rising linearly from 0 to 1 over the first ``handover`` of training.

    Early on, cross-entropy's gradient comes almost only from the wrong counterfactuals (the
    right ones are nearly saturated), which moves a random start fast; the smooth 0-1 loss then
    counts errors, no longer chasing the confidently wrong ones cross-entropy would trade many
    right answers for.
    """

    name = "cross_entropy_then_smooth"

    def __init__(self, handover: float = 0.5, temperature: float = 1.0, final_temperature: float | None = 0.1):
        if not (isinstance(handover, (int, float)) and 0 < handover <= 1):
            raise ConfigError(f"handover={handover!r}: expected a fraction of training in (0, 1]")
        self.handover = float(handover)
        self.smooth = SmoothZeroOne(temperature, final_temperature)

    def __call__(self, scores, labels, progress=0.0):
        w = min(max(progress / self.handover, 0.0), 1.0)
        ce = F.cross_entropy(scores.float(), labels) if w < 1 else 0.0
        return (1 - w) * ce + w * self.smooth(scores, labels, progress)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "handover": self.handover, "temperature": self.smooth.temperature,
                "final_temperature": self.smooth.final_temperature}

    def describe(self) -> str:
        t = self.smooth
        temp = f"{t.temperature:g}" if t.final_temperature is None else f"{t.temperature:g} -> {t.final_temperature:g}"
        return f"cross-entropy handing over to a smooth 0-1 loss on the label margin by {self.handover:.0%} of training (temperature {temp})"


class Hinge(Objective):
    """``relu(margin₀ − margin)``: a linear penalty until the label wins by ``margin₀``."""

    name = "hinge"

    def __init__(self, margin: float = 1.0):
        if not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin >= 0):
            raise ConfigError(f"margin {margin!r}: expected a non-negative number")
        self.margin = float(margin)

    def __call__(self, scores, labels, progress=0.0):
        return F.relu(self.margin - label_margin(scores.float(), labels)).mean()

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "margin": self.margin}

    def describe(self) -> str:
        return f"hinge on the label margin ({self.margin:g})"


_NAMES = {"cross_entropy": CrossEntropy, "ce": CrossEntropy, "smooth_zero_one": SmoothZeroOne, "hinge": Hinge,
          "cross_entropy_then_smooth": CrossEntropyThenSmooth}


def objective(spec: str | Objective | dict | None = None) -> Objective:
    """An :class:`Objective` from an instance, a name (``"cross_entropy"``, ``"smooth_zero_one"``,
    ``"hinge"``) or its :meth:`~Objective.to_json` record; ``None``: the default."""
    if spec is None:
        return default_objective()
    if isinstance(spec, Objective):
        return spec
    if isinstance(spec, dict):
        d = dict(spec)
        name = d.pop("name", None)
        if name not in _NAMES:
            raise ConfigError(f"objective record {spec!r}: unknown name {name!r}; expected one of {sorted(set(_NAMES))}")
        return _NAMES[name](**d)
    if isinstance(spec, str):
        if spec not in _NAMES:
            raise ConfigError(f"objective={spec!r}: expected one of {sorted(set(_NAMES))} or an Objective")
        return _NAMES[spec]()
    raise ConfigError(f"objective={spec!r}: expected a name, a record or an Objective; got {type(spec).__name__}")


def default_objective() -> Objective:
    """The default: :class:`CrossEntropyThenSmooth` (handing over by 10 % of training, ``τ`` 3 → 0.1).

    Chosen by measurement (``benchmarks/das_objectives_research.py``; the tables are in
    ``benchmarks/README.md``). On hierarchical equality (3 MLP seeds × layers 1-3, random
    starts) cross-entropy lost to the exhaustive localist alignment at layer 2 on every seed
    (0.39-0.53 against 0.68-0.70); the smooth 0-1 loss alone and the blends did not at full
    size. A late handover (half-way) stays in cross-entropy's basin when training is short or
    the network differs: 8,000 counterfactuals, an MLP trained 3 epochs, layer 2: 0.61 against
    the localist 0.67, at 4 or 10 epochs; handing over by 10 % reached 0.72 (smooth alone 0.72).
    On SmolLM2 polarity with a 4-step budget (32 counterfactuals, 2 epochs, 5 seeds) the smooth
    loss alone fell behind cross-entropy (0.79 against 0.86 mean selected IIA): from a random
    start, cross-entropy's gradient comes mostly from the wrong counterfactuals, the smooth
    loss's from both sides of the margin; the blends kept most of cross-entropy's pace (0.84 for
    a half-way handover, 0.83 for 10 %, within the 64-example tests' standard error).
    """
    return CrossEntropyThenSmooth(0.1, 3.0, 0.1)
