"""The plain training loop: AdamW over a :class:`~steerlab.reft.ReftModel`'s trainable parameters.

No ``transformers.Trainer`` (and none of its import cost): AdamW with the
orthonormal maps kept out of weight decay, on the one training loop of
:mod:`steerlab.interventions.training` (seeded order, warm-up then linear
decay, gradient accumulation, losses read once per logging interval,
checkpoints with exact resume, a progress bar). ``steerlab train`` runs this
same function, so a run file and a Python call with the same settings see
the same batches and the same losses.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from steerlab.interventions.errors import ConfigError, DataError
from steerlab.interventions.orthonormal import is_no_decay
from steerlab.interventions.training import Checkpoints, LoopSettings, run_loop
from steerlab.reft.data import IGNORE_INDEX, ReftDataCollator
from steerlab.reft.model import ReftModel

__all__ = ["train", "TrainResult", "param_groups", "step_loss", "Checkpoints"]

#: the batch key holding the positions whose logits the loss needs (computed on the host by the loop)
LOSS_POSITIONS = "loss_positions"


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on projection weights only; never on biases or orthonormal maps."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (rest if is_no_decay(p) or name.endswith("bias") or p.dim() < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


_KEEP: dict[Any, bool] = {}


def _takes_logits_to_keep(model: nn.Module) -> bool:
    """Whether ``model.forward`` accepts ``logits_to_keep`` (its signature read once per forward function)."""
    forward = model.forward
    key = getattr(forward, "__func__", forward)
    if key not in _KEEP:
        try:
            _KEEP[key] = "logits_to_keep" in inspect.signature(forward).parameters
        except (TypeError, ValueError):
            _KEEP[key] = False
    return _KEEP[key]


def loss_positions(labels: torch.Tensor) -> torch.Tensor:
    """The positions ``t`` whose logits predict a labelled token (``labels[:, t + 1] != -100`` in some row).

    A ``nonzero``: call it on the host copy of the labels (the loop does, in the
    collated batch before it moves to the device), not inside a device step."""
    return (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero().squeeze(-1)


def step_loss(model: ReftModel, batch: dict[str, Any]) -> torch.Tensor:
    """The batch's loss. For a causal LM with token labels, the vocabulary
    projection runs only at positions that predict a labelled token (the
    response), not at every prompt token: the same mean cross-entropy as the
    model's own loss, at a fraction of the head's cost. Those positions come
    with the batch (``loss_positions``, computed on the host by :func:`train`);
    without them they are computed here (a host sync on a GPU)."""
    batch = dict(batch)
    keep = batch.pop(LOSS_POSITIONS, None)
    labels = batch.get("labels")
    if labels is None or labels.dim() != 2 or not _takes_logits_to_keep(model.model):
        return model(**batch).loss
    rest = {k: v for k, v in batch.items() if k != "labels"}
    keep = loss_positions(labels) if keep is None else keep.to(labels.device)
    logits = model(**rest, logits_to_keep=keep).logits  # logits at t predict the label at t + 1
    return F.cross_entropy(logits.flatten(0, 1).float(), labels[:, keep + 1].flatten(), ignore_index=IGNORE_INDEX)


@dataclass
class TrainResult:
    """What :func:`train` did: the loss of every optimiser step, the epochs reached and the time taken;
    with checkpoints, also the run's length, where it resumed and the checkpoints written."""

    losses: list[float] = field(default_factory=list)
    epochs: int = 0
    seconds: float = 0.0
    total_steps: int | None = None
    resumed_from: int | None = None
    checkpoints: list[Path] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return len(self.losses)

    def __repr__(self) -> str:
        if not self.losses:
            return "TrainResult(no steps)"
        return f"TrainResult(steps={self.steps}, epochs={self.epochs}, loss {self.losses[0]:.4f} -> {self.losses[-1]:.4f}, {self.seconds:.1f}s)"

    def plot(self):
        """The loss curve (:func:`steerlab.viz.reft_training_curve`)."""
        from steerlab.viz import reft_training_curve

        return reft_training_curve(self)


def _batches(model: ReftModel, dataset: Dataset | Sequence[Mapping[str, Any]], collator: Callable[[list[Any]], Mapping[str, Tensor]], cache_prefix: bool, batch_size: int):
    """``batch_of(rows)`` for the loop: collate on the host, find the loss positions there, move once."""
    device = model.lab.device
    wants_positions = _takes_logits_to_keep(model.model)

    def collate(rows: list[int]) -> dict[str, Any]:
        batch = collator([dataset[i] for i in rows])
        labels = batch.get("labels")
        if wants_positions and isinstance(labels, torch.Tensor) and labels.dim() == 2:
            batch[LOSS_POSITIONS] = loss_positions(labels)
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    n = len(dataset)  # type: ignore[arg-type]
    if not cache_prefix:
        return lambda rows: collate(rows.tolist())  # rows: a CPU tensor (no device sync)
    if n > batch_size:
        raise ConfigError(f"cache_prefix=True needs the whole dataset in one batch; it has {n} examples and batch_size={batch_size}")
    whole = collate(list(range(n)))
    whole["prefix"] = model.prefix(whole["input_ids"], whole.get("attention_mask"))
    return lambda rows: whole  # one batch, every epoch: its mean loss whatever the order (the model is in train mode here)


def train(
    model: ReftModel,
    dataset: Dataset | Sequence[Mapping[str, Any]],
    *,
    epochs: int = 1,
    lr: float = 4e-3,
    batch_size: int = 8,
    weight_decay: float = 0.0,
    gradient_accumulation_steps: int = 1,
    max_steps: int | None = None,
    collator: Callable[[list[Any]], Mapping[str, Tensor]] | None = None,
    shuffle: bool = True,
    seed: int = 0,
    warmup_ratio: float = 0.0,
    cache_prefix: bool = False,
    progress: bool | None = None,
    log_every: int = 10,
    checkpoints: Checkpoints | None = None,
) -> TrainResult:
    """Train ``model``'s interventions (and saved modules) on ``dataset`` with AdamW.

    The loop is :func:`steerlab.interventions.training.run_loop`: a seeded
    order (``seed``, ``shuffle``), linear warm-up over ``warmup_ratio`` of the
    steps then linear decay to zero (as pyreft's examples use), gradient
    accumulation, the orthonormal maps never decayed. The model is left in
    eval mode. ``progress``: a bar (default: when the output is a terminal or
    a notebook), showing the loss every ``log_every`` steps, when the losses
    are read. ``checkpoints``: a :class:`Checkpoints` (folder, frequency,
    ``resume=True``); each checkpoint's ``reft/`` folder is the ReFT model in
    the one file format, and a resumed run ends exactly where an
    uninterrupted one does.

    ``cache_prefix=True`` (the whole dataset in one batch: the few-example
    regime ReFT is known for) computes the frozen blocks below the lowest
    intervened layer once and trains on the blocks above only; exact for
    models without dropout below that layer.
    """
    if not isinstance(model, ReftModel):
        raise ConfigError(f"train() takes a ReftModel; got {type(model).__name__}")
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise DataError("the training dataset is empty")
    settings = LoopSettings(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, shuffle=shuffle, warmup_ratio=warmup_ratio,
                            gradient_accumulation_steps=gradient_accumulation_steps, max_steps=max_steps, log_every=log_every)
    if checkpoints is not None:
        if not isinstance(checkpoints, Checkpoints):
            raise ConfigError(f"checkpoints={checkpoints!r}: expected a steerlab.reft.Checkpoints")
        checkpoints = checkpoints.bind(save_model=lambda ck: model.save_pretrained(ck / "reft"),
                                       load_model=lambda ck: model.load_weights(ck / "reft"), fingerprint=model.lab.fingerprint(),
                                       identity={"weight_decay": weight_decay, "cache_prefix": cache_prefix})
    opt = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr)
    model.train()
    try:
        batch_of = _batches(model, dataset, collator or ReftDataCollator(model.tokenizer), cache_prefix, batch_size)
        run = run_loop(len(dataset), batch_of, lambda batch: step_loss(model, batch), opt, settings,  # type: ignore[arg-type]
                       checkpoints=checkpoints, progress=progress, desc="ReFT")
    finally:
        model.eval()
    return TrainResult(run.losses, run.epochs, run.seconds, run.total_steps, run.resumed_from, run.checkpoints)
