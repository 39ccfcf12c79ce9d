"""steerlab.alignment — locating causal variables in a network.

Causal models (:class:`CausalModel`), counterfactual data
(:class:`CounterfactualDataset` and its encoders), distributed alignment
search (:class:`DAS`, :class:`BoundlessDAS`) scored by interchange-intervention
accuracy (:class:`IIA`), the controls every result needs beside it
(a re-initialised model and a localist alignment of the same size), search
over sites × positions × sizes (:func:`search`), and shipped tasks
(:mod:`steerlab.alignment.tasks`), and direction finders for steering
(:mod:`steerlab.alignment.directions`: DiffMean, PCA, probe, CAA, ActAdd). A result exports each variable's
:class:`~steerlab.Subspace` for steering.
"""

from steerlab.alignment import directions, tasks
from steerlab.alignment.causal_model import CausalModel
from steerlab.alignment.controls import localist_alignment, random_init_lab, reinitialise
from steerlab.alignment.counterfactuals import Counterfactual, CounterfactualBatch, CounterfactualDataset
from steerlab.alignment.das import DAS, BoundlessDAS
from steerlab.alignment.encoders import Encoder, PromptEncoder, VectorEncoder
from steerlab.alignment.iia import IIA
from steerlab.alignment.results import Curve, DASResult
from steerlab.alignment.search import SearchResult, search

__all__ = [
    "CausalModel",
    "Counterfactual",
    "CounterfactualBatch",
    "CounterfactualDataset",
    "Encoder",
    "VectorEncoder",
    "PromptEncoder",
    "DAS",
    "BoundlessDAS",
    "IIA",
    "Curve",
    "DASResult",
    "search",
    "SearchResult",
    "random_init_lab",
    "reinitialise",
    "localist_alignment",
    "tasks",
    "directions",
]
