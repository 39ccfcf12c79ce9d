"""Steered generation: batched, left-padded, per-example prompt positions, with the KV cache.

The prompt positions are resolved for each example after tokenisation
(:func:`~steerlab.reft.positions.prompt_positions`), so a batch of prompts of
different lengths is steered exactly as each prompt alone would be. By
default the interventions act at prefill only: decode steps run the plain
model (the hooks return at once), so steering costs nothing per new token.
With ``decode=True`` every new token is edited as well (pyreft's
"intervene on generated tokens").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

import torch

from steerlab.interventions import Attachment, Generation
from steerlab.interventions.errors import DataError, UnitError
from steerlab.reft.positions import prompt_positions

if TYPE_CHECKING:
    from steerlab.reft.model import ReftModel

__all__ = ["generate"]


def _encode(rm: ReftModel, inputs: Any, chat_template: bool) -> dict[str, torch.Tensor]:
    tok = rm.tokenizer
    if isinstance(inputs, str):
        inputs = [inputs]
    if isinstance(inputs, Sequence) and inputs and all(isinstance(s, str) for s in inputs):
        if tok is None:
            raise DataError("text prompts need a tokenizer: get_reft_model(model, config, tokenizer=tok)")
        if tok.pad_token_id is None and len(inputs) > 1:
            raise DataError(
                f"the tokenizer has no pad token, so a batch of {len(inputs)} prompts cannot be padded; "
                "set tokenizer.pad_token (e.g. to tokenizer.eos_token)"
            )
        if chat_template:
            from steerlab.reft.data import format_prompt

            inputs = [format_prompt(tok, p, chat_template=True) for p in inputs]
        enc = tok(list(inputs), return_tensors="pt", padding=True, padding_side="left", add_special_tokens=not chat_template)
        return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    if isinstance(inputs, Mapping) and isinstance(inputs.get("input_ids"), torch.Tensor):
        enc = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        ids = enc["input_ids"]
        if "attention_mask" not in enc:
            enc["attention_mask"] = torch.ones_like(ids)
        mask = enc["attention_mask"]
        if bool((mask[:, -1] == 0).any()):
            raise DataError("generation needs left-padded prompts (a row ends with padding); tokenize with padding_side='left'")
        return enc
    raise DataError(f"cannot generate from {type(inputs).__name__}; expected a prompt, a list of prompts, or a dict with input_ids")


def generate(
    rm: ReftModel,
    inputs: Any,
    *,
    decode: bool = False,
    positions: Any = None,
    chat_template: bool = False,
    **generate_kwargs,
) -> Generation:
    """Generate from ``inputs`` (text prompts, or a left-padded dict of ``input_ids`` / ``attention_mask``).

    ``positions`` overrides the model's prompt-position spec;
    ``chat_template=True`` formats text prompts as a user turn of the
    tokenizer's chat template. Other keyword arguments go to the model's
    ``generate`` (``max_new_tokens``, ``do_sample``, ...). A disabled model
    generates as the base model.
    """
    enc = _encode(rm, inputs, chat_template)
    lengths = enc["attention_mask"].sum(-1).cpu()
    spec = rm.positions if positions is None else positions
    pos = None if spec is None else prompt_positions(lengths, spec, tied=rm.tied)
    if pos is not None and pos.shape[1] != rm.n_groups:
        raise UnitError(
            f"positions={spec!r} gives {pos.shape[1]} position group(s) but this model has {rm.n_groups} "
            "(untied weights need a spec like 'f3+l3')"
        )
    device = rm.lab.device
    enc = {k: v.to(device) for k, v in enc.items()}
    tok = rm.tokenizer
    if tok is not None and tok.pad_token_id is not None:
        generate_kwargs.setdefault("pad_token_id", tok.pad_token_id)
    T = enc["input_ids"].shape[1]
    groups = [None] * rm.n_groups if pos is None else [pos[:, j].to(device) for j in range(rm.n_groups)]
    if not rm.enabled:
        seqs = rm.model.generate(**enc, **generate_kwargs)
    elif not decode:
        # the attached interventions already act at prefill only: give them this batch's positions
        try:
            for att, p in zip(rm._attachments, groups):
                att.positions = p
            seqs = rm.model.generate(**enc, **generate_kwargs)
        finally:
            for att in rm._attachments:
                att.positions = None
    else:
        with rm.disabled(), ExitStack() as stack:
            for group, p in zip(rm.groups, groups):
                stack.enter_context(Attachment(rm.lab, [rm.interventions[i] for i in group], decode=True, positions=p))
            seqs = rm.model.generate(**enc, **generate_kwargs)
    texts = tok.batch_decode(seqs[:, T:], skip_special_tokens=True) if tok is not None else None
    return Generation(seqs, T, texts)
