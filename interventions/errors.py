"""Every error steerlab raises on purpose.

One base, :class:`SteerlabError`; each subclass also subclasses the built-in
exception a Python user would expect (``SiteNotFound`` is a ``KeyError``,
``ShapeMismatch`` a ``ValueError``), so ``except KeyError`` keeps working.
A message says what was given, what was expected and, where there is one, the
likely fix. They are raised *before* any compute, so a model is never left
half-modified.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

__all__ = [
    "SteerlabError",
    "SiteNotFound",
    "UnitError",
    "PositionOutOfRange",
    "BatchMismatch",
    "ShapeMismatch",
    "SubspaceSizeError",
    "SourceError",
    "GraphError",
    "NotSerialisable",
    "FileFormatError",
    "FingerprintMismatch",
    "SaveError",
    "UnknownInterventionType",
    "LifetimeError",
    "AlreadyWrapped",
    "NotWrapped",
    "ConcurrentCall",
    "NotAnIntervention",
    "NotAModel",
    "Unsupported",
    "ConfigError",
    "DataError",
    "CausalModelError",
    "NotFitted",
]


class SteerlabError(Exception):
    """Base of every error steerlab raises on purpose."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else ""


class SiteNotFound(SteerlabError, KeyError):
    """A site name that the model's catalog does not have."""

    def __init__(self, name: str, known: Iterable[str], *, reason: str | None = None):
        known = list(known)
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        msg = f"unknown site {name!r}"
        if reason:
            msg += f": {reason}"
        if close:
            msg += f"; did you mean {', '.join(repr(c) for c in close)}?"
        msg += " (`lab.sites` lists every site of this model)"
        super().__init__(msg)
        self.name = name
        self.close_matches = close


class UnitError(SteerlabError, ValueError):
    """A unit selection (positions, heads, dims) that is malformed."""


class PositionOutOfRange(UnitError, IndexError):
    """A position that does not exist in (some example of) the sequence."""


class BatchMismatch(SteerlabError, ValueError):
    """Base and source (or inputs and positions) disagree on the batch size."""


class ShapeMismatch(SteerlabError, ValueError):
    """A tensor whose shape is not the one the site or intervention needs."""


class SubspaceSizeError(SteerlabError, ValueError):
    """A subspace (rank, size) that does not fit the site it lives at."""


class SourceError(SteerlabError, ValueError):
    """A sourced intervention without a source, or a source where none is allowed."""


class GraphError(SteerlabError, ValueError):
    """A run graph that cannot be executed (a cycle, a run of another graph)."""


class NotSerialisable(SteerlabError, TypeError):
    """Saving something that cannot be written as JSON + safetensors (``Lambda``)."""


class FileFormatError(SteerlabError, ValueError):
    """A steerlab directory that is corrupt, truncated, foreign or of another version."""


class FingerprintMismatch(FileFormatError):
    """A saved file made for another model (width, layer count, vocabulary, type)."""


class SaveError(SteerlabError, OSError):
    """A save refused or failed: a read-only target, a file where a folder is expected, a failed write."""


class UnknownInterventionType(FileFormatError, KeyError):
    """A type name that no intervention class registered."""


class LifetimeError(SteerlabError, RuntimeError):
    """Attaching twice, detaching what is not attached, or mixing lifetimes unsafely."""


class AlreadyWrapped(LifetimeError):
    """Wrapping a model (``wrap``, ``get_reft_model``) that a live Lab or ReftModel already wraps,
    without ``stack=True``."""


class NotWrapped(LifetimeError):
    """Using a Lab or ReftModel after ``unwrap()``: its model is no longer steerlab's."""


class ConcurrentCall(LifetimeError):
    """A call that cannot share its model with a call running in another thread (the nnsight engine)."""


class NotAnIntervention(SteerlabError, TypeError):
    """Something given where an :class:`~steerlab.interventions.Intervention` was expected."""


class NotAModel(SteerlabError, TypeError):
    """Something given where a model (an ``nn.Module``, an nnsight model) was expected."""


class Unsupported(SteerlabError, NotImplementedError):
    """An operation steerlab deliberately does not offer (it would act on the wrong object)."""


class ConfigError(SteerlabError, ValueError):
    """An argument or configuration value out of its allowed set."""


class DataError(SteerlabError, ValueError):
    """A dataset, batch or tokenizer that cannot be used as given."""


class CausalModelError(SteerlabError, ValueError):
    """A causal model that is cyclic, incomplete or inconsistent."""


class NotFitted(SteerlabError, AttributeError):
    """A fitted attribute (``DAS.result``, ``.subspaces``, ...) read before ``fit``."""


_F = TypeVar("_F", bound=Callable[..., Any])


def checked_first(**checks: Callable[[Any], object]) -> Callable[[_F], _F]:
    """Run steerlab's own checks of the named arguments before the decorated function is entered.

    A public entry point takes what a notebook passes and refuses a wrong value with a named
    error; its annotation states the contract (``qk_fix: bool``). The checks run first, so the
    user gets steerlab's error whether or not a runtime type checker guards the annotated
    function (the test suite's jaxtyping hook wraps it innermost, under this decorator). Each
    check takes the argument's value and raises or returns; an argument left to its default is
    not checked.
    """

    def decorate(fn: _F) -> _F:
        names = list(inspect.signature(fn).parameters)
        unknown = sorted(set(checks) - set(names))
        if unknown:
            raise TypeError(f"checked_first: {fn.__qualname__} has no parameter {', '.join(unknown)}")
        where = [(name, names.index(name), check) for name, check in checks.items()]

        @functools.wraps(fn)
        def call(*args, **kwargs):
            for name, i, check in where:
                if name in kwargs:
                    check(kwargs[name])
                elif i < len(args):
                    check(args[i])
            return fn(*args, **kwargs)

        return call  # type: ignore[return-value]

    return decorate


def flag(name: str) -> Callable[[object], None]:
    """A :func:`checked_first` check that argument ``name`` is ``True`` or ``False`` (not a truthy string)."""

    def check(value: object) -> None:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}={value!r}: expected True or False")

    return check
