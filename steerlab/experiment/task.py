"""A prompt task for your own concept: template, variables, causal mechanism, answers, splits.

:class:`PromptTask` is what :mod:`steerlab.alignment` needs to look for a concept in a language
model: a :class:`~steerlab.alignment.CausalModel` (input variables with their values, computed
variables with their mechanisms), a prompt template filled from the inputs, the answer token that
verbalises each value of the output, named positions, and held-out input values for the test
split. From Python a mechanism is a function; in an experiment file it is a table
(:func:`task_from_table`), and code is imported only when the caller allows it.

The ``[task]`` table of an experiment file::

    [task]
    template = "{name} was tired, so"          # str.format fields, filled from the variables
    intervene = "GENDER"                        # the variable(s) DAS aligns
    n_train = 128                               # counterfactuals (label-balanced)
    n_test = 64                                 # drawn from the held-out values
    min_accuracy = 0.8                          # validate fails below this task accuracy

    [task.variables]                            # input variables and their values
    NAME = ["John", "Mary", "Peter", "Anna"]

    [task.mechanisms.GENDER]                    # a computed variable: its parents and a table
    parents = ["NAME"]
    map = { John = "male", Peter = "male", Mary = "female", Anna = "female" }

    [task.mechanisms.PRONOUN]
    parents = ["GENDER"]
    map = { male = "he", female = "she" }

    [task.answers]                              # each output value's answer token
    he = " he"
    she = " she"

    [task.test_values]                          # held out: the test split draws only these
    NAME = ["Peter", "Anna"]

A mechanism table is one of ``map`` (one parent; keys are the parent's values as text),
``rows`` (``[[parent values..., value], ...]``), ``op`` (one of :data:`OPS`), or
``python = "file.py:function"`` (imports code: only with ``allow_code=True``, the command
line's ``--allow-code``). ``values`` lists a computed variable's values when they cannot be
read off the table. Template fields map to the variable of the same name in capitals unless
``[task.fields]`` says otherwise; named positions are ``last`` (-1) and one per field (its last
token), plus any in ``[task.positions]``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import operator
import random
import string
from collections.abc import Callable, Mapping, Sequence
from functools import reduce
from pathlib import Path
from typing import Any

from steerlab.alignment import CausalModel, CounterfactualDataset, PromptEncoder
from steerlab.interventions.errors import ConfigError

__all__ = ["PromptTask", "task_from_table", "OPS", "TASK_KEYS"]

#: named mechanisms for ``op = "..."`` (parents in the order listed)
OPS: dict[str, Callable[..., Any]] = {
    "identity": lambda x: x,
    "not": operator.not_,
    "equal": lambda *xs: all(x == xs[0] for x in xs),
    "not_equal": lambda a, b: a != b,
    "and": lambda *xs: all(xs),
    "or": lambda *xs: any(xs),
    "sum": lambda *xs: sum(xs),
    "difference": lambda a, b: a - b,
    "product": lambda *xs: reduce(operator.mul, xs, 1),
    "max": lambda *xs: max(xs),
    "min": lambda *xs: min(xs),
}

#: every key of the ``[task]`` table and what it means (``docs/cli.md`` lists the same)
TASK_KEYS = {
    "template": "the prompt, a str.format template over the fields (required)",
    "variables": "table: each input variable's list of values (required)",
    "mechanisms": "table of tables: each computed variable's parents and map / rows / op / python (and optional values)",
    "answers": "table: each output value's answer text, one token (required)",
    "output": "the variable whose value the model answers (default: the causal model's only output)",
    "intervene": "the variable, or list of variables, DAS aligns (default: the only computed variable that is not the output)",
    "fields": "table: template field -> variable (default: the field's name in capitals)",
    "positions": "table: extra named positions, an int (real-token index) or '{field}' (default: last and one per field)",
    "test_values": "table: held-out values of input variables; the test split draws only these, training never sees them",
    "n_train": "training counterfactuals (default 128)",
    "n_test": "held-out counterfactuals (default 64)",
    "seed": "seed of the counterfactual draws (default: the experiment's seed)",
    "min_accuracy": "steerlab validate fails when the model answers fewer inputs correctly (default 0.8)",
    "name": "a name for the task (default: the experiment's name)",
}


class PromptTask:
    """A concept as a causal model over prompts (see the module docstring).

    Args:
        template: ``str.format`` template over the fields, e.g. ``"{name} was tired, so"``.
        variables: each *input* variable's values.
        mechanisms: each computed variable: ``(parents, function)``; the function takes the
            parents' values in order. Values of computed variables are read off by running the
            function on every parent combination (or give ``values``).
        answers: output value -> its answer text (a single token for the model's tokenizer).
        output: the answered variable (default: the causal model's only output).
        intervene: what DAS aligns (default: the only computed variable other than the output).
        fields: template field -> variable (default: the field name in capitals).
        positions: extra named positions (``last`` and one per field are always there).
        test_values: held-out input values; the test split draws only these.
        values: value sets of computed variables, where given explicitly.
        n_train: training counterfactuals :meth:`datasets` draws by default.
        n_test: held-out counterfactuals by default.
        seed: the counterfactual draws' seed by default.
        min_accuracy: the task accuracy below which an experiment refuses to run.
        name: used in messages and reprs.
    """

    def __init__(
        self,
        *,
        template: str,
        variables: Mapping[str, Sequence[Any]],
        mechanisms: Mapping[str, tuple[Sequence[str], Callable[..., Any]]],
        answers: Mapping[Any, str],
        output: str | None = None,
        intervene: str | Sequence[str] | None = None,
        fields: Mapping[str, str] | None = None,
        positions: Mapping[str, int | str] | None = None,
        test_values: Mapping[str, Sequence[Any]] | None = None,
        values: Mapping[str, Sequence[Any]] | None = None,
        n_train: int = 128,
        n_test: int = 64,
        seed: int = 0,
        min_accuracy: float = 0.8,
        name: str = "prompt task",
    ):
        self.name, self.template = name, _template(template)
        self.field_names = [f for _, f, _, _ in string.Formatter().parse(template) if f]
        self.fields = _fields(self.field_names, fields, variables, mechanisms)
        all_values = {k: list(v) for k, v in variables.items()}
        parents = {v: list(p) for v, (p, _) in mechanisms.items()}
        funcs = {v: f for v, (_, f) in mechanisms.items()}
        for v in _order(parents, set(variables)):
            all_values[v] = list((values or {}).get(v) or _range_of(v, parents[v], funcs[v], all_values))
        self.causal_model = CausalModel(all_values, parents, funcs, outputs=[output] if output else None, name=name)
        self.output = self.causal_model.outputs[0] if output is None else output
        if len(self.causal_model.outputs) != 1 and output is None:
            raise ConfigError(f"task {name!r} has outputs {list(self.causal_model.outputs)}; say which one the model answers with output=")
        self.answers = _answers(answers, self.causal_model.values[self.output], self.output)
        self.intervene = _intervene(intervene, self.causal_model, self.output)
        self.test_values = _test_values(test_values or {}, self.causal_model)
        self.positions = {"last": -1, **{f: "{" + f + "}" for f in dict.fromkeys(self.field_names)}, **dict(positions or {})}
        self.n_train, self.n_test, self.seed, self.min_accuracy = n_train, n_test, seed, min_accuracy
        self.variables = tuple(self.intervene)
        self._encoders: dict[int, PromptEncoder] = {}

    # -- data -------------------------------------------------------------------------------------------
    def sampler(self, split: str = "train") -> Callable[[random.Random], dict[str, Any]]:
        """Draws of the input variables for ``split``: held-out values only in ``"test"``, never in ``"train"``."""
        if split not in ("train", "test"):
            raise ConfigError(f"split={split!r}: expected 'train' or 'test'")
        cm = self.causal_model
        pools = {}
        for v in cm.inputs:
            held = self.test_values.get(v)
            if held is None:
                pools[v] = list(cm.values[v])
            else:
                pools[v] = [x for x in cm.values[v] if (x in held) == (split == "test")]

        def draw(rng: random.Random) -> dict[str, Any]:
            return {v: rng.choice(pools[v]) for v in cm.inputs}

        return draw

    def encoder(self, tokenizer) -> PromptEncoder:
        """The prompt encoder for ``tokenizer`` (checks that every answer is one token)."""
        key = id(tokenizer)
        if key not in self._encoders:
            fields = self.fields
            self._encoders[key] = PromptEncoder(
                tokenizer, self.template, self.answers, positions=self.positions,
                fields=lambda s: {f: s[v] for f, v in fields.items()},
            )
        return self._encoders[key]

    def counterfactuals(self, n: int, tokenizer, *, split: str = "train", seed: int | None = None) -> CounterfactualDataset:
        """``n`` label-balanced counterfactuals interchanging :attr:`intervene` (inputs from ``split``)."""
        return CounterfactualDataset.sample(
            self.causal_model, self.encoder(tokenizer), n, intervene=list(self.intervene), seed=self.seed if seed is None else seed,
            sampler=self.sampler(split), output=self.output,
        )

    def datasets(self, lab, *, n_train: int | None = None, n_test: int | None = None, seed: int | None = None, intervene=None):
        """``(train, test)`` for ``lab``'s tokenizer; the test split uses the held-out values."""
        if intervene is not None and list([intervene] if isinstance(intervene, str) else intervene) != list(self.intervene):
            raise ConfigError(f"intervene={intervene!r}: this task aligns {list(self.intervene)}")
        seed = self.seed if seed is None else seed
        tok = getattr(lab, "tokenizer", lab)
        return (self.counterfactuals(n_train or self.n_train, tok, split="train", seed=seed),
                self.counterfactuals(n_test or self.n_test, tok, split="test", seed=seed + 1))

    def inputs(self, split: str | None = None, *, limit: int = 512, seed: int = 0) -> list[dict[str, Any]]:
        """Input settings of ``split`` (``None``: all): every one when there are at most ``limit``, else a seeded sample."""
        cm = self.causal_model
        pools = [[x for x in cm.values[v] if split is None or v not in self.test_values or (x in self.test_values[v]) == (split == "test")]
                 for v in cm.inputs]
        total = 1
        for p in pools:
            total *= len(p)
        if total <= limit:
            return [dict(zip(cm.inputs, combo)) for combo in itertools.product(*pools)]
        rng = random.Random(seed)
        return [{v: rng.choice(p) for v, p in zip(cm.inputs, pools)} for _ in range(limit)]

    def accuracy(self, lab, *, split: str | None = None, limit: int = 512, batch_size: int = 64) -> tuple[float, list[dict[str, Any]]]:
        """The fraction of inputs whose highest-scoring answer is the causal model's output, and the wrong ones."""
        import torch

        enc = self.encoder(lab.tokenizer)
        settings = self.inputs(split, limit=limit)
        wrong, right = [], 0
        for a in range(0, len(settings), batch_size):
            chunk = settings[a : a + batch_size]
            batch = {k: v.to(lab.device) for k, v in enc.encode(chunk).items()}
            with torch.no_grad():
                scores = enc.scores(lab.model(**batch, **enc.model_kwargs()))
            for s, pred in zip(chunk, scores.argmax(-1).tolist(), strict=True):
                want = self.causal_model.run(s)[self.output]
                got = enc.labels[pred]
                if got == want:
                    right += 1
                else:
                    wrong.append({"prompt": enc.text(s), "expected": self.answers[want], "answered": self.answers[got]})
        return right / max(len(settings), 1), wrong

    # -- description ---------------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """The task as plain data (what its content hash is taken over)."""
        cm = self.causal_model
        return {
            "name": self.name, "template": self.template, "fields": self.fields, "positions": self.positions,
            "variables": {v: [_jsonable(x) for x in cm.values[v]] for v in cm.variables},
            "parents": {v: list(p) for v, p in cm.parents.items() if p}, "output": self.output, "intervene": list(self.intervene),
            "answers": {str(k): v for k, v in self.answers.items()},
            "test_values": {v: [_jsonable(x) for x in xs] for v, xs in self.test_values.items()},
            # the mechanisms as their full tables: two tasks with equal tables compute the same thing
            "mechanisms": {v: [[*map(_jsonable, combo), _jsonable(out)] for combo, out in _table(cm, v)] for v in cm.variables if cm.parents[v]},
        }

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode()).hexdigest()

    def __repr__(self) -> str:
        cm = self.causal_model
        return (f"PromptTask({self.name!r}: {self.template!r}, inputs {list(cm.inputs)}, aligns {list(self.intervene)}, "
                f"answers {dict(self.answers)})")


def _jsonable(x: Any) -> Any:
    return x if isinstance(x, (str, int, float, bool)) or x is None else repr(x)


def _table(cm: CausalModel, v: str):
    combos = itertools.product(*(cm.values[p] for p in cm.parents[v]))
    return [(c, cm.mechanisms[v](*c)) for c in itertools.islice(combos, 4096)]


def _template(template: Any) -> str:
    if not isinstance(template, str) or not template:
        raise ConfigError(f"template={template!r}: expected a prompt text with {{field}} slots, e.g. '{{name}} was tired, so'")
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ConfigError(f"template {template!r} is not a str.format template: {e}") from None
    if not any(f for _, f, _, _ in parts):
        raise ConfigError(f"template {template!r} has no {{field}}: nothing in the prompt would depend on the variables")
    return template


def _fields(names: list[str], fields, variables, mechanisms) -> dict[str, str]:
    known = set(variables) | set(mechanisms)
    out = {}
    for f in dict.fromkeys(names):
        v = (fields or {}).get(f, f.upper())
        if v not in known:
            raise ConfigError(f"template field {{{f}}} has no variable: expected a variable {v!r} or an entry fields.{f} = \"VARIABLE\" "
                              f"(variables: {sorted(known)})")
        out[f] = v
    extra = sorted(set(fields or {}) - set(names))
    if extra:
        raise ConfigError(f"fields names {extra}, which are not fields of the template (its fields: {sorted(set(names))})")
    return out


def _order(parents: dict[str, list[str]], inputs: set[str]) -> list[str]:
    """Computed variables in an order where every parent's values are known first."""
    done, out = set(inputs), []
    todo = dict(parents)
    while todo:
        ready = [v for v, ps in todo.items() if all(p in done for p in ps)]
        if not ready:
            unknown = sorted({p for ps in todo.values() for p in ps} - done - set(todo))
            raise ConfigError(f"mechanisms {sorted(todo)} read {unknown or 'each other in a cycle'}: every parent must be an input "
                              "variable or another computed variable")
        for v in ready:
            out.append(v)
            done.add(v)
            del todo[v]
    return out


def _range_of(v: str, parents: list[str], fn, values: dict[str, list]) -> list:
    seen: dict[Any, None] = {}
    for combo in itertools.product(*(values[p] for p in parents)):
        try:
            seen[fn(*combo)] = None
        except Exception as e:
            raise ConfigError(f"the mechanism of {v!r} raised {type(e).__name__}: {e} on {dict(zip(parents, combo))}") from e
    return list(seen)


def _answers(answers: Mapping[Any, str], values: Sequence[Any], output: str) -> dict[Any, str]:
    if not isinstance(answers, Mapping) or not answers:
        raise ConfigError(f"answers: expected a table giving each value of {output!r} its answer token; its values are {list(values)}")
    by_text = {str(v): v for v in values}
    out = {}
    for k, text in answers.items():
        value = k if k in values else by_text.get(str(k))
        if value is None:
            raise ConfigError(f"answers gives {k!r}, which is not a value of {output!r} (its values: {list(values)})")
        if not isinstance(text, str) or not text:
            raise ConfigError(f"answers.{k} = {text!r}: expected the answer's text, e.g. ' {k}' (with its leading space)")
        out[value] = text
    missing = [v for v in values if v not in out]
    if missing:
        raise ConfigError(f"answers has no answer for {missing} of {output!r}: every value the model may answer needs its token")
    return out


def _intervene(intervene, cm: CausalModel, output: str) -> tuple[str, ...]:
    if intervene is None:
        hidden = [v for v in cm.variables if cm.parents[v] and v != output]
        if len(hidden) != 1:
            raise ConfigError(f"say which variable DAS aligns with intervene = \"...\" (computed variables: {hidden or 'none but the output'})")
        return (hidden[0],)
    names = [intervene] if isinstance(intervene, str) else list(intervene)
    for v in names:
        if v not in cm.values:
            raise ConfigError(f"intervene names {v!r}, which is not a variable (variables: {list(cm.variables)})")
    return tuple(names)


def _test_values(test_values: Mapping[str, Sequence[Any]], cm: CausalModel) -> dict[str, list]:
    out = {}
    for v, xs in test_values.items():
        if v not in cm.inputs:
            raise ConfigError(f"test_values.{v}: {v!r} is not an input variable (inputs: {list(cm.inputs)})")
        held = list(xs)
        bad = [x for x in held if x not in cm.values[v]]
        if bad:
            raise ConfigError(f"test_values.{v} holds {bad}, which are not values of {v!r}")
        if not held or len(held) == len(cm.values[v]):
            raise ConfigError(f"test_values.{v} must hold some but not all of its {len(cm.values[v])} values (training needs the rest)")
        out[v] = held
    return out


# -- from an experiment file -----------------------------------------------------------------------------------


def task_from_table(table: Mapping[str, Any], *, base: Path = Path("."), where: str = "[task]", allow_code: bool = False,
                    defaults: Mapping[str, Any] | None = None) -> PromptTask:
    """A :class:`PromptTask` from an experiment file's ``[task]`` table (see the module docstring).

    ``python = "file.py:function"`` mechanisms import that file (relative to ``base``) only with
    ``allow_code=True``; otherwise they are a :class:`ConfigError` naming the flag.
    """
    unknown = sorted(set(table) - set(TASK_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; known: {', '.join(sorted(TASK_KEYS))}")
    for key in ("template", "variables", "answers"):
        if key not in table:
            raise ConfigError(f"{where} has no {key!r}: {TASK_KEYS[key]}")
    variables = _mapping(table["variables"], f"{where}.variables")
    for v, xs in variables.items():
        if not isinstance(xs, list) or not xs:
            raise ConfigError(f"{where}.variables.{v} = {xs!r}: expected a non-empty list of values")
    mechanisms, values = {}, {}
    for v, spec in _mapping(table.get("mechanisms", {}), f"{where}.mechanisms").items():
        mechanisms[v] = _mechanism(v, _mapping(spec, f"{where}.mechanisms.{v}"), f"{where}.mechanisms.{v}", base, allow_code)
        if "values" in spec:
            values[v] = list(spec["values"])
    if not mechanisms:
        raise ConfigError(f"{where} has no [task.mechanisms]: a concept is a variable computed from the inputs (e.g. GENDER from NAME)")
    d = dict(defaults or {})
    kwargs = {k: table[k] for k in ("output", "intervene", "n_train", "n_test", "seed", "min_accuracy", "name") if k in table}
    for k in ("n_train", "n_test", "seed"):
        if k in kwargs and (not isinstance(kwargs[k], int) or isinstance(kwargs[k], bool) or kwargs[k] < (0 if k == "seed" else 1)):
            raise ConfigError(f"{where}.{k} = {kwargs[k]!r}: expected a {'non-negative' if k == 'seed' else 'positive'} integer")
    if "min_accuracy" in kwargs and not (isinstance(kwargs["min_accuracy"], (int, float)) and 0 <= kwargs["min_accuracy"] <= 1):
        raise ConfigError(f"{where}.min_accuracy = {kwargs['min_accuracy']!r}: expected a fraction in [0, 1]")
    try:
        return PromptTask(
            template=table["template"], variables=variables, mechanisms=mechanisms, answers=_mapping(table["answers"], f"{where}.answers"),
            fields=table.get("fields"), positions=table.get("positions"), test_values=table.get("test_values"), values=values,
            **{**{k: d[k] for k in ("seed", "name") if k in d}, **kwargs},
        )
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except Exception as e:  # CausalModelError and friends: name the table
        raise ConfigError(f"{where}: {e}") from None


def _mapping(x: Any, where: str) -> dict:
    if not isinstance(x, Mapping):
        raise ConfigError(f"{where}: expected a table; got {type(x).__name__} {x!r:.60}")
    return dict(x)


_MECH_KEYS = {"parents", "map", "rows", "op", "python", "values"}


def _mechanism(v: str, spec: dict, where: str, base: Path, allow_code: bool) -> tuple[list[str], Callable[..., Any]]:
    unknown = sorted(set(spec) - _MECH_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; known: {', '.join(sorted(_MECH_KEYS))}")
    parents = spec.get("parents")
    if not isinstance(parents, list) or not parents or not all(isinstance(p, str) for p in parents):
        raise ConfigError(f"{where}.parents = {parents!r}: expected a list of variable names, e.g. parents = [\"NAME\"]")
    kinds = [k for k in ("map", "rows", "op", "python") if k in spec]
    if len(kinds) != 1:
        raise ConfigError(f"{where}: give exactly one of map, rows, op or python (got {kinds or 'none'})")
    kind = kinds[0]
    if kind == "map":
        if len(parents) != 1:
            raise ConfigError(f"{where}: map takes one parent (got {parents}); with several use rows = [[a, b, value], ...]")
        table = _mapping(spec["map"], f"{where}.map")

        def by_map(x, table=table):
            key = str(x).lower() if isinstance(x, bool) else str(x)
            if key not in table:
                raise KeyError(f"{where}.map has no entry for {parents[0]} = {x!r}")
            return table[key]

        return parents, by_map
    if kind == "rows":
        rows = spec["rows"]
        if not isinstance(rows, list) or not all(isinstance(r, list) and len(r) == len(parents) + 1 for r in rows):
            raise ConfigError(f"{where}.rows: expected a list of rows [{', '.join(parents)}, value]")
        lookup = {tuple(r[:-1]): r[-1] for r in rows}

        def by_rows(*xs, lookup=lookup):
            if xs not in lookup:
                raise KeyError(f"{where}.rows has no row for {dict(zip(parents, xs))}")
            return lookup[xs]

        return parents, by_rows
    if kind == "op":
        if spec["op"] not in OPS:
            raise ConfigError(f"{where}.op = {spec['op']!r}: expected one of {', '.join(OPS)}")
        return parents, OPS[spec["op"]]
    return parents, _imported(spec["python"], where, base, allow_code)


def _imported(ref: Any, where: str, base: Path, allow_code: bool) -> Callable[..., Any]:
    if not isinstance(ref, str) or ref.count(":") != 1:
        raise ConfigError(f"{where}.python = {ref!r}: expected \"file.py:function\"")
    file, func = ref.split(":")
    path = (base / file).resolve()
    if not allow_code:
        raise ConfigError(f"{where} imports code from {str(path)!r} (python = {ref!r}); an experiment file runs no code unless you "
                          "pass --allow-code (from Python: allow_code=True)")
    if not path.is_file():
        raise ConfigError(f"{where}.python: {str(path)!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"steerlab_experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fn = getattr(module, func, None)
    if not callable(fn):
        raise ConfigError(f"{where}.python: {path.name} has no function {func!r}")
    return fn
