"""Prompt positions: a spec turned into per-example indices after tokenisation.

ReFT intervenes at positions of the *prompt* (during training the sequence
also holds the response, which must not be edited). For each example the
spec is resolved against its prompt length by the base layer's rule
(:class:`~steerlab.interventions.Positions`): ``"f7+l7"`` on a prompt of
``n`` tokens is ``0..6`` and ``n-7..n-1``, with a slot left empty (``-1``)
where its token would not exist or would repeat an earlier slot. The result
counts real tokens, so it is the same whatever side the batch is padded on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from steerlab.interventions import Positions
from steerlab.interventions.errors import PositionOutOfRange, UnitError
from steerlab.interventions.units import MaskInfo, check_real_indices, check_static_positions

__all__ = ["prompt_positions", "check_positions"]


def prompt_positions(
    lengths: Sequence[int] | Int[Tensor, " batch"], positions: Any, *, tied: bool = True
) -> Int[Tensor, "batch group k"]:
    """Per-example positions ``[batch, groups, k]`` (``-1`` = empty) for prompts of ``lengths`` tokens.

    ``groups`` is 1 when ``tied``; for an untied ``"fA+lB"`` it is 2 (the
    first ``A`` slots, then the last ``B``, each padded with ``-1`` to
    ``max(A, B)``). A fixed position beyond a prompt raises
    :class:`~steerlab.interventions.errors.PositionOutOfRange`.
    """
    lengths = [int(n) for n in (lengths.tolist() if isinstance(lengths, Tensor) else lengths)]
    if not lengths:
        raise UnitError("prompt_positions needs at least one prompt length")
    spec = Positions(positions)
    if spec.kind not in ("static", "firstlast"):
        raise UnitError(f"positions={positions!r}: expected a prompt spec ('f7+l7', 'l1', 'last', 3, [0, -1])")
    for i, n in enumerate(lengths):
        if n < 1:
            raise PositionOutOfRange(f"example {i} has an empty prompt (0 tokens); ReFT positions need at least one")
    check_static_positions(spec.static, lengths, "position", subject="the prompt of example")
    n = torch.tensor(lengths, dtype=torch.long)
    info = MaskInfo(torch.zeros_like(n), n, int(n.max()), 0, tuple(lengths))
    idx = spec.resolve(info)
    if tied or spec.kind != "firstlast" or spec.first == 0 or spec.last == 0:
        return idx[:, None, :]
    k = max(spec.first, spec.last)
    out = torch.full((len(lengths), 2, k), -1, dtype=torch.long)
    out[:, 0, : spec.first] = idx[:, : spec.first]
    out[:, 1, : spec.last] = idx[:, spec.first :]
    return out


def check_positions(positions: Int[Tensor, "batch group k"], lengths: Sequence[int], *, what: str = "intervention_positions") -> None:
    """Raise unless every slot is ``-1`` or a real-token index below its example's length."""
    if positions.dtype != torch.long or positions.dim() != 3:
        raise UnitError(f"{what} must be a LongTensor[batch, groups, k]; got {positions.dtype} of shape {tuple(positions.shape)}")
    if positions.shape[0] != len(lengths):
        raise UnitError(f"{what} has {positions.shape[0]} rows for a batch of {len(lengths)} examples")
    check_real_indices(positions, [int(n) for n in lengths], what)
