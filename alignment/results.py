"""What an alignment found: :class:`DASResult` (and its :class:`Curve`).

A result holds the :class:`~steerlab.interventions.Subspace` found for each
variable (``result.subspaces["WX"]``, what ReFT can start from), the IIA on
held-out counterfactuals per intervened set, and beside it, on the same
examples, the full-vector interchange at the same site and positions and the
controls: the same training on a randomly re-initialised copy of the model,
and the best neuron-aligned (localist) alignment of the same size, with the
method that chose it. It prints as a table (:meth:`DASResult.table`), plots
(:meth:`DASResult.plot`), and saves in the one file format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from steerlab.alignment.iia import IIA
from steerlab.alignment.selection import Selection
from steerlab.interventions import fileformat
from steerlab.interventions.errors import FileFormatError
from steerlab.interventions.subspace import Subspace

__all__ = ["Curve", "DASResult", "Projection", "format_table", "localist_search", "labelled_localist"]


@dataclass
class Curve:
    """Training curve: the loss at every step, the held-out IIA after every epoch
    (and, for Boundless DAS, the temperature and the learned size)."""

    loss: list[float] = field(default_factory=list)
    epoch_step: list[int] = field(default_factory=list)
    epoch_iia: list[float] = field(default_factory=list)
    temperature: list[float] = field(default_factory=list)
    size: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) for k, v in self.__dict__.items()}

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> Curve:
        return cls(**{k: list(v) for k, v in (d or {}).items() if k in cls.__dataclass_fields__})


def _iias(d: dict[str, IIA] | None) -> dict | None:
    return None if d is None else {k: v.to_json() for k, v in d.items()}


def _from_iias(d: dict | None) -> dict[str, IIA] | None:
    return None if d is None else {k: IIA.from_json(v) for k, v in d.items()}


@dataclass
class Projection:
    """Base representations projected onto a found subspace (for plotting)."""

    coords: Float[Tensor, "n k"]
    values: list
    text: list[str]
    variable: str
    jitter: Float[Tensor, " n"]


@dataclass
class DASResult:
    """The outcome of :meth:`DAS.fit` (see the module docstring).

    ``iia`` is keyed by intervened set (``"WX"``, ``"WX+YZ"``) and ``"all"``;
    ``full_vector`` by variable: the whole-vector interchange on the examples
    where it bounds that variable (see
    :func:`~steerlab.alignment.controls.full_vector_bound`), and ``bounded`` the
    DAS IIA on the same examples; ``random_init`` like ``iia``, on a copy
    re-initialised as ``random_init_scope`` says; ``localist`` like ``iia``,
    reached by ``localist_dims`` chosen as ``localist_method`` says.
    """

    site: str
    positions: Any
    variables: tuple[str, ...]
    sizes: dict[str, int]
    subspaces: dict[str, Subspace]
    iia: dict[str, IIA]
    full_vector: dict[str, IIA]
    curve: Curve
    method: str = "DAS"
    random_init: dict[str, IIA] | None = None
    random_init_curve: Curve | None = None
    localist: dict[str, IIA] | None = None
    localist_method: str | None = None
    localist_dims: dict[str, list[int]] | None = None
    bounded: dict[str, IIA] | None = None
    random_init_scope: str | None = None
    selection: Selection | None = None
    config: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    fingerprint: dict[str, Any] | None = None

    @property
    def chance(self) -> float:
        return self.iia["all"].chance

    def intervention(self, variable: str, **kwargs):
        """A :class:`SubspaceInterchange` over the subspace found for ``variable``."""
        return self.subspaces[variable].intervention(**kwargs)

    # -- tabular view --------------------------------------------------------------------
    def rows(self) -> list[dict[str, Any]]:
        """One row per intervened set: DAS IIA beside its controls and the full-vector interchange.

        ``full_vector`` (single variables only) is the whole-vector interchange on the
        ``full_vector_n`` examples where it bounds the variable; ``above_full_vector``
        flags a DAS IIA on those same examples more than two standard errors above it.
        ``localist_search`` says whether the localist control was exhaustive or sampled.
        """
        out = []
        for key, v in self.iia.items():
            if key == "all" and len(self.iia) == 2:
                continue  # a single set: "all" repeats it
            fv = self.full_vector.get(key)
            on_rows = None if self.bounded is None else self.bounded.get(key)
            row = {
                "site": self.site,
                "positions": self.positions,
                "variable": key,
                "size": sum(self.sizes.get(x, 0) for x in key.split("+")) if key != "all" else sum(self.sizes.values()),
                "iia": v.value,
                "se": v.se,
                "n": v.n,
                "random_init": None if self.random_init is None else _get(self.random_init, key),
                "localist": None if self.localist is None else _get(self.localist, key),
                "localist_search": localist_search(self.localist_method),
                "full_vector": None if fv is None else fv.value,
                "full_vector_n": None if fv is None else fv.n,
                "chance": v.chance,
            }
            # a subspace edit should not beat swapping the whole vector where the whole vector asks for the same
            # answer; when it does, it moves the output by a route the site does not use on real inputs (an
            # "interpretability illusion"). Compared on the same examples (those where the whole vector bounds it).
            row["above_full_vector"] = (
                fv is not None and on_rows is not None
                and on_rows.value > fv.value + 2 * max(on_rows.se, fv.se, on_rows.chance_se)
            )
            out.append(row)
        return out

    table = rows

    def to_pandas(self):
        import pandas as pd

        return pd.DataFrame(self.rows())

    def __str__(self) -> str:
        head = f"{self.method} at {self.site!r}, positions {self.positions!r}, sizes {self.sizes}"
        rows = self.rows()
        body = format_table(labelled_localist(rows), ["variable", "size", "iia", "se", "n", "random_init", "localist", "full_vector",
                                                      "full_vector_n", "chance"])
        tail = [f"localist: {self.localist_method}" if self.localist_method else "",
                f"random-init: {self.random_init_scope}" if self.random_init_scope else "",
                f"trained: {self.selection.describe()}" if self.selection is not None else ""]
        above = [r["variable"] for r in rows if r["above_full_vector"]]
        warn = f"above the full-vector interchange (suspect an illusion): {above}" if above else ""
        return "\n".join(x for x in (head, body, *tail, warn) if x)

    def _repr_html_(self) -> str:  # notebooks show the table
        return "<pre>" + str(self).replace("&", "&amp;").replace("<", "&lt;") + "</pre>"

    def plot(self, **kwargs):
        """The training curve (loss and held-out IIA per epoch, controls beside)."""
        from steerlab.viz import das_training_curve

        return das_training_curve(self, **kwargs)

    def project(self, lab, dataset, *, variable: str | None = None, coloured_by: str | None = None, max_points: int = 2000) -> Projection:
        """The distinct base inputs of ``dataset`` (up to ``max_points``) at this
        result's site and positions, in the coordinates of ``variable``'s subspace,
        with the value of ``coloured_by`` (default: ``variable``) on each input."""
        from steerlab.alignment._activations import ActivationStore

        variable = variable or self.variables[0]
        if variable not in self.subspaces:
            raise KeyError(f"no subspace for {variable!r}; found: {sorted(self.subspaces)}")
        colour = coloured_by or variable
        cm = dataset.causal_model
        if colour not in cm.values:
            raise KeyError(f"coloured_by={colour!r} is not a variable of {cm.name}")
        t = dataset.table()
        inputs = [t.inputs[i] for i in dict.fromkeys(t.base.tolist())][:max_points]
        store = ActivationStore(lab, dataset.encoder, inputs, [self.site])
        with torch.no_grad():
            v = store.slice(self.site, torch.arange(len(inputs)), self.positions)
            coords = self.subspaces[variable].project(v.to(torch.float32))
        slots = 1 if coords.dim() == 2 else coords.shape[1]
        coords = coords.reshape(-1, coords.shape[-1]).cpu()
        values, text = [], []
        for inp in inputs:
            val = cm.run(inp)[colour]
            for j in range(slots):
                values.append(val)
                desc = ", ".join(f"{k}={x!r}" for k, x in inp.items())
                text.append(desc + (f" (slot {j})" if slots > 1 else ""))
        g = torch.Generator().manual_seed(0)
        return Projection(coords, values, text, colour, torch.rand(coords.shape[0], generator=g) - 0.5)

    # -- the file format ----------------------------------------------------------------------
    def to_record(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "positions": self.positions,
            "variables": list(self.variables),
            "sizes": dict(self.sizes),
            "subspaces": {k: s.to_record() for k, s in self.subspaces.items()},
            "iia": _iias(self.iia),
            "full_vector": _iias(self.full_vector),
            "curve": self.curve.to_json(),
            "method": self.method,
            "random_init": _iias(self.random_init),
            "random_init_curve": None if self.random_init_curve is None else self.random_init_curve.to_json(),
            "localist": _iias(self.localist),
            "localist_method": self.localist_method,
            "localist_dims": self.localist_dims,
            "bounded": _iias(self.bounded),
            "random_init_scope": self.random_init_scope,
            "selection": None if self.selection is None else self.selection.to_json(),
            "config": self.config,
            "timings": self.timings,
        }

    @classmethod
    def from_record(cls, rec: dict[str, Any], tensors: dict, prefix: str = "") -> DASResult:
        try:
            subspaces = {k: Subspace.from_record(r, tensors[f"{prefix}subspace.{k}"]) for k, r in rec["subspaces"].items()}
            return cls(
                site=rec["site"],
                positions=rec["positions"],
                variables=tuple(rec["variables"]),
                sizes={k: int(v) for k, v in rec["sizes"].items()},
                subspaces=subspaces,
                iia=_from_iias(rec["iia"]) or {},
                full_vector=_from_iias(rec["full_vector"]) or {},
                curve=Curve.from_json(rec.get("curve")),
                method=rec.get("method", "DAS"),
                random_init=_from_iias(rec.get("random_init")),
                random_init_curve=None if rec.get("random_init_curve") is None else Curve.from_json(rec["random_init_curve"]),
                localist=_from_iias(rec.get("localist")),
                localist_method=rec.get("localist_method"),
                localist_dims=rec.get("localist_dims"),
                bounded=_from_iias(rec.get("bounded")),
                random_init_scope=rec.get("random_init_scope"),
                selection=Selection.from_json(rec.get("selection")),
                config=dict(rec.get("config") or {}),
                timings=dict(rec.get("timings") or {}),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise FileFormatError(f"a DAS result record is incomplete or malformed: {type(e).__name__}: {e}") from None

    def tensors(self, prefix: str = "") -> dict:
        return {f"{prefix}subspace.{k}": s.basis for k, s in self.subspaces.items()}

    def save(self, directory: str | Path) -> Path:
        """Save (``steerlab.json`` + ``weights.safetensors``, atomically)."""
        return fileformat.save(directory, kind="das_result", config=self.to_record(), tensors=self.tensors(), fingerprint=self.fingerprint)

    @classmethod
    def load(cls, directory: str | Path, *, fingerprint: dict | None = None) -> DASResult:
        """Load a saved result; ``fingerprint`` (``lab.fingerprint()``) checks it was made for that model."""
        meta, tensors = fileformat.load(directory, kind="das_result", fingerprint=fingerprint)
        res = cls.from_record(meta["config"], tensors)
        res.fingerprint = meta.get("fingerprint")
        return res

    def __repr__(self) -> str:
        iia = ", ".join(f"{k}={v.value:.3f}" for k, v in self.iia.items())
        return f"DASResult({self.method}, site={self.site!r}, sizes={self.sizes}, iia: {iia})"


def localist_search(method: str | None) -> str | None:
    """``"exhaustive"`` or ``"sampled: best of N"`` from a localist control's method text."""
    if not method:
        return None
    if method.startswith("exhaustive"):
        return "exhaustive"
    n = method.split("best of ", 1)[-1].split(" ", 1)[0]
    return f"sampled: best of {n}"


def labelled_localist(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows for printing, with the localist cell saying how it was searched: a sampled
    search is a lower bound on the best localist alignment, not the best one."""
    out = []
    for r in rows:
        r = dict(r)
        how = r.get("localist_search")
        if r.get("localist") is not None and how:
            r["localist"] = f"{r['localist']:.3f} ({'exhaustive' if how == 'exhaustive' else how.split(': ')[1] + ' sampled'})"
        out.append(r)
    return out


def _get(d: dict[str, IIA], key: str) -> float | None:
    v = d.get(key)
    return None if v is None else v.value


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A plain-text table of ``rows`` (floats to three places, ``-`` for None)."""

    def cell(v) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3f}"
        return str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
