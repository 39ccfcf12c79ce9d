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
                                     #   or {"text": ..., "label": int} (classification head);
                                     #   .jsonl, .json, .csv or .tsv (steerlab.data.DATA_FORMATS)
    chat_template = false            # instruction rows: format prompts as chat turns

    [train]
    epochs = 3
    lr = 4e-3
    batch_size = 8
    checkpoint_every = 10            # optimiser steps

The loop is :func:`steerlab.reft.train`'s maths (AdamW with the orthonormal
maps never decayed, linear warm-up then decay to zero, loss on the
responses only) with a seeded permutation per epoch. Every
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
import shutil
import sys
import time
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from steerlab.interventions import fileformat
from steerlab.interventions.errors import ConfigError, DataError, FileFormatError

__all__ = ["RunConfig", "TrainingRun", "train_from_config", "load_rows"]

STATE_KIND = "reft_train_state"
_TOP = {"model", "output_dir", "dtype", "device", "reft", "data", "train"}
_DATA = {"file", "chat_template", "system", "max_length"}
_TRAIN = {"epochs", "lr", "batch_size", "weight_decay", "warmup_ratio", "seed", "shuffle", "checkpoint_every", "keep_checkpoints"}


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
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    seed: int = 0
    shuffle: bool = True
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
        data, train, reft = (_table(raw, k, where) for k in ("data", "train", "reft"))
        _known(data, _DATA, where, "data.")
        _known(train, _TRAIN, where, "train.")
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
            **{k: _typed(train[k], _TRAIN_TYPES[k], f"train.{k}", where) for k in train},
            **{k: _typed(raw[k], str, k, where) for k in ("dtype", "device") if k in raw},
        )
        cfg._check(where)
        return cfg

    def _check(self, where: str) -> None:
        for name in ("epochs", "batch_size", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}: train.{name} = {getattr(self, name)}; expected a positive integer")
        if not self.lr > 0:
            raise ConfigError(f"{where}: train.lr = {self.lr}; expected a positive learning rate")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"{where}: train.warmup_ratio = {self.warmup_ratio}; expected a fraction in [0, 1)")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"{where}: dtype = {self.dtype!r}; expected float32, bfloat16 or float16")
        if not self.data_file.is_file():
            raise ConfigError(f"{where}: data.file {str(self.data_file)!r} does not exist")

    def settings(self) -> dict[str, Any]:
        """What a checkpoint must agree on to be resumed (everything but where and how often to save)."""
        skip = {"output_dir", "checkpoint_every", "keep_checkpoints", "device", "data_file"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}


_TRAIN_TYPES = {"epochs": int, "lr": float, "batch_size": int, "weight_decay": float, "warmup_ratio": float, "seed": int,
                "shuffle": bool, "checkpoint_every": int, "keep_checkpoints": int}


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
    """``("instruction" | "classification", rows)`` from a JSONL, JSON, CSV or TSV file (:func:`steerlab.data.read_rows`), every row checked."""
    from steerlab.data import read_rows

    path = Path(path)
    rows, kind = [], None
    for n, row in read_rows(path):
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


def _checkpoints(out: Path) -> list[tuple[int, Path]]:
    found = []
    for p in out.glob("checkpoint-*"):
        if p.name.removeprefix("checkpoint-").isdigit() and (p / "reft" / fileformat.CONFIG_NAME).is_file() \
                and (p / "state" / fileformat.CONFIG_NAME).is_file():
            found.append((int(p.name.removeprefix("checkpoint-")), p))
    return sorted(found)


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


def _lr_factor(step: int, total: int, warm: int) -> float:
    """The schedule of :func:`steerlab.reft.train`: linear warm-up over ``warm`` steps, then linear decay to 0."""
    if step < warm:
        return (step + 1) / max(1, warm)
    return max(0.0, (total - step) / max(1, total - warm))


def _order(n: int, epoch: int, seed: int, shuffle: bool) -> list[int]:
    if not shuffle:
        return list(range(n))
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


def _save_checkpoint(out: Path, step: int, rm, opt, losses: list[float], cfg: RunConfig, data_sha: str) -> Path:
    ck = out / f"checkpoint-{step:06d}"
    if ck.exists():
        shutil.rmtree(ck)
    rm.save_pretrained(ck / "reft")
    sd = opt.state_dict()
    tensors = {f"optim.{i}.{k}": v for i, st in sd["state"].items() for k, v in st.items()}
    tensors["rng.torch"] = torch.get_rng_state()
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in sd["param_groups"]]
    config = {"step": step, "losses": losses, "settings": _jsonable(cfg.settings()), "data_sha256": data_sha, "param_groups": groups}
    fileformat.save(ck / "state", kind=STATE_KIND, config=config, tensors=tensors, fingerprint=rm.lab.fingerprint())
    return ck


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d, default=str))


def _restore(ck: Path, rm, opt, cfg: RunConfig, data_sha: str) -> tuple[int, list[float]]:
    meta, tensors = fileformat.load(ck / "state", kind=STATE_KIND, fingerprint=rm.lab.fingerprint())
    c = meta["config"]
    saved, now = c.get("settings", {}), _jsonable(cfg.settings())
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, run file {now.get(k)!r}" for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if diffs:
        raise ConfigError(f"{ck} was written by a run with other settings ({'; '.join(diffs)}); resume with the same run file or start a new output_dir")
    if c.get("data_sha256") != data_sha:
        raise ConfigError(f"{ck} was trained on other data: {cfg.data_file} changed since (sha256 differs); start a new output_dir")
    rm.load_weights(ck / "reft")
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    try:
        opt.load_state_dict({"state": state, "param_groups": c["param_groups"]})
    except (ValueError, KeyError) as e:
        raise FileFormatError(f"{ck}: the optimiser state does not fit this run's parameters: {e}") from None
    torch.set_rng_state(tensors["rng.torch"])
    return int(c["step"]), [float(x) for x in c["losses"]]


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
    is written there; ``resume=True`` continues). ``progress``: a tqdm bar on
    stderr (``None``: when stderr is a terminal). ``log`` prints the summary lines.
    """
    from tqdm.auto import tqdm

    from steerlab.reft.data import ReftDataCollator
    from steerlab.reft.loop import param_groups, step_loss

    out = cfg.output_dir
    found = _checkpoints(out) if out.exists() else []
    if resume and not found:
        raise ConfigError(f"--resume: {out} holds no complete checkpoint to resume from")
    if not resume and (found or (out / "final").exists()):
        raise ConfigError(f"{out} already holds a run (checkpoints or final/); pass --resume to continue it, or choose another output_dir")
    if max_steps is not None and max_steps < 1:
        raise ConfigError(f"max_steps={max_steps}: expected a positive number of steps")
    data_sha = _sha256(cfg.data_file)
    torch.manual_seed(cfg.seed)  # a new classification head starts from the seed too
    rm, ds = _build(cfg)
    try:
        n = len(ds)
        per_epoch = math.ceil(n / cfg.batch_size)
        total = per_epoch * cfg.epochs
        warm = int(cfg.warmup_ratio * total)
        opt = torch.optim.AdamW(param_groups(rm, cfg.weight_decay), lr=cfg.lr)
        collator = ReftDataCollator(rm.tokenizer)
        step, losses, resumed = 0, [], None
        if resume:
            resumed = found[-1][0]
            step, losses = _restore(found[-1][1], rm, opt, cfg, data_sha)
        trainable, base = rm.get_nb_trainable_parameters()
        log(f"{cfg.model}: {len(rm.interventions)} {type(rm.interventions[0]).__name__} ({trainable:,d} trainable parameters, "
            f"{100 * trainable / base:.4f}% of {base:,d}); {n} examples, {cfg.epochs} epochs of {per_epoch} steps"
            + (f"; resuming after step {step}" if resumed is not None else ""))
        run = TrainingRun(losses, cfg.epochs, total, 0.0, resumed)
        t0, device, stop_at = time.perf_counter(), rm.lab.device, total if max_steps is None else min(total, step + max_steps)
        bar = tqdm(total=total, initial=step, desc="train", unit="step", disable=(not sys.stderr.isatty()) if progress is None else not progress,
                   file=sys.stderr, dynamic_ncols=True)
        rm.train()
        try:
            while step < stop_at:
                epoch, b = divmod(step, per_epoch)
                idx = _order(n, epoch, cfg.seed, cfg.shuffle)[b * cfg.batch_size : (b + 1) * cfg.batch_size]
                batch = {k: v.to(device) for k, v in collator([ds[i] for i in idx]).items()}
                for g in opt.param_groups:
                    g["lr"] = cfg.lr * _lr_factor(step, total, warm)
                loss = step_loss(rm, batch)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                losses.append(float(loss.detach()))
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}", epoch=epoch + 1)
                if step % cfg.checkpoint_every == 0 or step == stop_at:
                    run.checkpoints.append(_save_checkpoint(out, step, rm, opt, losses, cfg, data_sha))
                    for _, old in _checkpoints(out)[: -cfg.keep_checkpoints]:
                        shutil.rmtree(old, ignore_errors=True)
        finally:
            bar.close()
            rm.eval()
        run.seconds = time.perf_counter() - t0
        if step == total:
            run.final = rm.save_pretrained(out / "final")
            from steerlab.viz import save_html

            save_html(run.plot(), out / "training_curve.html")
        return run
    finally:
        rm.unwrap()
