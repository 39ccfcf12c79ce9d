"""Counterfactual datasets: (base, sources, intervened variables, counterfactual label).

An example asks: *if variable V took the value it has on the source input,
what would the causal model output on the base input?* A
:class:`CounterfactualDataset` holds such examples for a causal model and an
encoder; each example intervenes one variable or several (each from its own
source). Labels come from :meth:`CausalModel.interchange`, so they are right
by construction.

For training and evaluation the dataset is also a table (:meth:`table`): the
distinct inputs of every base and source, and per example the index of its
base, of each source (``-1`` where a variable is not intervened) and of its
labels. Each distinct input is encoded, and run through the model, once.

:meth:`CounterfactualDataset.collate` (or :meth:`collator`, for a
``DataLoader``) turns examples into a :class:`CounterfactualBatch`: base and
sources encoded and padded together, per-example positions for the base and
for each source, labels and the intervened mask.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from steerlab.alignment.causal_model import CausalModel, Setting, balanced_draw
from steerlab.alignment.encoders import Encoder
from steerlab.interventions.errors import BatchMismatch, CausalModelError, DataError

__all__ = ["Counterfactual", "CounterfactualDataset", "CounterfactualBatch", "CounterfactualTable"]


@dataclass(frozen=True)
class Counterfactual:
    """One example: ``base``, a source per intervened variable, the counterfactual ``label``."""

    base: Setting
    sources: dict[str, Setting]
    label: Any
    base_label: Any

    @property
    def intervened(self) -> tuple[str, ...]:
        return tuple(self.sources)


@dataclass
class CounterfactualTable:
    """A dataset as index tensors over its distinct inputs (see the module docstring)."""

    inputs: list[Setting]
    base: Int[Tensor, " example"]
    sources: Int[Tensor, "example var"]
    labels: Int[Tensor, " example"]
    base_labels: Int[Tensor, " example"]
    variables: tuple[str, ...]

    @property
    def intervened(self) -> Bool[Tensor, "example var"]:
        return self.sources >= 0


@dataclass
class CounterfactualBatch:
    """A collated batch. ``sources[v]`` holds, for rows that do not intervene
    ``v``, the base input again (so every row of every tensor is defined);
    ``intervened[:, j]`` says which rows intervene ``variables[j]``."""

    base: Any
    sources: dict[str, Any]
    positions: Int[Tensor, "batch k"] | None
    source_positions: dict[str, Int[Tensor, "batch k"] | None]
    labels: Int[Tensor, " batch"]
    base_labels: Int[Tensor, " batch"]
    intervened: Bool[Tensor, "batch var"]
    variables: tuple[str, ...]
    extra: dict = field(default_factory=dict)


def _key(setting: Mapping[str, Any]) -> tuple:
    return tuple(sorted(setting.items()))


class CounterfactualDataset(Sequence[Counterfactual]):
    """Counterfactual examples for ``causal_model`` encoded by ``encoder``.

    Build with :meth:`sample` (or :meth:`from_pairs` for given bases and sources).
    ``output`` is the variable whose value is the label (default: the causal
    model's only output).
    """

    def __init__(
        self,
        causal_model: CausalModel,
        encoder: Encoder,
        examples: Sequence[Counterfactual],
        *,
        output: str | None = None,
    ):
        if not isinstance(causal_model, CausalModel):
            raise DataError(f"causal_model: expected a CausalModel; got {type(causal_model).__name__}")
        if not isinstance(encoder, Encoder):
            raise DataError(f"encoder: expected an Encoder (VectorEncoder, PromptEncoder, ...); got {type(encoder).__name__}")
        self.causal_model = causal_model
        self.encoder = encoder
        self.output = _output_of(causal_model, output)
        self.examples = list(examples)
        seen: list[str] = []
        for ex in self.examples:
            for v in ex.sources:
                if v not in causal_model.values:
                    raise CausalModelError(
                        f"intervened variable {v!r} is not in {causal_model.name} (its variables: {list(causal_model.variables)})"
                    )
                if v not in seen:
                    seen.append(v)
        self.variables: tuple[str, ...] = tuple(v for v in causal_model.variables if v in seen)
        missing = {ex.label for ex in self.examples} - set(encoder.labels)
        if missing:
            raise DataError(f"labels {sorted(map(repr, missing))} of {self.output!r} are not among the encoder's labels {list(encoder.labels)}")
        self._table: CounterfactualTable | None = None

    # -- construction ----------------------------------------------------------------
    @classmethod
    def sample(
        cls,
        causal_model: CausalModel,
        encoder: Encoder,
        n: int,
        *,
        intervene: str | Sequence[str] | Sequence[Sequence[str]],
        balance: bool = True,
        seed: int = 0,
        sampler: Callable[[random.Random], Setting] | None = None,
        output: str | None = None,
        max_draws: int | None = None,
    ) -> CounterfactualDataset:
        """``n`` examples; ``intervene`` is a variable, a list of variables (one
        intervened per example, in turn), or a list of variable sets (e.g.
        ``[["WX"], ["YZ"], ["WX", "YZ"]]``, each set intervened jointly, each
        variable from its own source).

        ``balance`` makes every counterfactual label equally frequent (bounded
        rejection: :class:`CausalModelError` if a label is unreachable).
        ``sampler`` replaces the causal model's input distribution (e.g. a
        held-out split of entities).
        """
        out_var = _output_of(causal_model, output)
        sets = _intervention_sets(causal_model, intervene)
        rng = random.Random(seed)
        draw_input = (lambda: _checked(causal_model, sampler(rng))) if sampler is not None else (lambda: causal_model.sample_input(rng))
        turn = [0]

        def draw() -> Counterfactual:
            vs = sets[turn[0] % len(sets)]
            base = draw_input()
            sources = {v: draw_input() for v in vs}
            setting = causal_model.interchange(base, sources)
            return Counterfactual(base, sources, setting[out_var], causal_model.run(base)[out_var])

        if not balance:
            examples = []
            for _ in range(n):
                examples.append(draw())
                turn[0] += 1
        else:
            # balance labels within each intervention set, so every set is as frequent as the others
            examples = []
            targets = [(v,) for v in causal_model.values[out_var]]
            for i, vs in enumerate(sets):
                share = n // len(sets) + (i < n % len(sets))
                turn[0] = i
                examples += balanced_draw(
                    draw, lambda ex: (ex.label,), share, _reachable(targets, encoder), rng,
                    max_draws=max_draws, what=f"counterfactuals intervening {list(vs)} with balanced labels",
                    name=causal_model.name,
                )
            rng.shuffle(examples)
        return cls(causal_model, encoder, examples, output=out_var)

    @classmethod
    def from_pairs(
        cls,
        causal_model: CausalModel,
        encoder: Encoder,
        bases: Sequence[Setting],
        sources: Mapping[str, Sequence[Setting | None]],
        *,
        output: str | None = None,
    ) -> CounterfactualDataset:
        """Examples from given ``bases`` and, per variable, a list of sources
        aligned with them (``None``: that example does not intervene the variable)."""
        out_var = _output_of(causal_model, output)
        for v, srcs in sources.items():
            if len(srcs) != len(bases):
                raise BatchMismatch(
                    f"{len(bases)} bases but {len(srcs)} sources for {v!r}; expected one source (or None) per base"
                )
        examples = []
        for i, base in enumerate(bases):
            srcs = {v: s[i] for v, s in sources.items() if s[i] is not None}
            if not srcs:
                raise DataError(f"example {i} intervenes no variable (every source is None)")
            setting = causal_model.interchange(base, srcs)
            examples.append(Counterfactual(dict(base), srcs, setting[out_var], causal_model.run(base)[out_var]))
        return cls(causal_model, encoder, examples, output=out_var)

    # -- sequence protocol ------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return CounterfactualDataset(self.causal_model, self.encoder, self.examples[i], output=self.output)
        return self.examples[i]

    def subset(self, indices: Sequence[int]) -> CounterfactualDataset:
        return CounterfactualDataset(self.causal_model, self.encoder, [self.examples[i] for i in indices], output=self.output)

    @property
    def intervention_sets(self) -> list[tuple[str, ...]]:
        """The distinct sets of variables intervened together, in first-seen order."""
        out: list[tuple[str, ...]] = []
        for ex in self.examples:
            s = tuple(v for v in self.variables if v in ex.sources)
            if s not in out:
                out.append(s)
        return out

    # -- tensors -------------------------------------------------------------------------------
    def table(self) -> CounterfactualTable:
        """Index tensors over the distinct inputs (built once)."""
        if self._table is None:
            index: dict[tuple, int] = {}
            inputs: list[Setting] = []

            def idx(s: Setting) -> int:
                k = _key(s)
                if k not in index:
                    index[k] = len(inputs)
                    inputs.append(s)
                return index[k]

            base = [idx(ex.base) for ex in self.examples]
            srcs = [[idx(ex.sources[v]) if v in ex.sources else -1 for v in self.variables] for ex in self.examples]
            enc = self.encoder
            self._table = CounterfactualTable(
                inputs,
                torch.tensor(base, dtype=torch.long),
                torch.tensor(srcs, dtype=torch.long).view(len(self.examples), len(self.variables)),
                torch.tensor([enc.label_index(ex.label) for ex in self.examples], dtype=torch.long),
                torch.tensor([enc.label_index(ex.base_label) for ex in self.examples], dtype=torch.long),
                self.variables,
            )
        return self._table

    def collate(self, examples: Sequence[Counterfactual] | Sequence[int], *, positions=None) -> CounterfactualBatch:
        """Encode ``examples`` (or indices into this dataset): base and every source
        padded together, with ``positions`` (a name the encoder knows, an int, or
        ``None``) resolved per example for the base and for each source."""
        exs = [self.examples[e] if isinstance(e, int) else e for e in examples]
        sub = CounterfactualDataset(self.causal_model, self.encoder, exs, output=self.output)
        t = sub.table()
        enc = self.encoder.encode(t.inputs)
        pos = self.encoder.positions(positions, t.inputs, enc) if self.encoder.has_positions else None
        if positions is None and self.encoder.has_positions:
            check_equal_lengths(sub, self.encoder.lengths(enc))
        rows = lambda r: _rows(enc, r)  # noqa: E731
        src_rows = {v: torch.where(t.sources[:, j] >= 0, t.sources[:, j], t.base) for j, v in enumerate(t.variables)}
        return CounterfactualBatch(
            base=rows(t.base),
            sources={v: rows(r) for v, r in src_rows.items()},
            positions=None if pos is None else pos[t.base],
            source_positions={v: None if pos is None else pos[r] for v, r in src_rows.items()},
            labels=t.labels,
            base_labels=t.base_labels,
            intervened=t.intervened,
            variables=t.variables,
        )

    def collator(self, *, positions=None) -> Callable[[Sequence[Counterfactual]], CounterfactualBatch]:
        """``collate`` with fixed ``positions``, for ``torch.utils.data.DataLoader(dataset, collate_fn=...)``."""
        return lambda examples: self.collate(examples, positions=positions)

    def __repr__(self) -> str:
        sets = ", ".join("+".join(s) for s in self.intervention_sets)
        return f"CounterfactualDataset({len(self)} examples, intervening {sets}, label {self.output!r})"


def check_equal_lengths(ds: CounterfactualDataset, lengths: Tensor | None) -> None:
    """Raise :class:`DataError` if a base and one of its sources differ in length
    (an interchange over all positions aligns them position by position)."""
    if lengths is None:
        return
    t = ds.table()
    for j, v in enumerate(t.variables):
        has = t.sources[:, j] >= 0
        src = torch.where(has, t.sources[:, j], t.base)
        bad = (lengths[t.base] != lengths[src]) & has
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise DataError(
                f"example {i}: the base has {int(lengths[t.base[i]])} tokens but its source for {v!r} has "
                f"{int(lengths[src[i]])}; an interchange at all positions aligns base and source position by position, "
                "so their lengths must agree — give positions= (e.g. 'last' or a named position) instead"
            )


def _rows(encoded: Any, rows: Tensor) -> Any:
    if isinstance(encoded, Tensor):
        return encoded[rows]
    return {k: v[rows] for k, v in encoded.items()}


def _output_of(cm: CausalModel, output: str | None) -> str:
    if output is None:
        if len(cm.outputs) != 1:
            raise CausalModelError(f"{cm.name} has outputs {list(cm.outputs)}; say which is the label with output=")
        return cm.outputs[0]
    if output not in cm.values:
        raise CausalModelError(f"output={output!r} is not a variable of {cm.name} (variables: {list(cm.variables)})")
    return output


def _intervention_sets(cm: CausalModel, intervene) -> list[tuple[str, ...]]:
    if isinstance(intervene, str):
        sets = [(intervene,)]
    else:
        items = list(intervene)
        if not items:
            raise CausalModelError("intervene=[]: expected a variable, a list of variables, or a list of variable sets")
        sets = [(x,) if isinstance(x, str) else tuple(x) for x in items]
    for s in sets:
        if not s:
            raise CausalModelError("an intervention set is empty")
        for v in s:
            if v not in cm.values:
                raise CausalModelError(f"intervened variable {v!r} is not in {cm.name} (its variables: {list(cm.variables)})")
        if len(set(s)) != len(s):
            raise CausalModelError(f"intervention set {list(s)} repeats a variable")
    return sets


def _checked(cm: CausalModel, setting: Mapping[str, Any]) -> Setting:
    s = dict(setting)
    cm.check_input(s)
    return s


def _reachable(targets: list[tuple], encoder: Encoder) -> list[tuple]:
    return [t for t in targets if t[0] in encoder.labels]
