"""``SteerEvalResult``: every generation with its scores, the chosen factors, detection AUROCs, judges and timings.

Tabular views: :meth:`SteerEvalResult.table` (method × concept: harmonic mean
at the chosen factor, mean ± sd over seeds, with concept score, relevance,
fluency and AUROC), :meth:`SteerEvalResult.sweep` (validation curves), and
:meth:`SteerEvalResult.markdown`. Figures: :meth:`SteerEvalResult.plot`.
Saved in the one file format (kind ``"steer_eval"``: JSON records and no
tensors but an empty marker).
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from steerlab.interventions import fileformat
from steerlab.interventions.errors import FileFormatError

__all__ = ["SteerEvalResult", "KIND"]

#: the ``kind`` of a saved evaluation in the one file format
KIND = "steer_eval"
_METRICS = ("concept_score", "relevance", "fluency", "perplexity", "repetition", "hm")


def _mean(xs) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else math.nan


def _sd(xs) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


@dataclass
class SteerEvalResult:
    """What :func:`steerlab.reft.evaluate` measured (several concepts and seeds append to one result)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    detection: list[dict[str, Any]] = field(default_factory=list)
    judges: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    timings: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    # -- building ------------------------------------------------------------------
    def add_rows(self, concept, method, seed, split, factor, instructions, responses, scores, *, selected: bool = False) -> None:
        for i, (x, y) in enumerate(zip(instructions, responses)):
            row = {"concept": concept, "method": method, "seed": seed, "split": split, "factor": factor, "selected": selected,
                   "instruction": x, "response": y}
            row.update({k: float(scores[k][i]) for k in _METRICS})
            self.rows.append(row)

    def extend(self, other: SteerEvalResult) -> SteerEvalResult:
        """Append another result's records (e.g. another seed or concept)."""
        self.rows += other.rows
        self.detection += other.detection
        self.judges.update(other.judges)
        self.dropped.update(other.dropped)
        self.timings += other.timings
        return self

    # -- views -----------------------------------------------------------------------
    @property
    def concepts(self) -> list[str]:
        return list(dict.fromkeys([r["concept"] for r in self.rows] + list(self.dropped)))

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(r["method"] for r in self.rows))

    def judge_accuracy(self, concept: str) -> float:
        """The lowest accuracy the concept's judge reached on its labelled checks (nan if unchecked)."""
        checks = self.judges.get(concept) or []
        return min((c["accuracy"] for c in checks), default=math.nan)

    def cells(self) -> list[dict[str, Any]]:
        """One record per (concept, method): test means at the chosen factor, averaged over seeds (± sd), and AUROC."""
        per_seed: dict[tuple, dict] = defaultdict(lambda: defaultdict(list))
        for r in self.rows:
            if r["split"] == "test" and r["selected"]:
                cell = per_seed[(r["concept"], r["method"], r["seed"])]
                for k in _METRICS:
                    cell[k].append(r[k])
                cell["factor"] = [r["factor"]]
        grouped: dict[tuple, list] = defaultdict(list)
        for (c, m, s), cell in per_seed.items():
            grouped[(c, m)].append({k: _mean(v) for k, v in cell.items()})
        auc: dict[tuple, list] = defaultdict(list)
        for d in self.detection:
            auc[(d["concept"], d["method"])].append(d["auroc"])
        out = []
        for (c, m), seeds in grouped.items():
            rec = {"concept": c, "method": m, "seeds": len(seeds), "judge_accuracy": self.judge_accuracy(c)}
            for k in (*_METRICS, "factor"):
                vals = [s[k] for s in seeds]
                rec[k], rec[k + "_sd"] = _mean(vals), _sd(vals)
            rec["auroc"], rec["auroc_sd"] = (_mean(auc[(c, m)]), _sd(auc[(c, m)])) if auc.get((c, m)) else (math.nan, math.nan)
            out.append(rec)
        return out

    def sweep(self, concept: str | None = None) -> list[dict[str, Any]]:
        """Validation means per (concept, method, factor), over seeds: the factor-selection curves."""
        acc: dict[tuple, dict] = defaultdict(lambda: defaultdict(list))
        for r in self.rows:
            if r["split"] == "val" and r["method"] != "none" and (concept is None or r["concept"] == concept):
                for k in _METRICS:
                    acc[(r["concept"], r["method"], r["factor"])][k].append(r[k])
        return [{"concept": c, "method": m, "factor": f, **{k: _mean(v) for k, v in d.items()}} for (c, m, f), d in sorted(acc.items())]

    def table(self, metric: str = "hm") -> str:
        """Method × concept: ``metric`` at the chosen factor (mean ± sd over seeds), and AUROC where a direction exists."""
        cells = {(r["concept"], r["method"]): r for r in self.cells()}
        concepts = [c for c in self.concepts if c not in self.dropped]
        head = f"{'method':<14}" + "".join(f"{c + ' ' + metric:>22}{'AUROC':>8}" for c in concepts)
        lines = [head]
        for m in self.methods:
            line = f"{m:<14}"
            for c in concepts:
                r = cells.get((c, m))
                if r is None:
                    line += f"{'—':>22}{'':>8}"
                    continue
                val = f"{r[metric]:.3f} ± {r[metric + '_sd']:.3f}" if r["seeds"] > 1 else f"{r[metric]:.3f}"
                val += f" (×{r['factor']:g})" if m not in ("none", "prompt") else ""
                line += f"{val:>22}" + (f"{r['auroc']:>8.3f}" if math.isfinite(r["auroc"]) else f"{'':>8}")
            lines.append(line)
        lines.append("judges: " + "; ".join(f"{c} {self.judge_accuracy(c):.3f}" for c in concepts))
        lines += [f"dropped {c}: {why}" for c, why in self.dropped.items()]
        return "\n".join(lines)

    def markdown(self) -> str:
        """The table as Markdown (harmonic mean, concept score, relevance, fluency, AUROC per concept)."""
        concepts = [c for c in self.concepts if c not in self.dropped]
        cells = {(r["concept"], r["method"]): r for r in self.cells()}
        out = ["| concept (judge acc.) | method | factor | concept | relevance | fluency | harmonic mean | AUROC |", "|---|---|---|---|---|---|---|---|"]
        for c in concepts:
            for m in self.methods:
                r = cells.get((c, m))
                if r is None:
                    continue
                pm = (lambda k: f"{r[k]:.3f} ± {r[k + '_sd']:.3f}") if r["seeds"] > 1 else (lambda k: f"{r[k]:.3f}")
                auc = pm("auroc") if math.isfinite(r["auroc"]) else "—"
                out.append(f"| {c} ({self.judge_accuracy(c):.2f}) | {m} | {r['factor']:g} | {pm('concept_score')} | {pm('relevance')} | "
                           f"{pm('fluency')} | **{pm('hm')}** | {auc} |")
        return "\n".join(out)

    def time_split(self) -> dict[str, float]:
        """Seconds spent generating, judging (scores, perplexities, detection) and training."""
        return {
            "generation_s": sum(t.get("generation_s", 0.0) for t in self.timings),
            "judging_s": sum(t.get("judging_s", 0.0) for t in self.timings),
            "training_s": sum(t.get("train_s", 0.0) for t in self.timings),
        }

    def __repr__(self) -> str:
        return f"SteerEvalResult({len(self.concepts)} concepts, {len(self.methods)} methods, {len(self.rows)} generations)"

    def plot(self, kind: str = "table", concept: str | None = None):
        """``"table"`` (method × concept heatmap of the harmonic mean), ``"sweep"`` (concept score vs fluency
        along each method's factors, on validation), or ``"auroc"`` (detection bars)."""
        from steerlab.viz import steering

        figures = {"table": steering.steer_table, "sweep": steering.steer_sweep, "auroc": steering.steer_auroc}
        if kind not in figures:
            raise ValueError(f"kind={kind!r}: expected one of {sorted(figures)}")
        return figures[kind](self, concept=concept) if kind == "sweep" else figures[kind](self)

    # -- file format --------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        config = {"rows": self.rows, "detection": self.detection, "judges": self.judges, "dropped": self.dropped,
                  "timings": self.timings, "info": self.info}
        return fileformat.save(directory, kind=KIND, config=_finite(config), tensors={"empty": torch.zeros(0)})

    @classmethod
    def load(cls, directory: str | Path) -> SteerEvalResult:
        meta, _ = fileformat.load(directory, kind=KIND)
        cfg = meta["config"]
        if not isinstance(cfg.get("rows"), list) or not isinstance(cfg.get("detection"), list):
            raise FileFormatError(f"{directory}: a steer_eval record needs 'rows' and 'detection' lists")
        return cls(_nan(cfg["rows"]), cfg["detection"], cfg.get("judges") or {}, cfg.get("dropped") or {}, cfg.get("timings") or [],
                   cfg.get("info") or {})


def _finite(x):
    """JSON has no inf/nan: write them as strings."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def _nan(rows: list[dict]) -> list[dict]:
    return [{k: float(v) if isinstance(v, str) and v in ("inf", "nan", "-inf") else v for k, v in r.items()} for r in rows]
