"""Interventions and run graphs to and from the one file format.

Each intervention is recorded as its registered type name, its placement
(site and units), its type-specific constructor arguments and its width;
its parameters and buffers go to the weights file under ``"<index>.<name>"``
with their dtypes. Loading looks the type up in the registry (never a
string import), builds it for the recorded width and assigns each tensor
with its saved dtype, so a bf16 ``W`` stays bf16 and an fp32 ``R`` fp32.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from steerlab.interventions import fileformat
from steerlab.interventions.errors import FileFormatError, NotSerialisable
from steerlab.interventions.graph import Graph, Run, SourceValue
from steerlab.interventions.ops import Intervention, Lambda, intervention_class

if TYPE_CHECKING:
    from steerlab.interventions.facts import ModelFacts

__all__ = [
    "intervention_record",
    "build_intervention",
    "save_interventions",
    "load_interventions",
    "save_graph",
    "load_graph",
]

_PLACEMENT = ("positions", "heads", "dims", "source_positions", "source_site")


def intervention_record(iv: Intervention, prefix: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(record, tensors)`` for one intervention; tensors are named ``prefix + name``."""
    if isinstance(iv, Lambda):
        raise NotSerialisable(
            f"Lambda at {iv.site!r} wraps Python code ({getattr(iv.fn, '__name__', iv.fn)!r}), which is not data and "
            "cannot be saved; use a registered intervention type (or register your own with @steerlab.register)"
        )
    if not iv.type_name:
        raise NotSerialisable(f"{type(iv).__name__} is not registered; decorate it with @steerlab.register('name')")
    record = {"type": iv.type_name, **iv.placement(), "arguments": iv.arguments(), "width": iv.width}
    tensors = {prefix + k: v for k, v in iv.state_dict().items()}
    record["dtypes"] = {k: str(v.dtype).removeprefix("torch.") for k, v in iv.state_dict().items()}
    return record, tensors


def build_intervention(record: dict[str, Any], tensors: dict[str, Tensor], prefix: str, *, device="cpu") -> Intervention:
    """The inverse of :func:`intervention_record`."""
    if not isinstance(record, dict) or "type" not in record or "site" not in record:
        raise FileFormatError(f"an intervention record lacks its type or site: {record!r:.200}")
    cls = intervention_class(record["type"])
    kwargs = {k: record.get(k) for k in _PLACEMENT if record.get(k) is not None}
    args = record.get("arguments") or {}
    try:
        if not isinstance(args, dict):
            raise TypeError(f"arguments are {type(args).__name__}, not an object")
        iv = cls(record["site"], **kwargs, **args)
        if not iv.built and record.get("width") is not None:
            iv.build(int(record["width"]))
    except FileFormatError:
        raise
    except (TypeError, ValueError) as e:  # ValueError includes steerlab's own (SubspaceSizeError, UnitError, ...)
        raise FileFormatError(
            f"cannot rebuild {record['type']!r} at {record['site']!r} from the saved placement {kwargs}, arguments {args} "
            f"and width {record.get('width')!r}: {e}"
        ) from None
    own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    expected = set(iv.state_dict())
    if set(own) != expected:
        raise FileFormatError(
            f"{record['type']} at {record['site']!r}: saved tensors {sorted(own)} do not match its parameters {sorted(expected)}"
        )
    for name, value in own.items():
        _assign(iv, name, value.to(device))
    return iv.to(device) if not own else iv


def _assign(module: torch.nn.Module, name: str, value: Tensor) -> None:
    *path, leaf = name.split(".")
    owner = module.get_submodule(".".join(path)) if path else module
    current = getattr(owner, leaf)
    if tuple(current.shape) != tuple(value.shape):
        raise FileFormatError(f"tensor {name!r} has shape {tuple(value.shape)}; the rebuilt intervention expects {tuple(current.shape)}")
    if isinstance(current, torch.nn.Parameter):
        current.data = value
    else:
        owner._buffers[leaf] = value


def save_interventions(
    directory: str | Path,
    interventions: list[Intervention],
    *,
    fingerprint: dict | None,
    kind: str = "interventions",
    config: dict | None = None,
) -> Path:
    records, tensors = [], {}
    for i, iv in enumerate(interventions):
        rec, ts = intervention_record(iv, f"{i}.")
        records.append(rec)
        tensors.update(ts)
    return fileformat.save(directory, kind=kind, config={**(config or {}), "interventions": records}, tensors=tensors, fingerprint=fingerprint)


def load_interventions(
    directory: str | Path, *, fingerprint: dict | None = None, kind: str | tuple = "interventions", device="cpu"
) -> tuple[list[Intervention], dict]:
    meta, tensors = fileformat.load(directory, kind=kind, fingerprint=fingerprint, device=device)
    records = meta["config"].get("interventions")
    if not isinstance(records, list):
        raise FileFormatError(f"{directory} lists no interventions")
    ivs = [build_intervention(rec, tensors, f"{i}.", device=device) for i, rec in enumerate(records)]
    used = {k for k in tensors if k.split(".", 1)[0].isdigit() and int(k.split(".", 1)[0]) < len(ivs)}
    if used != set(tensors) and not meta["config"].get("extra_tensors"):
        raise FileFormatError(f"{directory} holds tensors no intervention owns: {sorted(set(tensors) - used)[:5]}")
    return ivs, meta


def save_graph(directory: str | Path, graph: Graph, lab: ModelFacts) -> Path:
    """Save a run graph: each run's inputs (as tensors), interventions and edges."""
    records, tensors = [], {}
    for run in graph.order():
        inp = lab.inputs(run.inputs, device=False)
        if inp.args:
            raise NotSerialisable("runs with positional (non-keyword) inputs cannot be saved; pass a dict of tensors")
        in_names = []
        for k, v in inp.kwargs.items():
            if not isinstance(v, Tensor):
                raise NotSerialisable(f"run {run.name!r} has a non-tensor input {k}={v!r:.40}")
            tensors[f"runs.{run.index}.inputs.{k}"] = v
            in_names.append(k)
        ivs = []
        for j, iv in enumerate(run.interventions):
            rec, ts = intervention_record(iv, f"runs.{run.index}.iv.{j}.")
            if isinstance(iv.source, Run):
                rec["source"] = {"run": iv.source.index}
            elif isinstance(iv.source, SourceValue):
                rec["source"] = {"value": True}
                tensors[f"runs.{run.index}.iv.{j}.source_value"] = iv.source.value
                if iv.source.valid is not None:
                    tensors[f"runs.{run.index}.iv.{j}.source_valid"] = iv.source.valid
            elif iv.source is not None:
                raise NotSerialisable(f"in run {run.name!r}, {iv.type_name} reads from raw inputs; add them as a run with graph.run(...)")
            ivs.append(rec)
            tensors.update(ts)
        records.append({"index": run.index, "name": run.name, "output": run.output, "inputs": in_names, "interventions": ivs})
    return fileformat.save(directory, kind="graph", config={"runs": records}, tensors=tensors, fingerprint=lab.fingerprint())


def _run_records(directory, meta: dict, tensors: dict) -> list[dict]:
    """The graph's run records, each checked for the fields and tensors it refers to."""
    runs = meta["config"].get("runs")
    if not isinstance(runs, list):
        raise FileFormatError(f"{directory}: the graph has no list of run records")
    for rec in runs:
        ok = isinstance(rec, dict) and isinstance(rec.get("index"), int) and isinstance(rec.get("inputs"), list) \
            and isinstance(rec.get("interventions"), list)
        if not ok:
            raise FileFormatError(f"{directory}: a run record lacks its index, inputs or interventions: {rec!r:.200}")
        for k in rec["inputs"]:
            if f"runs.{rec['index']}.inputs.{k}" not in tensors:
                raise FileFormatError(f"{directory}: run {rec['index']} lists the input {k!r}, which the weights file lacks")
        for j, ivrec in enumerate(rec["interventions"]):
            src = ivrec.get("source") if isinstance(ivrec, dict) else None
            if isinstance(src, dict) and src.get("value") and f"runs.{rec['index']}.iv.{j}.source_value" not in tensors:
                raise FileFormatError(f"{directory}: run {rec['index']} intervention {j} reads a source_value the weights file lacks")
    return sorted(runs, key=lambda r: r["index"])


def load_graph(directory: str | Path, lab: ModelFacts) -> Graph:
    meta, tensors = fileformat.load(directory, kind="graph", fingerprint=lab.fingerprint(), device=lab.device)
    runs = _run_records(directory, meta, tensors)
    g = Graph()
    by_index: dict[int, Run] = {}
    for rec in runs:
        inputs = {k: tensors[f"runs.{rec['index']}.inputs.{k}"] for k in rec["inputs"]}
        ivs = []
        for j, ivrec in enumerate(rec["interventions"]):
            prefix = f"runs.{rec['index']}.iv.{j}."
            own = {k: v for k, v in tensors.items() if k.startswith(prefix) and not k.endswith(("source_value", "source_valid"))}
            iv = build_intervention(ivrec, own, prefix, device=lab.device)
            src = ivrec.get("source")
            if src and "run" in src:
                if src["run"] not in by_index:
                    raise FileFormatError(f"run {rec['index']} reads from run {src['run']}, which comes later or does not exist")
                iv.source = by_index[src["run"]]
            elif src and src.get("value"):
                iv.source = SourceValue(tensors[prefix + "source_value"], tensors.get(prefix + "source_valid"))
            ivs.append(iv)
        by_index[rec["index"]] = g.run(inputs, ivs, name=rec["name"], output=rec.get("output"))
    return g
