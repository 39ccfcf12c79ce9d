"""Experiments as files: one TOML file, one table per step, every input hashed beside the results.

An experiment file has a ``[model]`` table, a ``[task]`` table (see :mod:`steerlab.experiment.task`)
and one table per step to run: ``[patch]``, ``[das]``, ``[search]``, ``[train]`` ship with
steerlab; each lives in its own module under ``steerlab/experiment/steps/`` and adds itself with
one :func:`register_step` call, so a new table is a new file, not an edit of a dispatcher.

``Experiment.validate()`` checks the file (every table, before any model loads), then loads the
model, measures its accuracy on the task and returns the plan; ``Experiment.run(out)`` executes
every step present in order and writes to ``out``:

* ``experiment.toml`` — the file as given (or the tables, for an experiment built in Python);
* ``manifest.json`` — steerlab's version, each step's summary, and a SHA-256 of every input:
  the file, the model's files, the task's full definition (tables of every mechanism), the
  counterfactual datasets, data files and imported code;
* per step, its saved result (the one file format) and figures; ``report.html`` with them all.

Old ``steerlab train`` run files (top-level ``model = "..."`` with ``[reft]``, ``[data]``,
``[train]``) are accepted and read as an experiment with one ``[train]`` step.
"""

from __future__ import annotations

import datetime
import difflib
import hashlib
import importlib
import json
import pkgutil
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steerlab.experiment.task import PromptTask, task_from_table
from steerlab.interventions.errors import ConfigError, checked_first, flag

__all__ = ["Experiment", "Step", "StepOutput", "Context", "register_step", "registered_steps", "Plan", "RunResult", "MODEL_KEYS", "TOP_KEYS"]

MANIFEST = "manifest.json"
MODEL_KEYS = {
    "name": "embedded name (smollm2-135m, minilm-l6), local model folder or hub id (required)",
    "dtype": "float32 (default), bfloat16 or float16",
    "device": "torch device, e.g. cpu or cuda:0 (default: cpu)",
}
TOP_KEYS = {
    "name": "the experiment's name (default: the file's stem)",
    "output_dir": "where steerlab run writes (relative to the file; default runs/<name>)",
    "seed": "seed of every step that draws or trains (default 0)",
    "model": "table: the model",
    "task": "table: the concept (template, variables, mechanisms, answers, ...)",
}


@dataclass
class StepOutput:
    """What a step produced: a summary (JSON), figures for the report, files it wrote, text for the console."""

    summary: dict[str, Any]
    figures: dict[str, Any] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    text: str = ""
    result: Any = None
    inputs: dict[str, str] = field(default_factory=dict)  # extra hashed inputs: name -> sha256


@dataclass
class Step:
    """One table of the file.

    ``parse(table, ctx) -> config`` validates the table (no model yet; raise
    :class:`ConfigError`); ``plan(config) -> str`` says in one line what will run;
    ``run(config, ctx) -> StepOutput`` does it. ``order`` sorts the steps (patch 10, das 20,
    search 30, train 40); ``needs_task`` / ``needs_lab`` say what the context must provide;
    ``keys`` documents every key of the table (unknown keys are refused with the list).
    """

    name: str
    parse: Callable[[dict, Context], Any]
    run: Callable[[Any, Context], StepOutput]
    plan: Callable[[Any], str]
    keys: dict[str, str]
    order: int = 50
    needs_task: bool = True
    needs_lab: bool = True
    doc: str = ""


_STEPS: dict[str, Step] = {}


def register_step(step: Step) -> Step:
    """Add a table to the experiment format (one call per step module)."""
    if step.name in TOP_KEYS:
        raise ConfigError(f"step name {step.name!r} is taken by a top-level key")
    _STEPS[step.name] = step
    return step


def registered_steps() -> dict[str, Step]:
    """Every registered step, in run order (the modules in ``steerlab/experiment/steps/`` are imported first)."""
    pkg = importlib.import_module("steerlab.experiment.steps")
    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{pkg.__name__}.{info.name}")
    return dict(sorted(_STEPS.items(), key=lambda kv: (kv[1].order, kv[0])))


@dataclass
class Context:
    """What steps share: the experiment's settings, and (during a run) the model, the data and earlier outputs."""

    experiment: Experiment
    out: Path | None = None
    log: Callable[[str], None] = print
    lab: Any = None
    outputs: dict[str, StepOutput] = field(default_factory=dict)
    _datasets: tuple | None = None

    @property
    def task(self) -> PromptTask:
        return self.experiment.task

    @property
    def seed(self) -> int:
        return self.experiment.seed

    @property
    def base(self) -> Path:
        return self.experiment.base

    def datasets(self):
        """``(train, test)`` counterfactuals of the task, drawn once per run (every step sees the same)."""
        if self._datasets is None:
            self._datasets = self.task.datasets(self.lab)
        return self._datasets


@dataclass
class Plan:
    """What :meth:`Experiment.validate` found: the task's accuracy and one line per step."""

    experiment: str
    model: str
    steps: list[tuple[str, str]]
    accuracy: float | None = None
    wrong: list[dict[str, Any]] = field(default_factory=list)
    task: str | None = None

    def __str__(self) -> str:
        lines = [f"experiment {self.experiment!r} on {self.model}"]
        if self.task:
            lines.append(f"task: {self.task}")
        if self.accuracy is not None:
            lines.append(f"the model answers {100 * self.accuracy:.1f}% of the task's inputs correctly")
            lines += [f"  wrong: {w['prompt']!r} -> {w['answered']!r} (expected {w['expected']!r})" for w in self.wrong[:5]]
        lines.append("plan:")
        lines += [f"  [{name}] {line}" for name, line in self.steps]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"experiment": self.experiment, "model": self.model, "task": self.task, "accuracy": self.accuracy,
                "wrong": self.wrong, "steps": [{"step": n, "plan": p} for n, p in self.steps]}


@dataclass
class RunResult:
    """What :meth:`Experiment.run` did: each step's output, the manifest and where everything is."""

    out: Path
    outputs: dict[str, StepOutput]
    manifest: dict[str, Any]
    report: Path | None

    def __getitem__(self, step: str) -> StepOutput:
        return self.outputs[step]


class Experiment:
    """An experiment: the model, the task and the step tables (see the module docstring).

    Build from a file with :meth:`from_toml`, or in Python::

        Experiment(model="smollm2-135m", task=PromptTask(...), das={"layer": 20, "size": 2})

    where each step is given as its table (a dict, exactly as in the file).
    """

    def __init__(self, *, model: str | Mapping[str, Any], task: PromptTask | Mapping[str, Any] | None = None,
                 name: str = "experiment", seed: int = 0, output_dir: str | Path | None = None, base: str | Path = ".",
                 allow_code: bool = False, source: str | None = None, where: str = "the experiment", **tables: Mapping[str, Any]):
        self.name, self.seed, self.base, self.where = name, _int(seed, "seed", where), Path(base), where
        self.source, self.allow_code, self.code_files = source, allow_code, []
        self.model = _model(model, where)
        self.output_dir = self.base / output_dir if output_dir is not None else self.base / "runs" / name
        known = registered_steps()
        for t in tables:
            if t not in known:
                close = difflib.get_close_matches(t, list(known) + list(TOP_KEYS), n=1)
                raise ConfigError(f"{where}: unknown table [{t}]{f'; did you mean [{close[0]}]' if close else ''}; "
                                  f"known: {', '.join(f'[{k}]' for k in [*TOP_KEYS, *known] if k not in ('name', 'seed', 'output_dir'))}")
        if isinstance(task, PromptTask) or task is None:
            self.task = task
        else:
            self.task = task_from_table(_table(task, f"{where} [task]"), base=self.base, where=f"{where} [task]", allow_code=allow_code,
                                        defaults={"seed": self.seed, "name": name})
            self.code_files = [self.base / m["python"].split(":")[0] for m in dict(task).get("mechanisms", {}).values()
                               if isinstance(m, Mapping) and "python" in m]
        if not tables:
            raise ConfigError(f"{where} has no step to run: add one of {', '.join(f'[{k}]' for k in known)}")
        self.configs: dict[str, Any] = {}
        ctx = Context(self)
        for name_, step in known.items():
            if name_ not in tables:
                continue
            if step.needs_task and self.task is None:
                raise ConfigError(f"{where}: the [{name_}] step needs a [task] table (the concept: template, variables, mechanisms, answers)")
            table = _table(tables[name_], f"{where} [{name_}]")
            unknown = sorted(set(table) - set(step.keys))
            if unknown:
                raise ConfigError(f"{where} [{name_}]: unknown key {unknown[0]!r}; known: {', '.join(sorted(step.keys))}")
            self.configs[name_] = step.parse(table, ctx)
        self.tables = {k: dict(v) for k, v in tables.items()}

    # -- construction from a file -------------------------------------------------------------------------------
    @classmethod
    @checked_first(allow_code=flag("allow_code"))  # allow_code="false" must not read as True
    def from_toml(cls, path: str | Path, *, allow_code: bool = False, output_dir: str | Path | None = None) -> Experiment:
        """Read and check an experiment file (or an old ``steerlab train`` run file)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"experiment file {str(path)!r} does not exist (expected a TOML file; see docs/cli.md)")
        text = path.read_text()
        try:
            raw = tomllib.loads(text)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid TOML: {e}") from None
        return cls.from_dict(raw, base=path.parent, where=str(path), name=path.stem, allow_code=allow_code, source=text,
                             output_dir=output_dir)

    @classmethod
    @checked_first(allow_code=flag("allow_code"))
    def from_dict(cls, raw: Mapping[str, Any], *, base: str | Path = ".", where: str = "the experiment", name: str = "experiment",
                  allow_code: bool = False, source: str | None = None, output_dir: str | Path | None = None) -> Experiment:
        raw = _upgrade_run_file(dict(raw))
        if "model" not in raw:
            raise ConfigError(f"{where} has no [model] table: expected [model] with name = \"smollm2-135m\" (or a folder or hub id)")
        top = {k: raw.pop(k) for k in ("name", "seed", "output_dir") if k in raw}
        if output_dir is not None:
            top["output_dir"] = Path(output_dir).absolute()
        return cls(model=raw.pop("model"), task=raw.pop("task", None), name=top.get("name", name), seed=top.get("seed", 0),
                   output_dir=top.get("output_dir"), base=base, allow_code=allow_code, source=source, where=where, **raw)

    # -- validate / run ---------------------------------------------------------------------------------------------
    def plan(self) -> list[tuple[str, str]]:
        known = registered_steps()
        return [(n, known[n].plan(c)) for n, c in self.configs.items()]

    def _load_lab(self):
        import torch

        import steerlab as sl

        from transformers.utils import logging as hf_logging

        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a weight-loading bar per run is noise
        try:
            model, tok = sl.load(self.model["name"], dtype=getattr(torch, self.model.get("dtype", "float32")), device=self.model.get("device"))
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        return sl.wrap(model, tok)

    def validate(self, *, check_model: bool = True) -> Plan:
        """The plan; with ``check_model``, load the model and measure its accuracy on the task's inputs."""
        plan = Plan(self.name, self.model["name"], self.plan(), task=repr(self.task) if self.task is not None else None)
        if check_model and self.task is not None:
            lab = self._load_lab()
            try:
                self.task.encoder(lab.tokenizer)  # every answer is one token for this tokenizer
                plan.accuracy, plan.wrong = self.task.accuracy(lab)
            finally:
                lab.unwrap()
        return plan

    def check_accuracy(self, plan: Plan) -> None:
        """Raise if the model does the task less often than ``[task] min_accuracy`` (an alignment of a task the model cannot do is noise)."""
        if plan.accuracy is not None and plan.accuracy < self.task.min_accuracy:
            raise ConfigError(f"the model answers only {100 * plan.accuracy:.1f}% of the task's inputs correctly, below "
                              f"min_accuracy = {self.task.min_accuracy}: fix the template or the answers (or lower min_accuracy)")

    @checked_first(overwrite=flag("overwrite"))
    def run(self, out: str | Path | None = None, *, log: Callable[[str], None] = print, overwrite: bool = False) -> RunResult:
        """Execute every step in order; write results, figures, the report and the manifest to ``out``."""
        out = Path(out) if out is not None else self.output_dir
        if (out / MANIFEST).exists() and not overwrite:
            raise ConfigError(f"{out} already holds a run ({MANIFEST}); choose another output_dir or pass --overwrite")
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        ctx = Context(self, out=out, log=log)
        known = registered_steps()
        needs_lab = any(known[n].needs_lab for n in self.configs)
        if needs_lab:
            ctx.lab = self._load_lab()
        try:
            if self.task is not None and ctx.lab is not None:
                acc, _ = self.task.accuracy(ctx.lab)
                log(f"[task] {self.task!r}: the model answers {100 * acc:.1f}% of its inputs correctly")
                self.check_accuracy(Plan(self.name, self.model["name"], [], accuracy=acc))
            for name in self.configs:
                log(f"[{name}] {known[name].plan(self.configs[name])}")
                ts = time.perf_counter()
                ctx.outputs[name] = known[name].run(self.configs[name], ctx)
                ctx.outputs[name].summary.setdefault("seconds", round(time.perf_counter() - ts, 2))
                if ctx.outputs[name].text:
                    log(ctx.outputs[name].text)
        finally:
            if ctx.lab is not None:
                ctx.lab.unwrap()
        manifest = self._manifest(ctx, time.perf_counter() - t0)
        report = _report(self, ctx, out)
        _write_json(out / MANIFEST, manifest)
        log(f"wrote {out} ({MANIFEST}, report.html, {', '.join(n for n in ctx.outputs)})")
        return RunResult(out, ctx.outputs, manifest, report)

    # -- provenance --------------------------------------------------------------------------------------------------
    def _manifest(self, ctx: Context, seconds: float) -> dict[str, Any]:
        import steerlab

        source = self.source if self.source is not None else _toml_of(self)
        (ctx.out / "experiment.toml").write_text(source)
        inputs: dict[str, Any] = {"experiment.toml": _sha(source.encode())}
        if ctx.lab is not None or any(s for s in self.configs):
            inputs["model"] = model_hash(self.model["name"])
        if self.task is not None:
            inputs["task"] = self.task.sha256()
        if ctx._datasets is not None:
            inputs["counterfactuals"] = {k: dataset_hash(d) for k, d in zip(("train", "test"), ctx._datasets)}
        for f in self.code_files:
            inputs[f"code:{f.name}"] = _sha(f.read_bytes())
        for o in ctx.outputs.values():
            inputs.update(o.inputs)
        return {
            "format": 1, "steerlab": steerlab.__version__, "experiment": self.name,
            "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "seconds": round(seconds, 2),
            "model": self.model, "inputs": inputs, "steps": {n: o.summary for n, o in ctx.outputs.items()},
        }


# -- helpers ---------------------------------------------------------------------------------------------------------


def _int(x: Any, name: str, where: str) -> int:
    if not isinstance(x, int) or isinstance(x, bool):
        raise ConfigError(f"{where}: {name} = {x!r}; expected an integer")
    return x


def _table(x: Any, where: str) -> dict:
    if not isinstance(x, Mapping):
        raise ConfigError(f"{where}: expected a table; got {type(x).__name__} {x!r:.60}")
    return dict(x)


def _model(model: Any, where: str) -> dict[str, Any]:
    table = {"name": model} if isinstance(model, str) else _table(model, f"{where} [model]")
    unknown = sorted(set(table) - set(MODEL_KEYS))
    if unknown:
        raise ConfigError(f"{where} [model]: unknown key {unknown[0]!r}; known: {', '.join(sorted(MODEL_KEYS))}")
    if not isinstance(table.get("name"), str) or not table["name"]:
        raise ConfigError(f"{where} [model] has no name: expected name = \"smollm2-135m\" (an embedded name, a local folder or a hub id)")
    if table.get("dtype", "float32") not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"{where} [model] dtype = {table['dtype']!r}: expected float32, bfloat16 or float16")
    return table


def _upgrade_run_file(raw: dict) -> dict:
    """An old ``steerlab train`` run file (``model = "..."``, ``[reft]``, ``[data]``, ``[train]``) as an experiment."""
    if not (isinstance(raw.get("model"), str) and "reft" in raw):
        return raw
    new = {"model": {"name": raw.pop("model"), **{k: raw.pop(k) for k in ("dtype", "device") if k in raw}}}
    train = dict(raw.pop("train", {}))
    train["reft"], train["data"] = raw.pop("reft"), raw.pop("data", {})
    if "output_dir" in raw:
        new["output_dir"] = raw.pop("output_dir")
    new["train"] = train
    new.update(raw)
    return new


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_hash(name: str) -> dict[str, Any]:
    """SHA-256 of every file of the model's folder (embedded: the converted copy), or the hub id where there is no folder."""
    from steerlab.models import EMBEDDED, embedded_path

    folder = embedded_path(name) if name in EMBEDDED else Path(name)
    if not folder.is_dir():
        return {"name": name, "hub_id": name}
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    return {"name": name, "files": {str(p.relative_to(folder)): file_sha(p) for p in files}}


def dataset_hash(ds) -> str:
    """SHA-256 of a counterfactual dataset's examples (bases, sources, labels) as canonical JSON."""
    rows = [{"base": ex.base, "sources": ex.sources, "label": ex.label} for ex in ds.examples]
    return _sha(json.dumps(rows, sort_keys=True, default=repr).encode())


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=_json_default) + "\n")
    tmp.replace(path)


def _json_default(x: Any) -> Any:
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "tolist"):
        return x.tolist()
    return repr(x)


def _toml_of(exp: Experiment) -> str:
    """The tables of an experiment built in Python, as TOML (the task as its resolved definition)."""
    lines = [f"# built in Python; the task's mechanisms are stored as their full tables in {MANIFEST}'s task hash",
             f"name = {json.dumps(exp.name)}", f"seed = {exp.seed}", "", "[model]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in exp.model.items()]
    if exp.task is not None:
        lines += ["", "# [task] (from Python)", *(f"# {line}" for line in json.dumps(exp.task.describe(), indent=1).splitlines())]
    for name, table in exp.tables.items():
        lines += ["", f"[{name}]"]
        lines += [f"{k} = {json.dumps(v, default=str)}" for k, v in table.items() if not isinstance(v, Mapping)]
        for k, v in table.items():
            if isinstance(v, Mapping):
                lines += ["", f"[{name}.{k}]", *(f"{kk} = {json.dumps(vv, default=str)}" for kk, vv in v.items())]
    return "\n".join(lines) + "\n"


def _report(exp: Experiment, ctx: Context, out: Path) -> Path | None:
    figures = [(f"{name}: {title}", fig) for name, o in ctx.outputs.items() for title, fig in o.figures.items()]
    if not figures:
        return None
    from steerlab.viz import report

    sections = [(heading, [fig]) for heading, fig in figures]
    summary = [{"step": n, **{k: v for k, v in o.summary.items() if isinstance(v, (int, float, str, bool))}} for n, o in ctx.outputs.items()]
    intro = f"Experiment {exp.name!r} on {exp.model['name']}." + (f" Task: {exp.task!r}." if exp.task is not None else "")
    return report([], out / "report.html", title=f"steerlab experiment: {exp.name}", intro=intro,
                  sections=[("summary", [summary])] + sections)
