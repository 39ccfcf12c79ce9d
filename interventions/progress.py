"""Progress bars for every long call in steerlab, one mechanism for every layer.

Every call that can take more than a few seconds (a DAS fit, a search, a
patching sweep, ReFT training, the demo's steps, a model conversion) takes
``progress: bool | None = None`` and opens its bar through :func:`bar` or
:func:`track`:

- ``progress=True`` always shows a bar; ``progress=False`` never does;
- ``progress=None`` (the default) follows :func:`default` when one is set
  (``with progress.default(False): ...``; the CLI's ``--no-progress``), else
  the environment variable ``STEERLAB_PROGRESS`` (``0`` off, ``1`` on), else
  shows a bar when the output is a terminal or a Jupyter kernel, and none
  when it is a file or a pipe (logs and CI stay clean).

Bars are tqdm's: a widget in Jupyter when ``ipywidgets`` is installed (text
otherwise), text on stderr in a terminal, so stdout holds only results. A
bar opened while another is open (a search's DAS fits) is transient: it
clears when done and the outer one stays. Training bars show the loss only
at logging intervals, when the loop reads it anyway
(:mod:`steerlab.interventions.training`); updating a bar never reads a
device tensor.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from typing import Any, Protocol, TypeVar, runtime_checkable

from steerlab.interventions.errors import ConfigError

__all__ = ["Bar", "bar", "track", "enabled", "default", "ENV"]

#: environment variable: ``0`` hides every default bar, ``1`` shows them even when the output is no terminal
ENV = "STEERLAB_PROGRESS"

T = TypeVar("T")

_default: ContextVar[bool | None] = ContextVar("steerlab_progress_default", default=None)
_depth: ContextVar[int] = ContextVar("steerlab_progress_depth", default=0)


@runtime_checkable  # so that a runtime type checker (the test suite's) can check a Bar argument
class Bar(Protocol):
    """What a call may do with its bar (a tqdm bar, or a silent stand-in)."""

    n: int

    def update(self, n: int = 1) -> Any: ...

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> Any: ...

    def set_description(self, desc: str | None = None, refresh: bool = True) -> Any: ...

    def write(self, s: str) -> None:
        """Print a line to stdout above the bar (nothing when the bar is off)."""


class _Silent:
    """A bar that shows nothing (``progress`` off); counts like a real one."""

    def __init__(self, total: int | None = None, initial: int = 0):
        self.total, self.n = total, initial

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        pass

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        pass

    def write(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


def _in_notebook() -> bool:
    """A Jupyter kernel (the test tqdm.autonotebook uses): IPython is running inside an ``IPKernelApp``."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
        return shell is not None and "IPKernelApp" in shell.config
    except Exception:  # noqa: BLE001 - any IPython oddity means "not a notebook"
        return False


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def enabled(progress: object = None) -> bool:
    """Whether a call given ``progress`` (``True``, ``False`` or ``None``; this is where a call's
    ``progress`` argument is checked, so it takes any value) shows a bar (see the module docstring)."""
    if progress is not None:
        if not isinstance(progress, bool):
            raise ConfigError(f"progress={progress!r}: expected True, False or None (None: a bar when the output is a terminal)")
        return progress
    chosen = _default.get()
    if chosen is not None:
        return chosen
    env = os.environ.get(ENV, "").strip().lower()
    if env in ("0", "false", "no", "off"):
        return False
    if env in ("1", "true", "yes", "on"):
        return True
    return _in_notebook() or _is_terminal(sys.stderr)


@contextlib.contextmanager
def default(progress: bool | None) -> Iterator[None]:
    """Within the block, calls given ``progress=None`` show a bar iff ``progress`` (``None``: decide per output)."""
    if progress is not None and not isinstance(progress, bool):
        raise ConfigError(f"progress={progress!r}: expected True, False or None")
    token = _default.set(progress)
    try:
        yield
    finally:
        _default.reset(token)


def _tqdm_class():
    if _in_notebook():
        try:
            import ipywidgets  # noqa: F401 - tqdm's widget needs it; without it, text bars (and no warning)
            from tqdm.notebook import tqdm

            return tqdm
        except ImportError:
            pass
    from tqdm.std import tqdm

    return tqdm


@contextlib.contextmanager
def bar(*, total: int | None, desc: str, unit: str = "it", progress: bool | None = None, initial: int = 0) -> Iterator[Bar]:
    """A progress bar for the block: ``with bar(total=n, desc="DAS") as b: ... b.update()``.

    Shown as :func:`enabled` says; transient when opened inside another bar.
    Always closed on exit, also when the block raises.
    """
    depth = _depth.get()
    if not enabled(progress):
        b: Any = _Silent(total, initial)
    else:
        b = _tqdm_class()(total=total, initial=initial, desc=desc, unit=unit, leave=depth == 0, file=sys.stderr,
                          dynamic_ncols=True, disable=False)
    token = _depth.set(depth + 1)
    try:
        yield b
    finally:
        try:
            _depth.reset(token)
        except ValueError:  # a generator (track) closed from another context: put the depth back by value
            _depth.set(depth)
        b.close()


def track(items: Iterable[T], *, desc: str, total: int | None = None, unit: str = "it", progress: bool | None = None) -> Iterator[T]:
    """``items`` one by one, with a bar that advances after each (see :func:`bar`)."""
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    with bar(total=total, desc=desc, unit=unit, progress=progress) as b:
        for item in items:
            yield item
            b.update(1)
