"""Generation with interventions: one implementation for ``lab.generate`` and ``ReftModel.generate``.

Prompts are left-padded (text is tokenised so; token ids must be). The
interventions act at prefill on prompt positions, and with ``decode=True``
also at each new token; a prompt-only set costs nothing at decode steps
(its hooks return at once). Attachments made for one generation belong to
the calling thread, and every per-call value (per-example positions, the
maps materialised for the prompt) lives in that call's scope: a
``KeyboardInterrupt`` mid-generation leaves nothing behind.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from steerlab.interventions.errors import BatchMismatch, DataError, SourceError
from steerlab.interventions.facts import ModelFacts
from steerlab.interventions.graph import Run, SourceValue
from steerlab.interventions.inputs import Inputs, is_texts, tokenize
from steerlab.interventions.ops import Intervention
from steerlab.interventions.units import Positions

__all__ = ["Generation", "prompts", "generate", "check_generation"]


@dataclass
class Generation:
    """Output of a generation: ``sequences`` (prompt + new tokens, the prompt left-padded to
    ``prompt_length``) and the decoded new ``texts``."""

    sequences: Int[Tensor, "batch pos"]
    prompt_length: int
    texts: list[str] | None

    @property
    def new_tokens(self) -> Int[Tensor, "batch new"]:
        return self.sequences[:, self.prompt_length :]


def prompts(facts: ModelFacts, inputs: Any, **tokenize_kwargs) -> Inputs:
    """``inputs`` as left-padded prompts on the model's device: text (a string or a list) is
    tokenised left-padded; token ids (a dict with ``input_ids``, a LongTensor) must be so."""
    if isinstance(inputs, str):
        inputs = [inputs]
    if is_texts(inputs):
        enc = tokenize(facts.tokenizer, inputs, padding_side="left", what="text prompts", **tokenize_kwargs)
        return Inputs((), {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}).to(facts.device)
    inp = facts.inputs(inputs)
    mask = inp.mask
    if mask is not None and mask.dim() == 2 and bool((mask[:, -1] == 0).any()):
        raise DataError("generation needs left-padded prompts (a row ends with padding); tokenize with padding_side='left'")
    if mask is None and "input_ids" in inp.kwargs:
        inp.kwargs["attention_mask"] = torch.ones_like(inp.kwargs["input_ids"])
    return inp


def check_generation(facts: ModelFacts, ivs: Sequence[Intervention], inp: Inputs, positions) -> None:
    """Everything a generation can check before its first forward (source runs included)."""
    info = inp.mask_info()
    for iv in ivs:
        facts.place(iv)
        (iv.positions if positions is None else Positions(positions)).validate(info)
        if not iv.sourced:
            continue
        if iv.source is None or isinstance(iv.source, Run):
            got = "a run of a graph" if iv.source is not None else "none"
            raise SourceError(f"{type(iv).__name__} at {iv.site!r} needs a source (inputs or a SourceValue); got {got}")
        if isinstance(iv.source, SourceValue):
            batch = iv.source.value.shape[0]
        else:
            src = facts.inputs(iv.source).mask_info()
            iv.effective_source_positions().validate(src, "source_positions")
            batch = src.batch
        if batch not in (1, info.batch):
            raise BatchMismatch(
                f"the source of {type(iv).__name__} at {iv.site!r} has batch {batch} but the prompts have "
                f"{info.batch}; expected equal batches (or a source batch of 1, broadcast)"
            )


def generate(facts: ModelFacts, inp: Inputs, scope: AbstractContextManager | None = None, **generate_kwargs) -> Generation:
    """``model.generate`` on ``inp`` within ``scope`` (the call's attachments using its positions,
    on this thread: :meth:`Attachment.using`); the tokenizer's pad token unless one is given."""
    tok = facts.tokenizer
    if tok is not None and "pad_token_id" not in generate_kwargs and getattr(tok, "pad_token_id", None) is not None:
        generate_kwargs["pad_token_id"] = tok.pad_token_id
    with scope if scope is not None else nullcontext():
        seqs = facts.model.generate(**inp.kwargs, **generate_kwargs)
    T = inp.seq
    texts = tok.batch_decode(seqs[:, T:], skip_special_tokens=True) if tok is not None else None
    return Generation(seqs, T, texts)
