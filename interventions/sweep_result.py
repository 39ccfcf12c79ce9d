"""The result of a patching sweep: a metric grid over sites × positions (or heads).

``values`` is the mean over examples (NaN-skipping) of the patched metric,
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
from jaxtyping import Float
from torch import Tensor

from steerlab.interventions import fileformat
from steerlab.interventions.errors import FileFormatError

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
        """Mean over examples of the patched metric (empty slots skipped)."""
        return self._shape(self.per_example.nanmean(-1))

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
        """Write the result in the one file format (``steerlab.json`` + ``weights.safetensors``)."""
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
        return fileformat.save(directory, kind=KIND, config=config, tensors=tensors, fingerprint=fingerprint)

    @classmethod
    def load(cls, directory: str | Path, *, fingerprint: dict | None = None) -> SweepResult:
        """Read a saved sweep (``fingerprint``: the model's, checked when given)."""
        meta, t = fileformat.load(directory, kind=KIND, fingerprint=fingerprint)
        c = meta["config"]
        try:
            res = cls(
                per_example=t["per_example"],
                base_metric=t["base_metric"],
                source_metric=t["source_metric"],
                sites=list(c["sites"]),
                layers=list(c["layers"]),
                positions=[None if p is None else list(p) for p in c["positions"]],
                tokens=list(c["tokens"]),
                heads=None if c["heads"] is None else list(c["heads"]),
                metric=str(c["metric"]),
                forwards=int(c["forwards"]),
                configs_per_forward=int(c["configs_per_forward"]),
                meta=dict(c.get("meta") or {}),
            )
        except (KeyError, TypeError) as e:
            raise FileFormatError(f"{directory} holds a patching sweep whose configuration lacks {e}") from None
        want = (len(res.sites), len(res.positions), len(res.heads) if res.heads is not None else 1)
        b = res.per_example.shape[-1] if res.per_example.dim() == 4 else -1
        if tuple(res.per_example.shape[:3]) != want or res.base_metric.shape != (b,) or res.source_metric.shape != (b,):
            raise FileFormatError(
                f"{directory}: per_example has shape {tuple(res.per_example.shape)} and the metrics "
                f"{tuple(res.base_metric.shape)}, {tuple(res.source_metric.shape)}; the configuration says "
                f"[{', '.join(map(str, want))}, batch] and [batch]"
            )
        if len(res.tokens) != len(res.positions) or len(res.layers) != len(res.sites):
            raise FileFormatError(
                f"{directory}: {len(res.tokens)} token labels for {len(res.positions)} positions, "
                f"or {len(res.layers)} layers for {len(res.sites)} sites"
            )
        return res
