"""Prefix reuse: compute the forward below a layer once, run only the layers above it.

When many forwards share their inputs and differ only from layer ``L`` up
(every epoch of DAS on a fixed dataset; every configuration of a patching
sweep), the residual stream entering block ``L`` is computed once
(:class:`Prefix`), and later forwards skip blocks ``0 .. L-1`` (each
replaced, for that call only, by the identity) and start from the cached
value. Embeddings and masks are still computed from the inputs; they are
cheap and keep every architecture's bookkeeping (rotary positions, masks)
exactly as in a full forward.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor, nn

from steerlab.interventions.errors import ShapeMismatch

__all__ = ["Prefix", "resume_from"]


@dataclass
class Prefix:
    """The residual stream entering block ``layer`` (``[batch, seq, d]``) for a fixed batch of inputs."""

    layer: int
    hidden: Float[Tensor, "batch seq d"]
    tuple_len: int = 0  # 0: blocks return a tensor; n: a tuple of n items

    def select(self, index) -> Prefix:
        """The prefix of a subset of the batch (``index``: rows, as for the inputs)."""
        return Prefix(self.layer, self.hidden[index], self.tuple_len)

    def repeat(self, n: int) -> Prefix:
        """``n`` stacked copies (copy-major), for packed sweeps."""
        return Prefix(self.layer, self.hidden.repeat(n, 1, 1), self.tuple_len)

    def __repr__(self) -> str:
        return f"Prefix(layer={self.layer}, hidden={tuple(self.hidden.shape)})"


def _identity(tuple_len: int):
    def forward(hidden_states=None, *args, **kwargs):
        if hidden_states is None:
            hidden_states = next(v for v in kwargs.values() if isinstance(v, Tensor))
        return hidden_states if tuple_len == 0 else (hidden_states,) + (None,) * (tuple_len - 1)

    return forward


@contextmanager
def resume_from(layers: nn.ModuleList, prefix: Prefix):
    """Within the block: blocks below ``prefix.layer`` are the identity and block
    ``prefix.layer`` receives ``prefix.hidden`` as its input."""
    patched: list[tuple[nn.Module, bool, object]] = []
    handle = None

    def inject(module, args, kwargs):
        x = args[0] if args and isinstance(args[0], Tensor) else kwargs.get("hidden_states")
        if x is None or x.shape != prefix.hidden.shape:
            got = None if x is None else tuple(x.shape)
            raise ShapeMismatch(f"the cached prefix has shape {tuple(prefix.hidden.shape)} but this forward's hidden state is {got}")
        h = prefix.hidden.to(x.dtype)
        if args and isinstance(args[0], Tensor):
            return (h, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": h}

    try:
        for layer in list(layers)[: prefix.layer]:
            had = "forward" in layer.__dict__
            patched.append((layer, had, layer.__dict__.get("forward")))
            layer.forward = _identity(prefix.tuple_len)
        handle = layers[prefix.layer].register_forward_pre_hook(inject, with_kwargs=True, prepend=True)
        yield
    finally:
        if handle is not None:
            handle.remove()
        for layer, had, old in patched:
            if had:
                layer.forward = old
            else:
                del layer.forward


def tuple_len_of(out) -> int:
    return len(out) if isinstance(out, tuple) else 0


_ = torch  # jaxtyping annotations only
