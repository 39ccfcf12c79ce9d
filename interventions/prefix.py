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
def resume_from(layers: nn.ModuleList, prefix: Prefix, root: nn.Module | None = None):
    """Within the block: blocks below ``prefix.layer`` are the identity and block
    ``prefix.layer`` receives ``prefix.hidden`` as its input.

    With ``root`` (the model), only the outermost forward of ``root`` resumes; a
    forward nested in it (an intervention calling the model) runs every block.
    """
    patched: list[tuple[nn.Module, bool, object]] = []
    handles: list = []
    depth = [0]

    def enter(module, args, kwargs):
        depth[0] += 1

    def leave(module, args, out):
        depth[0] -= 1

    def inject(module, args, kwargs):
        if depth[0] > 1:
            return None
        x = args[0] if args and isinstance(args[0], Tensor) else kwargs.get("hidden_states")
        if x is None or x.shape != prefix.hidden.shape:
            got = None if x is None else tuple(x.shape)
            raise ShapeMismatch(f"the cached prefix has shape {tuple(prefix.hidden.shape)} but this forward's hidden state is {got}")
        h = prefix.hidden.to(x.dtype)
        if args and isinstance(args[0], Tensor):
            return (h, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": h}

    def skip(layer: nn.Module, old):
        identity = _identity(prefix.tuple_len)
        real = old if old is not None else type(layer).forward.__get__(layer)

        def forward(*args, **kwargs):
            return real(*args, **kwargs) if depth[0] > 1 else identity(*args, **kwargs)

        return forward

    try:
        if root is not None:
            handles.append(root.register_forward_pre_hook(enter, with_kwargs=True, prepend=True))
            handles.append(root.register_forward_hook(leave, always_call=True))
        for layer in list(layers)[: prefix.layer]:
            had = "forward" in layer.__dict__
            patched.append((layer, had, layer.__dict__.get("forward")))
            layer.forward = skip(layer, layer.__dict__.get("forward"))
        handles.append(layers[prefix.layer].register_forward_pre_hook(inject, with_kwargs=True, prepend=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for layer, had, old in patched:
            if had:
                layer.forward = old
            else:
                del layer.forward


def tuple_len_of(out) -> int:
    return len(out) if isinstance(out, tuple) else 0


_ = torch  # jaxtyping annotations only
