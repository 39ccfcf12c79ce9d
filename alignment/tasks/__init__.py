"""Tasks shipped with steerlab: a causal model, an encoder and data splits, ready for DAS.

* :func:`hierarchical_equality` — the DAS paper's test bed: four entity
  vectors, label ``(w = x) = (y = z)``, a 3-layer MLP with hidden size 16.
* :func:`sentiment` — adjective polarity on a templated review prompt, for
  language models (SmolLM2-135M): the polarity is computed from the
  adjective, and read at the final answer position.
* :mod:`facts` — hand-written factual prompts (subject, relation prompt,
  one-token answer) and :func:`known_facts`, the ones a model answers
  correctly: causal tracing's inputs.
* :func:`ioi` — indirect object identification (Wang et al. 2022): the
  paper's templates, one-token names split into train and test, the ABC
  corruption, role positions (IO, S1, S2, END) and the logit difference.
"""

from steerlab.alignment.tasks.facts import FACTS, Fact, KnownFacts, facts, known_facts
from steerlab.alignment.tasks.ioi import IOI, IOIDataset, IOIPrompt, ioi
from steerlab.alignment.tasks.hierarchical_equality import EqualityMLP, HierarchicalEquality, hierarchical_equality
from steerlab.alignment.tasks.sentiment import Sentiment, sentiment

__all__ = [
    "HierarchicalEquality",
    "hierarchical_equality",
    "EqualityMLP",
    "Sentiment",
    "sentiment",
    "Fact",
    "FACTS",
    "facts",
    "KnownFacts",
    "known_facts",
    "IOI",
    "IOIDataset",
    "IOIPrompt",
    "ioi",
]
