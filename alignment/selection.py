"""Which trained subspace DAS reports: starts, restarts, and selection on training data.

A DAS run starts somewhere (a random rotation, the best localist subspace, a
given :class:`~steerlab.interventions.Subspace`) and follows its objective; the
objective is not IIA, so the last step need not be the best one, nor better than
the start. With ``select="train_iia"`` every run's state is scored by IIA on a
fixed sample of *training* counterfactuals at its start, ``checks_per_epoch``
times per epoch and at its end, and the best state over all runs is reported
(ties go to the earliest). The held-out test set is never looked at, so the
reported IIA stays an honest estimate; and because a run's start is one of the
candidates, a localist start can never be reported worse (on the selection
sample) than the localist subspace itself. :class:`Selection` records what was
tried and what won, and travels with the result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from steerlab.interventions.errors import ConfigError, FileFormatError

__all__ = ["Selection", "Checkpoints", "SELECT_RULES"]

SELECT_RULES = ("train_iia", "final")


@dataclass
class Selection:
    """How a reported subspace was chosen (see the module docstring).

    ``starts``: a label per run (``"random (seed 3)"``, ``"localist"``, ``"given"``);
    ``start_iia`` / ``final_iia``: each run's selection IIA at its start and end;
    ``chosen``: the winning run and step (0 = its start); ``iia``: the winner's selection IIA.
    """

    objective: dict[str, Any]
    rule: str
    starts: list[str]
    start_iia: list[float] = field(default_factory=list)
    final_iia: list[float] = field(default_factory=list)
    chosen_run: int = 0
    chosen_step: int = 0
    iia: float = float("nan")
    rows: int = 0
    checks: int = 0

    def describe(self) -> str:
        from steerlab.alignment.objectives import objective as _objective

        obj = _objective(self.objective).describe()
        runs = ", ".join(f"{s} {a:.3f}->{b:.3f}" for s, a, b in zip(self.starts, self.start_iia, self.final_iia))
        if self.rule == "final":
            return f"{obj}; {runs}; reported: the last step of {self.starts[self.chosen_run]}"
        where = "its start" if self.chosen_step == 0 else f"step {self.chosen_step}"
        return (f"{obj}; runs (training IIA start->end on {self.rows} training counterfactuals): {runs}; "
                f"reported: {self.starts[self.chosen_run]} at {where} (training IIA {self.iia:.3f}, best of {self.checks} checkpoints)")

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @staticmethod
    def check_record(d: Any, where: str) -> None:
        """A saved selection's fields, of the right types, before anything is built."""
        from steerlab.interventions.fileformat import field_of

        number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)  # noqa: E731
        count = lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= 0  # noqa: E731
        field_of(d, "objective", dict, where)
        rule = field_of(d, "rule", str, where)
        starts = field_of(d, "starts", list, where)
        if rule not in SELECT_RULES or not starts or not all(isinstance(x, str) for x in starts):
            raise FileFormatError(f"{where}: rule {rule!r:.40} with starts {starts!r:.80}; expected one of {list(SELECT_RULES)} and labels")
        for key in ("start_iia", "final_iia"):
            xs = field_of(d, key, list, where)
            if not all(number(x) for x in xs) or len(xs) > len(starts):
                raise FileFormatError(f"{where}: {key} {xs!r:.80}; expected at most one IIA per start")
        for key in ("chosen_run", "chosen_step", "rows", "checks"):
            if not count(field_of(d, key, int, where)):
                raise FileFormatError(f"{where}: {key} {d[key]!r}; expected a count")
        if d["chosen_run"] >= len(starts) or not number(field_of(d, "iia", (int, float), where)):
            raise FileFormatError(f"{where}: chosen run {d['chosen_run']} of {len(starts)} starts, iia {d['iia']!r}")

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> Selection | None:
        if d is None:
            return None
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


class Checkpoints:
    """Scores a run's parameters on the selection rows and keeps the best state seen.

    ``score()`` returns the selection IIA of the current parameters; :meth:`check`
    records it (and a copy of the parameters when it is the best so far).
    """

    def __init__(self, params: Sequence[nn.Parameter], score: Callable[[], float], run: int):
        self.params, self.score, self.run = list(params), score, run
        self.best: float = float("-inf")
        self.best_state: list[Tensor] | None = None
        self.best_step = 0
        self.first: float | None = None
        self.last: float | None = None
        self.checks = 0

    def check(self, step: int) -> float:
        with torch.no_grad():
            acc = self.score()
        self.checks += 1
        if self.first is None:
            self.first = acc
        self.last = acc
        if acc > self.best:
            self.best, self.best_step = acc, step
            self.best_state = [p.detach().clone() for p in self.params]
        return acc

    def restore(self) -> None:
        if self.best_state is None:
            raise ConfigError("no checkpoint was taken; call check() at least once")
        with torch.no_grad():
            for p, s in zip(self.params, self.best_state):
                p.copy_(s)
