"""ReFT training runs from a TOML file, with checkpoints and exact resume (``steerlab train``).

A run file (paths are relative to the file's folder)::

    model = "smollm2-135m"           # embedded name, local folder or hub id
    output_dir = "runs/polarity"

    [reft]                           # the fields of steerlab.reft.ReftConfig
    layers = [20]
    rank = 4
    positions = "l1"

    [data]
    file = "train.jsonl"             # rows {"prompt": ..., "response": ...} (causal LM)
                                     #   or {"text": ..., "label": int} (classification head)
    chat_template = false            # instruction rows: format prompts as chat turns

    [train]                          # every key optional; these are the defaults
    epochs = 1
    lr = 4e-3
    batch_size = 8
    gradient_accumulation_steps = 1  # micro-batches of batch_size per optimiser step
    weight_decay = 0.0               # never on the orthonormal maps
    warmup_ratio = 0.0               # linear warm-up over this fraction of the steps, then linear decay to 0
    seed = 0                         # the interventions' initial weights and the batch order
    shuffle = true
    log_every = 10                   # optimiser steps between loss readings (the progress bar's loss)
    checkpoint_every = 50            # optimiser steps
    keep_checkpoints = 2

The run is :func:`steerlab.reft.train` itself (AdamW with the orthonormal
maps never decayed, loss on the responses only, on the one training loop of
:mod:`steerlab.interventions.training`), so a run file and a Python call with
the same settings see the same batches and the same losses. Every
``checkpoint_every`` steps it writes ``output_dir/checkpoint-NNNNNN/``: the
ReFT weights (``reft/``, the one file format) and the trainer state
(``state/``: step, losses, AdamW moments, the RNG state, and the run's
settings), the state last, so a checkpoint without it is incomplete and
ignored. ``resume=True`` restores the latest complete checkpoint and
continues; the finished run then holds the same weights, bit for bit, as a
run that was never interrupted. The finished model is saved to
``output_dir/final`` (load it with ``ReftModel.from_pretrained`` or
``steerlab generate --interventions``) with ``training_curve.html`` beside it.
"""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from steerlab.interventions.errors import ConfigError, DataError

__all__ = ["RunConfig", "TrainingRun", "train_from_config", "load_rows", "parse_train_table", "TRAIN_KEYS"]

_TOP = {"model", "output_dir", "dtype", "device", "reft", "data", "train"}
_DATA = {"file", "chat_template", "system", "max_length"}
#: the keys of a ``[train]`` table and their types
TRAIN_KEYS: dict[str, type] = {
    "epochs": int, "lr": float, "batch_size": int, "gradient_accumulation_steps": int, "weight_decay": float,
    "warmup_ratio": float, "seed": int, "shuffle": bool, "log_every": int, "checkpoint_every": int, "keep_checkpoints": int,
}
_POSITIVE = ("epochs", "batch_size", "gradient_accumulation_steps", "log_every", "checkpoint_every", "keep_checkpoints")


def parse_train_table(table: Any, where: str = "the run file") -> dict[str, Any]:
    """A ``[train]`` table checked (known keys, types, ranges) into keyword arguments of :class:`RunConfig`.

    One function for every file that holds a ``[train]`` table (``steerlab train``
    run files, experiment files); errors name the file (``where``) and the key."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: train must be a table ([train]); got {type(table).__name__}")
    _known(table, set(TRAIN_KEYS), where, "train.")
    out = {k: _typed(v, TRAIN_KEYS[k], f"train.{k}", where) for k, v in table.items()}
    for name in _POSITIVE:
        if name in out and out[name] < 1:
            raise ConfigError(f"{where}: train.{name} = {out[name]}; expected a positive integer")
    if "lr" in out and not (out["lr"] > 0 and math.isfinite(out["lr"])):
        raise ConfigError(f"{where}: train.lr = {out['lr']}; expected a positive learning rate")
    if "warmup_ratio" in out and not 0 <= out["warmup_ratio"] < 1:
        raise ConfigError(f"{where}: train.warmup_ratio = {out['warmup_ratio']}; expected a fraction in [0, 1)")
    if "weight_decay" in out and not out["weight_decay"] >= 0:
        raise ConfigError(f"{where}: train.weight_decay = {out['weight_decay']}; expected a number >= 0")
    return out


@dataclass
class RunConfig:
    """A parsed run file (see the module docstring); :meth:`from_toml` validates every field."""

    model: str
    output_dir: Path
    data_file: Path
    reft: dict[str, Any]
    chat_template: bool = False
    system: str | None = None
    max_length: int | None = None
    epochs: int = 1
    lr: float = 4e-3
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    seed: int = 0
    shuffle: bool = True
    log_every: int = 10
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    dtype: str = "float32"
    device: str | None = None

    @classmethod
    def from_toml(cls, path: str | Path, *, output_dir: str | Path | None = None) -> RunConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"run file {str(path)!r} does not exist (expected a TOML file; see `steerlab train --help`)")
        try:
            raw = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid TOML: {e}") from None
        return cls.from_dict(raw, base=path.parent, where=str(path), output_dir=output_dir)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, base: Path = Path("."), where: str = "the run file",
                  output_dir: str | Path | None = None) -> RunConfig:
        _known(raw, _TOP, where, "")
        for key in ("model", "output_dir"):
            if key not in raw and not (key == "output_dir" and output_dir is not None):
                raise ConfigError(f"{where} has no {key!r}: expected e.g. model = \"smollm2-135m\", output_dir = \"runs/x\"")
        data, reft = _table(raw, "data", where), _table(raw, "reft", where)
        train = parse_train_table(raw.get("train", {}), where)
        _known(data, _DATA, where, "data.")
        if "file" not in data:
            raise ConfigError(f"{where} has no data.file: expected a [data] table with file = \"train.jsonl\"")
        from steerlab.reft import ReftConfig

        try:
            ReftConfig.from_dict(dict(reft))  # validated now, built against the model later
        except TypeError as e:
            raise ConfigError(f"{where} [reft]: {e}") from None
        cfg = cls(
            model=_typed(raw["model"], str, "model", where),
            output_dir=Path(output_dir) if output_dir is not None else base / _typed(raw["output_dir"], str, "output_dir", where),
            data_file=base / _typed(data["file"], str, "data.file", where),
            reft=dict(reft),
            **{k: _typed(data[k], t, f"data.{k}", where) for k, t in (("chat_template", bool), ("system", str), ("max_length", int)) if k in data},
            **train,
            **{k: _typed(raw[k], str, k, where) for k in ("dtype", "device") if k in raw},
        )
        cfg._check(where)
        return cfg

    def _check(self, where: str) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"{where}: dtype = {self.dtype!r}; expected float32, bfloat16 or float16")
        if not self.data_file.is_file():
            raise ConfigError(f"{where}: data.file {str(self.data_file)!r} does not exist")

    def settings(self) -> dict[str, Any]:
        """What a checkpoint must agree on to be resumed (everything but where and how often to save)."""
        skip = {"output_dir", "checkpoint_every", "keep_checkpoints", "log_every", "device", "data_file"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}



def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d, default=str))


def _table(raw: dict, key: str, where: str) -> dict:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {key} must be a table ([{key}]); got {type(value).__name__}")
    return value


def _known(table: dict, known: set[str], where: str, prefix: str) -> None:
    extra = sorted(set(table) - known)
    if extra:
        raise ConfigError(f"{where}: unknown setting {prefix}{extra[0]}; known: {', '.join(prefix + k for k in sorted(known))}")


def _typed(value: Any, kind: type, name: str, where: str) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: {name} = {value!r}; expected {kind.__name__}")
    return value


# -- data ------------------------------------------------------------------------------------------


def load_rows(path: str | Path) -> tuple[str, list[dict[str, Any]]]:
    """``("instruction" | "classification", rows)`` from a JSON-lines file, every row checked."""
    path = Path(path)
    rows, kind = [], None
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {n} is not JSON: {e}") from None
        if not isinstance(row, dict):
            raise DataError(f"{path} line {n}: expected an object; got {type(row).__name__}")
        this = "instruction" if {"prompt", "response"} <= set(row) else "classification" if {"text", "label"} <= set(row) else None
        if this is None:
            raise DataError(f"{path} line {n}: expected keys prompt and response, or text and label; got {sorted(row)}")
        if kind is not None and this != kind:
            raise DataError(f"{path} line {n} is a {this} row but earlier rows are {kind} rows; use one kind per file")
        kind = this
        if this == "classification" and (not isinstance(row["label"], int) or isinstance(row["label"], bool) or row["label"] < 0):
            raise DataError(f"{path} line {n}: label {row['label']!r}; expected a class index (an integer >= 0)")
        rows.append(row)
    if not rows:
        raise DataError(f"{path} holds no rows")
    return kind, rows


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- the run ---------------------------------------------------------------------------------------


@dataclass
class TrainingRun:
    """What :func:`train_from_config` did: the losses of every step so far (resumed runs
    included), where it resumed, and where it saved."""

    losses: list[float]
    epochs: int
    total_steps: int
    seconds: float
    resumed_from: int | None = None
    final: Path | None = None
    checkpoints: list[Path] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return len(self.losses)

    @property
    def finished(self) -> bool:
        return self.steps == self.total_steps

    def result(self):
        """As a :class:`steerlab.reft.TrainResult` (for its figure)."""
        from steerlab.reft import TrainResult

        return TrainResult(list(self.losses), self.epochs, self.seconds)

    def plot(self):
        from steerlab.viz import reft_training_curve

        return reft_training_curve(self.result())


def _build(cfg: RunConfig):
    import steerlab as sl
    from steerlab import reft

    kind, rows = load_rows(cfg.data_file)
    task = "classification" if kind == "classification" else None
    model, tok = sl.load(cfg.model, dtype=getattr(torch, cfg.dtype), device=cfg.device, task=task)
    rc = dict(cfg.reft)
    if kind == "classification":
        n_labels = int(getattr(model.config, "num_labels", 2))
        top = max(r["label"] for r in rows)
        if top >= n_labels:
            raise DataError(f"{cfg.data_file}: label {top} but the model's classification head has {n_labels} classes (0..{n_labels - 1})")
        if not rc.get("modules_to_save"):  # the new head trains with the interventions
            rc["modules_to_save"] = ["classifier" if hasattr(model, "classifier") else "score"]
        rc.setdefault("task_type", reft.TaskType.SEQ_CLS)
    torch.manual_seed(cfg.seed)  # the interventions' initial weights: those of get_reft_model right after manual_seed(seed)
    rm = reft.get_reft_model(model, reft.ReftConfig.from_dict(rc), tokenizer=tok)
    try:
        if kind == "instruction":
            ds = reft.InstructionDataset(tok, [r["prompt"] for r in rows], [r["response"] for r in rows], positions=rm.positions,
                                         tied=rm.tied, chat_template=cfg.chat_template, system=cfg.system, max_length=cfg.max_length)
        else:
            ds = reft.ClassificationDataset(tok, [r["text"] for r in rows], [r["label"] for r in rows], positions=rm.positions,
                                            tied=rm.tied, max_length=cfg.max_length)
    except BaseException:
        rm.unwrap()
        raise
    return rm, ds


def train_from_config(
    cfg: RunConfig,
    *,
    resume: bool = False,
    max_steps: int | None = None,
    progress: bool | None = None,
    log=print,
) -> TrainingRun:
    """Run (or resume) the training ``cfg`` describes; see the module docstring.

    ``max_steps`` stops after that many steps of this invocation (a checkpoint
    is written there; ``resume=True`` continues). ``progress``: a bar on stderr
    (``None``: when the output is a terminal). ``log`` prints the summary lines.
    """
    from steerlab import reft

    out = cfg.output_dir
    if max_steps is not None and max_steps < 1:
        raise ConfigError(f"max_steps={max_steps}: expected a positive number of steps")
    checkpoints = reft.Checkpoints(out, every=cfg.checkpoint_every, keep=cfg.keep_checkpoints, resume=resume, stop_after=max_steps)
    found = checkpoints.latest_step()
    if resume and found is None:
        raise ConfigError(f"--resume: {out} holds no complete checkpoint to resume from")
    if not resume and (found is not None or (out / "final").exists()):
        raise ConfigError(f"{out} already holds a run (checkpoints or final/); pass --resume to continue it, or choose another output_dir")
    data_sha = _sha256(cfg.data_file)
    torch.manual_seed(cfg.seed)  # a new classification head starts from the seed too
    rm, ds = _build(cfg)
    try:
        n, per_epoch = len(ds), math.ceil(math.ceil(len(ds) / cfg.batch_size) / cfg.gradient_accumulation_steps)
        trainable, base = rm.get_nb_trainable_parameters()
        log(f"{cfg.model}: {len(rm.interventions)} {type(rm.interventions[0]).__name__} ({trainable:,d} trainable parameters, "
            f"{100 * trainable / base:.4f}% of {base:,d}); {n} examples, {cfg.epochs} epochs of {per_epoch} steps"
            + (f"; resuming after step {found}" if resume else ""))
        res = reft.train(rm, ds, epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, weight_decay=cfg.weight_decay,
                         gradient_accumulation_steps=cfg.gradient_accumulation_steps, shuffle=cfg.shuffle, seed=cfg.seed,
                         warmup_ratio=cfg.warmup_ratio, log_every=cfg.log_every, progress=progress,
                         checkpoints=checkpoints.bind(identity={"run": _jsonable(cfg.settings()), "data_sha256": data_sha}))
        run = TrainingRun(res.losses, res.epochs, res.total_steps or res.steps, res.seconds, res.resumed_from, checkpoints=res.checkpoints)
        if run.finished:
            run.final = rm.save_pretrained(out / "final")
            from steerlab.viz import save_html

            save_html(run.plot(), out / "training_curve.html")
        return run
    finally:
        rm.unwrap()
