"""High-level causal models: variables, value sets, parents, mechanisms.

A :class:`CausalModel` is the algorithm a neural network is hypothesised to
implement. Variables without parents are its *inputs*; every other variable
has a mechanism computing its value from its parents' values (called
positionally, in the order the parents are listed); variables nobody reads
(other than inputs) are its *outputs*. The hierarchical-equality model of the
DAS paper::

    same = lambda a, b: a == b
    cm = CausalModel(
        values={"W": E, "X": E, "Y": E, "Z": E, "WX": [True, False], "YZ": [True, False], "O": [True, False]},
        parents={"WX": ["W", "X"], "YZ": ["Y", "Z"], "O": ["WX", "YZ"]},
        mechanisms={"WX": same, "YZ": same, "O": same},
    )
    cm.run({"W": 1, "X": 1, "Y": 2, "Z": 3})["O"]                         # False
    cm.interchange(base, {"WX": source})["O"]   # O with WX as it is on `source`

Everything is checked on construction: unknown parents, cycles, missing or
superfluous mechanisms, empty or repeated value sets, and mechanisms that
return a value outside their variable's value set (every parent combination
when there are few, a seeded sample of them otherwise). Sampling is bounded:
a label-balanced draw that cannot reach a value raises instead of looping.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

from steerlab.interventions.errors import CausalModelError, checked_first

__all__ = ["CausalModel", "Setting"]

Setting = dict[str, Any]
"""A value for every variable (or for the inputs only, when given to :meth:`CausalModel.run`)."""

#: parent-value combinations checked exhaustively below this count, sampled above it
_CHECK_LIMIT = 4096
#: input spaces enumerated exactly for balanced sampling below this size
_ENUMERATE_LIMIT = 50_000


class CausalModel:
    """A finite, acyclic causal model (see the module docstring).

    Args:
        values: each variable's value set (a non-empty sequence of hashable,
            distinct values). Every variable of the model is a key here.
        parents: each non-input variable's parents, in the order its mechanism
            takes them. Variables absent here (or with ``[]``) are inputs.
        mechanisms: ``variable -> f(*parent_values)`` for every non-input variable.
        outputs: the output variables (default: non-input variables no other
            variable reads).
        input_sampler: ``rng -> {input: value}`` replacing the uniform draw of
            inputs (e.g. to make equal entities as likely as distinct ones);
            each draw is checked.
        name: used in messages and reprs.
    """

    @checked_first(values=lambda values: _check_values(values))  # defined below
    def __init__(
        self,
        values: Mapping[str, Sequence[Hashable]],
        parents: Mapping[str, Sequence[str]] | None = None,
        mechanisms: Mapping[str, Callable[..., Any]] | None = None,
        *,
        outputs: Sequence[str] | None = None,
        input_sampler: Callable[[random.Random], Mapping[str, Any]] | None = None,
        name: str = "causal model",
    ):
        self.name = name
        self.values: dict[str, tuple] = _check_values(values)
        self.parents: dict[str, tuple[str, ...]] = _check_parents(self.values, parents or {})
        self.mechanisms: dict[str, Callable[..., Any]] = dict(mechanisms or {})
        self._value_sets = {v: frozenset(vals) for v, vals in self.values.items()}
        self.variables: tuple[str, ...] = _topological_order(self.values, self.parents)
        self.inputs: tuple[str, ...] = tuple(v for v in self.variables if not self.parents[v])
        self._check_mechanisms()
        readers = {p for ps in self.parents.values() for p in ps}
        if outputs is None:
            outputs = [v for v in self.variables if v not in readers and self.parents[v]]
        self.outputs: tuple[str, ...] = tuple(outputs)
        unknown = [o for o in self.outputs if o not in self.values]
        if unknown or not self.outputs:
            raise CausalModelError(
                f"{self.name}: outputs={list(outputs)} — expected one or more of its variables {list(self.variables)}"
            )
        self.input_sampler = input_sampler
        self.children: dict[str, tuple[str, ...]] = {
            v: tuple(c for c in self.variables if v in self.parents[c]) for v in self.variables
        }

    # -- construction checks ---------------------------------------------------
    def _check_mechanisms(self) -> None:
        extra = sorted(set(self.mechanisms) - set(self.values))
        if extra:
            raise CausalModelError(f"{self.name}: mechanisms given for unknown variables {extra}; variables: {list(self.variables)}")
        for v in self.variables:
            has = v in self.mechanisms
            if self.parents[v] and not has:
                raise CausalModelError(
                    f"{self.name}: variable {v!r} has parents {list(self.parents[v])} but no mechanism; "
                    f"give mechanisms[{v!r}] = f({', '.join(self.parents[v])})"
                )
            if not self.parents[v] and has:
                raise CausalModelError(
                    f"{self.name}: input variable {v!r} has a mechanism but no parents; an input takes its value "
                    "from the input setting (remove the mechanism or give it parents)"
                )
            if has and not callable(self.mechanisms[v]):
                raise CausalModelError(f"{self.name}: mechanisms[{v!r}] is {self.mechanisms[v]!r}, not a callable")
        rng = random.Random(0)
        for v in self.variables:
            ps = self.parents[v]
            if not ps:
                continue
            sizes = [len(self.values[p]) for p in ps]
            if math.prod(sizes) <= _CHECK_LIMIT:
                combos: Iterable[tuple] = itertools.product(*(self.values[p] for p in ps))
            else:
                combos = (tuple(rng.choice(self.values[p]) for p in ps) for _ in range(_CHECK_LIMIT))
            for combo in combos:
                self._apply(v, combo)

    def _apply(self, v: str, parent_values: tuple) -> Any:
        try:
            out = self.mechanisms[v](*parent_values)
        except Exception as e:  # a mechanism that fails on a legal parent value is a broken model
            args = dict(zip(self.parents[v], parent_values))
            raise CausalModelError(f"{self.name}: the mechanism of {v!r} raised {type(e).__name__}: {e} on parents {args}") from e
        try:
            ok = out in self._value_sets[v]
        except TypeError:
            ok = False
        if not ok:
            args = dict(zip(self.parents[v], parent_values))
            raise CausalModelError(
                f"{self.name}: the mechanism of {v!r} returned {out!r} on parents {args}, which is not in its value set "
                f"{_short(self.values[v])}"
            )
        return out

    # -- running -------------------------------------------------------------------
    def check_input(self, inputs: Mapping[str, Any]) -> None:
        """Raise :class:`CausalModelError` unless ``inputs`` sets exactly the input variables to legal values."""
        if not isinstance(inputs, Mapping):
            raise CausalModelError(f"{self.name}: an input setting is a mapping {{input: value}}; got {type(inputs).__name__}")
        missing = [v for v in self.inputs if v not in inputs]
        extra = [k for k in inputs if k not in self.inputs]
        if missing or extra:
            raise CausalModelError(
                f"{self.name}: an input setting must set exactly the inputs {list(self.inputs)}; "
                f"missing {missing}, not inputs {extra}"
            )
        for v in self.inputs:
            try:
                ok = inputs[v] in self._value_sets[v]
            except TypeError:
                ok = False
            if not ok:
                raise CausalModelError(f"{self.name}: input {v!r}={inputs[v]!r} is not in its value set {_short(self.values[v])}")

    def run(self, inputs: Mapping[str, Any]) -> Setting:
        """The value of every variable on ``inputs`` (a setting of the input variables)."""
        self.check_input(inputs)
        return self._run(inputs, {})

    def intervene(self, inputs: Mapping[str, Any], fixed: Mapping[str, Any]) -> Setting:
        """Run on ``inputs`` with the variables in ``fixed`` held at the given values."""
        self.check_input(inputs)
        self._check_variables(fixed, "an intervened variable")
        for v, val in fixed.items():
            if val not in self._value_sets[v]:
                raise CausalModelError(f"{self.name}: cannot set {v!r} to {val!r}; its value set is {_short(self.values[v])}")
        return self._run(inputs, dict(fixed))

    def interchange(self, base: Mapping[str, Any], sources: Mapping[str, Mapping[str, Any]]) -> Setting:
        """The interchange intervention: run on ``base`` with each variable ``v`` in
        ``sources`` fixed to the value it takes on the run of ``sources[v]``."""
        self.check_input(base)
        self._check_variables(sources, "an intervened variable")
        fixed = {v: self.run(src)[v] for v, src in sources.items()}
        return self._run(base, fixed)

    def _run(self, inputs: Mapping[str, Any], fixed: Mapping[str, Any]) -> Setting:
        out: Setting = {}
        for v in self.variables:
            if v in fixed:
                out[v] = fixed[v]
            elif not self.parents[v]:
                out[v] = inputs[v]
            else:
                out[v] = self.mechanisms[v](*(out[p] for p in self.parents[v]))
        return out

    def _check_variables(self, names: Iterable[str], what: str) -> None:
        for v in names:
            if v not in self.values:
                raise CausalModelError(f"{self.name}: {what} {v!r} is not one of its variables {list(self.variables)}")

    def descendants(self, variable: str) -> tuple[str, ...]:
        """Variables downstream of ``variable`` (not including it)."""
        self._check_variables([variable], "variable")
        seen: list[str] = []
        todo = list(self.children[variable])
        while todo:
            c = todo.pop()
            if c not in seen:
                seen.append(c)
                todo.extend(self.children[c])
        return tuple(v for v in self.variables if v in seen)

    def ancestors(self, variable: str) -> tuple[str, ...]:
        """Variables upstream of ``variable`` (not including it)."""
        self._check_variables([variable], "variable")
        seen: set[str] = set()
        todo = list(self.parents[variable])
        while todo:
            p = todo.pop()
            if p not in seen:
                seen.add(p)
                todo.extend(self.parents[p])
        return tuple(v for v in self.variables if v in seen)

    def side_variables(self, variable: str) -> tuple[str, ...]:
        """Variables neither upstream nor downstream of ``variable`` (nor it): what a
        representation may carry beside it without being computed from it or into it
        (for hierarchical equality's ``WX``: ``Y``, ``Z`` and ``YZ``)."""
        linked = {variable, *self.ancestors(variable), *self.descendants(variable)}
        return tuple(v for v in self.variables if v not in linked)

    # -- sampling ------------------------------------------------------------------------
    def sample_input(self, rng: random.Random) -> Setting:
        """One input setting: ``input_sampler(rng)`` if given, else each input uniformly."""
        if self.input_sampler is None:
            return {v: rng.choice(self.values[v]) for v in self.inputs}
        drawn = dict(self.input_sampler(rng))
        self.check_input(drawn)
        return drawn

    def input_space_size(self) -> int:
        return math.prod(len(self.values[v]) for v in self.inputs)

    def sample_inputs(
        self,
        n: int,
        *,
        balance: str | Sequence[str] | None = None,
        seed: int = 0,
        max_draws: int | None = None,
    ) -> list[Setting]:
        """``n`` input settings; with ``balance`` (a variable or several), every
        reachable value combination of those variables equally often.

        Small input spaces (uniform inputs) are enumerated exactly; otherwise
        draws are rejected until each combination has its share, within
        ``max_draws`` (default ``200 * n + 1000``) draws, after which a
        :class:`CausalModelError` names the combinations not reached.
        """
        if not isinstance(n, int) or n < 0:
            raise CausalModelError(f"n={n!r}: expected a non-negative int")
        rng = random.Random(seed)
        if balance is None:
            return [self.sample_input(rng) for _ in range(n)]
        keys = [balance] if isinstance(balance, str) else list(balance)
        self._check_variables(keys, "a balanced variable")
        if self.input_sampler is None and self.input_space_size() <= _ENUMERATE_LIMIT:
            groups: dict[tuple, list[Setting]] = {}
            for combo in itertools.product(*(self.values[v] for v in self.inputs)):
                inp = dict(zip(self.inputs, combo))
                full = self._run(inp, {})
                groups.setdefault(tuple(full[k] for k in keys), []).append(inp)
            order = [c for c in itertools.product(*(self.values[k] for k in keys)) if c in groups]
            quota = _quotas(order, n, rng)
            out = [dict(rng.choice(groups[c])) for c in order for _ in range(quota[c])]
            rng.shuffle(out)
            return out
        targets = list(itertools.product(*(self.values[k] for k in keys)))
        return balanced_draw(
            lambda: self.sample_input(rng),
            lambda inp: tuple(self._run(inp, {})[k] for k in keys),
            n,
            targets,
            rng,
            max_draws=max_draws,
            what=f"inputs balanced over {keys}",
            name=self.name,
        )

    def __repr__(self) -> str:
        edges = ", ".join(f"{'+'.join(ps)}->{v}" for v, ps in self.parents.items() if ps)
        return f"CausalModel({self.name!r}, inputs={list(self.inputs)}, outputs={list(self.outputs)}, {edges})"


def balanced_draw(
    draw: Callable[[], Any],
    key: Callable[[Any], tuple],
    n: int,
    targets: Sequence[tuple],
    rng: random.Random,
    *,
    max_draws: int | None = None,
    what: str = "samples",
    name: str = "causal model",
) -> list:
    """Draw until each target key has its share of ``n``; bounded (never loops forever).

    Keys outside ``targets`` are discarded. Raises :class:`CausalModelError`
    naming the unreached targets when ``max_draws`` draws are not enough.
    """
    quota = _quotas(list(targets), n, rng)
    need = {t: q for t, q in quota.items() if q > 0}
    budget = max_draws if max_draws is not None else 200 * n + 1000
    out: list = []
    draws = 0
    while need:
        if draws >= budget:
            short = {t: q for t, q in need.items()}
            raise CausalModelError(
                f"{name}: could not draw {n} {what} in {budget} draws; still missing {_short(list(short.items()), 6)} "
                "(value, count). The value may be unreachable or too rare under the input distribution: "
                "give an input_sampler that makes it likelier, or balance over fewer variables"
            )
        item = draw()
        draws += 1
        k = key(item)
        if need.get(k, 0) > 0:
            out.append(item)
            need[k] -= 1
            if need[k] == 0:
                del need[k]
    rng.shuffle(out)
    return out


def _quotas(order: list, n: int, rng: random.Random) -> dict:
    """``n`` split as evenly as possible over ``order`` (the remainder to random members)."""
    if not order:
        return {}
    base, extra = divmod(n, len(order))
    lucky = set(rng.sample(range(len(order)), extra))
    return {c: base + (i in lucky) for i, c in enumerate(order)}


def _check_values(values: object) -> dict[str, tuple]:  # the validator: takes anything
    if not isinstance(values, Mapping) or not values:
        raise CausalModelError("values: expected a non-empty mapping {variable: [its values]}")
    out: dict[str, tuple] = {}
    for v, vals in values.items():
        if not isinstance(v, str) or not v:
            raise CausalModelError(f"variable name {v!r}: expected a non-empty string")
        if isinstance(vals, (str, bytes)) or not isinstance(vals, Iterable):
            raise CausalModelError(f"values[{v!r}] = {vals!r}: expected a sequence of values")
        vals = tuple(vals)
        if not vals:
            raise CausalModelError(f"variable {v!r} has an empty value set")
        try:
            distinct = len(set(vals))
        except TypeError:
            raise CausalModelError(f"variable {v!r} has an unhashable value; values must be hashable (ints, strings, tuples)") from None
        if distinct != len(vals):
            raise CausalModelError(f"variable {v!r} repeats a value in its value set {_short(vals)}")
        out[v] = vals
    return out


def _check_parents(values: dict[str, tuple], parents: Mapping[str, Sequence[str]]) -> dict[str, tuple[str, ...]]:
    out = {v: () for v in values}
    for v, ps in parents.items():
        if v not in values:
            raise CausalModelError(f"parents given for {v!r}, which has no value set; variables: {list(values)}")
        if isinstance(ps, str):
            raise CausalModelError(f"parents[{v!r}] = {ps!r}: expected a list of variable names")
        ps = tuple(ps)
        unknown = [p for p in ps if p not in values]
        if unknown:
            raise CausalModelError(f"variable {v!r} has unknown parents {unknown}; variables: {list(values)}")
        if len(set(ps)) != len(ps):
            raise CausalModelError(f"variable {v!r} lists a parent twice: {list(ps)}")
        out[v] = ps
    return out


def _topological_order(values: dict[str, tuple], parents: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
    state: dict[str, int] = {}
    order: list[str] = []

    def visit(v: str, path: list[str]) -> None:
        s = state.get(v, 0)
        if s == 1:
            cycle = list(reversed(path[path.index(v):] + [v]))  # path runs child -> parent
            raise CausalModelError(f"the causal model has a cycle: {' -> '.join(cycle)} (each arrow: parent -> child)")
        if s == 2:
            return
        state[v] = 1
        for p in parents[v]:
            visit(p, path + [v])
        state[v] = 2
        order.append(v)

    for v in values:
        visit(v, [])
    return tuple(order)


def _short(vals, k: int = 8) -> str:
    vals = list(vals)
    body = ", ".join(repr(x) for x in vals[:k])
    return "[" + body + (f", ... ({len(vals)} in all)" if len(vals) > k else "") + "]"
