"""The intervention base class and the registry of intervention types.

An intervention is an ``nn.Module`` that maps the selected slice of a site's
value (and, for sourced types, the aligned slice of a source run) to a new
slice of the same shape::

    new = intervention(base)            # sourceless: Add, Zero, LoReFT, ...
    new = intervention(base, source)    # sourced: Interchange, SubspaceInterchange, ...

``base`` and ``source`` are ``[batch, k, ..., width]``: ``k`` selected
positions, then heads if the site is per-head, then the (selected) features.

Besides its maths an intervention carries its *placement*: the ``site`` and the
units (``positions``, ``heads``, ``dims``), and for a sourced type the
``source`` (a run, inputs, or a precomputed :class:`~steerlab.interventions.graph.SourceValue`)
with its own ``source_positions`` (default: the same as ``positions``).

Each type registers under a name with :func:`register`; files store that name
and every constructor argument (:meth:`Intervention.arguments`), and loading
looks the name up in the registry, never importing from a string.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from steerlab.interventions.errors import ConfigError, NotAnIntervention, SourceError, UnknownInterventionType
from steerlab.interventions.units import Positions, parse_dims, parse_heads

__all__ = ["Intervention", "register", "registered", "intervention_class", "check_intervention", "check_interventions"]

_REGISTRY: dict[str, type[Intervention]] = {}


def register(name: str):
    """Class decorator: register an intervention type under ``name``."""

    def deco(cls: type[Intervention]) -> type[Intervention]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ConfigError(f"intervention type name {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        cls.type_name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def registered() -> dict[str, type[Intervention]]:
    """The registry (a copy): type name -> class."""
    return dict(_REGISTRY)


def intervention_class(name: str) -> type[Intervention]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownInterventionType(
            f"unknown intervention type {name!r}; registered types: {sorted(_REGISTRY)}"
        ) from None


_UNSET = object()


class Intervention(nn.Module):
    """Base class. Subclasses implement :meth:`forward` and list their own
    constructor arguments in ``_arguments`` (attribute names, serialised as JSON)
    and may build parameters lazily in :meth:`build` once the site's width is
    known."""

    type_name: ClassVar[str] = ""
    sourced: ClassVar[bool] = False
    _arguments: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        site: str,
        *,
        positions=None,
        heads=None,
        dims=None,
        source=None,
        source_positions=_UNSET,
        source_site: str | None = None,
    ):
        super().__init__()
        if not isinstance(site, str) or not site:
            raise ConfigError(f"site={site!r}: expected a site name such as 'blocks.3.resid_post'")
        self.site = site
        self.positions = Positions(positions)
        self.heads = parse_heads(heads)
        self.dims = parse_dims(dims)
        if source is not None and not self.sourced:
            raise SourceError(f"{type(self).__name__} takes no source (it is sourceless); got source={source!r:.60}")
        self.source = source
        self.source_positions = None if source_positions is _UNSET else Positions(source_positions)
        self.source_site = source_site
        self.width: int | None = None

    # -- lazy construction ---------------------------------------------
    def build(self, width: int) -> None:
        """Create parameters for a slice of ``width`` features (override; call super)."""
        self.width = width

    @property
    def built(self) -> bool:
        return self.width is not None

    # -- the maths ------------------------------------------------------
    def forward(self, base: Tensor, source: Tensor | None = None) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- description ------------------------------------------------------
    def arguments(self) -> dict[str, Any]:
        """Every type-specific constructor argument, JSON-serialisable."""
        return {name: _jsonable(getattr(self, name)) for name in self._arguments}

    def placement(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "positions": self.positions.to_json(),
            "heads": list(self.heads) if self.heads else None,
            "dims": list(self.dims) if self.dims else None,
            "source_positions": None if self.source_positions is None else self.source_positions.to_json(),
            "source_site": self.source_site,
        }

    def require_source(self, source: Tensor | None) -> Tensor:
        """``source``, or :class:`SourceError` when a sourced intervention is called without one."""
        if source is None:
            raise SourceError(f"{type(self).__name__} at {self.site!r} is sourced: call it as iv(base, source) with the aligned source slice")
        return source

    @property
    def trainable(self) -> bool:
        return any(p.requires_grad for p in self.parameters())

    def effective_source_positions(self) -> Positions:
        return self.positions if self.source_positions is None else self.source_positions

    def extra_repr(self) -> str:
        bits = [repr(self.site)]
        if self.positions.kind != "all":
            bits.append(f"positions={self.positions.to_json()!r}")
        if self.heads:
            bits.append(f"heads={list(self.heads)}")
        if self.dims:
            bits.append(f"dims=<{len(self.dims)}>")
        bits += [f"{k}={v!r}" for k, v in self.arguments().items() if not isinstance(v, (list, dict))]
        return ", ".join(bits)


def check_intervention(iv: object, where: str = "interventions") -> Intervention:
    """``iv`` if it is an :class:`Intervention`, else :class:`NotAnIntervention` naming what it is."""
    if not isinstance(iv, Intervention):
        raise NotAnIntervention(
            f"{where} must be Intervention objects; got {type(iv).__name__} {iv!r:.60} (expected sl.Add, sl.Interchange, a ReFT intervention, ...)"
        )
    return iv


def check_interventions(value: object, where: str = "interventions") -> list[Intervention]:
    """``value`` (an intervention or an iterable of them) as a list, each checked by :func:`check_intervention`.

    A one-shot iterator is not read here (a check before the call would consume it): the call checks
    the list it makes of it."""
    if isinstance(value, Intervention):
        return [value]
    if isinstance(value, Iterator):
        return []
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        check_intervention(value, where)
    return [check_intervention(iv, where) for iv in value]  # type: ignore[union-attr]


def _jsonable(v):
    if isinstance(v, torch.dtype):
        return str(v).removeprefix("torch.")
    if isinstance(v, Tensor):
        return v.tolist()
    if isinstance(v, tuple):
        return list(v)
    return v
