"""Indirect object identification (Wang et al. 2022, "Interpretability in the Wild").

``"When Mary and John went to the store, John gave a drink to"`` -> ``" Mary"``: the
indirect object (IO) is the name mentioned once, the subject (S) the name mentioned
twice. The paper's 15 templates, each in its two orders (``BABA``: S first, ``ABBA``:
IO first), its places and objects, and its names restricted to those that are one
token for SmolLM2 (81 of its 100). Every name, place and object is one token, so all
prompts of one template have the same length and the same positions:

* ``IO``, ``S1``, ``S2``: the IO's mention, the subject's first and second mentions;
* ``END``: the last token (``" to"``), where the name is predicted.

The corrupted distribution is the paper's ABC: the same template and fillers with
the three name slots filled by three other, distinct names (``"When Alice and Bob
went to the store, Carol gave a drink to"``), which removes the information about
which name is duplicated. The score is the logit difference ``logit(IO) − logit(S)``
at ``END`` (:attr:`IOIDataset.metric`). :meth:`IOI.prompts` draws a dataset from one split of the names (train
and test names are disjoint), so a circuit found on one split can be checked on
prompts with names it never saw.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor

from steerlab.interventions.errors import ConfigError, DataError

__all__ = ["IOI", "IOIPrompt", "IOIDataset", "ioi", "TEMPLATES", "NAMES", "PLACES", "OBJECTS"]

#: [A] = the indirect object, [B] = the subject (the BABA order; ABBA swaps the first two names)
TEMPLATES = (
    "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to",
    "Then, [B] and [A] had a lot of fun at the [PLACE]. [B] gave a [OBJECT] to",
    "Then, [B] and [A] were working at the [PLACE]. [B] decided to give a [OBJECT] to",
    "Then, [B] and [A] were thinking about going to the [PLACE]. [B] wanted to give a [OBJECT] to",
    "Then, [B] and [A] had a long argument, and afterwards [B] said to",
    "After [B] and [A] went to the [PLACE], [B] gave a [OBJECT] to",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give it to",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give the [OBJECT] to",
    "While [B] and [A] were working at the [PLACE], [B] gave a [OBJECT] to",
    "While [B] and [A] were commuting to the [PLACE], [B] gave a [OBJECT] to",
    "After the lunch, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to",
    "Afterwards, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to",
    "Then, [B] and [A] had a long argument. Afterwards [B] said to",
    "The [PLACE] [B] and [A] went to had a [OBJECT]. [B] gave it to",
    "Friends [B] and [A] found a [OBJECT] at the [PLACE]. [B] gave it to",
)
NAMES = (
    "Michael", "Christopher", "Jessica", "Matthew", "Ashley", "Jennifer", "Joshua", "Amanda", "Daniel", "David",
    "James", "Robert", "John", "Joseph", "Andrew", "Ryan", "Jason", "Justin", "Sarah", "William", "Jonathan",
    "Stephanie", "Brian", "Nicole", "Nicholas", "Anthony", "Heather", "Eric", "Elizabeth", "Adam", "Melissa",
    "Kevin", "Steven", "Thomas", "Timothy", "Christina", "Rachel", "Laura", "Lauren", "Richard", "Jeffrey", "Amy",
    "Crystal", "Michelle", "Jeremy", "Benjamin", "Mark", "Emily", "Aaron", "Charles", "Rebecca", "Jacob", "Stephen",
    "Patrick", "Sean", "Erin", "Jamie", "Kelly", "Samantha", "Nathan", "Sara", "Paul", "Angela", "Tyler", "Scott",
    "Katherine", "Andrea", "Gregory", "Mary", "Lisa", "Kenneth", "Bryan", "Jose", "Alexander", "Jesse", "Katie",
    "Shannon", "Christine", "Allison", "Bradley", "Samuel",
)
PLACES = ("store", "garden", "restaurant", "school", "hospital", "office", "house", "station")
OBJECTS = ("ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack")
ROLES = ("IO", "S1", "S2", "END")


@dataclass(frozen=True)
class IOIPrompt:
    """One prompt: a template (index into :data:`TEMPLATES`), an order and its fillers.
    ``abc`` holds the three names of its corrupted (ABC) version."""

    template: int
    order: str  # "BABA" (S first) or "ABBA" (IO first)
    io: str
    s: str
    place: str
    obj: str
    abc: tuple[str, str, str]

    def _fill(self, first: str, second: str, third: str) -> str:
        t = TEMPLATES[self.template]
        t = t.replace("[B] and [A]", "[X] and [Y]", 1)
        t = t.replace("[X]", first).replace("[Y]", second).replace("[B]", third)
        return t.replace("[PLACE]", self.place).replace("[OBJECT]", self.obj)

    @property
    def text(self) -> str:
        first, second = (self.s, self.io) if self.order == "BABA" else (self.io, self.s)
        return self._fill(first, second, self.s)

    @property
    def corrupted(self) -> str:
        """The ABC prompt: the same template with three distinct other names."""
        return self._fill(*self.abc)


class IOIDataset:
    """Prompts with their tokens, role positions and answer tokens (see the module docstring)."""

    def __init__(self, prompts: list[IOIPrompt], tokenizer):
        if not prompts:
            raise DataError("an IOI dataset needs at least one prompt")
        self.prompts = list(prompts)
        self.tokenizer = tokenizer
        ids = [tokenizer(p.text).input_ids for p in self.prompts]
        bad = [p for p, i in zip(self.prompts, ids, strict=True) if len(i) != _length(tokenizer, p.template)]
        if bad:
            raise DataError(f"{bad[0].text!r} does not tokenise like its template: a name, place or object is not one token")
        self.io_ids = torch.tensor([_one(tokenizer, p.io) for p in self.prompts])
        self.s_ids = torch.tensor([_one(tokenizer, p.s) for p in self.prompts])
        self._positions = self._roles(ids)

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def texts(self) -> list[str]:
        return [p.text for p in self.prompts]

    @property
    def corrupted_texts(self) -> list[str]:
        return [p.corrupted for p in self.prompts]

    @property
    def templates(self) -> Int[Tensor, " batch"]:
        return torch.tensor([p.template for p in self.prompts])

    def _roles(self, ids: list[list[int]]) -> dict[str, Tensor]:
        out: dict[str, list[int]] = {r: [] for r in ROLES}
        for p, row in zip(self.prompts, ids, strict=True):
            io, s = _one(self.tokenizer, p.io), _one(self.tokenizer, p.s)
            s_at = [i for i, t in enumerate(row) if t == s]
            io_at = [i for i, t in enumerate(row) if t == io]
            if len(s_at) != 2 or len(io_at) != 1:
                raise DataError(f"{p.text!r}: expected the subject twice and the IO once among its tokens")
            out["IO"].append(io_at[0])
            out["S1"].append(s_at[0])
            out["S2"].append(s_at[1])
            out["END"].append(len(row) - 1)
        return {r: torch.tensor(v) for r, v in out.items()}

    def positions(self, role: str) -> Int[Tensor, " batch"]:
        """Real-token index of ``role`` (``"IO"``, ``"S1"``, ``"S2"``, ``"END"``) in each prompt."""
        if role not in ROLES:
            raise ConfigError(f"role={role!r}: expected one of {ROLES}")
        return self._positions[role].clone()

    def encode(self, *, corrupted: bool = False) -> dict[str, Tensor]:
        """Token ids and attention mask, left-padded (prompts of one template have one length)."""
        texts = self.corrupted_texts if corrupted else self.texts
        side = self.tokenizer.padding_side
        try:
            self.tokenizer.padding_side = "left"
            enc = self.tokenizer(texts, return_tensors="pt", padding=True)
        finally:
            self.tokenizer.padding_side = side
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    @property
    def metric(self):
        """``logit(IO) − logit(S)`` at the last real token, per example: a patching metric (a
        batch repeating the prompts ``n`` times, as packed runs do, gets the answers repeated)."""
        from steerlab.interventions.metrics import logit_diff

        return logit_diff(self.io_ids, self.s_ids)

    def split(self, n: int) -> tuple[IOIDataset, IOIDataset]:
        """The first ``n`` prompts and the rest."""
        if not 0 < n < len(self):
            raise ConfigError(f"n={n}: expected 1 .. {len(self) - 1}")
        return IOIDataset(self.prompts[:n], self.tokenizer), IOIDataset(self.prompts[n:], self.tokenizer)

    def __repr__(self) -> str:
        return f"IOIDataset({len(self)} prompts over {len(set(p.template for p in self.prompts))} templates)"


def _one(tokenizer, word: str) -> int:
    ids = tokenizer(" " + word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise DataError(f"{word!r} is {len(ids)} tokens for this tokenizer; IOI needs one-token names, places and objects")
    return ids[0]


def _length(tokenizer, template: int) -> int:
    probe = IOIPrompt(template, "BABA", "Mary", "John", "store", "drink", ("Mary", "John", "John"))
    return len(tokenizer(probe.text).input_ids)


class IOI:
    """The task: templates, fillers and a split of the names into train and test.

    Args:
        test_names: names held out for the ``"test"`` split (the rest are ``"train"``).
        seed: draws the split.
    """

    def __init__(self, *, test_names: int = 30, seed: int = 0, names=NAMES, templates: tuple[int, ...] | None = None):
        if not 3 <= test_names <= len(names) - 3:
            raise ConfigError(f"test_names={test_names}: expected 3 .. {len(names) - 3} (each split needs 3 names for ABC)")
        shuffled = list(names)
        random.Random(seed).shuffle(shuffled)
        self.splits = {"test": tuple(shuffled[:test_names]), "train": tuple(shuffled[test_names:])}
        self.templates = tuple(range(len(TEMPLATES))) if templates is None else tuple(templates)
        if not self.templates or not all(isinstance(t, int) and 0 <= t < len(TEMPLATES) for t in self.templates):
            raise ConfigError(f"templates={templates!r}: expected indices into the {len(TEMPLATES)} templates")

    def prompts(self, n: int, tokenizer, *, split: str = "train", seed: int = 0) -> IOIDataset:
        """``n`` prompts from ``split``'s names: templates and orders cycled in turn (balanced),
        names, places and objects drawn at random."""
        if split not in self.splits:
            raise ConfigError(f"split={split!r}: expected one of {sorted(self.splits)}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"n={n!r}: expected a positive number of prompts")
        rng = random.Random(seed)
        names = self.splits[split]
        out = []
        for i in range(n):
            template = self.templates[(i // 2) % len(self.templates)]
            io, s, *abc = rng.sample(names, 5)
            out.append(IOIPrompt(template, ("BABA", "ABBA")[i % 2], io, s, rng.choice(PLACES), rng.choice(OBJECTS), (abc[0], abc[1], abc[2])))
        return IOIDataset(out, tokenizer)

    def __repr__(self) -> str:
        return f"IOI({len(self.templates)} templates, {len(self.splits['train'])} train / {len(self.splits['test'])} test names)"


def ioi(**kwargs) -> IOI:
    """The IOI task (see :class:`IOI`)."""
    return IOI(**kwargs)
