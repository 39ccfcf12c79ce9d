"""Who wraps a model, and the model as it was handed over.

Wrapping a model (``wrap``, and through it ``get_reft_model``) freezes its
parameters; training it afterwards (the Hugging Face ``Trainer``) may also
switch it to train mode, turn on gradient checkpointing, hook its input
embeddings so they require grad (``enable_input_require_grads``) and leave
gradients in ``.grad``. A :class:`WrapRecord` notes all of that when the
model is wrapped, and :func:`release` puts it back when it is unwrapped:
``requires_grad`` flags, train/eval mode of every module, gradient
checkpointing, the input-embedding hook, ``.grad`` of every parameter and
``config.use_cache`` — the model as the user handed it over.

One model, one wrapper at a time: a second ``wrap`` of a model that a live
wrapper holds is refused (:class:`~steerlab.interventions.errors.AlreadyWrapped`)
unless the caller asks to stack (``stack=True``). Stacked wrappers may be
unwrapped in any order: each unwrap hands what it noted to the wrapper above
it, and the last one restores the model as it was before the first.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

from torch import nn

from steerlab.interventions.errors import AlreadyWrapped

__all__ = ["WrapRecord", "acquire", "release", "wrappers"]

_WRAPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> [WrapRecord], bottom first
_CHECKPOINT_KEYS = ("gradient_checkpointing", "_gradient_checkpointing_func")
_INPUT_GRAD_KEYS = ("_require_grads_hook", "_require_grads_hooks")
_MISSING = object()


@dataclass(eq=False)
class _ModelState:
    """What wrapping and training may change on a model, noted before they do."""

    flags: dict[nn.Parameter, bool]
    grads: dict[nn.Parameter, Any]
    training: dict[nn.Module, bool]
    checkpointing: dict[nn.Module, dict[str, Any]]
    input_grads: dict[str, Any]  # enable_input_require_grads(): its handles on the embeddings
    embedding_hooks: dict[nn.Module, set]  # the forward hooks of the input embeddings
    use_cache: Any

    @classmethod
    def of(cls, model: nn.Module) -> _ModelState:
        params = list(model.parameters())
        modules = list(model.modules())
        return cls(
            flags={p: p.requires_grad for p in params},
            grads={p: p.grad for p in params},
            training={m: m.training for m in modules},
            checkpointing={m: {k: m.__dict__.get(k, _MISSING) for k in _CHECKPOINT_KEYS} for m in modules},
            input_grads={k: model.__dict__.get(k, _MISSING) for k in _INPUT_GRAD_KEYS},
            embedding_hooks={e: set(e._forward_hooks) for e in _embeddings(modules)},
            use_cache=getattr(getattr(model, "config", None), "use_cache", _MISSING),
        )

    def restore(self, model: nn.Module) -> None:
        for m, keys in self.embedding_hooks.items():
            for k, fn in list(m._forward_hooks.items()):
                # enable_input_require_grads() since wrapping (the Trainer's, maybe called twice): its hooks only
                if k not in keys and "make_inputs_require_grads" in getattr(fn, "__qualname__", ""):
                    del m._forward_hooks[k]
        for k in _INPUT_GRAD_KEYS:
            _set(model, k, self.input_grads[k])
        for m, saved in self.checkpointing.items():
            for k, v in saved.items():
                _set(m, k, v)
        for m, mode in self.training.items():
            m.training = mode
        for p, flag in self.flags.items():
            p.requires_grad_(flag)
        for p, grad in self.grads.items():
            if p.grad is not grad:
                p.grad = grad
        cfg = getattr(model, "config", None)
        if self.use_cache is not _MISSING and cfg is not None:
            cfg.use_cache = self.use_cache


def _embeddings(modules: list[nn.Module]) -> list[nn.Module]:
    """The input embeddings of every Hugging Face model among ``modules`` (where ``enable_input_require_grads`` hooks)."""
    out = []
    for m in modules:
        get = getattr(m, "get_input_embeddings", None)
        if callable(get) and hasattr(m, "config"):
            try:
                e = get()
            except (NotImplementedError, AttributeError):
                continue
            if isinstance(e, nn.Module) and e not in out:
                out.append(e)
    return out


def _set(obj: Any, key: str, value: Any) -> None:
    if value is _MISSING:
        obj.__dict__.pop(key, None)
    else:
        obj.__dict__[key] = value


@dataclass(eq=False)
class WrapRecord:
    """One wrapper's hold on a model and the state to restore when it lets go."""

    model: weakref.ref
    owner: weakref.ref
    state: _ModelState
    released: bool = False
    finalizer: Any = None

    @property
    def live(self) -> bool:
        return not self.released and self.owner() is not None


def _records(model: nn.Module) -> list[WrapRecord]:
    """``model``'s wrappers still holding it, bottom first (the registry keeps only weak references:
    a wrapper dropped without ``unwrap()`` lets go when it is collected)."""
    refs = _WRAPS.get(model, [])
    out = [r for r in (ref() for ref in refs) if r is not None and r.live]
    refs[:] = [weakref.ref(r) for r in out]
    return out


def wrappers(model: nn.Module) -> list[WrapRecord]:
    """The live wrappers of ``model``, bottom first."""
    return _records(model)


def acquire(model: nn.Module, owner: object, *, freeze: bool, stack: bool) -> WrapRecord:
    """Note ``model``'s state and (``freeze``) freeze its parameters for ``owner``.

    Refused with :class:`AlreadyWrapped` while another live wrapper holds the model, unless
    ``stack``. If ``owner`` is collected without letting go, it lets go then.
    """
    live = _records(model)
    if live and not stack:
        holder = live[-1].owner()
        raise AlreadyWrapped(
            f"this {type(model).__name__} is already wrapped by {holder!r}; call its unwrap() first (a notebook cell run "
            "twice wraps twice), or pass stack=True to wrap it again on top (unwrapping in any order then restores the model)"
        )
    rec = WrapRecord(weakref.ref(model), weakref.ref(owner), _ModelState.of(model))
    _WRAPS.setdefault(model, []).append(weakref.ref(rec))
    rec.finalizer = weakref.finalize(owner, release, rec)
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    return rec


def release(rec: WrapRecord) -> None:
    """Let go of ``rec``'s model: the top wrapper restores what it noted; one below the top hands
    its notes to the wrapper above it (which then restores them in turn)."""
    if rec.released:
        return
    model = rec.model()
    others = [] if model is None else [r for r in _records(model) if r is not rec]
    rec.released = True
    if rec.finalizer is not None:
        rec.finalizer.detach()
    if model is None:
        return
    refs = _WRAPS.get(model, [])
    order = [ref() for ref in refs]
    mine = order.index(rec) if rec in order else len(order)
    above = [r for r in others if r in order and order.index(r) > mine]
    refs[:] = [weakref.ref(r) for r in others]
    if above:
        above[0].state = rec.state
        return
    rec.state.restore(model)
