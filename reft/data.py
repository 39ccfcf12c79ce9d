"""Datasets and the collator for ReFT training.

Two kinds of data, each tokenised once up front, with each example's
intervention positions computed from its own prompt length
(:func:`~steerlab.reft.positions.prompt_positions`):

- :class:`InstructionDataset` — prompt → response pairs for a causal LM.
  The loss is on the response only (prompt labels are ``-100``); with a chat
  template (the default when the tokenizer has one) the prompt is a user
  turn and the response the assistant's reply, end-of-turn token included.
- :class:`ClassificationDataset` — texts with labels, for an encoder with a
  classification head (positions ``"f1"``: the ``[CLS]`` token) or a decoder
  classifying at its last token (positions ``"l1"``).

:class:`ReftDataCollator` pads a batch on either side (positions count real
tokens, so they need no shifting), stacks the positions as
``intervention_positions`` (``LongTensor[batch, groups, k]``, ``-1`` = empty
slot) and checks each against its example's length, so the training step
itself never has to.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor
from torch.utils.data import Dataset

from steerlab.interventions.errors import ConfigError, DataError, checked_first
from steerlab.reft.positions import check_positions, prompt_positions

__all__ = [
    "IGNORE_INDEX",
    "format_prompt",
    "InstructionDataset",
    "ClassificationDataset",
    "ReftDataCollator",
    "make_supervised_data_module",
    "make_last_position_supervised_data_module",
]

#: label of a token that carries no loss (the prompt, padding)
IGNORE_INDEX = -100


def _check_tokenizer(tokenizer) -> None:
    if tokenizer is None or not callable(tokenizer):
        raise DataError(f"expected a Hugging Face tokenizer; got {type(tokenizer).__name__}")
    if getattr(tokenizer, "pad_token_id", None) is None:
        raise DataError(
            f"the tokenizer {type(tokenizer).__name__} has no pad token, so batches cannot be padded; "
            "set tokenizer.pad_token (e.g. tokenizer.pad_token = tokenizer.eos_token)"
        )


def _use_template(tokenizer, chat_template: bool | None) -> bool:
    has = getattr(tokenizer, "chat_template", None) is not None
    if chat_template and not has:
        raise DataError(f"chat_template=True but the tokenizer {type(tokenizer).__name__} has no chat template")
    return has if chat_template is None else bool(chat_template)


def _messages(prompt: str, system: str | None) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def format_prompt(tokenizer, prompt: str, *, chat_template: bool | None = None, system: str | None = None) -> str:
    """``prompt`` as the model sees it: a user turn of the chat template (ending
    with the assistant's header), or the text itself without a template."""
    if not _use_template(tokenizer, chat_template):
        return prompt
    return tokenizer.apply_chat_template(_messages(prompt, system), tokenize=False, add_generation_prompt=True)


def _strings(name: str, values) -> list[str]:
    values = list(values)
    bad = [i for i, v in enumerate(values) if not isinstance(v, str)]
    if bad:
        raise DataError(f"{name}[{bad[0]}] is {type(values[bad[0]]).__name__}; expected text")
    return values


class _Examples(Dataset):
    """Tokenised examples with their positions; indexable, as the Trainer wants."""

    def __init__(self, items: list[dict[str, Any]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


class InstructionDataset(_Examples):
    """Prompt → response pairs for a causal LM, loss on the response only.

    Args:
        tokenizer: a tokenizer with a pad token.
        prompts: the prompts (a list of text).
        responses: the responses, one per prompt.
        positions: the prompt-position spec (``"f7+l7"``, ``"l1"``, ...);
            pass ``reft_model.positions`` to match the model.
        tied: ``False`` for a model with untied first/last weights.
        chat_template: format as chat turns (``None``: when the tokenizer has
            a template).
        system: an optional system message (with a template).
        add_eos: end a response with the EOS token (without a template; a
            template ends the turn itself).
        max_length: truncate the response so the example fits; a prompt that
            alone reaches it is an error.
    """

    # a list's items are checked first (the suite's type checker samples one item, so it may miss the bad one
    # or pre-empt the named error); an iterator is left to the body, which reads it once
    @checked_first(prompts=lambda v: isinstance(v, (list, tuple)) and _strings("prompts", v),
                   responses=lambda v: isinstance(v, (list, tuple)) and _strings("responses", v))
    def __init__(
        self,
        tokenizer,
        prompts: Sequence[str],
        responses: Sequence[str],
        *,
        positions: Any = "l1",
        tied: bool = True,
        chat_template: bool | None = None,
        system: str | None = None,
        add_eos: bool = True,
        max_length: int | None = None,
    ):
        _check_tokenizer(tokenizer)
        prompts, responses = _strings("prompts", prompts), _strings("responses", responses)
        if len(prompts) != len(responses):
            raise DataError(f"{len(prompts)} prompts but {len(responses)} responses; expected one response per prompt")
        if not prompts:
            raise DataError("the dataset is empty (no prompts); give at least one prompt/response pair")
        use = _use_template(tokenizer, chat_template)
        ids, prompt_lengths = [], []
        for i, (p, r) in enumerate(zip(prompts, responses)):
            p_ids, r_ids = self._tokenize(tokenizer, p, r, use, system, add_eos)
            if max_length is not None:
                if len(p_ids) >= max_length:
                    raise DataError(f"prompt {i} has {len(p_ids)} tokens, which leaves no room for a response within max_length={max_length}")
                r_ids = r_ids[: max_length - len(p_ids)]
            if not r_ids:
                raise DataError(f"response {i} is empty after tokenisation; there is nothing to learn from it")
            ids.append((p_ids, r_ids))
            prompt_lengths.append(len(p_ids))
        pos = prompt_positions(prompt_lengths, positions, tied=tied)
        super().__init__([
            {"input_ids": p + r, "labels": [IGNORE_INDEX] * len(p) + r, "intervention_positions": pos[i]}
            for i, (p, r) in enumerate(ids)
        ])
        self.prompt_lengths = prompt_lengths

    @staticmethod
    def _tokenize(tok, prompt: str, response: str, use_template: bool, system: str | None, add_eos: bool):
        if not use_template:
            p_ids = tok(prompt, add_special_tokens=True)["input_ids"]
            r_ids = tok(response, add_special_tokens=False)["input_ids"]
            if add_eos and tok.eos_token_id is not None:
                r_ids = r_ids + [tok.eos_token_id]
            return list(p_ids), list(r_ids)
        msgs = _messages(prompt, system)
        p_text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": response}], tokenize=False)
        if not full.startswith(p_text):
            raise DataError("the tokenizer's chat template does not extend the prompt turn with the response; pass chat_template=False")
        p_ids = tok(p_text, add_special_tokens=False)["input_ids"]
        r_ids = tok(full[len(p_text):], add_special_tokens=False)["input_ids"]
        return list(p_ids), list(r_ids)


class ClassificationDataset(_Examples):
    """Texts and labels for sequence classification; positions over each whole text.

    ``positions="f1"`` (the first token, ``[CLS]`` of a BERT-style encoder)
    or ``"l1"`` (the last token, where a decoder's classification head
    reads). ``labels`` are ints (classes) or floats (regression).
    """

    def __init__(
        self,
        tokenizer,
        texts: Sequence[str],
        labels: Sequence[int | float],
        *,
        positions: Any = "f1",
        tied: bool = True,
        max_length: int | None = None,
    ):
        _check_tokenizer(tokenizer)
        texts, labels = _strings("texts", texts), list(labels)
        if len(texts) != len(labels):
            raise DataError(f"{len(texts)} texts but {len(labels)} labels; expected one label per text")
        if not texts:
            raise DataError("the dataset is empty (no texts); give at least one text and label")
        enc = tokenizer(texts, add_special_tokens=True, truncation=max_length is not None, max_length=max_length)
        lengths = [len(x) for x in enc["input_ids"]]
        pos = prompt_positions(lengths, positions, tied=tied)
        super().__init__([
            {"input_ids": list(enc["input_ids"][i]), "labels": labels[i], "intervention_positions": pos[i]}
            for i in range(len(texts))
        ])


class ReftDataCollator:
    """Pad a list of examples into a batch for a :class:`~steerlab.reft.ReftModel`.

    Returns ``input_ids``, ``attention_mask``, ``labels`` (padded with
    ``-100`` for sequences, stacked for classes) and ``intervention_positions``.
    ``padding_side`` defaults to the tokenizer's; left and right give the
    same intervention positions (they count real tokens).
    ``return_position_ids=True`` adds ``position_ids`` counted from each
    example's first real token, which a decoder trained on left-padded
    batches needs to see the same token positions as with right padding
    (not for RoBERTa-style models, whose positions are offset).
    """

    def __init__(self, tokenizer, *, padding_side: str | None = None, pad_to_multiple_of: int | None = None,
                 label_pad_token_id: int = IGNORE_INDEX, return_position_ids: bool = False):
        _check_tokenizer(tokenizer)
        side = padding_side or getattr(tokenizer, "padding_side", "right")
        if side not in ("left", "right"):
            raise ConfigError(f"padding_side={side!r}: expected 'left' or 'right'")
        self.tokenizer, self.padding_side = tokenizer, side
        self.pad_to_multiple_of, self.label_pad_token_id = pad_to_multiple_of, label_pad_token_id
        self.return_position_ids = return_position_ids

    def _pad(self, rows: list[list[int]], value: int, length: int) -> Int[Tensor, "batch pos"]:
        out = torch.full((len(rows), length), value, dtype=torch.long)
        for i, r in enumerate(rows):
            if self.padding_side == "right":
                out[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
            else:
                out[i, length - len(r):] = torch.as_tensor(r, dtype=torch.long)
        return out

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Tensor]:
        if not features:
            raise DataError("cannot collate an empty batch")
        missing = [k for k in ("input_ids", "intervention_positions") if k not in features[0]]
        if missing:
            raise DataError(f"examples lack {missing}; build them with a steerlab.reft dataset")
        rows = [list(f["input_ids"]) for f in features]
        lengths = [len(r) for r in rows]
        if min(lengths) == 0:
            raise DataError(f"example {lengths.index(0)} has no tokens")
        L = max(lengths)
        if self.pad_to_multiple_of:
            L = -(-L // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": self._pad(rows, self.tokenizer.pad_token_id, L),
            "attention_mask": self._pad([[1] * n for n in lengths], 0, L),
        }
        if self.return_position_ids:
            batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp_min(0)
        if "labels" in features[0]:
            labels = [f["labels"] for f in features]
            if isinstance(labels[0], (list, tuple)):
                batch["labels"] = self._pad([list(x) for x in labels], self.label_pad_token_id, L)
            else:
                batch["labels"] = torch.tensor(labels, dtype=torch.float32 if isinstance(labels[0], float) else torch.long)
        shapes = {tuple(torch.as_tensor(f["intervention_positions"]).shape) for f in features}
        if len(shapes) != 1:
            raise DataError(f"examples disagree on the shape of their intervention positions: {sorted(shapes)}")
        pos = torch.stack([torch.as_tensor(f["intervention_positions"], dtype=torch.long) for f in features])
        if pos.dim() == 2:
            pos = pos[:, None, :]
        check_positions(pos, lengths)
        batch["intervention_positions"] = pos
        return batch


def make_supervised_data_module(
    tokenizer, model, prompts: Sequence[str], responses: Sequence[str], *, positions: Any = None, **dataset_kwargs
) -> dict[str, Any]:
    """``{"train_dataset", "eval_dataset", "data_collator"}`` for ``ReftTrainerForCausalLM(**module)``.

    ``positions`` and ``tied`` default to the ReFT model's (``model``).
    """
    spec = positions if positions is not None else getattr(model, "positions", None) or "l1"
    dataset_kwargs.setdefault("tied", getattr(model, "tied", True))
    ds = InstructionDataset(tokenizer, prompts, responses, positions=spec, **dataset_kwargs)
    return {"train_dataset": ds, "eval_dataset": None, "data_collator": ReftDataCollator(tokenizer)}


def make_last_position_supervised_data_module(tokenizer, model, inputs: Sequence[str], outputs: Sequence[str],
                                              num_interventions: int = 1, nonstop: bool = False) -> dict[str, Any]:
    """pyreft's helper: already-formatted prompts, the last prompt token intervened."""
    return make_supervised_data_module(tokenizer, model, inputs, outputs, positions="l1", chat_template=False, add_eos=not nonstop)
