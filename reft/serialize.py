"""A :class:`~steerlab.reft.ReftModel` to and from the one file format (kind ``"reft"``).

The record holds every intervention (type, placement, constructor arguments,
width, dtypes), the weight groups, the :class:`~steerlab.reft.ReftConfig` they
came from (if any), the trained base modules (``modules_to_save``) and the
base model's fingerprint; the weights file holds the interventions' tensors
(``"<index>.<name>"``) and the saved modules' (``"modules.<module>.<name>"``).

A load checks the whole file against the model before building anything
(see :mod:`steerlab.interventions.serialize` for the per-intervention
checks): only ReFT types; the groups partition the interventions; a recorded
``ReftConfig`` describes exactly the recorded interventions (types, sites,
positions, rank, activation, dropout, dtype, groups, saved modules; a config
that contradicts them would change what the collators and ``generate`` do);
each saved module exists in the model with the recorded tensors' shapes; no
tensor is left over. Nothing is unpickled.

What a save owns in its folder, and why a kill at any moment leaves the
complete old or new save: :mod:`steerlab.interventions.fileformat`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from steerlab.interventions import Lab, Positions, fileformat, wrap
from steerlab.interventions.errors import FileFormatError, SteerlabError, checked_first, flag
from steerlab.interventions.fileformat import SavedFile, TensorSpec, field_of
from steerlab.interventions.serialize import build_intervention, check_interventions, intervention_record
from steerlab.reft.config import ReftConfig
from steerlab.reft.interventions import INTERVENTION_TYPES

__all__ = ["KIND", "reft_record", "save_reft_model", "load_reft_model", "load_weights"]

#: the ``kind`` of a saved ReFT model in the one file format
KIND = "reft"
_MODULES = "modules."


def _base_module(model: nn.Module, name: str, where: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        children = [n for n, _ in model.named_children()]
        raise FileFormatError(f"{where}: modules_to_save names {name!r}, which this model lacks; its top-level modules: {children}") from None


def reft_record(rm, state_dict: dict[str, Tensor] | None = None) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(config, tensors)`` of a ReftModel as the file stores them. ``state_dict``: the model's
    full state dict as a sharding wrapper gathered it (FSDP's ``FULL_STATE_DICT``)."""
    records, tensors = [], {}
    for i, iv in enumerate(rm.interventions):
        rec, ts = intervention_record(iv, f"{i}.")
        records.append(rec)
        tensors.update(ts)
    for name in rm.modules_to_save:
        for k, v in rm.model.get_submodule(name).state_dict().items():
            tensors[f"{_MODULES}{name}.{k}"] = v
    if state_dict is not None:
        full = {f"interventions.{k}": k for k in tensors if k[0].isdigit()}
        full.update({f"model.{k.removeprefix(_MODULES)}": k for k in tensors if k.startswith(_MODULES)})
        missing = sorted(set(full) - set(state_dict))
        if missing:
            raise FileFormatError(f"the gathered state dict lacks {missing[:4]}; expected the ReftModel's full state dict")
        tensors = {ours: state_dict[theirs] for theirs, ours in full.items()}
    config = {
        "reft_config": None if rm.reft_config is None else rm.reft_config.to_dict(),
        "groups": rm.groups,
        "interventions": records,
        "modules_to_save": list(rm.modules_to_save),
        "extra_tensors": bool(rm.modules_to_save),
    }
    return config, tensors


def save_reft_model(rm, directory: str | Path, *, is_main_process: bool = True, state_dict: dict[str, Tensor] | None = None) -> Path | None:
    """Write ``rm`` into ``directory`` (only on the main process); see the module docstring."""
    if not is_main_process:
        return None
    config, tensors = reft_record(rm, state_dict)
    return fileformat.save(directory, kind=KIND, config=config, tensors=tensors, fingerprint=rm.lab.fingerprint())


# --------------------------------------------------------------------------- checking
def _check(saved: SavedFile, model: nn.Module, lab: Lab) -> tuple[list[dict], ReftConfig | None, list[list[int]], list[str]]:
    where = f"{saved.directory}"
    cfg = saved.config
    raw = cfg.get("interventions")
    if not isinstance(raw, list) or not raw:
        raise FileFormatError(f"{where} lists no interventions (\"interventions\" is {raw!r:.60}; expected a non-empty list)")
    bad = [r.get("type") if isinstance(r, dict) else r for r in raw
           if not isinstance(r, dict) or not isinstance(r.get("type"), str) or r["type"] not in INTERVENTION_TYPES]
    if bad:
        raise FileFormatError(f"{where} holds a {bad[0]!r:.60} intervention, which is not a ReFT type {sorted(INTERVENTION_TYPES)}")
    records = check_interventions(saved, lab, extra_prefix=_MODULES)
    groups = field_of(cfg, "groups", list, where)
    if not all(isinstance(g, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in g) for g in groups) \
            or sorted(i for g in groups for i in g) != list(range(len(records))):
        raise FileFormatError(f"{where}: groups {groups!r:.80}; expected lists of intervention indices partitioning 0..{len(records) - 1}")
    saved_modules = field_of(cfg, "modules_to_save", list, where)
    if not all(isinstance(m, str) for m in saved_modules) or len(set(saved_modules)) != len(saved_modules):
        raise FileFormatError(f"{where}: modules_to_save {saved_modules!r:.80}; expected distinct module names")
    if field_of(cfg, "extra_tensors", bool, where) != bool(saved_modules):
        raise FileFormatError(f"{where}: extra_tensors is {cfg['extra_tensors']} but modules_to_save is {saved_modules}")
    _check_module_tensors(saved, model, saved_modules, where)
    rc = field_of(cfg, "reft_config", (dict, type(None)), where)
    config = None
    if rc is not None:
        if set(rc) != set(ReftConfig.__dataclass_fields__):
            raise FileFormatError(f"{where}: the saved reft_config has the fields {sorted(rc)}; expected {sorted(ReftConfig.__dataclass_fields__)}")
        for key, types in _CONFIG_TYPES.items():
            field_of(rc, key, types, f"{where}: reft_config")
        try:
            config = ReftConfig.from_dict(rc)
        except (SteerlabError, TypeError) as e:
            raise FileFormatError(f"{where}: the saved reft_config is invalid: {e}") from None
        _check_config_matches(config, records, groups, saved_modules, lab, where)
    return records, config, groups, saved_modules


_CONFIG_TYPES = {"layers": (list, int, str), "rank": int, "positions": (str, int, list), "intervention": str, "site": str,
                 "tied": bool, "act_fn": (str, type(None)), "dropout": float, "dtype": (str, type(None)), "modules_to_save": list,
                 "task_type": str, "intervention_kwargs": dict}


def _check_module_tensors(saved: SavedFile, model: nn.Module, names: list[str], where: str) -> None:
    expected: dict[str, Tensor] = {}
    for name in names:
        for k, v in _base_module(model, name, where).state_dict().items():
            expected[f"{_MODULES}{name}.{k}"] = v
    got = {k: s for k, s in saved.specs.items() if k.startswith(_MODULES)}
    if set(got) != set(expected):
        raise FileFormatError(f"{where}: saved module tensors {sorted(got)[:6]} do not match modules_to_save {sorted(expected)[:6]}")
    for k, spec in got.items():
        want = expected[k]
        if spec.shape != tuple(want.shape) or spec.dtype.is_floating_point != want.dtype.is_floating_point:
            raise FileFormatError(f"{where}: saved {k!r} is {spec}; the model's is {TensorSpec(want.dtype, tuple(want.shape))}")


def _check_config_matches(config: ReftConfig, records: list[dict], groups: list[list[int]], saved_modules: list[str], lab: Lab, where: str) -> None:
    """The recorded ReftConfig must describe exactly the recorded interventions."""
    try:
        layers = config.layer_indices(lab.n_layers)
    except SteerlabError as e:
        raise FileFormatError(f"{where}: the saved reft_config does not fit this model: {e}") from None
    want, want_groups = [], []
    for spec in config.position_groups():
        want_groups.append(list(range(len(want), len(want) + len(layers))))
        want += [(config.intervention, f"blocks.{layer}.{config.site}", Positions(spec).to_json()) for layer in layers]
    got = [(r["type"], r["site"], r["positions"]) for r in records]
    act = None if config.act_fn in (None, "linear", "identity", "none") else config.act_fn
    args = {"rank": config.rank, "act_fn": act, "dropout": config.dropout, **config.intervention_kwargs}
    if config.dtype is not None:
        args["dtype"] = config.dtype
    wrong = [f"intervention {i}: {k}={r['arguments'].get(k)!r} vs {v!r}" for i, r in enumerate(records) for k, v in args.items()
             if r["arguments"].get(k) != v]
    if got != want or groups != want_groups or saved_modules != config.modules_to_save or wrong:
        raise FileFormatError(
            f"{where}: the saved reft_config contradicts the saved interventions (it describes {want} in groups {want_groups} "
            f"with modules_to_save {config.modules_to_save}; the records are {got} in groups {groups} with {saved_modules}"
            + (f"; {'; '.join(wrong[:3])}" if wrong else "") + ")"
        )


# --------------------------------------------------------------------------- loading
@checked_first(is_trainable=flag("is_trainable"))
def load_reft_model(directory: str | Path, model: nn.Module, tokenizer=None, *, is_trainable: bool = False,
                    device: str | torch.device | None = None, factory: Callable[..., Any]):
    """A saved ReFT model on ``model`` (see :meth:`ReftModel.from_pretrained`); ``factory`` is the
    ``ReftModel`` class. The model is left as found when anything is refused."""
    dev = fileformat.check_device(device) if device is not None else None
    lab = wrap(model, tokenizer)
    try:
        saved = fileformat.read(directory, kind=KIND, fingerprint=lab.fingerprint())
        records, config, groups, saved_modules = _check(saved, model, lab)
        dev = dev if dev is not None else lab.device
        tensors = saved.tensors(dev)
        with torch.random.fork_rng(devices=[]):
            ivs = [build_intervention(rec, tensors, f"{i}.", device=dev) for i, rec in enumerate(records)]
        if not is_trainable:
            for iv in ivs:
                iv.requires_grad_(False)
    except BaseException:
        lab.unwrap()
        raise
    rm = factory(model, ivs, tokenizer=tokenizer, config=config, groups=groups, modules_to_save=saved_modules, _lab=lab)
    try:
        _copy_modules(rm, {k: v for k, v in tensors.items() if k.startswith(_MODULES)})
        if not is_trainable:
            for name in saved_modules:
                rm.model.get_submodule(name).requires_grad_(False)
    except BaseException:
        rm.unwrap()
        raise
    return rm


def _copy_modules(rm, tensors: dict[str, Tensor]) -> None:
    with torch.no_grad():
        for name in rm.modules_to_save:
            for k, v in rm.model.get_submodule(name).state_dict().items():
                v.copy_(tensors[f"{_MODULES}{name}.{k}"])


_SAME = ("type", "site", "positions", "heads", "dims", "arguments", "width")


def load_weights(rm, directory: str | Path) -> None:
    """A checkpoint of *this* ReFT model's interventions, loaded in place (the Trainer's resume path):
    the parameters keep their identity, device and dtype; the file must hold the same interventions."""
    saved = fileformat.read(directory, kind=KIND, fingerprint=rm.lab.fingerprint())
    config, current = reft_record(rm)
    records = check_interventions(saved, rm.lab, extra_prefix=_MODULES)
    strip = lambda recs: [{k: r.get(k) for k in _SAME} for r in recs]  # noqa: E731
    if strip(records) != strip(config["interventions"]):
        raise FileFormatError(f"{directory} holds other interventions than this ReftModel (types, sites, arguments or widths differ)")
    if set(saved.specs) != set(current):
        raise FileFormatError(f"{directory} holds tensors {sorted(set(saved.specs) ^ set(current))[:5]} this ReftModel does not (or lacks them)")
    for k, v in current.items():
        spec = saved.specs[k]
        if spec.shape != tuple(v.shape) or (not k.startswith(_MODULES) and spec.dtype != v.dtype):
            raise FileFormatError(f"{directory}: tensor {k} is {spec}; the live one is {TensorSpec(v.dtype, tuple(v.shape))}")
    tensors = saved.tensors("cpu")
    with torch.no_grad():
        for i, iv in enumerate(rm.interventions):
            for k, v in iv.state_dict(keep_vars=True).items():
                v.copy_(tensors[f"{i}.{k}"])
            for m in iv.modules():
                if hasattr(m, "_cached"):
                    m._cached = None
    _copy_modules(rm, tensors)
