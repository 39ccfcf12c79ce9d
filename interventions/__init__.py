"""steerlab.interventions — the base layer.

Sites and their architecture adapters, unit selection (positions, heads,
dims), intervention types, the orthonormal map, ``Subspace``, the run graph
and its hook engine, activation collection, patching sweeps and the one file
format. Everything else in steerlab is built from these pieces.
"""

from steerlab.interventions import metrics
from steerlab.interventions.activation_cache import ActivationCache
from steerlab.interventions.adapters import Architecture, register_architecture
from steerlab.interventions.attachment import Attachment
from steerlab.interventions.attribution import attribution_patching
from steerlab.interventions.attribution_result import AttributionResult, Comparison
from steerlab.interventions.direct_effects import (
    DirectionEffects,
    DirectionLogits,
    HeadLogitAttribution,
    direction_effects,
    direction_logits,
    head_logit_attribution,
)
from steerlab.interventions.engine import HookEngine, PreparedRun
from steerlab.interventions.errors import *  # noqa: F403 - the error hierarchy is public
from steerlab.interventions.errors import __all__ as _errors
from steerlab.interventions.facts import ModelFacts
from steerlab.interventions.generation import Generation
from steerlab.interventions.gradients import Gradients, Taps, metric_gradients
from steerlab.interventions.graph import Graph, GraphResult, Run, RunResult, SourceValue
from steerlab.interventions.lab import Lab, wrap
from steerlab.interventions.logit_lens import LogitLens, ReadOut, logit_lens
from steerlab.interventions.nnsight_engine import NNsightEngine
from steerlab.interventions.plan import Engine, Plan
from steerlab.interventions.ops import (
    Add,
    BoundlessSubspaceInterchange,
    Collect,
    Interchange,
    Intervention,
    Lambda,
    Mean,
    Noise,
    Scale,
    SigmoidMask,
    SubspaceInterchange,
    Zero,
    register,
    registered,
    subspace_edit,
)
from steerlab.interventions.orthonormal import Orthonormal
from steerlab.interventions.prefix import Prefix
from steerlab.interventions.subspace import Subspace
from steerlab.interventions.subspace_attribution import (
    IntegratedGradients,
    SubspaceAttribution,
    integrated_gradients,
    subspace_attribution,
)
from steerlab.interventions.sweeps import SweepResult, sweep
from steerlab.interventions.from_pyvene import import_pyvene
from steerlab.interventions.units import Positions

__all__ = [
    "wrap",
    "Lab",
    "Generation",
    "ModelFacts",
    "Plan",
    "Engine",
    "HookEngine",
    "PreparedRun",
    "NNsightEngine",
    "Architecture",
    "register_architecture",
    "Attachment",
    "ActivationCache",
    "Graph",
    "Run",
    "RunResult",
    "GraphResult",
    "SourceValue",
    "Prefix",
    "Subspace",
    "Positions",
    "Orthonormal",
    "Intervention",
    "register",
    "registered",
    "subspace_edit",
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
    "sweep",
    "import_pyvene",
    "SweepResult",
    "metrics",
    "attribution_patching",
    "AttributionResult",
    "Comparison",
    "Taps",
    "Gradients",
    "metric_gradients",
    "subspace_attribution",
    "SubspaceAttribution",
    "integrated_gradients",
    "IntegratedGradients",
    "logit_lens",
    "LogitLens",
    "ReadOut",
    "direction_logits",
    "DirectionLogits",
    "head_logit_attribution",
    "HeadLogitAttribution",
    "direction_effects",
    "DirectionEffects",
    *_errors,
]
