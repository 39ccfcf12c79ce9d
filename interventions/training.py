"""The one training loop: DAS (:class:`~steerlab.alignment.DAS`), :func:`steerlab.reft.train`
and ``steerlab train`` all run through :func:`run_loop`.

A caller supplies how to turn a batch of example indices into a loss
(``batch_of(rows)`` on the host, then ``loss_of(batch)`` on the device) and an
optimiser; the loop owns everything else, the same way for every caller:

**Order** — one seeded shuffle. A ``torch.Generator`` seeded with ``seed``
draws one permutation of the ``n`` examples per epoch, epoch after epoch from
the same stream (``randperm(n, generator=g)``); micro-batches are consecutive
slices of ``batch_size`` (the last one may be smaller). ``shuffle=False``
takes ``0..n-1`` every epoch. So the same seed gives the same batches through
every entry point; :func:`batch_order` lists them.

**Schedule** — with ``T`` optimiser steps (``max_steps`` caps it) and
``w = int(warmup_ratio · T)`` warm-up steps, step ``s`` runs at

.. math::

    \\mathrm{lr}(s) = \\mathrm{lr} \\cdot \\begin{cases} (s + 1) / w & s < w \\\\
    (T - s) / (T - w) & \\text{otherwise} \\end{cases}

a function of the step alone (:func:`lr_factor`), so a resumed run needs no
scheduler state.

**Accumulation** — ``gradient_accumulation_steps = a`` micro-batches per
optimiser step; an epoch's last group may hold fewer, and its loss is the
mean over the micro-batches it has. Steps per epoch:
``ceil(ceil(n / batch_size) / a)``.

**Logging** — a step's loss stays where it was computed. Every ``log_every``
steps (and at a checkpoint and at the end) the losses of the interval are
read in one transfer; the progress bar shows their mean then. Nothing else
leaves the device inside a step, so a GPU step never waits on the host.
The result holds the loss of every step.

**Checkpoints and exact resume** — with :class:`Checkpoints`, every
``every`` steps ``directory/checkpoint-NNNNNN/`` receives the caller's model
files and ``state/`` (the one file format: step, losses, optimiser state,
RNG states, the settings that must agree to resume), the state written last,
so a checkpoint without it is incomplete and ignored. Resuming restores all
of it and replays the order's generator to the checkpoint's epoch: the
finished run equals an uninterrupted one, bit for bit.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from steerlab.interventions import fileformat
from steerlab.interventions.errors import ConfigError, DataError, FileFormatError
from steerlab.interventions.progress import bar

__all__ = ["LoopSettings", "LoopResult", "Checkpoints", "run_loop", "batch_order", "lr_factor", "STATE_KIND"]

#: the ``kind`` of a checkpoint's ``state/`` folder in the one file format
STATE_KIND = "train_state"


@dataclass(frozen=True)
class LoopSettings:
    """How :func:`run_loop` trains (see the module docstring); every field is checked on construction."""

    # __post_init__ checks every field with a named error: a runtime type checker on __init__ (the test
    # suite's jaxtyping hook honours this flag, as typing.no_type_check sets it) would pre-empt it
    __no_type_check__ = True

    epochs: int = 1
    batch_size: int = 8
    lr: float = 1e-3
    seed: int = 0
    shuffle: bool = True
    warmup_ratio: float = 0.0
    gradient_accumulation_steps: int = 1
    max_steps: int | None = None
    log_every: int = 10

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "gradient_accumulation_steps", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}={value!r}: expected a positive int")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or isinstance(self.max_steps, bool) or self.max_steps < 1):
            raise ConfigError(f"max_steps={self.max_steps!r}: expected a positive int or None")
        if not (isinstance(self.lr, (int, float)) and not isinstance(self.lr, bool) and self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr={self.lr!r}: expected a positive learning rate")
        if not (isinstance(self.warmup_ratio, (int, float)) and 0 <= self.warmup_ratio < 1):
            raise ConfigError(f"warmup_ratio={self.warmup_ratio!r}: expected a fraction in [0, 1)")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"seed={self.seed!r}: expected an int")
        if not isinstance(self.shuffle, bool):
            raise ConfigError(f"shuffle={self.shuffle!r}: expected True or False")

    def micro_batches(self, n: int) -> int:
        """Micro-batches per epoch over ``n`` examples."""
        return math.ceil(n / self.batch_size)

    def steps_per_epoch(self, n: int) -> int:
        """Optimiser steps per epoch over ``n`` examples."""
        return math.ceil(self.micro_batches(n) / self.gradient_accumulation_steps)

    def total_steps(self, n: int) -> int:
        """Optimiser steps of the whole run (``max_steps`` caps it)."""
        total = self.steps_per_epoch(n) * self.epochs
        return min(total, self.max_steps) if self.max_steps else total

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """The learning-rate multiplier of optimiser step ``step`` (0-based): linear warm-up over
    ``warmup`` steps, then linear decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


class _Order:
    """The seeded order: epoch ``e``'s permutation is the ``e``-th draw of one generator stream."""

    def __init__(self, n: int, seed: int, shuffle: bool):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self._epoch, self._perm, self._gen = -1, torch.arange(n), torch.Generator().manual_seed(seed)

    def epoch(self, e: int) -> Int[Tensor, " example"]:
        if not self.shuffle:
            return torch.arange(self.n)
        if e < self._epoch:  # going back: restart the stream
            self._epoch, self._gen = -1, torch.Generator().manual_seed(self.seed)
        while self._epoch < e:
            self._perm = torch.randperm(self.n, generator=self._gen)
            self._epoch += 1
        return self._perm


def _groups(perm: Tensor, s: LoopSettings) -> list[list[Tensor]]:
    """An epoch's micro-batches (consecutive slices of ``perm``), grouped per optimiser step."""
    micro = [perm[a : a + s.batch_size] for a in range(0, perm.shape[0], s.batch_size)]
    a = s.gradient_accumulation_steps
    return [micro[i : i + a] for i in range(0, len(micro), a)]


def batch_order(n: int, settings: LoopSettings) -> Iterator[tuple[int, int, list[Int[Tensor, " batch"]]]]:
    """``(epoch, step, micro-batches)`` of every optimiser step :func:`run_loop` takes over ``n`` examples:
    the example indices each micro-batch holds, in order."""
    order, spe, total = _Order(n, settings.seed, settings.shuffle), settings.steps_per_epoch(n), settings.total_steps(n)
    step = 0
    while step < total:
        epoch = step // spe
        for group in _groups(order.epoch(epoch), settings)[step % spe :]:
            if step >= total:
                return
            yield epoch, step, group
            step += 1


@dataclass
class LoopResult:
    """What :func:`run_loop` did: the loss of every optimiser step (resumed runs: from step 1), the
    epochs reached, the run's length, where it resumed and the checkpoints it wrote this time."""

    losses: list[float]
    epochs: int
    total_steps: int
    seconds: float = 0.0
    resumed_from: int | None = None
    checkpoints: list[Path] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return len(self.losses)

    @property
    def finished(self) -> bool:
        return self.steps >= self.total_steps


@dataclass
class Checkpoints:
    """Where and how often :func:`run_loop` checkpoints, and whether it resumes.

    Args:
        directory: the run's folder; checkpoints are ``checkpoint-NNNNNN/`` inside it.
        every: a checkpoint every this many optimiser steps (and at the last step).
        keep: how many of the latest checkpoints to keep.
        resume: continue from the latest complete checkpoint (one must exist);
            without it, a folder that already holds checkpoints is refused.
        stop_after: stop after this many steps of this invocation, with a
            checkpoint there (``resume=True`` continues later).
        identity: more settings that must agree to resume (the caller's: model,
            data hash, ...); the loop adds its own settings and the example count.
        save_model: writes the trained weights inside a checkpoint folder
            (set by the entry point, e.g. ``reft.train``).
        load_model: reads them back from one.
        fingerprint: the model's, checked when the state is read back.
    """

    directory: str | Path
    every: int = 50
    keep: int = 2
    resume: bool = False
    stop_after: int | None = None
    identity: dict[str, Any] = field(default_factory=dict)
    save_model: Callable[[Path], Any] | None = None
    load_model: Callable[[Path], Any] | None = None
    fingerprint: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        for name in ("every", "keep"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"Checkpoints({name}={value!r}): expected a positive int")
        if self.stop_after is not None and (not isinstance(self.stop_after, int) or self.stop_after < 1):
            raise ConfigError(f"Checkpoints(stop_after={self.stop_after!r}): expected a positive number of steps")

    def bind(self, **kwargs: Any) -> Checkpoints:
        """A copy with the entry point's pieces (``save_model``, ``load_model``, ``fingerprint``, more ``identity``)."""
        identity = {**self.identity, **kwargs.pop("identity", {})}
        return replace(self, identity=identity, **kwargs)

    def found(self) -> list[tuple[int, Path]]:
        """The complete checkpoints in :attr:`directory`, oldest first."""
        d = Path(self.directory)
        if not d.is_dir():
            return []
        out = []
        for p in d.glob("checkpoint-*"):
            tail = p.name.removeprefix("checkpoint-")
            if tail.isdigit() and (p / "state" / fileformat.CONFIG_NAME).is_file():
                out.append((int(tail), p))
        return sorted(out)

    def latest_step(self) -> int | None:
        found = self.found()
        return found[-1][0] if found else None

    def save(self, step: int, optimizer: torch.optim.Optimizer, losses: list[float], identity: dict[str, Any]) -> Path:
        """Write ``checkpoint-{step}``: the model files, then the state (last: it marks the checkpoint complete)."""
        ck = Path(self.directory) / f"checkpoint-{step:06d}"
        if ck.exists():
            shutil.rmtree(ck)
        ck.mkdir(parents=True)
        if self.save_model is not None:
            self.save_model(ck)
        tensors, scalars, groups = _optimizer_tensors(optimizer)
        tensors.update(_rng_tensors())
        config = {"step": step, "losses": losses, "settings": identity, "param_groups": groups, "optimizer_scalars": scalars}
        fileformat.save(ck / "state", kind=STATE_KIND, config=config, tensors=tensors, fingerprint=self.fingerprint)
        for _, old in self.found()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return ck

    def restore(self, ck: Path, optimizer: torch.optim.Optimizer, identity: dict[str, Any]) -> tuple[int, list[float]]:
        """Load checkpoint ``ck`` into the model, the optimiser and the RNGs; ``(step, losses)``."""
        meta, tensors = fileformat.load(ck / "state", kind=STATE_KIND, fingerprint=self.fingerprint)
        c = meta["config"]
        saved = c.get("settings", {})
        diffs = [f"{k}: checkpoint {saved.get(k)!r}, this run {identity.get(k)!r}"
                 for k in sorted(set(saved) | set(identity)) if saved.get(k) != identity.get(k)]
        if diffs:
            raise ConfigError(f"{ck} was written by a run with other settings ({'; '.join(diffs)}); "
                              "resume with the same settings, or start a new run in another folder")
        if self.load_model is not None:
            self.load_model(ck)
        _load_optimizer(optimizer, tensors, c, ck)
        _set_rng(tensors)
        return int(c["step"]), [float(x) for x in c["losses"]]


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any], list[dict]]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for i, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"optim.{i}.{k}"] = v
            else:
                scalars[f"{i}.{k}"] = v
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, scalars, json.loads(json.dumps(groups, default=str))


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], c: dict, ck: Path) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    for key, v in (c.get("optimizer_scalars") or {}).items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = v
    try:
        optimizer.load_state_dict({"state": state, "param_groups": c["param_groups"]})
    except (ValueError, KeyError, TypeError) as e:
        raise FileFormatError(f"{ck}: the optimiser state does not fit this run's parameters: {e}") from None


def _rng_tensors() -> dict[str, Tensor]:
    out = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return out


def _set_rng(tensors: dict[str, Tensor]) -> None:
    if "rng.torch" not in tensors:
        raise FileFormatError("the checkpoint's state holds no RNG state (rng.torch): it cannot be resumed exactly")
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


class _Losses:
    """Per-step losses kept on their device and read once per logging interval."""

    def __init__(self, read: list[float]):
        self.read, self.pending = read, []

    def add(self, loss: Tensor) -> None:
        self.pending.append(loss)

    def flush(self) -> float | None:
        """Read the pending losses in one transfer; their mean (``None`` if there were none)."""
        if not self.pending:
            return None
        values = torch.stack([p.float() for p in self.pending]).cpu().tolist()
        self.read.extend(values)
        self.pending = []
        return sum(values) / len(values)


def _start(checkpoints: Checkpoints | None, optimizer, identity: dict[str, Any]) -> tuple[int, list[float], int | None]:
    """``(step, losses, resumed_from)``: from the latest checkpoint when resuming, else from scratch."""
    if checkpoints is None:
        return 0, [], None
    found = checkpoints.found()
    if checkpoints.resume:
        if not found:
            raise ConfigError(f"resume: {checkpoints.directory} holds no complete checkpoint to resume from")
        step, losses = checkpoints.restore(found[-1][1], optimizer, identity)
        return step, losses, step
    if found:
        raise ConfigError(f"{checkpoints.directory} already holds checkpoints of a run; resume it (resume=True, "
                          "steerlab train --resume) or choose another folder")
    return 0, [], None


def _take_step(group: list[Tensor], batch_of, loss_of, optimizer: torch.optim.Optimizer, factor: float) -> Tensor:
    """One optimiser step over its micro-batches at ``factor`` times each group's initial learning rate;
    the step's loss, still on its device (nothing is read here)."""
    parts = []
    for rows in group:
        loss = loss_of(batch_of(rows)) / len(group)
        loss.backward()
        parts.append(loss.detach())
    for g in optimizer.param_groups:
        g["lr"] = g["initial_lr"] * factor
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return parts[0] if len(parts) == 1 else torch.stack(parts).sum()


def run_loop(
    n: int,
    batch_of: Callable[[Int[Tensor, " batch"]], Any],
    loss_of: Callable[[Any], Tensor],
    optimizer: torch.optim.Optimizer,
    settings: LoopSettings,
    *,
    on_step: Callable[[int, int], None] | None = None,
    on_epoch: Callable[[int, int], None] | None = None,
    checkpoints: Checkpoints | None = None,
    progress: bool | None = None,
    desc: str = "train",
) -> LoopResult:
    """Train over ``n`` examples (see the module docstring); returns the losses of every step.

    ``batch_of(rows)`` turns a micro-batch of example indices (a CPU ``LongTensor``)
    into what ``loss_of`` takes; ``loss_of(batch)`` returns the micro-batch's scalar
    loss. ``on_step(step, total)`` runs before each optimiser step (e.g. a
    temperature schedule), ``on_epoch(epoch, steps_done)`` after each epoch's
    last step. The optimiser's learning rates are set from :func:`lr_factor`
    times each group's ``initial_lr`` (its ``lr`` when the loop starts).
    """
    if n < 1:
        raise DataError("the training dataset is empty")
    total, spe = settings.total_steps(n), settings.steps_per_epoch(n)
    warm = int(settings.warmup_ratio * total)
    for g in optimizer.param_groups:
        g.setdefault("initial_lr", g["lr"])
    loop = {k: v for k, v in settings.to_json().items() if k != "log_every"}  # how often losses are read changes nothing
    identity = {**(checkpoints.identity if checkpoints else {}), "loop": loop, "examples": n}
    step, losses, resumed = _start(checkpoints, optimizer, identity)
    stop = total if checkpoints is None or checkpoints.stop_after is None else min(total, step + checkpoints.stop_after)
    result = LoopResult(losses, math.ceil(step / spe) if step else 0, total, 0.0, resumed)
    log = _Losses(losses)
    order, groups, t0 = _Order(n, settings.seed, settings.shuffle), (-1, []), time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    with bar(total=total, initial=step, desc=desc, unit="step", progress=progress) as b:
        while step < stop:
            epoch = step // spe
            if groups[0] != epoch:  # the epoch's micro-batches, sliced once
                groups = (epoch, _groups(order.epoch(epoch), settings))
            group = groups[1][step % spe]
            if on_step is not None:
                on_step(step, total)
            log.add(_take_step(group, batch_of, loss_of, optimizer, lr_factor(step, total, warm)))
            step += 1
            result.epochs = epoch + 1
            b.update(1)
            saving = checkpoints is not None and (step % checkpoints.every == 0 or step == stop)
            if step % settings.log_every == 0 or step == stop or saving:
                mean = log.flush()
                b.set_postfix(loss=f"{mean:.4f}", epoch=epoch + 1)
            if saving:
                result.checkpoints.append(checkpoints.save(step, optimizer, losses, identity))
            if on_epoch is not None and (step % spe == 0 or step == total):
                on_epoch(epoch, step)
    log.flush()
    result.seconds = time.perf_counter() - t0
    return result
