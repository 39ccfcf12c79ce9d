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
from steerlab.interventions.fileformat import TensorSpec, field_of
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


def _check_iias(rec: dict, key: str, optional: bool, where: str) -> None:
    d = field_of(rec, key, (dict, type(None)) if optional else dict, where)
    for k, v in (d or {}).items():
        ok = isinstance(v, dict) and all(isinstance(v.get(f), (int, float)) and not isinstance(v.get(f), bool) for f in ("value", "n", "chance")) \
            and isinstance(v["n"], int) and 0 <= v["value"] <= 1 and 0 <= v["chance"] <= 1 and v["n"] >= 0
        if not ok:
            raise FileFormatError(f"{where}: {key}[{k!r}] is {v!r:.80}; expected {{value: 0..1, n: count, chance: 0..1}}")


#: the DAS result record's own version: 2 added ``bounded``, ``random_init_scope`` and ``selection``
RECORD_VERSION = 2
_LATER_FIELDS = ("bounded", "random_init_scope", "selection")


def _check_later_fields(rec: dict, where: str) -> None:
    """Fields a record of version 2 must have, and an older (unversioned) one must not."""
    version = rec.get("record")
    if version is None:
        extra = [k for k in _LATER_FIELDS if k in rec]
        if extra:
            raise FileFormatError(f"{where}: fields {extra} without the record version that introduced them ('record': 2)")
        return
    if not isinstance(version, int) or isinstance(version, bool) or not 2 <= version <= RECORD_VERSION:
        raise FileFormatError(f"{where}: record version {version!r}; this steerlab reads DAS result records up to {RECORD_VERSION}")
    _check_iias(rec, "bounded", True, where)
    field_of(rec, "random_init_scope", (str, type(None)), where)
    if field_of(rec, "selection", (dict, type(None)), where) is not None:
        Selection.check_record(rec["selection"], f"{where}: selection")


def _check_curve(d: Any, where: str) -> None:
    if d is None and where.endswith("random_init_curve"):
        return
    number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)  # noqa: E731
    if not isinstance(d, dict) or set(d) != set(Curve.__dataclass_fields__) or \
            not all(isinstance(v, list) and all(number(x) for x in v) for v in d.values()):
        raise FileFormatError(f"{where} is {d!r:.80}; expected lists of numbers: {', '.join(Curve.__dataclass_fields__)}")


@dataclass
class Projection:
    """Base representations projected onto a found subspace (for plotting)."""

    coords: Float[Tensor, "example rank"]
    values: list
    text: list[str]
    variable: str
    jitter: Float[Tensor, " example"]


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
            "record": RECORD_VERSION,
            "random_init_scope": self.random_init_scope,
            "selection": None if self.selection is None else self.selection.to_json(),
            "config": self.config,
            "timings": self.timings,
        }

    @staticmethod
    def check_record(rec: Any, specs: dict[str, TensorSpec], prefix: str, where: str) -> set[str]:
        """Every field of a saved result, of the right type and consistent (sizes, subspaces and
        their bases as the weights header declares them), before anything is built; returns the
        names of the tensors it owns."""
        field_of(rec, "site", str, where)
        pos = field_of(rec, "positions", (int, str, list, type(None)), where)  # a base-layer spec or an encoder's position names
        if isinstance(pos, list) and not all(isinstance(p, (int, str)) and not isinstance(p, bool) for p in pos):
            raise FileFormatError(f"{where}: positions {pos!r:.80}; expected positions or position names")
        variables = field_of(rec, "variables", list, where)
        sizes = field_of(rec, "sizes", dict, where)
        subs = field_of(rec, "subspaces", dict, where)
        if not variables or not all(isinstance(v, str) for v in variables) or len(set(variables)) != len(variables):
            raise FileFormatError(f"{where}: variables {variables!r:.80}; expected distinct names")
        if set(sizes) != set(subs) or not set(subs) <= set(variables):
            raise FileFormatError(f"{where}: sizes for {sorted(sizes)} and subspaces for {sorted(subs)}; expected the same variables, among {variables}")
        for k, r in subs.items():
            Subspace.check_record(r, specs.get(f"{prefix}subspace.{k}"), f"{where}: subspace {k!r}")
            if sizes[k] != r["size"] or r["site"] != rec["site"]:
                raise FileFormatError(f"{where}: variable {k!r} has size {sizes[k]!r} but its subspace is {r['size']} at {r['site']!r}")
        for key, optional in (("iia", False), ("full_vector", False), ("random_init", True), ("localist", True)):
            _check_iias(rec, key, optional, where)
        _check_later_fields(rec, where)
        for key in ("curve", "random_init_curve"):
            field_of(rec, key, (dict, type(None)), where)
            _check_curve(rec[key], f"{where}: {key}")
        field_of(rec, "method", str, where)
        for key, types in (("localist_method", (str, type(None))), ("localist_dims", (dict, type(None))),
                           ("config", dict), ("timings", dict)):
            field_of(rec, key, types, where)
        dims = rec["localist_dims"] or {}
        if not all(isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v) for v in dims.values()):
            raise FileFormatError(f"{where}: localist_dims {dims!r:.80}; expected lists of dimension indices")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in rec["timings"].values()):
            raise FileFormatError(f"{where}: timings {rec['timings']!r:.80}; expected seconds")
        return {f"{prefix}subspace.{k}" for k in subs}

    @classmethod
    def from_record(cls, rec: dict[str, Any], tensors: dict, prefix: str = "") -> DASResult:
        """The result a record :meth:`check_record` accepted describes."""
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

    def tensors(self, prefix: str = "") -> dict:
        return {f"{prefix}subspace.{k}": s.basis for k, s in self.subspaces.items()}

    def save(self, directory: str | Path) -> Path:
        """Save in the one file format, atomically (see :mod:`~steerlab.interventions.fileformat`
        for the files a save owns in ``directory``)."""
        return fileformat.save(directory, kind="das_result", config=self.to_record(), tensors=self.tensors(), fingerprint=self.fingerprint)

    @classmethod
    def load(cls, directory: str | Path, *, fingerprint: dict | None = None) -> DASResult:
        """Load a saved result; ``fingerprint`` (``lab.fingerprint()``) checks it was made for that model."""
        saved = fileformat.read(directory, kind="das_result", fingerprint=fingerprint)
        owned = cls.check_record(saved.config, saved.specs, "", f"{directory}")
        if set(saved.specs) != owned:
            raise FileFormatError(f"{directory} holds tensors {sorted(set(saved.specs) - owned)[:5]} that no subspace of the result owns")
        res = cls.from_record(saved.config, saved.tensors())
        res.fingerprint = saved.fingerprint
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
