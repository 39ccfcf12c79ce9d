"""The result of a patching sweep: a metric grid over sites × positions (or heads).

``values`` is the mean over examples of the patched metric (over the examples a
cell patched: ``filled``; a slot beyond an example's length is empty there, while a
NaN the metric returns for a patched example makes the mean NaN),
indexed as ``dims`` says: ``("layer", "position")`` for a site sweep,
``("layer", "head")`` for a head sweep at one position slot,
``("layer", "position", "head")`` for a head sweep over several slots (the
first axis is ``"site"`` when the rows are not one site per layer).
``normalised`` rescales it so that 0 is the unpatched base and 1 the source::

    normalised = (values - mean(base_metric)) / (mean(source_metric) - mean(base_metric))

Saved in the one file format (kind ``"patching-sweep"``).
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from steerlab.interventions import fileformat
from steerlab.interventions.errors import FileFormatError
from steerlab.interventions.fileformat import field_of

__all__ = ["SweepResult"]

KIND = "patching-sweep"


@dataclass
class SweepResult:
    """Per-example patched metrics ``[site, slot, head, example]`` (head axis 1 for a
    site sweep) with the unpatched base and source metrics and the axis labels."""

    per_example: Float[Tensor, "site slot head batch"]
    base_metric: Float[Tensor, " batch"]
    source_metric: Float[Tensor, " batch"]
    sites: list[str]
    layers: list[int | None]
    positions: list[list[int] | None]  # each slot's real-token positions (None: all at once)
    tokens: list[str]  # one label per slot
    heads: list[int] | None = None
    metric: str = "metric"
    forwards: int = 0  # packed forwards the sweep took
    configs_per_forward: int = 0
    meta: dict = field(default_factory=dict)
    #: which cells were patched, ``[site, slot, head, example]`` (``None``, from a file of format
    #: version 1: the cells that are not NaN)
    filled: Bool[Tensor, "site slot head batch"] | None = None

    # -- the grid --------------------------------------------------------
    @property
    def row_axis(self) -> str:
        kinds = {s.split(".", 2)[-1] for s in self.sites}
        one_per_layer = None not in self.layers and len(set(self.layers)) == len(self.layers)
        return "layer" if len(kinds) == 1 and one_per_layer else "site"

    @property
    def dims(self) -> tuple[str, ...]:
        if self.heads is None:
            return (self.row_axis, "position")
        if len(self.positions) == 1:
            return (self.row_axis, "head")
        return (self.row_axis, "position", "head")

    def _shape(self, t: Tensor) -> Tensor:
        """``[site, slot, head, ...]`` -> the axes of :attr:`dims`."""
        if self.heads is None:
            return t[:, :, 0]
        if len(self.positions) == 1:
            return t[:, 0]
        return t

    @property
    def per_example_values(self) -> Float[Tensor, "*grid batch"]:
        """The patched metric per example, ``dims + ("example",)``."""
        return self._shape(self.per_example)

    @property
    def values(self) -> Float[Tensor, "*grid"]:
        """Mean over the examples each cell patched (NaN where it patched none); a NaN metric
        of a patched example is a NaN mean, never dropped."""
        filled = self.filled if self.filled is not None else ~self.per_example.isnan()
        total = torch.where(filled, self.per_example, torch.zeros((), dtype=self.per_example.dtype)).sum(-1)
        return self._shape(total / filled.sum(-1))

    @property
    def base_value(self) -> float:
        return float(self.base_metric.mean())

    @property
    def source_value(self) -> float:
        return float(self.source_metric.mean())

    @property
    def effect(self) -> Float[Tensor, "*grid"]:
        """``values - mean(base_metric)``: what each patch changes."""
        return self.values - self.base_value

    @property
    def normalised(self) -> Float[Tensor, "*grid"]:
        """``(values - base) / (source - base)``: 0 unpatched, 1 fully restored."""
        gap = self.source_value - self.base_value
        return self.effect / gap if gap != 0 else torch.full_like(self.values, math.nan)

    normalized = normalised

    @property
    def row_labels(self) -> list[str]:
        if self.row_axis == "layer":
            return [str(layer) for layer in self.layers]
        return list(self.sites)

    @property
    def column_labels(self) -> list[str]:
        """The last axis' labels: tokens (position axis) or head numbers."""
        if self.dims[-1] == "head":
            return [str(h) for h in self.heads or []]
        return list(self.tokens)

    def top(self, k: int = 5, *, normalised: bool = False) -> list[tuple[str, str, float]]:
        """The ``k`` configurations with the largest absolute effect: ``(site, column, value)``."""
        grid = self.normalised if normalised else self.effect
        flat = grid.reshape(len(self.sites), -1)
        cols = self._column_names()
        order = flat.abs().nan_to_num(-1.0).flatten().argsort(descending=True)[:k]
        return [(self.sites[int(i) // flat.shape[1]], cols[int(i) % flat.shape[1]], float(flat.flatten()[i])) for i in order]

    def _column_names(self) -> list[str]:
        if self.dims[1:] == ("position", "head"):
            return [f"{t!r} h{h}" for t in self.tokens for h in self.heads or []]
        if self.dims[-1] == "head":
            return [f"h{h}" for h in self.heads or []]
        return [f"{i}:{t!r}" for i, t in enumerate(self.tokens)]

    # -- views -------------------------------------------------------------
    def _panels(self, grid: Tensor) -> list[tuple[str, Tensor]]:
        if grid.dim() == 3:
            return [(f"position {i} ({self.tokens[i]!r})", grid[:, i]) for i in range(grid.shape[1])]
        return [("", grid)]

    def table(self, *, normalised: bool = False, digits: int = 3) -> str:
        """A plain-text grid (rows: sites or layers; columns: tokens or heads)."""
        grid = self.normalised if normalised else self.values
        cols = [repr(c) if self.dims[-1] == "position" else f"h{c}" for c in self.column_labels]
        rows = self.row_labels
        fmt = lambda x: "nan" if math.isnan(x) else f"{x:.{digits}f}"  # noqa: E731
        out = [
            f"{self.metric}: base {self.base_value:.{digits}f}, source {self.source_value:.{digits}f}"
            + (" (normalised: 0 = base, 1 = source)" if normalised else "")
        ]
        for title, g in self._panels(grid):
            body = [[fmt(float(x)) for x in row] for row in g]
            w0 = max(len(self.row_axis), *(len(r) for r in rows))
            ws = [max(len(c), *(len(r[j]) for r in body)) for j, c in enumerate(cols)]
            if title:
                out.append(title)
            out.append(" ".join([f"{self.row_axis:<{w0}}"] + [f"{c:>{w}}" for c, w in zip(cols, ws, strict=True)]))
            out += [" ".join([f"{r:<{w0}}"] + [f"{x:>{w}}" for x, w in zip(b, ws, strict=True)]) for r, b in zip(rows, body, strict=True)]
        return "\n".join(out)

    def __repr__(self) -> str:
        shape = "×".join(f"{n} {d}s" for n, d in zip(self.values.shape, self.dims, strict=True))
        return f"SweepResult({self.metric}, {shape}, {self.forwards} packed forwards)\n" + self.table()

    def _repr_html_(self) -> str:
        grid = self.values
        head = f"<p><b>{html.escape(self.metric)}</b>: base {self.base_value:.4g}, source {self.source_value:.4g}</p>"
        parts = [head]
        for title, g in self._panels(grid):
            th = "".join(f"<th>{html.escape(c)}</th>" for c in self.column_labels)
            trs = "".join(
                f"<tr><th>{html.escape(r)}</th>" + "".join(f"<td>{float(x):.4g}</td>" for x in row) + "</tr>"
                for r, row in zip(self.row_labels, g, strict=True)
            )
            cap = f"<caption>{html.escape(title)}</caption>" if title else ""
            parts.append(f"<table>{cap}<tr><th>{html.escape(self.row_axis)}</th>{th}</tr>{trs}</table>")
        return "".join(parts)

    def plot(self, **kwargs):
        """A heatmap (:func:`steerlab.viz.patching_heatmap`)."""
        from steerlab.viz import patching_heatmap

        return patching_heatmap(self, **kwargs)

    # -- saving ------------------------------------------------------------
    def save(self, directory: str | Path, *, fingerprint: dict | None = None) -> Path:
        """Write the result in the one file format, atomically (see
        :mod:`~steerlab.interventions.fileformat` for the files a save owns in ``directory``)."""
        config = {
            "sites": self.sites,
            "layers": self.layers,
            "positions": self.positions,
            "tokens": self.tokens,
            "heads": self.heads,
            "metric": self.metric,
            "forwards": self.forwards,
            "configs_per_forward": self.configs_per_forward,
            "meta": self.meta,
        }
        tensors = {"per_example": self.per_example, "base_metric": self.base_metric, "source_metric": self.source_metric}
        if self.filled is not None:
            tensors["filled"] = self.filled
        return fileformat.save(directory, kind=KIND, config=config, tensors=tensors, fingerprint=fingerprint, nonfinite=_DATA)

    @classmethod
    def load(cls, directory: str | Path, *, fingerprint: dict | None = None) -> SweepResult:
        """Read a saved sweep (``fingerprint``: the model's, checked when given); every field
        and tensor shape is checked before the result is built."""
        saved = fileformat.read(directory, kind=KIND, fingerprint=fingerprint)
        c, where = saved.config, f"{directory}"
        sites, layers = field_of(c, "sites", list, where), field_of(c, "layers", list, where)
        positions, tokens = field_of(c, "positions", list, where), field_of(c, "tokens", list, where)
        heads = field_of(c, "heads", (list, type(None)), where)
        field_of(c, "metric", str, where)
        for key in ("forwards", "configs_per_forward"):
            field_of(c, key, int, where)
        field_of(c, "meta", dict, where)
        ints = lambda xs: all(isinstance(x, int) and not isinstance(x, bool) for x in xs)  # noqa: E731
        ok = all(isinstance(x, str) for x in sites + tokens) and all(x is None or (isinstance(x, int) and not isinstance(x, bool)) for x in layers) \
            and all(p is None or (isinstance(p, list) and ints(p)) for p in positions) and (heads is None or ints(heads))
        if not ok or len(tokens) != len(positions) or len(layers) != len(sites):
            raise FileFormatError(f"{where}: the sweep's axes are malformed ({len(sites)} sites, {len(layers)} layers, "
                                  f"{len(positions)} position slots, {len(tokens)} token labels); expected matching lists")
        _check_sweep_tensors(saved.specs, (len(sites), len(positions), len(heads) if heads is not None else 1), where)
        t = saved.tensors(nonfinite=_DATA)
        return cls(
            per_example=t["per_example"], base_metric=t["base_metric"], source_metric=t["source_metric"],
            sites=list(sites), layers=list(layers), positions=[None if p is None else list(p) for p in positions],
            tokens=list(tokens), heads=None if heads is None else list(heads), metric=c["metric"], forwards=c["forwards"],
            configs_per_forward=c["configs_per_forward"], meta=dict(c["meta"]), filled=t.get("filled"),
        )


_DATA = ("per_example", "base_metric", "source_metric")  # metrics: NaN is a value here


def _check_sweep_tensors(specs: dict, grid: tuple[int, int, int], where: str) -> None:
    names = set(specs)
    if names not in ({*_DATA}, {*_DATA, "filled"}):
        raise FileFormatError(f"{where}: a sweep holds per_example, base_metric, source_metric (and filled); the file holds {sorted(names)}")
    pe = specs["per_example"]
    b = pe.shape[-1] if len(pe.shape) == 4 else -1
    want = {"per_example": (*grid, b), "base_metric": (b,), "source_metric": (b,), "filled": (*grid, b)}
    for k in [n for n in (*_DATA, "filled") if n in specs]:
        spec = specs[k]
        if spec.shape != want[k] or (spec.dtype == torch.bool) != (k == "filled") or (k != "filled" and not spec.dtype.is_floating_point):
            raise FileFormatError(f"{where}: {k} is {spec}; the configuration says shape {list(want[k])} "
                                  f"({'bool' if k == 'filled' else 'floating'}, batch {b})")
