"""Small test helpers written independently of steerlab: manual hooks, padded indices, counting forwards."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor, nn

import steerlab as sl


@contextmanager
def wrapped(model, tokenizer=None, **kw):
    """``sl.wrap`` for a shared (session) model, unwrapped afterwards so its ``requires_grad`` flags are restored."""
    lab = sl.wrap(model, tokenizer, **kw)
    try:
        yield lab
    finally:
        lab.unwrap()


def real_index(mask: Tensor, i: int, p: int) -> int:
    """The padded index of example ``i``'s real token ``p`` (negative counts from its last real token)."""
    where = [j for j, m in enumerate(mask[i].tolist()) if m]
    return where[p]


def hidden_arg(args, kwargs) -> Tensor:
    return args[0] if args and isinstance(args[0], Tensor) else kwargs["hidden_states"]


def replace_input(module: nn.Module, fn):
    """A manual forward pre-hook replacing the module's first tensor input by ``fn(x)``."""

    def hook(mod, args, kwargs):
        if args and isinstance(args[0], Tensor):
            return (fn(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}

    return module.register_forward_pre_hook(hook, with_kwargs=True)


def replace_output(module: nn.Module, fn):
    """A manual forward hook replacing the module's output (or its first element) by ``fn(y)``."""

    def hook(mod, args, out):
        if isinstance(out, Tensor):
            return fn(out)
        return (fn(out[0]), *out[1:])

    return module.register_forward_hook(hook)


def read_input(module: nn.Module, store: dict, key):
    def hook(mod, args, kwargs):
        store[key] = hidden_arg(args, kwargs).detach().clone()

    return module.register_forward_pre_hook(hook, with_kwargs=True)


def read_output(module: nn.Module, store: dict, key):
    def hook(mod, args, out):
        store[key] = (out if isinstance(out, Tensor) else out[0]).detach().clone()

    return module.register_forward_hook(hook)


@contextmanager
def hooks(*handles):
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def hook_counts(model: nn.Module) -> tuple:
    """Sizes of every module's hook registries (to see that a call left them as it found them)."""
    return tuple(
        (name, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks), len(getattr(m, "_forward_hooks_with_kwargs", {})))
        for name, m in model.named_modules()
    )


_ = torch


def in_fresh_interpreter(call: str) -> None:
    """Run ``call`` (``"module:function"`` of the tests package) in a fresh interpreter, where
    steerlab is imported without the suite's runtime type checker (tests/conftest.py).

    For the tests where nnsight ships steerlab's code by value, as to NDIF: in the suite's process every
    steerlab function is wrapped by the checker, whose wrappers hold weak references no pickler can
    ship; a user's steerlab has no such wrappers."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    module, function = call.split(":")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, "-c", f"from {module} import {function}; {function}()"],
                         cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
