"""Attribution-patching results, and their comparison with exact patching cell by cell.

An :class:`AttributionResult` is a :class:`~steerlab.interventions.sweep_result.SweepResult`
whose per-example values are ``base metric + estimated effect``: its axes,
labels, ``effect``, ``normalised``, ``table`` and heatmap are those of an exact
sweep over the same cells. It adds the method (``AtP``, ``AtP+QK``, ``AtP*``),
GradDrop's unsigned ``score`` where computed, and the exact patched metric of
the cells that ``refine=k`` checked (``exact``, NaN elsewhere). The third axis
is heads (``heads=``) or features (``neurons=``: ``unit == "neuron"``).

:meth:`AttributionResult.compare` lines it up against an exact sweep of the
same cells: Spearman's rank correlation and Pearson's correlation of the
effects, and the overlap of the ``k`` largest cells, overall and per site
family (``resid_post``, ``attn.out``, ``attn.z`` ...).
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
from steerlab.interventions.errors import ConfigError, FileFormatError, ShapeMismatch
from steerlab.interventions.sweep_result import SweepResult

__all__ = ["AttributionResult", "Comparison", "rank_correlation"]

KIND = "attribution"


def _ranks(x: Tensor) -> Tensor:
    """Ranks ``0 .. n−1`` with ties sharing their average rank."""
    order = x.argsort()
    r = torch.empty_like(x)
    r[order] = torch.arange(x.numel(), dtype=x.dtype)
    _, inv, counts = torch.unique(x, return_inverse=True, return_counts=True)
    sums = torch.zeros(counts.numel(), dtype=x.dtype).index_add_(0, inv, r)
    return (sums / counts.to(x.dtype))[inv]


def _pearson(a: Tensor, b: Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = (a.norm() * b.norm()).item()
    return float((a @ b).item() / den) if den > 0 else math.nan


def rank_correlation(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation of two equal-size tensors (NaN pairs dropped)."""
    a, b = a.flatten().double(), b.flatten().double()
    keep = ~(a.isnan() | b.isnan())
    a, b = a[keep], b[keep]
    if a.numel() < 2:
        return math.nan
    return _pearson(_ranks(a), _ranks(b))


def _overlap(a: Tensor, b: Tensor, k: int) -> float:
    """Share of the ``k`` largest ``|a|`` cells that are among the ``k`` largest ``|b|``."""
    a, b = a.flatten().double(), b.flatten().double()
    keep = ~(a.isnan() | b.isnan())
    a, b = a[keep].abs(), b[keep].abs()
    k = min(k, a.numel())
    if k == 0:
        return math.nan
    ta, tb = set(a.topk(k).indices.tolist()), set(b.topk(k).indices.tolist())
    return len(ta & tb) / k


@dataclass
class AttributionResult(SweepResult):
    """An estimated patching grid (see the module docstring); ``forwards`` counts model forwards."""

    unit: str = "head"
    method: str = "AtP"
    score: Float[Tensor, "site slot unit batch"] | None = None
    exact: Float[Tensor, "site slot unit batch"] | None = None

    # -- axes ------------------------------------------------------------------
    @property
    def dims(self) -> tuple[str, ...]:
        d = super().dims
        return tuple(self.unit if x == "head" else x for x in d)

    @property
    def column_labels(self) -> list[str]:
        if self.dims[-1] == self.unit and self.heads is not None:
            return [str(h) for h in self.heads]
        return list(self.tokens)

    def _column_names(self) -> list[str]:
        prefix = "h" if self.unit == "head" else "n"
        if self.heads is not None and len(self.positions) > 1:
            return [f"{t!r} {prefix}{h}" for t in self.tokens for h in self.heads]
        if self.heads is not None:
            return [f"{prefix}{h}" for h in self.heads]
        return [f"{i}:{t!r}" for i, t in enumerate(self.tokens)]

    # -- estimates --------------------------------------------------------------
    @property
    def estimate(self) -> Float[Tensor, "*grid"]:
        """The estimated effect of each patch (``effect``): ``Σ Δa · ∂metric/∂a``."""
        return self.effect

    @property
    def ranking(self) -> Float[Tensor, "*grid"]:
        """What ``top`` and ``refine`` rank by: GradDrop's score where computed, else ``|estimate|``."""
        if self.score is not None:
            return self._shape(self.score.mean(-1))
        return self.effect.abs()

    @property
    def exact_values(self) -> Float[Tensor, "*grid"] | None:
        """The exactly patched metric of the refined cells (mean over examples; NaN elsewhere)."""
        return None if self.exact is None else self._shape(self.exact.mean(-1))

    @property
    def exact_effect(self) -> Float[Tensor, "*grid"] | None:
        v = self.exact_values
        return None if v is None else v - self.base_value

    def top_cells(self, k: int = 5) -> list[tuple[int, int, int]]:
        """Indices ``(site, slot, unit)`` of the ``k`` highest-ranked cells."""
        full = self.score.mean(-1) if self.score is not None else (self.per_example.mean(-1) - self.base_value).abs()
        flat = full.flatten().nan_to_num(-1.0)
        order = flat.argsort(descending=True)[: max(0, k)]
        s, u = full.shape[1], full.shape[2]
        return [(int(i) // (s * u), (int(i) // u) % s, int(i) % u) for i in order]

    def top(self, k: int = 5, *, normalised: bool = False) -> list[tuple[str, str, float]]:
        """The ``k`` highest-ranked cells: ``(site, column, estimated effect)``."""
        est = self.per_example.mean(-1) - self.base_value
        gap = self.source_value - self.base_value
        out = []
        for i, j, u in self.top_cells(k):
            v = float(est[i, j, u])
            out.append((self.sites[i], self._cell_column(j, u), v / gap if normalised and gap else v))
        return out

    @property
    def cell_names(self) -> list[str]:
        """One name per column of the flattened grid (slot-major: ``"3:' Italy'"``, ``"h4"``, ``"' is' h4"``)."""
        return self._column_names()

    def _cell_column(self, slot: int, unit: int) -> str:
        """The column name of cell ``(slot, unit)`` (as ``_column_names`` lists them, slot-major)."""
        return self._column_names()[slot * self.per_example.shape[2] + unit]

    def refined(self) -> list[dict]:
        """One row per exactly patched cell: site, column, estimated and exact effect."""
        if self.exact is None:
            return []
        est = self.per_example.mean(-1) - self.base_value
        ex = self.exact.mean(-1) - self.base_value
        rows = []
        for i, j, u in torch.nonzero(~ex.isnan()).tolist():
            rows.append({"site": self.sites[i], "column": self._cell_column(j, u), "estimate": float(est[i, j, u]), "exact": float(ex[i, j, u])})
        rows.sort(key=lambda r: -abs(r["exact"]))
        return rows

    # -- comparison ---------------------------------------------------------------
    def compare(self, exact: SweepResult, *, k: int = 10) -> Comparison:
        """Cell by cell against an exact sweep of the same sites, positions and units."""
        if not isinstance(exact, SweepResult) or isinstance(exact, AttributionResult):
            raise ConfigError(f"compare() takes the exact SweepResult of the same cells; got {type(exact).__name__}")
        same = (self.sites == exact.sites, self.positions == exact.positions, self.heads == exact.heads)
        if not all(same) or self.per_example.shape != exact.per_example.shape:
            raise ShapeMismatch(
                f"the sweep's cells differ from the attribution's: sites {len(exact.sites)} vs {len(self.sites)}, "
                f"positions {exact.positions} vs {self.positions}, heads {exact.heads} vs {self.heads}; "
                "run sweep() with the same sites=, positions= and heads="
            )
        return Comparison(self, exact, k)

    # -- views ----------------------------------------------------------------------
    def table(self, *, normalised: bool = False, digits: int = 3) -> str:
        head = f"{self.method} estimate (base + first-order effect)"
        body = super().table(normalised=normalised, digits=digits)
        rows = self.refined()
        if rows:
            body += "\nrefined (exact patches): " + "; ".join(
                f"{r['site']} {r['column']}: est {r['estimate']:+.{digits}f}, exact {r['exact']:+.{digits}f}" for r in rows
            )
        return head + "\n" + body

    def __repr__(self) -> str:
        shape = "×".join(f"{n} {d}s" for n, d in zip(self.values.shape, self.dims, strict=True))
        return f"AttributionResult({self.method}, {self.metric}, {shape})\n" + self.table()

    def _repr_html_(self) -> str:
        return f"<p><b>{html.escape(self.method)}</b> estimate</p>" + super()._repr_html_()

    def plot(self, **kwargs):
        """A heatmap of the estimate (:func:`steerlab.viz.attribution_heatmap`)."""
        from steerlab.viz import attribution_heatmap

        return attribution_heatmap(self, **kwargs)

    # -- saving ----------------------------------------------------------------------
    def save(self, directory: str | Path, *, fingerprint: dict | None = None) -> Path:
        config = {
            "sites": self.sites, "layers": self.layers, "positions": self.positions, "tokens": self.tokens,
            "heads": self.heads, "metric": self.metric, "forwards": self.forwards, "meta": self.meta,
            "unit": self.unit, "method": self.method,
        }
        tensors = {"per_example": self.per_example, "base_metric": self.base_metric, "source_metric": self.source_metric}
        if self.score is not None:
            tensors["score"] = self.score
        if self.exact is not None:
            tensors["exact"] = self.exact
        return fileformat.save(directory, kind=KIND, config=config, tensors=tensors, fingerprint=fingerprint, nonfinite=_DATA)

    @classmethod
    def load(cls, directory: str | Path, *, fingerprint: dict | None = None) -> AttributionResult:
        meta, t = fileformat.load(directory, kind=KIND, fingerprint=fingerprint, nonfinite=_DATA)
        c = meta["config"]
        try:
            res = cls(
                per_example=t["per_example"], base_metric=t["base_metric"], source_metric=t["source_metric"],
                sites=list(c["sites"]), layers=list(c["layers"]),
                positions=[None if p is None else list(p) for p in c["positions"]], tokens=list(c["tokens"]),
                heads=None if c["heads"] is None else list(c["heads"]), metric=str(c["metric"]), forwards=int(c["forwards"]),
                meta=dict(c.get("meta") or {}), unit=str(c["unit"]), method=str(c["method"]),
                score=t.get("score"), exact=t.get("exact"),
            )
        except (KeyError, TypeError) as e:
            raise FileFormatError(f"{directory} holds an attribution result whose configuration lacks {e}") from None
        want = (len(res.sites), len(res.positions), len(res.heads) if res.heads is not None else 1)
        for name, x in (("per_example", res.per_example), ("score", res.score), ("exact", res.exact)):
            if x is not None and (x.dim() != 4 or tuple(x.shape[:3]) != want or x.shape[3] != res.base_metric.shape[0]):
                raise FileFormatError(f"{directory}: {name} has shape {tuple(x.shape)}; the configuration says [{', '.join(map(str, want))}, batch]")
        return res


_DATA = ("per_example", "base_metric", "source_metric", "score", "exact")  # metrics: NaN marks an empty or unrefined cell


def _family(site: str) -> str:
    return site.split(".", 2)[2] if site.startswith("blocks.") else site


@dataclass
class Comparison:
    """An estimate against the exact sweep of the same cells.

    ``spearman``/``pearson``: correlation of the effects over the compared
    cells; ``overlap``: share of the estimate's ``k`` largest cells (by
    ``|effect|``) among the exact ``k`` largest; :meth:`rows`: the same per
    site family. Cells no patch changes (the source's activation equals the
    base's, e.g. before the first differing token: the estimate is exactly 0
    and the exact effect float noise) are left out of every figure
    (``trivial`` counts them): they would inflate the agreement with ties both
    sides get right for free.
    """

    estimate: AttributionResult
    exact: SweepResult
    k: int = 10
    _rows: list[dict] = field(default_factory=list, repr=False)

    def __post_init__(self):
        est, ex = _nontrivial(self.estimate.effect, self.exact.effect)
        self.trivial = int(_trivial(self.estimate.effect, self.exact.effect).sum())
        self.cells = int((~ex.isnan()).sum())
        self.spearman = rank_correlation(est, ex)
        self.pearson = _pearson(*_finite(est, ex))
        self.overlap = _overlap(est, ex, self.k)
        fams: dict[str, list[int]] = {}
        for i, s in enumerate(self.estimate.sites):
            fams.setdefault(_family(s), []).append(i)
        for fam, idx in fams.items():
            e, x = _nontrivial(self.estimate.per_example[idx].mean(-1) - self.estimate.base_value,
                               self.exact.per_example[idx].mean(-1) - self.exact.base_value)
            self._rows.append({
                "family": fam + (" (heads)" if self.estimate.heads is not None and self.estimate.unit == "head" else ""),
                "cells": int((~x.isnan()).sum()), "spearman": rank_correlation(e, x), "pearson": _pearson(*_finite(e, x)),
                "overlap": _overlap(e, x, self.k), "k": min(self.k, int((~x.isnan()).sum())),
            })

    def rows(self) -> list[dict]:
        return list(self._rows)

    def failures(self, k: int = 5) -> list[dict]:
        """The ``k`` cells where the estimate misses the exact effect most: site, column,
        estimate, exact effect and the error (where the linear estimate fails)."""
        est = self.estimate.per_example.mean(-1) - self.estimate.base_value
        ex = self.exact.per_example.mean(-1) - self.exact.base_value
        err = (est - ex).abs().nan_to_num(-1.0)
        u = err.shape[2]
        out = []
        for flat in err.flatten().argsort(descending=True)[: max(0, k)].tolist():
            i, j, h = flat // (err.shape[1] * u), (flat // u) % err.shape[1], flat % u
            out.append({"site": self.estimate.sites[i], "column": self.estimate._cell_column(j, h),
                        "estimate": float(est[i, j, h]), "exact": float(ex[i, j, h]), "error": float(est[i, j, h] - ex[i, j, h])})
        return out

    def table(self, digits: int = 3) -> str:
        lines = [f"{self.estimate.method} vs exact patching ({self.estimate.metric}), {self.cells} cells ({self.trivial} where both "
                 f"are 0 left out): Spearman {self.spearman:.{digits}f}, Pearson {self.pearson:.{digits}f}, "
                 f"top-{self.k} overlap {self.overlap:.{digits}f}"]
        w = max(len(r["family"]) for r in self._rows)
        lines.append(f"{'family':<{w}}  {'cells':>6}  {'spearman':>8}  {'pearson':>8}  {'top-k':>8}")
        lines += [f"{r['family']:<{w}}  {r['cells']:>6}  {r['spearman']:>8.{digits}f}  {r['pearson']:>8.{digits}f}  "
                  f"{r['overlap']:>6.{digits}f}/{r['k']}" for r in self._rows]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return "Comparison\n" + self.table()

    def plot(self, **kwargs):
        """Estimate and exact heatmaps side by side, and a scatter of the two (:func:`steerlab.viz.attribution_comparison`)."""
        from steerlab.viz import attribution_comparison

        return attribution_comparison(self, **kwargs)


def _trivial(est: Tensor, exact: Tensor) -> Tensor:
    """Cells no patch changes: the estimate is exactly 0 (the source's activation equals the base's)
    and the exact effect is float noise (a packed forward may round differently from the base's)."""
    noise = 1e-5 * float(exact.nan_to_num(0.0).abs().max()) + 1e-7
    return (est == 0) & (exact.abs() <= noise)


def _nontrivial(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """``a``, ``b`` with NaN at trivial cells."""
    both = _trivial(a, b)
    return a.masked_fill(both, math.nan), b.masked_fill(both, math.nan)


def _finite(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    a, b = a.flatten().double(), b.flatten().double()
    keep = ~(a.isnan() | b.isnan())
    return a[keep], b[keep]
