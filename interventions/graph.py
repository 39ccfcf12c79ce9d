"""The run graph: model runs as nodes, site values flowing between them.

A node is one run of the model on inputs, with the interventions applied in
that run. A sourced intervention's ``source`` names another node (or plain
inputs, which become a node of their own, or a precomputed
:class:`SourceValue`): that edge carries the source's value at the
intervention's site and source positions. A node that is itself intervened
can feed another node, which is path patching::

    g = Graph()
    clean = g.run(clean_inputs)
    x = g.run(corrupt_inputs, [Interchange("blocks.3.attn.z", heads=[5], source=clean)])
    y = g.run(corrupt_inputs, [Interchange("blocks.9.resid_post", source=x)])
    res = lab.execute(g)          # res[y].logits

Executed in topological order by the hook engine (``Lab.execute``), which
batches independent plain runs of the same shape into one forward and stops
a run as soon as everything read from it has been read.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, no_type_check

from torch import Tensor

from steerlab.interventions.activation_cache import ActivationCache
from steerlab.interventions.errors import GraphError, SourceError, checked_first
from steerlab.interventions.inputs import ModelInputs, check_inputs
from steerlab.interventions.ops import Intervention, check_interventions

__all__ = ["Graph", "Run", "SourceValue", "RunResult", "GraphResult"]


@dataclass(eq=False)
class SourceValue:
    """A precomputed source slice, ``[batch or 1, k, ..., width]``: what a source
    run would have supplied at the intervention's site and source positions
    (for example cached once and reused across training epochs). ``valid``
    (``[batch or 1, k]``, optional) marks the slots that hold a token; an
    aligned base slot whose source slot is empty keeps its value."""

    value: Tensor
    valid: Tensor | None = None

    def __repr__(self) -> str:
        return f"SourceValue(shape={tuple(self.value.shape)})"


class Run:
    """A node of a :class:`Graph`: one model run, optionally intervened."""

    def __init__(self, graph: Graph, index: int, inputs: Any, interventions: Sequence[Intervention], name: str | None, output: bool | None):
        self.graph = graph
        self.index = index
        self.inputs = inputs
        self.interventions = list(interventions)
        self.name = name or f"run{index}"
        self.output = output

    def sources(self) -> list[Run]:
        return [iv.source for iv in self.interventions if isinstance(iv.source, Run)]

    def __repr__(self) -> str:
        return f"Run({self.name!r}, {len(self.interventions)} interventions)"


class Graph:
    """A DAG of runs. Build with :meth:`run`; execute with ``lab.execute(graph)``."""

    def __init__(self):
        self.runs: list[Run] = []

    @checked_first(inputs=check_inputs, interventions=lambda v: check_interventions(v, "a run's interventions"))
    def run(self, inputs: ModelInputs, interventions: Iterable[Intervention] | Intervention = (), *, name: str | None = None, output: bool | None = None) -> Run:
        """Add a run of the model on ``inputs`` with ``interventions``.

        A sourced intervention whose ``source`` is not a :class:`Run` or a
        :class:`SourceValue` (text, a dict of tensors, token ids) gets a
        plain run of those inputs as its source. ``output`` keeps the run's
        output even when other runs read from it (by default only runs that
        nobody reads from keep theirs).
        """
        interventions = check_interventions(list(interventions) if isinstance(interventions, Iterator) else interventions, "a run's interventions")
        for iv in interventions:
            if isinstance(iv.source, Run) and iv.source.graph is not self:
                raise GraphError(f"{iv!r} reads from {iv.source!r}, which belongs to another graph")
        node = Run(self, len(self.runs), inputs, interventions, name, output)
        self.runs.append(node)
        return node

    def __iter__(self) -> Iterator[Run]:
        return iter(self.runs)

    def __len__(self) -> int:
        return len(self.runs)

    def order(self) -> list[Run]:
        """Runs in an order where every source precedes its readers; raises on a cycle."""
        state: dict[int, int] = {}
        out: list[Run] = []

        @no_type_check  # a closure made per call: the suite's runtime checker would decorate it on every call
        def visit(r: Run, path: list[str]) -> None:
            s = state.get(r.index, 0)
            if s == 1:
                raise GraphError(f"the run graph has a cycle: {' -> '.join(path + [r.name])}")
            if s == 2:
                return
            state[r.index] = 1
            for src in r.sources():
                if src.graph is not self:
                    raise GraphError(f"{r!r} reads from {src!r}, which belongs to another graph")
                visit(src, path + [r.name])
            state[r.index] = 2
            out.append(r)

        for r in self.runs:
            visit(r, [])
        return out

    def validate_sources(self) -> None:
        for r in self.runs:
            for iv in r.interventions:
                if iv.sourced and iv.source is None:
                    raise SourceError(
                        f"{type(iv).__name__} at {iv.site!r} in {r.name} needs a source "
                        "(source=<a run, inputs, or a SourceValue>)"
                    )


@dataclass
class RunResult:
    """What one run produced: the model's ``output`` and a ``cache`` of collected values."""

    output: Any
    cache: ActivationCache = field(default_factory=ActivationCache)

    @property
    def logits(self) -> Tensor:
        out = self.output
        if isinstance(out, Tensor):
            return out
        logits = getattr(out, "logits", None)
        if logits is None:
            raise AttributeError("this run's output has no logits")
        return logits

    def __getattr__(self, name: str):
        # forward attribute access to the model output (hidden_states, loss, ...)
        if name in ("output", "cache"):
            raise AttributeError(name)
        return getattr(self.output, name)


def _check_run(run: object) -> None:
    if not isinstance(run, Run):  # a name would otherwise hit str.index and read as "kept no output"
        raise GraphError(f"graph results are indexed by the Run that graph.run(...) returned; got {type(run).__name__} {run!r:.60}")


class GraphResult:
    """Results of an executed graph, indexed by :class:`Run`."""

    def __init__(self, results: dict[int, RunResult]):
        self._results = results

    @checked_first(run=_check_run)
    def __getitem__(self, run: Run) -> RunResult:
        try:
            return self._results[run.index]
        except KeyError:
            raise KeyError(
                f"{run!r} kept no output: it only supplied values to other runs (pass output=True to keep it)"
            ) from None

    def __contains__(self, run: Run) -> bool:
        return run.index in self._results
