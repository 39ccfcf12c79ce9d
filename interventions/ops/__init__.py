"""Intervention types, one module each, registered by name."""

from steerlab.interventions.ops._base import Intervention, check_intervention, check_interventions, intervention_class, register, registered
from steerlab.interventions.ops._edit import compute_dtype, subspace_edit
from steerlab.interventions.ops.ablation import Mean, Noise, Zero
from steerlab.interventions.ops.add import Add
from steerlab.interventions.ops.collect import Collect
from steerlab.interventions.ops.function import Lambda
from steerlab.interventions.ops.interchange import Interchange
from steerlab.interventions.ops.scale import Scale
from steerlab.interventions.ops.sigmoid_mask import SigmoidMask
from steerlab.interventions.ops.subspace_interchange import BoundlessSubspaceInterchange, SubspaceInterchange

__all__ = [
    "Intervention",
    "register",
    "registered",
    "intervention_class",
    "check_intervention",
    "check_interventions",
    "subspace_edit",
    "compute_dtype",
    "Interchange",
    "SubspaceInterchange",
    "BoundlessSubspaceInterchange",
    "SigmoidMask",
    "Add",
    "Zero",
    "Mean",
    "Noise",
    "Scale",
    "Lambda",
    "Collect",
]
