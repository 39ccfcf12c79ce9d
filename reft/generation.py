"""Steered generation: batched, left-padded, per-example prompt positions, with the KV cache.

The prompt positions are resolved for each example after tokenisation
(:func:`~steerlab.reft.positions.prompt_positions`), so a batch of prompts of
different lengths is steered exactly as each prompt alone would be. By
default the interventions act at prefill only: decode steps run the plain
model (the hooks return at once), so steering costs nothing per new token.
With ``decode=True`` every new token is edited as well (pyreft's
"intervene on generated tokens"). The generation itself is the base layer's
(:mod:`steerlab.interventions.generation`); this module adds the ReFT
prompt format and positions. The positions belong to this call and this
thread: another thread's forwards of the model see the attached model as it is.
"""

from __future__ import annotations

from typing import Any

from steerlab.interventions import Generation
from steerlab.interventions.errors import UnitError
from steerlab.interventions.generation import generate as generate_with
from steerlab.interventions.generation import prompts
from steerlab.interventions.inputs import is_texts
from steerlab.reft.positions import prompt_positions

__all__ = ["generate"]


def generate(
    rm: Any,
    inputs: Any,
    *,
    decode: bool = False,
    positions: Any = None,
    chat_template: bool = False,
    **generate_kwargs,
) -> Generation:
    """Generate with the :class:`~steerlab.reft.ReftModel` ``rm`` from ``inputs`` (text prompts, or a
    left-padded dict of ``input_ids`` / ``attention_mask``).

    ``positions`` overrides the model's prompt-position spec;
    ``chat_template=True`` formats text prompts as a user turn of the
    tokenizer's chat template. Other keyword arguments go to the model's
    ``generate`` (``max_new_tokens``, ``do_sample``, ...). A disabled model
    generates as the base model.
    """
    rm.check_usable("generate()")
    facts = rm.lab.facts
    texts = [inputs] if isinstance(inputs, str) else inputs
    if chat_template and is_texts(texts):
        from steerlab.reft.data import format_prompt

        texts = [format_prompt(facts.tokenizer, p, chat_template=True) for p in texts]
    inp = prompts(facts, texts, add_special_tokens=not chat_template) if is_texts(texts) else prompts(facts, inputs)
    spec = rm.positions if positions is None else positions
    pos = None
    if spec is not None and rm.enabled:
        pos = prompt_positions(inp.kwargs["attention_mask"].sum(-1).cpu(), spec, tied=rm.tied)
        if pos.shape[1] != rm.n_groups:
            raise UnitError(
                f"positions={spec!r} gives {pos.shape[1]} position group(s) but this model has {rm.n_groups} "
                "(untied weights need a spec like 'f3+l3')"
            )
        pos = pos.to(facts.device)
    return generate_with(facts, inp, rm.using(pos, decode=decode), **generate_kwargs)
