"""Training a :class:`~steerlab.reft.ReftModel`: through the Hugging Face ``Trainer``, or a plain loop.

With the ``Trainer`` (``ReftTrainerForCausalLM``, ``ReftTrainerForSequenceClassification``)
everything accelerate offers applies unchanged, because the interventions are
attached to the model for the whole run: DDP (``accelerate launch`` /
``torchrun``, see ``docs/reft.md``), bf16/fp16, gradient accumulation,
gradient checkpointing. What the ReFT trainers add:

- the orthonormal maps' parameters are never weight-decayed (they are
  scale-invariant, and decay must not reach them: ``is_no_decay``);
- checkpoints hold the ReFT model in steerlab's file format
  (``steerlab.json`` + ``weights.safetensors``, not the frozen base model),
  and ``resume_from_checkpoint`` / ``load_best_model_at_end`` load it back
  in place; the optimizer, scheduler and RNG files beside it are the
  Trainer's own (loaded by it with ``weights_only=True``);
- the default collator is :class:`~steerlab.reft.ReftDataCollator`.

:func:`steerlab.reft.train` (``loop.py``) is the plain loop.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers import Trainer

from steerlab.interventions.errors import ConfigError, DataError, checked_first
from steerlab.interventions.orthonormal import is_no_decay
from steerlab.reft.data import ReftDataCollator
from steerlab.reft.model import ReftModel

__all__ = ["ReftTrainer", "ReftTrainerForCausalLM", "ReftTrainerForSequenceClassification"]


def _check_model(model: object) -> None:
    if not isinstance(model, ReftModel):
        raise ConfigError(f"a ReFT trainer trains a steerlab ReftModel (get_reft_model(...)); got {type(model).__name__}")


class ReftTrainer(Trainer):
    """``transformers.Trainer`` for a :class:`~steerlab.reft.ReftModel`."""

    @checked_first(model=_check_model)
    def __init__(self, model: ReftModel | None = None, args=None, data_collator=None, *pos, **kwargs):  # None: refused (Trainer's order)
        if data_collator is None:
            tok = kwargs.get("processing_class") or model.tokenizer
            if tok is None:
                raise DataError("give data_collator=, processing_class= or a ReftModel with a tokenizer")
            data_collator = ReftDataCollator(tok)
        super().__init__(model, args, data_collator, *pos, **kwargs)

    def _reft(self, model: nn.Module | None = None) -> ReftModel:
        m = self.accelerator.unwrap_model(model if model is not None else self.model)
        if not isinstance(m, ReftModel):  # pragma: no cover - guarded in __init__
            raise ConfigError(f"expected a ReftModel inside the Trainer; found {type(m).__name__}")
        return m

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        names = super().get_decay_parameter_names(model)
        never = {n for n, p in model.named_parameters() if is_no_decay(p)}
        return [n for n in names if n not in never]

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        self._reft().save_pretrained(output_dir, state_dict=state_dict)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))  # the Trainer's own file, as it writes it

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        self._reft(model).load_weights(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        self._reft().load_weights(self.state.best_model_checkpoint)


class ReftTrainerForCausalLM(ReftTrainer):
    """For instruction data (:class:`~steerlab.reft.InstructionDataset`): the loss is the model's, on response tokens."""


class ReftTrainerForSequenceClassification(ReftTrainer):
    """For :class:`~steerlab.reft.ClassificationDataset`; reports accuracy when no ``compute_metrics`` is given."""

    def __init__(self, *pos, **kwargs):
        kwargs.setdefault("compute_metrics", _accuracy)
        super().__init__(*pos, **kwargs)


def _accuracy(pred) -> dict[str, float]:
    logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
    return {"accuracy": float((logits.argmax(-1) == pred.label_ids).mean())}
