"""Interventions and run graphs to and from the one file format.

Each intervention is recorded as its registered type name, its placement
(site and units), its type-specific constructor arguments, its width and the
dtype of each tensor; its parameters and buffers go to the weights file under
``"<index>.<name>"``. Loading looks the type up in the registry (never a
string import).

A load checks everything before it builds anything: every record has every
field, of the right type; the type is registered; the placement and
arguments rebuild to exactly what was recorded (an edited ``"trainable":
"false"`` or ``"alpha": "2"`` does not silently become something else); the
site exists on the model, with its heads and dims in range and the recorded
width equal to the site's; each tensor's shape equals what the type builds at
that width (found by building it on the ``meta`` device, which allocates
nothing) and its dtype equals the record's; no tensor is left over. Only then
are the tensors read (finite, as the format requires) and the interventions
built, with their saved dtypes (a bf16 ``W`` stays bf16, an fp32 ``R`` fp32)
and without touching the caller's random number generator.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from steerlab.interventions import fileformat
from steerlab.interventions.errors import FileFormatError, NotSerialisable, SteerlabError
from steerlab.interventions.fileformat import TensorSpec, field_of
from steerlab.interventions.graph import Graph, Run, SourceValue
from steerlab.interventions.ops import Intervention, Lambda, intervention_class
from steerlab.interventions.orthonormal import Orthonormal

if TYPE_CHECKING:
    from steerlab.interventions.facts import ModelFacts

__all__ = [
    "intervention_record",
    "check_record",
    "expected_tensors",
    "build_intervention",
    "save_interventions",
    "load_interventions",
    "save_graph",
    "load_graph",
]

_PLACEMENT = ("positions", "heads", "dims", "source_positions", "source_site")
_RECORD = {"type": str, "site": str, "heads": (list, type(None)), "dims": (list, type(None)),
           "source_site": (str, type(None)), "arguments": dict, "width": (int, type(None)), "dtypes": dict}


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
    record["dtypes"] = {k: fileformat.dtype_name(v.dtype) for k, v in iv.state_dict().items()}
    return record, tensors


# --------------------------------------------------------------------------- checking a record
def check_record(record: Any, where: str, lab: ModelFacts | None = None) -> type[Intervention]:
    """The record's fields and types, its type registered, its placement on ``lab``'s model
    (site, heads, dims, width) when given; returns the intervention class."""
    for key, types in _RECORD.items():
        field_of(record, key, types, where)
    for key in ("positions", "source_positions"):
        field_of(record, key, (str, list, type(None)), where)
    cls = intervention_class(record["type"])
    width = record["width"]
    if width is not None and width < 1:
        raise FileFormatError(f"{where}: width {width}; expected a positive integer (or null for an unbuilt intervention)")
    for key in ("heads", "dims"):
        if record[key] is not None and not all(isinstance(x, int) and not isinstance(x, bool) for x in record[key]):
            raise FileFormatError(f"{where}: {key!r} is {record[key]!r:.80}; expected a list of integers")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in record["dtypes"].items()):
        raise FileFormatError(f"{where}: 'dtypes' is {record['dtypes']!r:.120}; expected tensor names -> dtype names")
    if lab is not None:
        _check_placement(record, lab, where)
    return cls


def _check_placement(record: dict, lab: ModelFacts, where: str) -> None:
    lab = getattr(lab, "facts", lab)  # a Lab or its ModelFacts
    try:
        site = lab.resolve(record["site"])
        shape = lab.site_shape(site)
        has_positions = lab.has_positions(site)
        source = lab.resolve(record["source_site"]) if record["source_site"] is not None else site
        source_shape = lab.site_shape(source)
    except SteerlabError as e:
        raise FileFormatError(f"{where}: {e}") from e
    if source_shape != shape:
        raise FileFormatError(f"{where}: source_site {source.name!r} has features {source_shape}; {site.name!r} has {shape}")
    heads = record["heads"]
    if heads is not None:
        if not site.n_heads:
            raise FileFormatError(f"{where}: heads={heads} at {site.name!r}, which is not a per-head site (attn.q|k|v|z are)")
        bad = [h for h in heads if not 0 <= h < site.n_heads]
        if bad:
            raise FileFormatError(f"{where}: heads {bad[:5]} out of range at {site.name!r}, which has {site.n_heads} heads (0..{site.n_heads - 1})")
    width = shape[-1]
    if record["dims"] is not None:
        bad = [d for d in record["dims"] if not 0 <= d < width]
        if bad:
            raise FileFormatError(f"{where}: dims {bad[:5]} out of range at {site.name!r}, whose width is {width} (0..{width - 1})")
        width = len(record["dims"])
    if record["width"] is not None and record["width"] != width:
        raise FileFormatError(f"{where}: width {record['width']}, but its slice of {site.name!r} on this model has width {width}")
    if not has_positions and record["positions"] not in (None, [0], [-1], 0, -1):
        raise FileFormatError(f"{where}: positions {record['positions']!r:.60} at {site.name!r}, which has no position axis")


def _construct(cls: type[Intervention], record: dict, where: str) -> Intervention:
    """The intervention the record describes, built at its width, as far as ``cls`` allows."""
    kwargs = {k: record[k] for k in _PLACEMENT if record.get(k) is not None}
    try:
        iv = cls(record["site"], **kwargs, **record["arguments"])
        if not iv.built and record["width"] is not None:
            iv.build(record["width"])
    except FileFormatError:
        raise
    except (TypeError, ValueError, RuntimeError, NotImplementedError) as e:  # ValueError includes steerlab's own
        raise FileFormatError(
            f"{where}: cannot rebuild {record['type']!r} at {record['site']!r} from the saved placement {kwargs}, "
            f"arguments {record['arguments']!r:.200} and width {record['width']!r}: {e}"
        ) from None
    return iv


def expected_tensors(record: dict, where: str) -> tuple[Intervention, dict[str, TensorSpec]]:
    """What the record's type builds at its width, on the ``meta`` device (no memory): the
    (meta) intervention and its tensors. Its placement and arguments must equal the record's."""
    cls = intervention_class(record["type"])
    with torch.device("meta"):
        iv = _construct(cls, record, where)
    got = {**iv.placement(), "arguments": iv.arguments(), "width": iv.width}
    for key, value in got.items():
        if _json(record.get(key)) != _json(value):  # typed: "trainable": 1 is not true, "alpha": 2 not 2.0
            raise FileFormatError(f"{where}: {key!r} is {record.get(key)!r:.80}, which {record['type']!r} reads as {value!r:.80} (an edited or foreign record)")
    return iv, {k: TensorSpec(v.dtype, tuple(v.shape)) for k, v in iv.state_dict().items()}


def _json(v: Any) -> str:
    try:
        return json.dumps(v, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError):
        return repr(v)


def check_tensors(record: dict, specs: dict[str, TensorSpec], prefix: str, where: str) -> None:
    """The file's tensors under ``prefix`` against what the record's type builds and the record's dtypes."""
    iv, want = expected_tensors(record, where)
    own = {k[len(prefix):]: v for k, v in specs.items() if k.startswith(prefix)}
    if set(own) != set(want):
        raise FileFormatError(f"{where}: {record['type']} at {record['site']!r} has tensors {sorted(own)}; its parameters are {sorted(want)}")
    if record["dtypes"] != {k: fileformat.dtype_name(v.dtype) for k, v in own.items()}:
        raise FileFormatError(f"{where}: the record's dtypes {record['dtypes']} differ from the weights file's "
                              f"{ {k: str(v) for k, v in own.items()} }")
    for name, spec in own.items():
        w = want[name]
        if spec.shape != w.shape:
            raise FileFormatError(f"{where}: tensor {prefix + name!r} is {spec}; {record['type']} at width {record['width']} has {list(w.shape)}")
        owner = iv.get_submodule(name.rpartition(".")[0]) if "." in name else iv
        fixed = isinstance(owner, Orthonormal) or not w.dtype.is_floating_point
        if (fixed and spec.dtype != w.dtype) or (w.dtype.is_floating_point and not spec.dtype.is_floating_point):
            raise FileFormatError(f"{where}: tensor {prefix + name!r} is {spec}; {record['type']} keeps it in {fileformat.dtype_name(w.dtype)}")


def build_intervention(record: dict[str, Any], tensors: dict[str, Tensor], prefix: str, *, device="cpu") -> Intervention:
    """The inverse of :func:`intervention_record` (for a record :func:`check_record` and
    :func:`check_tensors` accepted); the caller's random number generator is left as it was."""
    cls = intervention_class(record["type"])
    with torch.random.fork_rng(devices=[]):
        iv = _construct(cls, record, f"{record['type']!r} at {record['site']!r}")
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


# --------------------------------------------------------------------------- lists of interventions
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


def check_interventions(saved: fileformat.SavedFile, lab: ModelFacts | None, *, extra_prefix: str | None = None) -> list[dict]:
    """Every intervention record of ``saved`` checked (see the module docstring); tensors that no
    intervention owns are refused unless they start with ``extra_prefix``."""
    records = saved.config.get("interventions")
    if not isinstance(records, list):
        raise FileFormatError(f"{saved.directory} lists no interventions (\"interventions\" is {records!r:.60}; expected a list)")
    for i, rec in enumerate(records):
        where = f"{saved.directory}: intervention {i}"
        check_record(rec, where, lab)
        check_tensors(rec, saved.specs, f"{i}.", where)
    owned = {k for k in saved.specs if k.split(".", 1)[0].isdigit() and int(k.split(".", 1)[0]) < len(records)}
    stray = sorted(k for k in set(saved.specs) - owned if extra_prefix is None or not k.startswith(extra_prefix))
    if stray:
        raise FileFormatError(f"{saved.directory} holds tensors no intervention owns: {stray[:5]}")
    return records


def load_interventions(
    directory: str | Path, *, fingerprint: dict | None = None, kind: str | tuple = "interventions", device="cpu", lab: ModelFacts | None = None
) -> tuple[list[Intervention], dict]:
    """Interventions saved by :func:`save_interventions`, checked (against ``lab``'s model when
    given, whose fingerprint then applies), on ``device``; ``(interventions, meta)``."""
    fileformat.check_device(device)
    if lab is not None:
        fingerprint = lab.fingerprint()
    saved = fileformat.read(directory, kind=kind, fingerprint=fingerprint)
    records = check_interventions(saved, lab)
    tensors = saved.tensors(device)
    return [build_intervention(rec, tensors, f"{i}.", device=device) for i, rec in enumerate(records)], saved.meta


# --------------------------------------------------------------------------- run graphs
def save_graph(directory: str | Path, graph: Graph, lab: ModelFacts) -> Path:
    """Save a run graph: each run's inputs (as tensors), interventions and edges (every sourced
    intervention needs its source, as for running the graph)."""
    graph.validate_sources()
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


_SOURCE_TENSORS = ("source_value", "source_valid")


def _run_records(saved: fileformat.SavedFile, lab: ModelFacts) -> list[dict]:
    """The graph's run records, each checked: fields, unique indices 0..n-1, sources earlier, every
    intervention against the model, every tensor accounted for."""
    d = saved.directory
    runs = saved.config.get("runs")
    if not isinstance(runs, list):
        raise FileFormatError(f"{d}: the graph has no list of run records (\"runs\" is {runs!r:.60})")
    for rec in runs:
        ok = isinstance(rec, dict) and isinstance(rec.get("index"), int) and not isinstance(rec.get("index"), bool) \
            and isinstance(rec.get("inputs"), list) and isinstance(rec.get("interventions"), list)
        if not ok:
            raise FileFormatError(f"{d}: a run record lacks its index, inputs or interventions: {rec!r:.200}")
    indices = [r["index"] for r in runs]
    if sorted(indices) != list(range(len(runs))):
        raise FileFormatError(f"{d}: run indices {sorted(indices)[:20]}; expected each of 0..{len(runs) - 1} exactly once")
    runs = sorted(runs, key=lambda r: r["index"])
    used: set[str] = set()
    for rec in runs:
        used |= _check_run(saved, rec, lab)
    stray = sorted(set(saved.specs) - used)
    if stray:
        raise FileFormatError(f"{d}: the weights file holds tensors no run uses: {stray[:5]}")
    return runs


def _check_run(saved: fileformat.SavedFile, rec: dict, lab: ModelFacts) -> set[str]:
    d, i = saved.directory, rec["index"]
    field_of(rec, "name", str, f"{d}: run {i}")
    field_of(rec, "output", (bool, type(None)), f"{d}: run {i}")
    used = set()
    for k in rec["inputs"]:
        if not isinstance(k, str) or f"runs.{i}.inputs.{k}" not in saved.specs:
            raise FileFormatError(f"{d}: run {i} lists the input {k!r}, which the weights file lacks")
        used.add(f"runs.{i}.inputs.{k}")
    _check_input_specs(saved, rec, d)
    for j, ivrec in enumerate(rec["interventions"]):
        where, prefix = f"{d}: run {i} intervention {j}", f"runs.{i}.iv.{j}."
        cls = check_record(ivrec, where, lab)
        own = {k: v for k, v in saved.specs.items() if k.startswith(prefix) and k[len(prefix):] not in _SOURCE_TENSORS}
        check_tensors(ivrec, own, prefix, where)
        used |= set(own)
        src = ivrec.get("source")
        if src is not None and not cls.sourced:
            raise FileFormatError(f"{where}: a {ivrec['type']!r} takes no source; the record gives {src!r:.60}")
        if src is None:
            if cls.sourced:
                raise FileFormatError(f"{where}: a {ivrec['type']!r} reads a source, and the record names none "
                                      "(expected \"source\": {\"run\": <an earlier run>} or {\"value\": true})")
            continue
        if src == {"value": True}:
            if prefix + "source_value" not in saved.specs:
                raise FileFormatError(f"{where} reads a source_value the weights file lacks")
            used |= {prefix + n for n in _SOURCE_TENSORS if prefix + n in saved.specs}
        elif not (isinstance(src, dict) and set(src) == {"run"} and isinstance(src["run"], int) and not isinstance(src["run"], bool)):
            raise FileFormatError(f"{where}: source {src!r:.80}; expected {{\"run\": <an earlier run's index>}} or {{\"value\": true}}")
        elif not 0 <= src["run"] < i:
            raise FileFormatError(f"run {i} reads from run {src['run']}, which comes later or does not exist")
    return used


def _check_input_specs(saved: fileformat.SavedFile, rec: dict, d: Path) -> None:
    specs = {k: saved.specs[f"runs.{rec['index']}.inputs.{k}"] for k in rec["inputs"]}
    ids = specs.get("input_ids")
    for k, s in specs.items():
        if k in ("input_ids", "attention_mask", "token_type_ids", "position_ids") and (s.dtype.is_floating_point or s.dtype == torch.bool or len(s.shape) != 2):
            raise FileFormatError(f"{d}: run {rec['index']} input {k!r} is {s}; expected an integer tensor [batch, pos]")
        if ids is not None and k in ("attention_mask", "token_type_ids", "position_ids") and s.shape != ids.shape:
            raise FileFormatError(f"{d}: run {rec['index']} input {k!r} is {s} but input_ids is {ids}; expected the same shape")


def _check_input_values(tensors: dict[str, Tensor], rec: dict, lab: ModelFacts, d: Path) -> None:
    ids = tensors.get(f"runs.{rec['index']}.inputs.input_ids")
    vocab = lab.fingerprint().get("vocab_size")
    if ids is not None and ids.numel() and vocab and not (0 <= int(ids.min()) and int(ids.max()) < vocab):
        raise FileFormatError(f"{d}: run {rec['index']} has token ids in {int(ids.min())}..{int(ids.max())}; this model's vocabulary is 0..{vocab - 1}")
    mask = tensors.get(f"runs.{rec['index']}.inputs.attention_mask")
    if mask is not None and mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
        raise FileFormatError(f"{d}: run {rec['index']} has an attention mask with values other than 0 and 1")


def load_graph(directory: str | Path, lab: ModelFacts) -> Graph:
    """A run graph saved by :func:`save_graph`, checked whole against ``lab``'s model before it is built."""
    saved = fileformat.read(directory, kind="graph", fingerprint=lab.fingerprint())
    runs = _run_records(saved, lab)
    tensors = saved.tensors(lab.device)
    for rec in runs:
        _check_input_values(tensors, rec, lab, saved.directory)
    g = Graph()
    by_index: dict[int, Run] = {}
    for rec in runs:
        inputs = {k: tensors[f"runs.{rec['index']}.inputs.{k}"] for k in rec["inputs"]}
        ivs = []
        for j, ivrec in enumerate(rec["interventions"]):
            prefix = f"runs.{rec['index']}.iv.{j}."
            own = {k: v for k, v in tensors.items() if k.startswith(prefix) and k[len(prefix):] not in _SOURCE_TENSORS}
            iv = build_intervention(ivrec, own, prefix, device=lab.device)
            src = ivrec.get("source")
            if src and "run" in src:
                iv.source = by_index[src["run"]]
            elif src:
                iv.source = SourceValue(tensors[prefix + "source_value"], tensors.get(prefix + "source_valid"))
            ivs.append(iv)
        by_index[rec["index"]] = g.run(inputs, ivs, name=rec["name"], output=rec.get("output"))
    return g
