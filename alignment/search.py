"""Search over sites × positions × subspace sizes, every activation computed once.

:func:`search` trains DAS at every candidate (site, positions, size) and puts
beside each IIA its controls (a re-initialised copy of the model trained the
same way; the best localist alignment of the same size) and the full-vector
interchange at the same site and positions. Nothing below a site is run more
than once: one forward per input chunk collects every candidate site's values
and every candidate block's prefix for the distinct inputs of the train and
test data (once for the model, once for its re-initialised copy); every
candidate, epoch and control then runs only the blocks from its site upward,
with sources read from that cache. The wall time therefore grows with the
layers above each site, not with the number of source or prefix forwards.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from steerlab.alignment._activations import Runner, site_layer
from steerlab.alignment.controls import full_vector_bound, localist_alignment, random_init
from steerlab.alignment.counterfactuals import CounterfactualDataset
from steerlab.alignment.das import (
    TrainConfig,
    bounded_iia,
    evaluate,
    resolve_sizes,
    store_for,
    subspaces_of,
    train_selected,
)
from steerlab.alignment.objectives import Objective
from steerlab.alignment.objectives import objective as make_objective
from steerlab.alignment.results import DASResult, format_table, labelled_localist
from steerlab.alignment.selection import SELECT_RULES
from steerlab.interventions import fileformat
from steerlab.interventions.errors import ConfigError, DataError, FileFormatError, checked_first
from steerlab.interventions.fileformat import field_of
from steerlab.interventions.lab import Lab
from steerlab.interventions.progress import Bar, bar
from steerlab.interventions.units import PositionSpec

__all__ = ["search", "SearchResult", "CounterfactualTask"]


@runtime_checkable
class CounterfactualTask(Protocol):
    """A task that draws train and test counterfactuals for a model (the tasks of ``sl.alignment.tasks``)."""

    def datasets(self, lab: Lab, *, n_train: int, n_test: int, seed: int) -> tuple[CounterfactualDataset, CounterfactualDataset]: ...


def _check_train(train: object) -> None:
    if not isinstance(train, CounterfactualDataset) and not hasattr(train, "datasets"):
        raise DataError(f"search() takes a CounterfactualDataset or a task; got {type(train).__name__}")


@dataclass
class SearchResult:
    """Every candidate's :class:`DASResult`, with a tabular view and a plot.

    ``rows()`` has one row per candidate and intervened set: site, layer,
    positions, size, DAS IIA (± its standard error), the random-init and
    localist controls, the full-vector interchange, chance, and seconds.
    """

    results: list[DASResult]
    variables: tuple[str, ...]
    config: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    layers: dict[str, int | None] = field(default_factory=dict)
    fingerprint: dict[str, Any] | None = None

    @property
    def chance(self) -> float:
        return self.results[0].chance if self.results else float("nan")

    def get(self, site: str, positions=None, size: int | None = None) -> DASResult:
        for r in self.results:
            if r.site == site and r.positions == positions and (size is None or set(r.sizes.values()) == {size}):
                return r
        raise KeyError(f"no candidate at site={site!r}, positions={positions!r}, size={size!r}")

    def best(self, variable: str = "all") -> DASResult:
        """The candidate with the highest IIA for ``variable`` (an intervened set or ``"all"``)."""
        have = [r for r in self.results if variable in r.iia]
        if not have:
            raise KeyError(f"no candidate reports IIA for {variable!r}; keys: {sorted(self.results[0].iia)}")
        return max(have, key=lambda r: r.iia[variable].value)

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for r in self.results:
            for row in r.rows():
                row = {"site": r.site, "layer": self.layers.get(r.site), "positions": r.positions, **{k: v for k, v in row.items() if k not in ("site", "positions")}}
                row["seconds"] = round(sum(r.timings.values()), 2)
                out.append(row)
        return out

    table = rows

    def to_pandas(self):
        import pandas as pd

        return pd.DataFrame(self.rows())

    def __str__(self) -> str:
        cols = ["site", "positions", "size", "variable", "iia", "se", "random_init", "localist", "full_vector", "chance", "seconds"]
        rows = self.rows()
        above = list(dict.fromkeys(f"{r['site']} {r['positions']!r} size {r['size']}" for r in rows if r["above_full_vector"]))
        note = ("\nDAS above the full-vector interchange (more than 2 SE; a subspace edit that beats swapping the whole "
                f"vector suggests an interpretability illusion): {'; '.join(above)}") if above else ""
        scope = next((r.random_init_scope for r in self.results if r.random_init_scope), None)
        scope = f"\nrandom-init: {scope}" if scope else ""
        return format_table(labelled_localist(rows), cols) + scope + note

    def plot(self, **kwargs):
        """IIA over sites × sizes, with the controls and the full-vector interchange beside it."""
        from steerlab.viz import iia_heatmap

        return iia_heatmap(self, **kwargs)

    # -- the file format --------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Save in the one file format, atomically (see :mod:`~steerlab.interventions.fileformat`
        for the files a save owns in ``directory``)."""
        tensors: dict = {}
        records = []
        for i, r in enumerate(self.results):
            records.append(r.to_record())
            tensors.update(r.tensors(f"{i}."))
        config = {"results": records, "variables": list(self.variables), "config": self.config, "timings": self.timings, "layers": self.layers}
        return fileformat.save(directory, kind="das_search", config=config, tensors=tensors, fingerprint=self.fingerprint)

    @classmethod
    def load(cls, directory: str | Path, *, fingerprint: dict | None = None) -> SearchResult:
        """Load a saved search; ``fingerprint`` (``lab.fingerprint()``) checks it was made for that model.
        Every candidate's record is checked before anything is built."""
        saved = fileformat.read(directory, kind="das_search", fingerprint=fingerprint)
        cfg = saved.config
        where = f"{directory}"
        records = field_of(cfg, "results", list, where)
        variables = field_of(cfg, "variables", list, where)
        layers = field_of(cfg, "layers", dict, where)
        for key in ("config", "timings"):
            field_of(cfg, key, dict, where)
        if not all(isinstance(v, str) for v in variables) or not all(isinstance(v, (int, type(None))) and not isinstance(v, bool) for v in layers.values()):
            raise FileFormatError(f"{where}: variables {variables!r:.60} or layers {layers!r:.60}; expected names and layer numbers")
        owned: set[str] = set()
        for i, rec in enumerate(records):
            owned |= DASResult.check_record(rec, saved.specs, f"{i}.", f"{where}: candidate {i}")
        if set(saved.specs) != owned:
            raise FileFormatError(f"{where} holds tensors {sorted(set(saved.specs) - owned)[:5]} that no candidate owns")
        tensors = saved.tensors()
        results = [DASResult.from_record(rec, tensors, f"{i}.") for i, rec in enumerate(records)]
        return cls(results, tuple(variables), dict(cfg["config"]), dict(cfg["timings"]), dict(layers), saved.fingerprint)

    def __repr__(self) -> str:
        return f"SearchResult({len(self.results)} candidates, variables {list(self.variables)})"


def _sites(lab: Lab, sites: str | Sequence[str]) -> list[str]:
    names: list[str] = []
    for s in [sites] if isinstance(sites, str) else list(sites):
        names += [lab.resolve(n).name for n in lab.facts.expand(s)]
    if not names:
        raise ConfigError(f"sites={sites!r} matched no site")
    return list(dict.fromkeys(names))


# long in its signature and docstring only (every DAS option is a keyword); the body is under 30 lines
@checked_first(train=_check_train)
def search(
    lab: Lab,
    train: CounterfactualDataset | CounterfactualTask,
    test: CounterfactualDataset | None = None,
    *,
    sites: str | Sequence[str],
    positions: PositionSpec | Sequence[PositionSpec] = (None,),
    sizes: Sequence[int] = (1, 4, 16),
    controls: bool = True,
    random_init_scope: str | Sequence[str] = "all",
    epochs: int = 5,
    batch_size: int = 64,
    lr: float = 1e-2,
    seed: int = 0,
    n_train: int = 256,
    n_test: int = 256,
    localist_limit: int = 20_000,
    localist_samples: int = 32,
    selection_size: int = 256,
    eval_size: int | None = 256,
    objective: str | Objective | dict[str, Any] | None = None,
    init: str = "random",
    restarts: int = 0,
    select: str = "train_iia",
    checks_per_epoch: int = 1,
    progress: bool | None = None,
) -> SearchResult:
    """DAS at every (site, positions, size) with controls (see the module docstring).

    Args:
        train: a :class:`CounterfactualDataset`, or a task (``sl.alignment.tasks``),
            from which ``n_train`` / ``n_test`` counterfactuals are drawn.
        test: held-out counterfactuals (default: from the task, else ``train``).
        sites: site names or patterns (``"blocks.*.resid_post"``).
        positions: position specs to try (names the encoder knows, ints, ``None``).
        sizes: subspace sizes to try (each variable gets its own subspace of that size).
        controls: train on a re-initialised copy and search localist alignments too.
        random_init_scope: what that copy re-initialises (``"all"``, ``"trained"``, module paths).
        objective, init, restarts, select, checks_per_epoch: how each candidate trains and which state
            it reports, as :class:`~steerlab.alignment.DAS` takes them (``init``: ``"random"`` or
            ``"localist"``, the candidate's own localist control).
        progress: a bar over the candidates, each candidate's training bar inside it, and each
            candidate's row printed above the bar as it finishes; default: when the output is a
            terminal or a notebook (:mod:`steerlab.interventions.progress`).
    """
    obj = _training_options(objective, init, restarts, select)
    train, test = _datasets(lab, train, test, n_train, n_test, seed)
    variables = list(train.variables)
    names = _sites(lab, sites)
    specs = [positions] if isinstance(positions, (str, int)) or positions is None else list(positions)
    sizes = [sizes] if isinstance(sizes, int) else list(sizes)
    widths = _validate(lab, train, names, specs, sizes)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, eval_size=eval_size)
    timings: dict[str, float] = {}
    n_candidates = len(names) * len(specs) * len(sizes)
    with bar(total=n_candidates, desc="DAS search", unit="candidate", progress=progress) as b:
        store, rstore, scope = _stores(lab, train, test, names, controls, seed, random_init_scope, b, timings)
        results = []
        t_all = time.perf_counter()
        localist = dict(limit=localist_limit, samples=localist_samples, selection_size=selection_size, seed=seed)
        for s in names:
            for p in specs:
                results += _candidates(store, rstore, train, test, s, p, sizes, widths[s], cfg, controls, localist,
                                       dict(objective=obj, select=select, selection_size=selection_size, checks_per_epoch=checks_per_epoch),
                                       (init, restarts), b, progress)
    timings["candidates"] = time.perf_counter() - t_all
    for r in results:
        r.fingerprint = lab.fingerprint()
        r.random_init_scope = scope
    config = {**cfg.to_json(), "sites": names, "positions": specs, "sizes": sizes, "controls": controls,
              "n_train": len(train), "n_test": len(test), "objective": obj.describe(), "init": init, "restarts": restarts,
              "select": select}
    return SearchResult(results, tuple(variables), config, timings, {s: site_layer(lab, s) for s in names}, lab.fingerprint())


def _datasets(lab: Lab, train, test, n_train: int, n_test: int, seed: int) -> tuple[CounterfactualDataset, CounterfactualDataset]:
    """``(train, test)``: given, or drawn from a task; test defaults to the task's held-out split, else train."""
    if not isinstance(train, CounterfactualDataset):
        train, task_test = train.datasets(lab, n_train=n_train, n_test=n_test, seed=seed)
        test = test if test is not None else task_test
    return train, test if test is not None else train


def _stores(lab: Lab, train, test, names: list[str], controls: bool, seed: int, scope, b: Bar, timings: dict[str, float]):
    """The activation stores of the model and (with controls) of its re-initialised copy, timed,
    and what the copy re-initialised."""
    b.set_postfix(phase="caching activations")
    t0 = time.perf_counter()
    store = store_for(lab, [train, test], names)
    timings["cache"] = time.perf_counter() - t0
    if not controls:
        return store, None, None
    b.set_postfix(phase="caching random-init activations")
    t0 = time.perf_counter()
    ri = random_init(lab, seed=seed, scope=scope)
    rstore = store_for(ri.lab, [train, test], names)
    timings["random_init_cache"] = time.perf_counter() - t0
    return store, rstore, ri.description


def _training_options(objective, init, restarts, select):
    """The objective, after checking the start, restarts and selection rule."""
    if init not in ("random", "localist"):
        raise ConfigError(f"init={init!r}: search starts each candidate at 'random' or 'localist'")
    if select not in SELECT_RULES:
        raise ConfigError(f"select={select!r}: expected one of {list(SELECT_RULES)}")
    if not isinstance(restarts, int) or restarts < 0:
        raise ConfigError(f"restarts={restarts!r}: expected a non-negative int")
    return make_objective(objective)


def _validate(lab: Lab, train: CounterfactualDataset, names: list[str], specs: list, sizes: list[int]) -> dict[str, int]:
    """Check every candidate before any compute; return each site's width."""
    widths = {}
    for s in names:
        shape = lab.facts.site_shape(lab.resolve(s))
        if len(shape) != 1:
            raise ConfigError(f"{s!r} is a per-head site {shape}; search aligns whole-vector sites")
        widths[s] = shape[0]
        for k in sizes:
            resolve_sizes(k, list(train.variables), s, widths[s])
    for p in specs:
        train.encoder.position_spec(p)
    return widths


def _candidates(store, rstore, train, test, site, spec, sizes, width, cfg, controls, localist, how, start, b: Bar,
                progress) -> list[DASResult]:
    """Every size at one (site, positions): the full-vector IIA is computed once for all sizes."""
    t0 = time.perf_counter()
    r_train, r_test = Runner(store, train, site, spec), Runner(store, test, site, spec)
    bound = full_vector_bound(r_test, test, batch_size=cfg.eval_batch_size)
    full = {v: b[0] for v, b in bound.items()}
    t_full = time.perf_counter() - t0
    rr = (Runner(rstore, train, site, spec), Runner(rstore, test, site, spec)) if rstore is not None else None
    out = []
    variables = list(train.variables)
    init, restarts = start
    randoms = [(f"random (seed {cfg.seed + r})", None, cfg.seed + r) for r in range(restarts + 1)]
    for k in sizes:
        b.set_postfix(site=site, positions=spec, size=k)
        sizes_k = resolve_sizes(k, variables, site, width)
        timings = {"full_vector": t_full / len(sizes)}
        loc = None
        if controls or init == "localist":
            t0 = time.perf_counter()
            loc = localist_alignment(r_train, r_test, sizes_k, width, **localist)
            timings["localist"] = time.perf_counter() - t0
        starts = randoms
        if init == "localist":
            dims = [d for v in variables for d in loc.dims[v]]
            starts = [("localist", torch.eye(width)[dims], cfg.seed)] + randoms[1:]
        t0 = time.perf_counter()
        ivs, curve, selection = train_selected(r_train, r_test, site, sizes_k, width, cfg, starts, **how, progress=progress,
                                               desc=f"DAS {site} size {k}")
        iia = evaluate(r_test, ivs, batch_size=cfg.eval_batch_size)
        timings["train"] = time.perf_counter() - t0
        res = DASResult(site=site, positions=spec, variables=tuple(variables), sizes=sizes_k,
                        subspaces=subspaces_of(ivs, variables, site, spec, "DAS", iia, train.encoder), iia=iia, full_vector=full,
                        bounded=bounded_iia(r_test, ivs, bound, batch_size=cfg.eval_batch_size), selection=selection,
                        curve=curve, config={**cfg.to_json(), "n_train": len(train), "n_test": len(test),
                                             "objective": how["objective"].describe(), "init": init, "restarts": restarts,
                                             "select": how["select"]}, timings=timings)
        if controls:
            res.localist, res.localist_method, res.localist_dims = loc.iia, loc.method, loc.dims
            t0 = time.perf_counter()
            r_ivs, res.random_init_curve, _ = train_selected(rr[0], rr[1], site, sizes_k, width, cfg, randoms, **how, progress=progress,
                                                             desc=f"random-init {site} size {k}")
            res.random_init = evaluate(rr[1], r_ivs, batch_size=cfg.eval_batch_size)
            timings["random_init"] = time.perf_counter() - t0
        row = res.rows()[-1]
        b.write(f"  {site} pos={spec!r} size={k}: iia {row['iia']:.3f} random {_f(row['random_init'])} "
                f"localist {_f(row['localist'])} full {_f(row['full_vector'])} ({sum(timings.values()):.1f}s)")
        b.update(1)
        out.append(res)
    return out


def _f(x) -> str:
    return "-" if x is None else f"{x:.3f}"

