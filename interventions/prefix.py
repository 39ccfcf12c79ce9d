"""Prefix reuse: compute the forward below a layer once, run only the layers above it.

When many forwards share their inputs and differ only from layer ``L`` up
(every epoch of DAS on a fixed dataset; every configuration of a patching
sweep), the residual stream entering block ``L`` is computed once
(:class:`Prefix`), and later forwards skip blocks ``0 .. L-1`` (each
replaced, for that call only, by the identity) and start from the cached
value. Embeddings and masks are still computed from the inputs; they are
cheap and keep every architecture's bookkeeping (rotary positions, masks)
exactly as in a full forward.

A prefix can also cover the *first positions at every layer*: with ``past``
(the keys and values of the prompt's first ``start`` positions, a KV cache
from :meth:`Lab.past`), a resumed forward is given only the remaining tokens
(``input_ids[:, start:]`` with the full attention mask) and computes only
them, above ``layer`` — what an edit at the last positions needs. Positions
given to such a forward count the remaining tokens (they are prompt
positions, not decode steps).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import no_type_check

from jaxtyping import Float
from torch import Tensor, nn

from steerlab.interventions.errors import ShapeMismatch

__all__ = ["Prefix", "resume_from"]


@dataclass
class Prefix:
    """The residual stream entering block ``layer`` (``[batch, seq, d]``) for a fixed batch of inputs."""

    layer: int
    hidden: Float[Tensor, "batch pos d_model"]
    tuple_len: int = 0  # 0: blocks return a tensor; n: a tuple of n items
    #: per layer, (keys, values) ``[batch, kv_heads, start, d_head]`` of the first ``start`` positions
    past: tuple[tuple[Tensor, Tensor], ...] | None = None

    @property
    def start(self) -> int:
        """Positions covered by ``past`` (0 without it)."""
        return 0 if self.past is None else self.past[0][0].shape[-2]

    def select(self, index) -> Prefix:
        """The prefix of a subset of the batch (``index``: rows, as for the inputs)."""
        past = None if self.past is None else tuple((k[index], v[index]) for k, v in self.past)
        return Prefix(self.layer, self.hidden[index], self.tuple_len, past)

    def repeat(self, n: int) -> Prefix:
        """``n`` stacked copies (copy-major), for packed sweeps."""
        past = None if self.past is None else tuple((k.repeat(n, 1, 1, 1), v.repeat(n, 1, 1, 1)) for k, v in self.past)
        return Prefix(self.layer, self.hidden.repeat(n, 1, 1), self.tuple_len, past)

    def after(self, past: tuple[tuple[Tensor, Tensor], ...]) -> Prefix:
        """This prefix with the first positions cached: ``hidden`` keeps only the positions ``past`` does not cover."""
        start = past[0][0].shape[-2]
        if past[0][0].shape[0] != self.hidden.shape[0] or not 0 < start < self.hidden.shape[1]:
            raise ShapeMismatch(
                f"a KV cache of {past[0][0].shape[0]} rows x {start} positions does not fit a prefix of "
                f"{self.hidden.shape[0]} rows x {self.hidden.shape[1]} positions (expected the same rows and fewer positions)"
            )
        return Prefix(self.layer, self.hidden[:, start:], self.tuple_len, past)

    def past_kwargs(self, keyword: str = "past_key_values") -> dict:
        """The model keyword (``past_key_values``, or ``cache`` for models that name it so) carrying a
        fresh KV cache of ``past`` (a forward appends to it)."""
        from transformers import DynamicCache

        return {keyword: DynamicCache(ddp_cache_data=[(k, v) for k, v in self.past or ()])}

    def __repr__(self) -> str:
        extra = f", start={self.start}" if self.past is not None else ""
        return f"Prefix(layer={self.layer}, hidden={tuple(self.hidden.shape)}{extra})"


def _identity(tuple_len: int):
    @no_type_check  # a closure made per call: the suite's runtime checker would decorate it on every call
    def forward(hidden_states=None, *args, **kwargs):
        if hidden_states is None:
            hidden_states = next(v for v in kwargs.values() if isinstance(v, Tensor))
        return hidden_states if tuple_len == 0 else (hidden_states,) + (None,) * (tuple_len - 1)

    return forward


_LOCK = threading.Lock()


class _Router:
    """A layer's instance ``forward`` while some thread resumes past it: each thread that resumes
    gets its own choice (the identity, or the real forward for a nested forward); every other
    thread, and every other call, runs the layer's own forward."""

    def __init__(self, layer: nn.Module):
        self.had = "forward" in layer.__dict__
        self.old = layer.__dict__.get("forward")
        self.real = self.old if self.old is not None else type(layer).forward.__get__(layer)
        self.skips: dict[int, list] = {}

    def __call__(self, *args, **kwargs):
        stack = self.skips.get(threading.get_ident())
        if stack:
            return stack[-1](self.real, args, kwargs)
        return self.real(*args, **kwargs)


def _route(layer: nn.Module, skip) -> None:
    with _LOCK:
        router = layer.__dict__.get("forward")
        if not isinstance(router, _Router):
            router = _Router(layer)
            layer.forward = router
        router.skips.setdefault(threading.get_ident(), []).append(skip)


def _unroute(layer: nn.Module, skip) -> None:
    with _LOCK:
        router = layer.__dict__.get("forward")
        if not isinstance(router, _Router):
            return
        stack = router.skips.get(threading.get_ident(), [])
        if skip in stack:
            stack.remove(skip)
        if not stack:
            router.skips.pop(threading.get_ident(), None)
        if not router.skips:  # the last resumed call is over: the layer is as it was
            if router.had:
                layer.forward = router.old
            else:
                del layer.forward


@contextmanager
def resume_from(layers: nn.ModuleList, prefix: Prefix, root: nn.Module | None = None):
    """Within the block, on this thread: blocks below ``prefix.layer`` are the identity and
    block ``prefix.layer`` receives ``prefix.hidden`` as its input. Other threads see the
    model unchanged.

    With ``root`` (the model), only the outermost forward of ``root`` resumes; a
    forward nested in it (an intervention calling the model) runs every block.
    """
    ident = threading.get_ident()
    handles: list = []
    routed: list[nn.Module] = []
    depth = [0]  # this thread's forwards of root under way (state of this call only: dropped with it)
    identity = _identity(prefix.tuple_len)

    @no_type_check
    def enter(module, args, kwargs=None):  # kwargs None: another thread met the hook half-registered
        if threading.get_ident() == ident:
            depth[0] += 1

    @no_type_check
    def leave(module, args, out):
        if threading.get_ident() == ident:
            depth[0] -= 1

    @no_type_check
    def inject(module, args, kwargs=None):
        if threading.get_ident() != ident or kwargs is None or depth[0] > 1:
            return None
        x = args[0] if args and isinstance(args[0], Tensor) else kwargs.get("hidden_states")
        if x is None or x.shape != prefix.hidden.shape:
            got = None if x is None else tuple(x.shape)
            raise ShapeMismatch(f"the cached prefix has shape {tuple(prefix.hidden.shape)} but this forward's hidden state is {got}")
        h = prefix.hidden.to(x.dtype)
        if args and isinstance(args[0], Tensor):
            return (h, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": h}

    @no_type_check
    def skip(real, args, kwargs):
        return real(*args, **kwargs) if depth[0] > 1 else identity(*args, **kwargs)

    try:
        if root is not None:
            handles.append(root.register_forward_pre_hook(enter, with_kwargs=True, prepend=True))
            handles.append(root.register_forward_hook(leave, always_call=True))
        for layer in list(layers)[: prefix.layer]:
            _route(layer, skip)
            routed.append(layer)
        handles.append(layers[prefix.layer].register_forward_pre_hook(inject, with_kwargs=True, prepend=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for layer in routed:
            _unroute(layer, skip)
