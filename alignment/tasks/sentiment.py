"""Adjective polarity on a templated review, for language models.

Prompt: ``"Review: The {noun} was {adjective}.\\nSentiment:"``; labels: the
next-token logits of ``" positive"`` / ``" negative"`` compared. SmolLM2's own
greedy answer is capitalised (``" Positive"``, and for most negative reviews
``" Negative"``), but the capitalised pair is a biased classifier: measured on
all 528 task prompts, comparing ``" Positive"`` with ``" Negative"`` labels 93%
correctly (every positive, 86% of the negatives, with margins near 0), the
log-sum-exp of both spellings 99.6%, the lower-case pair 100% (smallest margin
0.84). Scored with a pair the model separates poorly, IIA would partly
measure that bias, so the lower-case pair is the default (``label_tokens=``
chooses others). The causal model has two
inputs, ``NOUN`` (irrelevant) and ``ADJECTIVE``, and one computed variable,
``POLARITY``, the adjective's sentiment — which appears nowhere in the
prompt as a token: the model must compute it from the adjective and carry it
to the final position, where the answer is read. Interchanging ``POLARITY``
from a source sets the label to the source's polarity whatever the base's
adjective.

The word lists are single tokens for SmolLM2's tokenizer, and SmolLM2-135M
labels every (noun, adjective) prompt correctly (tested). Adjectives are
split into disjoint train and test sets, so held-out counterfactuals use
adjectives never seen in training — a subspace that memorised the training
adjectives does not pass.
"""

from __future__ import annotations

import random

from steerlab.alignment.causal_model import CausalModel, Setting
from steerlab.alignment.counterfactuals import CounterfactualDataset
from steerlab.alignment.encoders import PromptEncoder
from steerlab.interventions.errors import ConfigError

__all__ = ["Sentiment", "sentiment", "POSITIVE", "NEGATIVE", "NOUNS"]

POSITIVE = (
    "wonderful", "great", "excellent", "amazing", "fantastic", "delightful", "superb", "brilliant", "lovely",
    "enjoyable", "charming", "pleasant", "impressive", "beautiful", "outstanding", "terrific", "marvelous",
    "perfect", "splendid", "fabulous", "awesome", "incredible",
)
NEGATIVE = (
    "terrible", "awful", "horrible", "dreadful", "boring", "disappointing", "poor", "bad", "unpleasant", "dull",
    "annoying", "tedious", "weak", "miserable", "ugly", "nasty", "stupid", "sad", "painful", "useless", "rude",
    "worse",
)
NOUNS = ("movie", "food", "book", "hotel", "service", "show", "concert", "meal", "game", "trip", "film", "album")


class Sentiment:
    """The task (see the module docstring).

    Args:
        test_adjectives: adjectives of each polarity held out for testing.
        seed: draws the split.
        label_tokens: ``{"positive": token, "negative": token}`` read as the answer
            (default ``" positive"`` / ``" negative"``: see the module docstring).
    """

    template = "Review: The {noun} was {adjective}.\nSentiment:"
    label_tokens = {"positive": " positive", "negative": " negative"}
    positions = {"last": -1, "adjective": "{adjective}"}
    variables = ("POLARITY",)

    def __init__(self, *, test_adjectives: int = 6, seed: int = 0, nouns=NOUNS, positive=POSITIVE, negative=NEGATIVE,
                 label_tokens: dict[str, str] | None = None):
        if label_tokens is not None:
            if set(label_tokens) != {"positive", "negative"}:
                raise ConfigError(f"label_tokens={label_tokens!r}: expected the keys 'positive' and 'negative'")
            self.label_tokens = dict(label_tokens)
        if not 0 < test_adjectives < min(len(positive), len(negative)):
            raise ConfigError(f"test_adjectives={test_adjectives}: expected 1 .. {min(len(positive), len(negative)) - 1}")
        rng = random.Random(seed)
        self.polarity = {**{a: "positive" for a in positive}, **{a: "negative" for a in negative}}
        pos, neg = list(positive), list(negative)
        rng.shuffle(pos)
        rng.shuffle(neg)
        k = test_adjectives
        self.splits = {"train": pos[k:] + neg[k:], "test": pos[:k] + neg[:k]}
        self.nouns = tuple(nouns)
        lexicon = self.polarity
        self.causal_model = CausalModel(
            {"NOUN": self.nouns, "ADJECTIVE": tuple(positive) + tuple(negative), "POLARITY": ("positive", "negative")},
            {"POLARITY": ["ADJECTIVE"]},
            {"POLARITY": lambda adjective: lexicon[adjective]},
            name="adjective polarity",
        )
        self._encoders: dict[int, PromptEncoder] = {}

    def sampler(self, split: str = "train"):
        if split not in self.splits:
            raise ConfigError(f"split={split!r}: expected one of {sorted(self.splits)}")
        adjectives = self.splits[split]

        def draw(rng: random.Random) -> Setting:
            return {"NOUN": rng.choice(self.nouns), "ADJECTIVE": rng.choice(adjectives)}

        return draw

    def encoder(self, tokenizer) -> PromptEncoder:
        """The prompt encoder for ``tokenizer`` (named positions ``"last"`` and ``"adjective"``)."""
        key = id(tokenizer)
        if key not in self._encoders:
            self._encoders[key] = PromptEncoder(
                tokenizer, self.template, self.label_tokens, positions=self.positions,
                fields=lambda s: {"noun": s["NOUN"], "adjective": s["ADJECTIVE"]},
            )
        return self._encoders[key]

    def counterfactuals(self, n: int, tokenizer, *, split: str = "train", seed: int = 0) -> CounterfactualDataset:
        """``n`` label-balanced counterfactuals interchanging ``POLARITY`` (inputs from ``split``)."""
        return CounterfactualDataset.sample(
            self.causal_model, self.encoder(tokenizer), n, intervene="POLARITY", seed=seed, sampler=self.sampler(split)
        )

    def datasets(self, lab, *, n_train: int = 128, n_test: int = 128, seed: int = 0, intervene=None):
        """``(train, test)`` for ``lab``'s tokenizer; the test set uses held-out adjectives."""
        if intervene not in (None, "POLARITY", ["POLARITY"], ("POLARITY",)):
            raise ConfigError(f"intervene={intervene!r}: this task has the one variable POLARITY")
        return (
            self.counterfactuals(n_train, lab.tokenizer, split="train", seed=seed),
            self.counterfactuals(n_test, lab.tokenizer, split="test", seed=seed + 1),
        )

    def prompts(self, split: str = "train") -> list[Setting]:
        """Every (noun, adjective) input of ``split``."""
        return [{"NOUN": n, "ADJECTIVE": a} for a in self.splits[split] for n in self.nouns]

    def __repr__(self) -> str:
        return f"Sentiment({len(self.splits['train'])} train / {len(self.splits['test'])} test adjectives, {len(self.nouns)} nouns)"


def sentiment(**kwargs) -> Sentiment:
    """The adjective-polarity task (see :class:`Sentiment`)."""
    return Sentiment(**kwargs)
