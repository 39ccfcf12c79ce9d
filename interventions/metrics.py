"""Patching metrics: a model output (and its inputs) to one number per example.

Every metric maps ``(output, inputs) -> Float[Tensor, "batch"]``: ``output``
is what the model returned (a ``ModelOutput``, a :class:`RunResult` or a
logits tensor ``[batch, seq, vocab]``), ``inputs`` what it ran on (a dict with
``attention_mask``, :class:`Inputs`, token ids, or ``None`` for unpadded
inputs). ``position`` counts real tokens whatever the padding side: ``-1`` is
each example's last real token. With ``p = softmax(logits[position])``::

    logit_diff(good, bad)   z[good] - z[bad]
    logit(t)                z[t]
    prob(t)                 p[t]
    logprob(t)              log p[t]
    kl(reference)           KL(p_ref || p) = sum_v p_ref[v] (log p_ref[v] - log p[v])
    kl_to_base()            kl with the sweep's unpatched base run as reference
    loss()                  mean next-token cross-entropy over real tokens

A token is a string (resolved with the lab's tokenizer; it must encode to one
token), an id, or one per example (a list of strings or ids, or a
``LongTensor[batch]``), as in TransformerLens's ``answer_tokens``. A batch that
repeats the examples ``n`` times (copy-major, as a packed sweep does) reuses
the per-example tokens for each copy.

Any function ``fn(output, inputs) -> Float[Tensor, "batch"]`` is a metric too.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from steerlab.interventions.errors import BatchMismatch, ConfigError, ShapeMismatch, checked_first
from steerlab.interventions.inputs import Inputs
from steerlab.interventions.units import MaskInfo, Positions

__all__ = [
    "Metric",
    "logit_diff",
    "logit",
    "prob",
    "logprob",
    "kl",
    "kl_to_base",
    "loss",
    "as_metric",
]

TokenSpec = str | int | Sequence[str | int] | Tensor


def _tokenizer_of(obj):
    """A tokenizer from a Lab (its ``.tokenizer``) or a tokenizer itself."""
    return getattr(obj, "tokenizer", obj) if obj is not None and not hasattr(obj, "encode") else obj


def _token_id(tok, tokenizer, what: str) -> int:
    if isinstance(tok, bool):
        raise ConfigError(f"{what}={tok!r}: expected a token string or a token id")
    if isinstance(tok, int):
        return tok
    if not isinstance(tok, str):
        raise ConfigError(f"{what}={tok!r} ({type(tok).__name__}): expected a token string or a token id")
    if tokenizer is None:
        raise ConfigError(
            f"{what}={tok!r} is a string but the metric has no tokenizer: pass token ids, "
            "or bind it with metric.bind(lab) (sweep does this for you)"
        )
    ids = tokenizer.encode(tok, add_special_tokens=False)
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        raise ConfigError(
            f"{what}={tok!r} is {len(ids)} tokens under this tokenizer ({pieces!r}); a metric token must be a "
            "single token: pick a word that is one token (often with its leading space) or pass its id"
        )
    return int(ids[0])


def _resolve_tokens(spec: TokenSpec, tokenizer, what: str) -> Int[Tensor, "*token"]:
    """A 0-d tensor (one token for every example) or ``[n]`` (one per example)."""
    if isinstance(spec, Tensor):
        if spec.dtype.is_floating_point or spec.dim() > 1:
            raise ConfigError(f"{what} tensor has dtype {spec.dtype} and shape {tuple(spec.shape)}; expected LongTensor[batch] of ids")
        return spec.long()
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise ConfigError(f"{what}=[]: expected a token per example")
        return torch.tensor([_token_id(t, tokenizer, f"{what}[{i}]") for i, t in enumerate(spec)], dtype=torch.long)
    return torch.tensor(_token_id(spec, tokenizer, what), dtype=torch.long)


def _per_row(t: Tensor, rows: int, what: str) -> Tensor:
    """Tokens or references for ``rows`` rows: broadcast, or tile per-example values over copies."""
    if t.dim() == 0:
        return t.expand(rows)
    n = t.shape[0]
    if rows % n:
        raise BatchMismatch(f"the metric has {n} per-example {what} but the batch has {rows} rows; expected {n} or a multiple")
    return t.repeat(rows // n, *([1] * (t.dim() - 1))) if rows != n else t


def _logits(output) -> Tensor:
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if not isinstance(logits, Tensor):
        raise ConfigError(
            f"this metric reads logits, but the model output ({type(output).__name__}) has none; a model without a "
            "language-model head needs a custom metric: a function (output, inputs) -> Float[Tensor, 'batch']"
        )
    return logits


def _as_inputs(inputs, tokenizer) -> Inputs | MaskInfo | None:
    if inputs is None or isinstance(inputs, (Inputs, MaskInfo)):
        return inputs
    return Inputs.of(inputs, tokenizer=tokenizer)


def _mask_info(inputs, batch: int, seq: int, device) -> MaskInfo:
    if isinstance(inputs, MaskInfo):
        return inputs
    if inputs is None:
        return MaskInfo.from_mask(None, batch, seq, device)
    info = inputs.mask_info()
    if info.batch != batch:
        raise BatchMismatch(f"the inputs have batch {info.batch} but the model output has {batch}")
    return info


def _at_position(logits: Tensor, inputs, position: int) -> Float[Tensor, "batch vocab"]:
    """Logits at real-token ``position`` of each example."""
    if logits.dim() == 2:
        return logits  # already one position per example (a classification head)
    b, t = logits.shape[:2]
    info = _mask_info(inputs, b, t, logits.device)
    idx = Positions(position).resolve(info)
    assert idx is not None
    if info.lengths_cpu is not None:
        Positions(position).validate(info, "metric position")
    return logits.gather(1, idx.clamp_min(0)[:, :, None].expand(-1, 1, logits.shape[-1]))[:, 0]


class Metric:
    """Base of the built-in metrics: ``metric(output, inputs) -> Float[Tensor, "batch"]``.

    ``bind(lab)`` resolves token strings with the lab's tokenizer;
    ``against(base_output, base_inputs)`` supplies a reference run (used by
    :func:`kl_to_base`); both return a copy.
    """

    name: str = "metric"
    tokenizer = None
    #: reads only the logits of each example's last ``tail`` real tokens (None: any);
    #: a sweep then asks the model for the logits of those positions alone
    tail: int | None = None

    def bind(self, lab_or_tokenizer) -> Metric:
        m = copy.copy(self)
        m.tokenizer = _tokenizer_of(lab_or_tokenizer)
        m._resolve(strict=True)
        return m

    def against(self, base_output, base_inputs) -> Metric:
        return self

    def _resolve(self, strict: bool = False) -> None:
        """Turn token strings into ids; ``strict``: fail now if that needs a tokenizer there is not."""

    def __call__(self, output, inputs=None) -> Float[Tensor, " batch"]:
        return self.compute(output, _as_inputs(inputs, self.tokenizer))

    def compute(self, output, inputs: Inputs | MaskInfo | None) -> Float[Tensor, " batch"]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


def _check_position(position: object) -> None:
    if isinstance(position, bool) or not isinstance(position, int):
        raise ConfigError(f"position={position!r}: expected one int (a real-token index, -1 = last)")


class _TokenMetric(Metric):
    """A metric of the logits at one position and some tokens."""

    @checked_first(position=_check_position)
    def __init__(self, kind: str, tokens: dict[str, TokenSpec], position: int, tokenizer=None):
        self.kind = kind
        self.specs = tokens
        self.position = position
        self.tokenizer = _tokenizer_of(tokenizer)
        self.tail = -position if position < 0 else None
        self.ids: dict[str, Tensor] | None = None
        shown = ", ".join(repr(v) if not isinstance(v, Tensor) else f"<{v.numel()} ids>" for v in tokens.values())
        self.name = f"{kind}({shown})" + (f"@{position}" if position != -1 else "")
        self._resolve()

    def _resolve(self, strict: bool = False) -> None:
        texts = lambda v: isinstance(v, str) or (isinstance(v, (list, tuple)) and any(isinstance(x, str) for x in v))  # noqa: E731
        needs_tok = any(texts(v) for v in self.specs.values())
        if needs_tok and self.tokenizer is None and not strict:
            self.ids = None  # resolved at bind()
            return
        self.ids = {k: _resolve_tokens(v, self.tokenizer, k) for k, v in self.specs.items()}

    def _rows(self, key: str, rows: int, device) -> Tensor:
        if self.ids is None:
            bad = next(v for v in self.specs.values() if isinstance(v, (str, list, tuple)))
            _resolve_tokens(bad, None, key)  # raises the "no tokenizer" error
        return _per_row(self.ids[key].to(device), rows, "tokens")

    def compute(self, output, inputs) -> Float[Tensor, " batch"]:
        z = _at_position(_logits(output), inputs, self.position).float()
        pick = lambda key: z.gather(1, self._rows(key, z.shape[0], z.device)[:, None])[:, 0]  # noqa: E731
        if self.kind == "logit_diff":
            return pick("good") - pick("bad")
        if self.kind == "logit":
            return pick("token")
        logp = z.log_softmax(-1).gather(1, self._rows("token", z.shape[0], z.device)[:, None])[:, 0]
        return logp if self.kind == "logprob" else logp.exp()


@checked_first(position=_check_position)
def logit_diff(good: TokenSpec, bad: TokenSpec, *, position: int = -1, tokenizer=None) -> Metric:
    """``logits[good] - logits[bad]`` at real-token ``position`` (default the last)."""
    return _TokenMetric("logit_diff", {"good": good, "bad": bad}, position, tokenizer)


@checked_first(position=_check_position)
def logit(token: TokenSpec, *, position: int = -1, tokenizer=None) -> Metric:
    """``logits[token]`` at real-token ``position``."""
    return _TokenMetric("logit", {"token": token}, position, tokenizer)


@checked_first(position=_check_position)
def prob(token: TokenSpec, *, position: int = -1, tokenizer=None) -> Metric:
    """``softmax(logits)[token]`` at real-token ``position``."""
    return _TokenMetric("prob", {"token": token}, position, tokenizer)


@checked_first(position=_check_position)
def logprob(token: TokenSpec, *, position: int = -1, tokenizer=None) -> Metric:
    """``log_softmax(logits)[token]`` at real-token ``position``."""
    return _TokenMetric("logprob", {"token": token}, position, tokenizer)


class _KL(Metric):
    @checked_first(position=_check_position)
    def __init__(self, reference: Tensor | None, position: int, to_base: bool):
        self.position = position
        self.tail = -position if position < 0 else None
        self.to_base = to_base
        self.reference = None if reference is None else reference.detach().float().log_softmax(-1)
        self.name = "kl_to_base" if to_base else "kl"
        if position != -1:
            self.name += f"@{position}"

    def against(self, base_output, base_inputs) -> Metric:
        if not self.to_base:
            return self
        m = copy.copy(self)
        z = _at_position(_logits(base_output), _as_inputs(base_inputs, self.tokenizer), self.position)
        m.reference = z.detach().float().log_softmax(-1)
        return m

    def compute(self, output, inputs) -> Float[Tensor, " batch"]:
        if self.reference is None:
            raise ConfigError("kl_to_base() needs the base run's output: a sweep supplies it; elsewhere use kl(reference_logits)")
        logp = _at_position(_logits(output), inputs, self.position).float().log_softmax(-1)
        ref = self.reference
        if ref.dim() == 3:
            ref = _at_position(ref, None, self.position)
        if ref.shape[-1] != logp.shape[-1]:
            raise ShapeMismatch(f"the KL reference has {ref.shape[-1]} vocabulary entries but the output has {logp.shape[-1]}")
        ref = _per_row(ref.to(logp.device), logp.shape[0], "reference distributions")
        return (ref.exp() * (ref - logp)).sum(-1)


def _check_reference(reference: object) -> None:
    if not isinstance(reference, Tensor) or reference.dim() not in (2, 3):
        got = tuple(reference.shape) if isinstance(reference, Tensor) else type(reference).__name__
        raise ConfigError(f"kl(reference={got}): expected logits [batch, vocab] or [batch, pos, vocab]")


@checked_first(reference=_check_reference, position=_check_position)
def kl(reference: Float[Tensor, "batch *pos vocab"], *, position: int = -1) -> Metric:
    """``KL(p_ref || p)`` at real-token ``position``; ``reference`` holds logits,
    ``[batch, vocab]`` (already at the position) or ``[batch, pos, vocab]`` (unpadded)."""
    return _KL(reference, position, False)


@checked_first(position=_check_position)
def kl_to_base(*, position: int = -1) -> Metric:
    """``KL(p_base || p)``: how far a patch moves the next-token distribution from the unpatched base run."""
    return _KL(None, position, True)


class _Loss(Metric):
    name = "loss"

    def compute(self, output, inputs) -> Float[Tensor, " batch"]:
        if not isinstance(inputs, Inputs) or not isinstance(inputs.kwargs.get("input_ids"), Tensor):
            raise ConfigError("loss() needs the token ids: pass the inputs (a dict with input_ids) as the second argument")
        z = _logits(output)
        ids = inputs.kwargs["input_ids"]
        mask = inputs.mask if inputs.mask is not None else torch.ones_like(ids)
        pair = (mask[:, :-1] * mask[:, 1:]).to(z.dtype)  # predicting a real token from a real token
        ce = F.cross_entropy(z[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view_as(pair)
        return (ce * pair).sum(1) / pair.sum(1).clamp_min(1)


def loss() -> Metric:
    """Per-example mean next-token cross-entropy over the real tokens."""
    return _Loss()


class _Function(Metric):
    def __init__(self, fn: Callable[[Any, Any], Tensor], name: str | None = None):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "metric")

    def __call__(self, output, inputs=None) -> Tensor:
        return self.fn(output, inputs)


def as_metric(metric) -> Metric:
    """A :class:`Metric` from a built-in metric or a function ``(output, inputs) -> [batch]``."""
    if isinstance(metric, Metric):
        return metric
    if callable(metric):
        return _Function(metric)
    raise ConfigError(
        f"metric={metric!r}: expected a steerlab metric (sl.metrics.logit_diff(...), ...) "
        "or a function (output, inputs) -> Float[Tensor, 'batch']"
    )
