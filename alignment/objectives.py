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
over training. The measurements behind the defaults are in
``benchmarks/das_objectives.py`` and its README section.

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

__all__ = ["Objective", "CrossEntropy", "SmoothZeroOne", "Hinge", "objective", "label_margin"]


def label_margin(scores: Float[Tensor, "b labels"], labels: Int[Tensor, " b"]) -> Float[Tensor, " b"]:
    """``z_y − max_{j≠y} z_j`` per example: positive exactly where the prediction is right."""
    zy = scores.gather(1, labels[:, None]).squeeze(1)
    other = scores.masked_fill(F.one_hot(labels, scores.shape[1]).bool(), float("-inf")).amax(1)
    return zy - other


class Objective:
    """A loss of the intervened label scores; ``progress`` runs from 0 to 1 over training."""

    name = "objective"

    def __call__(self, scores: Float[Tensor, "b labels"], labels: Int[Tensor, " b"], progress: float = 0.0) -> Tensor:
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


_NAMES = {"cross_entropy": CrossEntropy, "ce": CrossEntropy, "smooth_zero_one": SmoothZeroOne, "hinge": Hinge}


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
    """The default: :class:`SmoothZeroOne` with ``τ`` annealed from 3 to 0.1.

    Chosen by measurement (``benchmarks/das_objectives_research.py``; tables in
    ``benchmarks/README.md``): on hierarchical equality (3 MLP seeds × layers 1-3,
    random starts) it was at or above the exhaustive localist alignment in all nine
    cases where cross-entropy was in four; a fixed ``τ`` of 0.3 or 1, or annealing
    from 1, each missed one or two (a start at a high temperature keeps the gradient
    of confidently wrong counterfactuals from vanishing early); on SmolLM2 polarity
    at the answer position it matched or beat cross-entropy at every layer tried.
    """
    return SmoothZeroOne(3.0, 0.1)
