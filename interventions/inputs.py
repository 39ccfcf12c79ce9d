"""What a run is run on: normalised model inputs.

Accepted: a string or list of strings (tokenised with the lab's tokenizer,
padded on the tokenizer's side), a ``dict`` / ``BatchEncoding`` of keyword
arguments (``input_ids``, ``attention_mask``, ...), a ``LongTensor`` of token
ids, or, for a plain ``nn.Module``, a tensor or tuple of positional arguments.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from steerlab.interventions.errors import BatchMismatch, DataError
from steerlab.interventions.units import MaskInfo

__all__ = ["Inputs", "ModelInputs", "tokenize", "is_texts", "check_inputs"]


def is_texts(x) -> bool:
    """A non-empty list or tuple of strings."""
    return isinstance(x, (list, tuple)) and bool(x) and all(isinstance(s, str) for s in x)


def tokenize(tokenizer, texts, *, padding_side: str | None = None, what: str = "text inputs", **kwargs) -> dict:
    """``texts`` tokenised into a padded batch (``padding_side``: the tokenizer's own by default).

    The one place steerlab checks a tokenizer can do it: text needs a
    tokenizer, and more than one text needs a pad token.
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    if tokenizer is None:
        raise DataError(f"{what} need a tokenizer: wrap(model, tokenizer) (or get_reft_model(model, config, tokenizer=tok)) or pass token ids")
    if getattr(tokenizer, "pad_token", None) is None and len(texts) > 1:
        raise DataError(
            f"the tokenizer has no pad token, so a batch of {len(texts)} texts cannot be padded; "
            "set tokenizer.pad_token (e.g. to tokenizer.eos_token)"
        )
    side = {} if padding_side is None else {"padding_side": padding_side}
    return dict(tokenizer(texts, return_tensors="pt", padding=True, **side, **kwargs))


def check_inputs(x: object) -> None:
    """Refuse (:class:`DataError`) what :meth:`Inputs.of` cannot use as model inputs (see :data:`ModelInputs`)."""
    if not (isinstance(x, (Inputs, str, Mapping, Tensor, tuple)) or is_texts(x)):
        raise DataError(
            f"cannot use {type(x).__name__} as model inputs; expected text, a dict of tensors "
            "(input_ids, attention_mask, ...), a LongTensor of token ids or a tensor"
        )


@dataclass
class Inputs:
    """Positional ``args`` and keyword ``kwargs`` for one model call."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    @staticmethod
    def of(x, *, tokenizer=None, device: torch.device | None = None, token_ids: bool = True) -> Inputs:
        """``x`` as model inputs. ``token_ids``: an integer tensor is ``input_ids`` (a Hugging Face
        model), not a positional argument (a plain module)."""
        if isinstance(x, Inputs):
            return x.to(device) if device is not None else x
        if isinstance(x, str):
            x = [x]
        if is_texts(x):
            x = tokenize(tokenizer, x)
        if isinstance(x, Mapping):
            kwargs = {k: v for k, v in x.items()}
            inp = Inputs((), kwargs)
        elif isinstance(x, Tensor) and token_ids and x.dtype in (torch.int64, torch.int32):
            ids = x if x.dim() == 2 else x[None]
            inp = Inputs((), {"input_ids": ids})
        elif isinstance(x, Tensor):
            inp = Inputs((x,), {})
        elif isinstance(x, tuple):
            inp = Inputs(tuple(x), {})
        else:
            check_inputs(x)  # raises: nothing else is model inputs
        return inp.to(device) if device is not None else inp

    # -- shape ----------------------------------------------------------
    @property
    def _ref(self) -> Tensor:
        for k in ("input_ids", "inputs_embeds"):
            if isinstance(self.kwargs.get(k), Tensor):
                return self.kwargs[k]
        for a in self.args:
            if isinstance(a, Tensor):
                return a
        for v in self.kwargs.values():
            if isinstance(v, Tensor):
                return v
        raise DataError("inputs hold no tensor")

    @property
    def batch(self) -> int:
        return self._ref.shape[0]

    @property
    def seq(self) -> int:
        ref = self._ref
        if "inputs_embeds" in self.kwargs or "input_ids" in self.kwargs:
            return ref.shape[1]
        return ref.shape[1] if ref.dim() >= 3 else 1

    @property
    def mask(self) -> Tensor | None:
        m = self.kwargs.get("attention_mask")
        return m if isinstance(m, Tensor) else None

    def mask_info(self) -> MaskInfo:
        return MaskInfo.from_mask(self.mask, self.batch, self.seq, self._ref.device)

    def signature(self) -> tuple:
        """Inputs with equal signatures can be concatenated into one batch."""
        sig = tuple(
            (k, tuple(v.shape[1:]), v.dtype) if isinstance(v, Tensor) else (k, repr(v)) for k, v in sorted(self.kwargs.items())
        )
        return sig + tuple((i, tuple(a.shape[1:]), a.dtype) if isinstance(a, Tensor) else (i, repr(a)) for i, a in enumerate(self.args))

    # -- transforms -------------------------------------------------------
    def to(self, device) -> Inputs:
        mv = lambda v: v.to(device) if isinstance(v, Tensor) else v  # noqa: E731
        return Inputs(tuple(mv(a) for a in self.args), {k: mv(v) for k, v in self.kwargs.items()})

    def map(self, fn) -> Inputs:
        mv = lambda v: fn(v) if isinstance(v, Tensor) and v.dim() >= 1 else v  # noqa: E731
        return Inputs(tuple(mv(a) for a in self.args), {k: mv(v) for k, v in self.kwargs.items()})

    def select(self, index) -> Inputs:
        return self.map(lambda t: t[index])

    def repeat(self, n: int) -> Inputs:
        """``n`` copies stacked along the batch (copy-major: rows ``c*b .. c*b+b-1``)."""
        return self.map(lambda t: t.repeat(n, *([1] * (t.dim() - 1))))

    @staticmethod
    def cat(parts: list[Inputs]) -> Inputs:
        first = parts[0]
        for p in parts[1:]:
            if p.signature() != first.signature():
                raise BatchMismatch("inputs of different shapes cannot be batched together")
        args = tuple(torch.cat([p.args[i] for p in parts]) if isinstance(a, Tensor) else a for i, a in enumerate(first.args))
        kwargs = {k: torch.cat([p.kwargs[k] for p in parts]) if isinstance(v, Tensor) else v for k, v in first.kwargs.items()}
        return Inputs(args, kwargs)


#: what a call runs the model on: text or a list of texts (tokenised with the lab's tokenizer), a dict /
#: ``BatchEncoding`` of keyword arguments, a LongTensor of token ids, a tensor or a tuple of positional
#: arguments (a plain module), or :class:`Inputs`
ModelInputs = str | Sequence[str] | Mapping[str, Any] | Tensor | tuple[Any, ...] | Inputs
