"""Interchange-intervention accuracy (IIA) and its uncertainty.

IIA is the fraction of counterfactual examples on which the intervened
network predicts the causal model's counterfactual label. The prediction is
the argmax of the encoder's label scores (for a language model: the
next-token logits restricted to the task's label tokens), so chance is
``1 / |labels|``. With ``n`` examples its standard error is
``sqrt(p (1 - p) / n)``; a result is *near chance* when it lies within two
standard errors of chance under the null hypothesis (``sqrt(c (1 - c) / n)``
for chance ``c``), i.e. a two-sided binomial test at about the 5% level.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

__all__ = ["IIA", "evaluate_iia", "set_key"]


@dataclass(frozen=True)
class IIA:
    """An accuracy ``value`` over ``n`` examples with ``chance`` = 1/|labels|."""

    value: float
    n: int
    chance: float

    @property
    def se(self) -> float:
        """Standard error of the estimate, ``sqrt(p (1 - p) / n)``."""
        return math.sqrt(max(self.value * (1 - self.value), 0.0) / self.n) if self.n else float("nan")

    @property
    def chance_se(self) -> float:
        """Standard error at chance, ``sqrt(c (1 - c) / n)``."""
        return math.sqrt(self.chance * (1 - self.chance) / self.n) if self.n else float("nan")

    @property
    def near_chance(self) -> bool:
        """Within two standard errors (at chance) of chance."""
        return abs(self.value - self.chance) <= 2 * self.chance_se

    def __float__(self) -> float:
        return float(self.value)

    def __format__(self, spec: str) -> str:
        return format(self.value, spec or ".3f")

    def __str__(self) -> str:
        return f"{self.value:.3f} ± {self.se:.3f} (n={self.n})"

    def to_json(self) -> dict[str, Any]:
        return {"value": self.value, "n": self.n, "chance": self.chance}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> IIA:
        return cls(float(d["value"]), int(d["n"]), float(d["chance"]))


def set_key(variables: tuple[str, ...], mask: Tensor) -> str:
    """``"WX"``, ``"WX+YZ"``: the name of the set of variables a row intervenes."""
    return "+".join(v for v, m in zip(variables, mask.tolist()) if m)


def evaluate_iia(
    predict: Callable[[Int[Tensor, " batch"]], Float[Tensor, "batch labels"]],
    labels: Int[Tensor, " example"],
    intervened: Tensor,
    variables: tuple[str, ...],
    *,
    batch_size: int = 256,
    rows: Int[Tensor, " batch"] | None = None,
) -> dict[str, IIA]:
    """IIA of ``predict`` (rows -> label scores) over ``rows`` (default: all),
    per set of intervened variables (``"WX"``, ``"WX+YZ"``) and over ``"all"``."""
    n_labels = None
    rows = torch.arange(labels.shape[0]) if rows is None else rows
    correct = torch.zeros(rows.shape[0], dtype=torch.bool)
    with torch.no_grad():
        for a in range(0, rows.shape[0], batch_size):
            r = rows[a : a + batch_size]
            scores = predict(r)
            n_labels = scores.shape[-1]
            correct[a : a + batch_size] = scores.argmax(-1).cpu() == labels[r]
    chance = 1.0 / (n_labels or 2)
    out: dict[str, IIA] = {}
    keys = [set_key(variables, m) for m in intervened[rows]]
    for k in dict.fromkeys(keys):
        sel = torch.tensor([kk == k for kk in keys])
        out[k] = IIA(float(correct[sel].float().mean()), int(sel.sum()), chance)
    out["all"] = IIA(float(correct.float().mean()) if len(rows) else float("nan"), int(rows.shape[0]), chance)
    return out
