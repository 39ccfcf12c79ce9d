"""Encoders: high-level inputs -> model inputs, and model outputs -> label scores.

An encoder is the bridge between a :class:`~steerlab.alignment.CausalModel`
and a network. It turns a list of input settings into one padded batch of
model inputs (:meth:`Encoder.encode`), names the positions an alignment can
sit at (:meth:`Encoder.positions`, real-token indices per example), and reads
the network's prediction as scores over the task's labels
(:meth:`Encoder.scores`), in the order of :attr:`Encoder.labels`.

* :class:`VectorEncoder` — a feature vector per input (an MLP's input); the
  output's logits are the label scores.
* :class:`PromptEncoder` — a text template filled from the input (a language
  model prompt); the label scores are the next-token logits of the task's
  label tokens at the last prompt token, each label a single token.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from steerlab.interventions.errors import ConfigError, DataError, UnitError
from steerlab.interventions.units import MaskInfo, Positions

__all__ = ["Encoder", "VectorEncoder", "PromptEncoder"]


class Encoder:
    """Base class (see the module docstring). Subclasses set :attr:`labels`."""

    labels: tuple = ()
    #: whether the model's sites have a position axis
    has_positions: bool = True

    def encode(self, settings: Sequence[Mapping[str, Any]]) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def positions(self, name: str | int | Sequence[int] | None, settings: Sequence[Mapping[str, Any]], encoded: Any) -> Int[Tensor, "example k"] | None:
        """Real-token indices ``[n, k]`` of the named (or given) positions; ``None`` for all positions."""
        if name is None:
            return None
        raise ConfigError(f"positions={name!r}: this encoder's model has no position axis; use positions=None")

    @property
    def position_names(self) -> tuple[str, ...]:
        return ()

    def position_spec(self, name) -> Any:
        """``name`` as a base-layer position spec: an int or list stays, a name
        of a fixed index becomes it, a per-example name becomes ``"per-call"``."""
        return name

    def scores(self, output: Any) -> Float[Tensor, "batch labels"]:  # pragma: no cover - abstract
        raise NotImplementedError

    def label_index(self, value: Any) -> int:
        try:
            return self.labels.index(value)
        except ValueError:
            raise DataError(f"label {value!r} is not one of the encoder's labels {list(self.labels)}") from None

    def lengths(self, encoded: Any) -> Int[Tensor, " example"] | None:
        """Real-token count of each encoded input (``None`` when there is no position axis)."""
        return None

    def model_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments for the model's forward when only the scores are read."""
        return {}


class VectorEncoder(Encoder):
    """One feature vector per input: ``fn(setting) -> Tensor[d]``; scores are the output logits.

    Args:
        fn: maps an input setting to the model's input vector.
        labels: the label values, in the order of the model's output units.
    """

    has_positions = False

    def __init__(self, fn: Callable[[Mapping[str, Any]], Tensor], labels: Sequence[Any]):
        self.fn = fn
        self.labels = tuple(labels)
        if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
            raise ConfigError(f"labels={list(labels)!r}: expected two or more distinct label values")

    def encode(self, settings: Sequence[Mapping[str, Any]]) -> Float[Tensor, "example width"]:
        return torch.stack([torch.as_tensor(self.fn(s), dtype=torch.float32) for s in settings])

    def scores(self, output: Any) -> Float[Tensor, "batch labels"]:
        logits = output if isinstance(output, Tensor) else getattr(output, "logits", output)
        if logits.dim() == 3:
            logits = logits[:, -1]
        if logits.shape[-1] != len(self.labels):
            raise DataError(f"the model outputs {logits.shape[-1]} logits but the task has {len(self.labels)} labels {list(self.labels)}")
        return logits


class PromptEncoder(Encoder):
    """A prompt per input, filled from a template; label scores read at the last token.

    Args:
        tokenizer: a Hugging Face (fast) tokenizer; prompts are left-padded so
            the last column is every prompt's last token.
        template: a ``str.format`` template over the setting's fields, e.g.
            ``"Review: The {noun} was {adjective}.\\nSentiment:"``.
        label_tokens: ``label value -> token string`` (e.g. ``{"positive": " positive"}``);
            each must encode to exactly one token (:class:`DataError` otherwise).
        positions: named positions: an int (a real-token index, ``-1`` = the
            last token) or ``"{field}"`` (the last token of that field's text).
        fields: ``setting -> template fields`` (default: the setting itself).
    """

    def __init__(
        self,
        tokenizer,
        template: str,
        label_tokens: Mapping[Any, str],
        *,
        positions: Mapping[str, int | str] | None = None,
        fields: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None,
    ):
        if tokenizer is None:
            raise ConfigError("PromptEncoder needs a tokenizer")
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError(f"PromptEncoder needs a fast tokenizer (for token offsets); got {type(tokenizer).__name__}")
        if tokenizer.pad_token is None:
            raise DataError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to tokenizer.eos_token)")
        self.tokenizer = tokenizer
        self.template = template
        self.fields = fields or (lambda s: s)
        self._parts = [(lit, name) for lit, name, _, _ in string.Formatter().parse(template)]
        self.labels = tuple(label_tokens)
        if len(self.labels) < 2:
            raise ConfigError(f"label_tokens={dict(label_tokens)!r}: expected two or more labels")
        self.label_ids = self._label_ids(label_tokens)
        self._positions = dict(positions or {"last": -1})
        for name, spec in self._positions.items():
            if isinstance(spec, str):
                field = spec.strip("{}")
                if field not in {n for _, n in self._parts if n}:
                    raise ConfigError(f"position {name!r} = {spec!r} names no field of the template {template!r}")
            elif not isinstance(spec, int) or isinstance(spec, bool):
                raise ConfigError(f"position {name!r} = {spec!r}: expected an int (real-token index) or '{{field}}'")

    def _label_ids(self, label_tokens: Mapping[Any, str]) -> Int[Tensor, " labels"]:
        ids = []
        for value, text in label_tokens.items():
            got = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(got) != 1:
                pieces = self.tokenizer.convert_ids_to_tokens(got)
                raise DataError(
                    f"label {value!r} has token string {text!r}, which the tokenizer splits into {len(got)} tokens "
                    f"{pieces}; a label must be a single token (try another word, or with/without a leading space)"
                )
            ids.append(got[0])
        if len(set(ids)) != len(ids):
            raise DataError(f"label tokens {dict(label_tokens)!r} are not distinct token ids: {ids}")
        return torch.tensor(ids)

    @property
    def position_names(self) -> tuple[str, ...]:
        return tuple(self._positions)

    def position_spec(self, name) -> Any:
        if isinstance(name, str):
            if name not in self._positions:
                _grammar(name, list(self._positions))
                return name  # a base-layer spec ('l1', 'f2+l2', ...) means the same to the base layer
            spec = self._positions[name]
            return spec if isinstance(spec, int) else "per-call"
        return name

    def text(self, setting: Mapping[str, Any]) -> str:
        try:
            return self.template.format(**self.fields(setting))
        except (KeyError, IndexError) as e:
            raise DataError(f"template {self.template!r} needs field {e}, which the setting {dict(setting)!r} does not give") from None

    def encode(self, settings: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        texts = [self.text(s) for s in settings]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def lengths(self, encoded: dict[str, Tensor]) -> Int[Tensor, " example"]:
        return encoded["attention_mask"].sum(-1)

    def _field_end(self, setting: Mapping[str, Any], field: str) -> int:
        """Character index just past the first occurrence of ``{field}`` in the filled prompt."""
        values = self.fields(setting)
        pos = 0
        for lit, name in self._parts:
            pos += len(lit)
            if name is None:
                continue
            pos += len(format(values[name]))
            if name == field:
                return pos
        raise DataError(f"field {field!r} is not in the template")  # pragma: no cover - checked in __init__

    def positions(self, name, settings, encoded) -> Int[Tensor, "example k"] | None:
        if name is None:
            return None
        lengths = self.lengths(encoded)
        if isinstance(name, int) or (isinstance(name, (list, tuple)) and all(isinstance(p, int) for p in name)):
            specs = [name] if isinstance(name, int) else list(name)
            idx = torch.tensor(specs)[None, :].expand(len(settings), -1)
            out = torch.where(idx < 0, idx + lengths[:, None], idx)
            bad = (out < 0) | (out >= lengths[:, None])
            if bool(bad.any()):
                i = int(bad.any(1).nonzero()[0])
                raise DataError(f"positions={name!r} are beyond example {i}, which has {int(lengths[i])} tokens")
            return out
        if name not in self._positions:
            return _grammar_positions(_grammar(name, list(self._positions)), lengths, name)
        spec = self._positions[name]
        if isinstance(spec, int):
            return self.positions(spec, settings, encoded)
        field = spec.strip("{}")
        texts = [self.text(s) for s in settings]
        enc = self.tokenizer(texts, return_offsets_mapping=True, add_special_tokens=True)
        out = []
        for i, s in enumerate(settings):
            end = self._field_end(s, field)
            spans = enc["offset_mapping"][i]
            hit = [j for j, (a, b) in enumerate(spans) if a < end <= b or (b == end and b > a)]
            if not hit:
                raise DataError(f"no token ends the field {field!r} in prompt {texts[i]!r}")
            out.append(hit[0])
        return torch.tensor(out)[:, None]

    def scores(self, output: Any) -> Float[Tensor, "batch labels"]:
        logits = output if isinstance(output, Tensor) else output.logits
        return logits[:, -1, :].index_select(-1, self.label_ids.to(logits.device))

    def model_kwargs(self) -> dict[str, Any]:
        return {"logits_to_keep": 1}

    def __repr__(self) -> str:
        return f"PromptEncoder({self.template!r}, labels={list(self.labels)})"


def _grammar(name: str, named: list[str]) -> Positions:
    """``name`` in the base layer's position grammar (``'l1'``, ``'last'``, ``'f2+l2'``): the one parser
    every API shares, for a string that is not one of the encoder's own named positions."""
    try:
        spec = Positions(name)
    except UnitError:
        spec = None
    if spec is None or spec.kind not in ("static", "firstlast"):
        raise ConfigError(f"unknown position {name!r}; this encoder names {named} (or give an int, or a spec like 'l1' or 'f2+l2')")
    return spec


def _grammar_positions(spec: Positions, lengths: Tensor, name: str) -> Int[Tensor, "example k"]:
    """Real-token indices of ``spec`` for prompts of ``lengths`` tokens (every slot must exist)."""
    n = lengths.long().cpu()
    info = MaskInfo(torch.zeros_like(n), n, int(n.max()), 0, tuple(int(x) for x in n))
    spec.validate(info)
    idx = spec.resolve(info)
    if bool((idx < 0).any()):
        i = int((idx < 0).any(1).nonzero()[0])
        raise DataError(f"positions={name!r} are beyond example {i}, which has {int(n[i])} tokens")
    return idx
