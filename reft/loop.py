"""The plain training loop: AdamW over a :class:`~steerlab.reft.ReftModel`'s trainable parameters.

No ``transformers.Trainer`` (and none of its import cost): a data loader,
AdamW with the orthonormal maps kept out of weight decay, a linear schedule.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from steerlab.interventions.errors import ConfigError, DataError
from steerlab.interventions.orthonormal import is_no_decay
from steerlab.reft.data import ReftDataCollator
from steerlab.reft.model import ReftModel

__all__ = ["train", "TrainResult", "param_groups", "step_loss"]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on projection weights only; never on biases or orthonormal maps."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (rest if is_no_decay(p) or name.endswith("bias") or p.dim() < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def _takes_logits_to_keep(model: nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def step_loss(model: ReftModel, batch: dict[str, Any]) -> torch.Tensor:
    """The batch's loss. For a causal LM with token labels, the vocabulary
    projection runs only at positions that predict a labelled token (the
    response), not at every prompt token: the same mean cross-entropy as the
    model's own loss, at a fraction of the head's cost."""
    labels = batch.get("labels")
    if labels is None or labels.dim() != 2 or not _takes_logits_to_keep(model.model):
        return model(**batch).loss
    rest = {k: v for k, v in batch.items() if k != "labels"}
    keep = (labels[:, 1:] != -100).any(0).nonzero().squeeze(-1)  # logits at t predict the label at t + 1
    logits = model(**rest, logits_to_keep=keep).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), labels[:, keep + 1].flatten(), ignore_index=-100)


@dataclass
class TrainResult:
    """What :func:`train` did: the loss of every optimiser step, and the time taken."""

    losses: list[float] = field(default_factory=list)
    epochs: int = 0
    seconds: float = 0.0

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


def train(
    model: ReftModel,
    dataset: Dataset,
    *,
    epochs: int = 1,
    lr: float = 4e-3,
    batch_size: int = 8,
    weight_decay: float = 0.0,
    gradient_accumulation_steps: int = 1,
    max_steps: int | None = None,
    collator=None,
    shuffle: bool = True,
    seed: int = 0,
    warmup_ratio: float = 0.0,
    cache_prefix: bool = False,
) -> TrainResult:
    """Train ``model``'s interventions (and saved modules) on ``dataset`` with AdamW.

    A linear learning-rate decay to zero (after ``warmup_ratio`` of the
    steps of linear warm-up), as pyreft's examples use; the orthonormal maps
    are never decayed. The model is left in eval mode.

    ``cache_prefix=True`` (the whole dataset in one batch: the few-example
    regime ReFT is known for) computes the frozen blocks below the lowest
    intervened layer once and trains on the blocks above only; exact for
    models without dropout below that layer.
    """
    if not isinstance(model, ReftModel):
        raise ConfigError(f"train() takes a ReftModel; got {type(model).__name__}")
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise DataError("the training dataset is empty")
    if epochs < 1 or batch_size < 1 or gradient_accumulation_steps < 1:
        raise ConfigError(f"epochs={epochs}, batch_size={batch_size}, gradient_accumulation_steps={gradient_accumulation_steps}: each must be >= 1")
    collator = collator or ReftDataCollator(model.tokenizer)
    device = model.lab.device
    if cache_prefix:
        if len(dataset) > batch_size:  # type: ignore[arg-type]
            raise ConfigError(f"cache_prefix=True needs the whole dataset in one batch; it has {len(dataset)} examples and batch_size={batch_size}")  # type: ignore[arg-type]
        whole = {k: v.to(device) for k, v in collator([dataset[i] for i in range(len(dataset))]).items()}  # type: ignore[arg-type]
        model.train()
        whole["prefix"] = model.prefix(whole["input_ids"], whole.get("attention_mask"))
        loader = [whole]
    else:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collator,
                            generator=torch.Generator().manual_seed(seed))
    total = -(-len(loader) // gradient_accumulation_steps) * epochs
    total = min(total, max_steps) if max_steps else total
    opt = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr)
    warm = int(warmup_ratio * total)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / max(1, warm) if s < warm else max(0.0, (total - s) / max(1, total - warm)))
    result, t0 = TrainResult(), time.perf_counter()
    model.train()
    try:
        acc, running = 0, 0.0
        for epoch in range(epochs):
            result.epochs = epoch + 1
            for batch in loader:
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                loss = step_loss(model, batch) / gradient_accumulation_steps
                loss.backward()
                running += float(loss.detach())
                acc += 1
                if acc == gradient_accumulation_steps:
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
                    result.losses.append(running)
                    acc, running = 0, 0.0
                    if max_steps and result.steps >= max_steps:
                        return result
            if acc:
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                result.losses.append(running * gradient_accumulation_steps / acc)
                acc, running = 0, 0.0
    finally:
        model.eval()
        result.seconds = time.perf_counter() - t0
    return result
