"""steerlab.reft — steering with the ReFT family, on the base layer's interventions.

LoReFT, DiReFT, NoReFT, ConsReFT and LobiReFT as subspace-edit
interventions; :class:`ReftConfig` / :func:`get_reft_model` / :class:`ReftModel`
(attach, ``print_trainable_parameters``, ``save_pretrained`` /
``from_pretrained``, ``generate``); datasets and a collator for instruction
and classification data; training through the Hugging Face ``Trainer``
(``ReftTrainerForCausalLM``, ...) or :func:`train`. A DAS ``Subspace`` seeds
a LoReFT with :meth:`LoReFT.from_subspace`. Names follow pyreft where one
exists (``ReftConfig``, ``get_reft_model``, ``ReftTrainerForCausalLM``,
``ReftDataCollator``, ``make_last_position_supervised_data_module``).
"""

from steerlab.reft._base import ReftIntervention
from steerlab.reft.config import ReftConfig, TaskType
from steerlab.reft.effects import SteeringEffect, steering_effect
from steerlab.reft.data import (
    ClassificationDataset,
    InstructionDataset,
    ReftDataCollator,
    format_prompt,
    make_last_position_supervised_data_module,
    make_supervised_data_module,
)
from steerlab.reft.interventions import ConsReFT, DiReFT, LobiReFT, LoReFT, NoReFT
from steerlab.reft.model import ReftModel, get_reft_model
from steerlab.reft.from_pyreft import import_pyreft
from steerlab.reft.positions import prompt_positions
from steerlab.reft.loop import Checkpoints, TrainResult, train
from steerlab.reft.reft_r1 import ReFTr1
from steerlab.reft import concepts, judges, steer_metrics
from steerlab.reft.concepts import Concept, ConceptSplit
from steerlab.reft.judges import JUDGE_FLOOR, Judge, JudgeCheck
from steerlab.reft.steer_eval import Contender, GenerationSettings, evaluate, steering_add
from steerlab.reft.steer_result import SteerEvalResult

__all__ = [
    "LoReFT",
    "DiReFT",
    "NoReFT",
    "ConsReFT",
    "LobiReFT",
    "ReftIntervention",
    "ReftConfig",
    "TaskType",
    "ReftModel",
    "get_reft_model",
    "from_pretrained",
    "import_pyreft",
    "InstructionDataset",
    "ClassificationDataset",
    "ReftDataCollator",
    "format_prompt",
    "make_supervised_data_module",
    "make_last_position_supervised_data_module",
    "prompt_positions",
    "ReftTrainer",
    "ReftTrainerForCausalLM",
    "ReftTrainerForSequenceClassification",
    "train",
    "TrainResult",
    "Checkpoints",
    "SteeringEffect",
    "steering_effect",
    "ReFTr1",
    "concepts",
    "judges",
    "steer_metrics",
    "Concept",
    "ConceptSplit",
    "Judge",
    "JudgeCheck",
    "JUDGE_FLOOR",
    "Contender",
    "GenerationSettings",
    "evaluate",
    "steering_add",
    "SteerEvalResult",
]

from_pretrained = ReftModel.from_pretrained

_TRAINERS = ("ReftTrainer", "ReftTrainerForCausalLM", "ReftTrainerForSequenceClassification")


def __getattr__(name: str):
    # the Trainer classes import transformers.Trainer (seconds); only when asked for
    if name in _TRAINERS:
        from steerlab.reft import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'steerlab.reft' has no attribute {name!r}")
