"""Distributed alignment search (DAS) and Boundless DAS.

DAS (Geiger et al. 2023) looks for a ``k``-dimensional subspace of a site
whose interchange implements a causal variable: with ``R`` (``k × d``,
orthonormal rows) trained so that the distributed interchange

.. math::

    h' = h + R^\\top (R s - R h)

(base ``h``, source ``s`` at the aligned positions) makes the network output
the causal model's counterfactual label, by cross-entropy over the label
scores. Several variables are aligned to *disjoint* subspaces of one site,
as in the paper: their bases are consecutive row blocks of one orthonormal
matrix, so each edit leaves the others' coordinates untouched. Boundless DAS
(Wu et al. 2023) learns the size too: a full rotation and a soft boundary
annealed from a high temperature to a low one, with a penalty on the width.

Training runs only the layers from the site upward: base prefixes and source
slices come from an :class:`~steerlab.alignment._activations.ActivationStore`
computed once per dataset (see :mod:`steerlab.alignment._activations`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from steerlab.alignment._activations import ActivationStore, Runner, check_positions_at
from steerlab.alignment.controls import full_vector_bound
from steerlab.alignment.counterfactuals import CounterfactualDataset
from steerlab.alignment.iia import IIA, evaluate_iia
from steerlab.alignment.objectives import CrossEntropy, Objective
from steerlab.alignment.objectives import objective as make_objective
from steerlab.alignment.results import Curve, DASResult
from steerlab.alignment.selection import SELECT_RULES, Checkpoints, Selection
from steerlab.interventions.errors import ConfigError, DataError, NotFitted, SubspaceSizeError
from steerlab.interventions.lab import Lab
from steerlab.interventions.ops import BoundlessSubspaceInterchange, Interchange, Intervention, SubspaceInterchange
from steerlab.interventions.orthonormal import Orthonormal, orthonormal_rows
from steerlab.interventions.progress import Bar, bar
from steerlab.interventions.subspace import Subspace
from steerlab.interventions.training import LoopSettings, run_loop
from steerlab.interventions.units import PositionSpec

__all__ = ["DAS", "BoundlessDAS", "TrainConfig"]


class _Rows(nn.Module):
    """Rows ``start:stop`` of a shared orthonormal map: disjoint subspaces of one rotation."""

    def __init__(self, joint: Orthonormal, start: int, stop: int):
        super().__init__()
        self.joint = joint
        self.start, self.stop = start, stop

    def forward(self) -> Tensor:
        return self.joint()[self.start : self.stop]


class TrainConfig:
    """Hyper-parameters shared by DAS, Boundless DAS and the controls."""

    def __init__(
        self,
        *,
        epochs: int = 5,
        batch_size: int = 64,
        lr: float = 1e-2,
        seed: int = 0,
        eval_size: int | None = 512,
        eval_batch_size: int = 256,
        warmup_ratio: float = 0.0,
        gradient_accumulation_steps: int = 1,
    ):
        if not isinstance(epochs, int) or epochs < 1:
            raise ConfigError(f"epochs={epochs!r}: expected a positive int")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size={batch_size!r}: expected a positive int")
        if not lr > 0:
            raise ConfigError(f"lr={lr!r}: expected a positive learning rate")
        self.epochs, self.batch_size, self.lr, self.seed = epochs, batch_size, float(lr), seed
        self.eval_size, self.eval_batch_size = eval_size, eval_batch_size
        self.warmup_ratio, self.gradient_accumulation_steps = warmup_ratio, gradient_accumulation_steps
        self.loop()  # checks the loop's settings now

    def loop(self) -> LoopSettings:
        """The settings of the one training loop (the same order and schedule as ReFT's for the same seed)."""
        return LoopSettings(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, seed=self.seed, shuffle=True,
                            warmup_ratio=self.warmup_ratio, gradient_accumulation_steps=self.gradient_accumulation_steps)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def with_seed(self, seed: int) -> TrainConfig:
        """The same settings with another seed (a restart's)."""
        out = TrainConfig.__new__(TrainConfig)
        out.__dict__.update(self.__dict__, seed=seed)
        return out


def _random_basis(k: int, d: int, g: torch.Generator) -> Tensor:
    return orthonormal_rows(torch.randn(d, k, generator=g))


def build_subspace_interventions(site: str, sizes: Mapping[str, int], width: int, seed: int,
                                 init: Tensor | None = None) -> list[SubspaceInterchange]:
    """One :class:`SubspaceInterchange` per variable; with several, their ``R``s are
    consecutive row blocks of one orthonormal map (disjoint subspaces). ``init``: the
    ``[sum(sizes), width]`` start (rows in variable order); default a random one from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    total = sum(sizes.values())
    if init is None:
        init = _random_basis(total, width, g)
    elif tuple(init.shape) != (total, width):
        raise SubspaceSizeError(f"a start of shape {tuple(init.shape)} for sizes {dict(sizes)}; expected [{total}, {width}]")
    ivs = []
    if len(sizes) == 1:
        (k,) = sizes.values()
        return [SubspaceInterchange(site, size=k, width=width, init=init)]
    joint = Orthonormal(width, total, init)
    start = 0
    for k in sizes.values():
        iv = SubspaceInterchange(site, size=k, width=width)
        iv.rotation = _Rows(joint, start, start + k)
        ivs.append(iv)
        start += k
    return ivs


def _parameters(ivs: Sequence[Intervention]) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for iv in ivs:
        for p in iv.parameters():
            seen.setdefault(id(p), p)
    return list(seen.values())


def _eval_rows(n: int, size: int | None, seed: int) -> Tensor:
    if size is None or size >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))[:size].sort().values


def objective(runner: Runner, rows: Tensor, ivs: Sequence[Intervention], loss: Objective | None = None,
              progress: float = 0.0) -> Tensor:
    """The DAS loss of a minibatch: ``loss`` (default cross-entropy; see
    :mod:`steerlab.alignment.objectives`) of the intervened label scores against the causal
    model's counterfactual labels, at ``progress`` (0..1) through training (the one place the
    objective is evaluated)."""
    scores = runner.run(rows, ivs)
    return (loss or CrossEntropy())(scores.float(), runner.labels(rows).to(scores.device), progress)


def train(
    runner: Runner,
    ivs: Sequence[Intervention],
    cfg: TrainConfig,
    *,
    evaluator: Runner | None = None,
    extra_loss=None,
    on_step=None,
    on_epoch=None,
    groups: list[dict] | None = None,
    progress: bool | None = None,
    desc: str = "DAS",
    loss: Objective | None = None,
) -> Curve:
    """Train ``ivs`` (one per variable, in the runner's variable order) on :func:`objective` (``loss``)
    with Adam on the one training loop (:func:`steerlab.interventions.training.run_loop`:
    the seeded order, linear decay to 0, losses read per logging interval); returns the curve.

    ``evaluator`` (default: ``runner``) gives the IIA after each epoch on up to
    ``cfg.eval_size`` of its examples. ``extra_loss()`` is added to the loss,
    ``on_step(step, total)`` runs before each step (temperature schedules),
    ``on_epoch(curve)`` after each epoch. ``progress``: a bar (see
    :mod:`steerlab.interventions.progress`).
    """
    opt = torch.optim.Adam(groups or _parameters(ivs), lr=cfg.lr)
    curve = Curve()
    ev = evaluator or runner
    ev_rows = _eval_rows(len(ev), cfg.eval_size, cfg.seed)

    at = {"progress": 0.0}  # where training is, for objectives that anneal

    def step_start(step: int, total: int) -> None:
        at["progress"] = step / max(total, 1)
        if on_step is not None:
            on_step(step, total)

    def loss_of(rows: Tensor) -> Tensor:
        value = objective(runner, rows, ivs, loss, at["progress"])
        return value if extra_loss is None else value + extra_loss()

    def epoch_done(epoch: int, step: int) -> None:
        curve.epoch_step.append(step)
        curve.epoch_iia.append(evaluate(ev, ivs, rows=ev_rows, batch_size=cfg.eval_batch_size)["all"].value)
        if on_epoch is not None:
            on_epoch(curve)

    for iv in ivs:
        iv.train()
    try:
        run = run_loop(len(runner), lambda rows: rows, loss_of, opt, cfg.loop(), on_step=step_start, on_epoch=epoch_done,
                       progress=progress, desc=desc)
    finally:
        for iv in ivs:
            iv.eval()
    curve.loss = run.losses
    return curve


def evaluate(runner: Runner, ivs: Sequence[Intervention], *, rows: Tensor | None = None, batch_size: int = 256) -> dict[str, IIA]:
    """IIA of ``ivs`` on the runner's examples, per intervened set and ``"all"``."""
    t = runner.table
    return evaluate_iia(lambda r: runner.run(r, ivs), t.labels, t.intervened, t.variables, rows=rows, batch_size=batch_size)


def bounded_iia(runner: Runner, ivs: Sequence[Intervention], bound: Mapping[str, tuple[IIA, Tensor]], *,
                batch_size: int = 256) -> dict[str, IIA]:
    """IIA of ``ivs`` on the examples where the full-vector interchange bounds each variable
    (``bound`` from :func:`~steerlab.alignment.controls.full_vector_bound`)."""
    return {v: evaluate(runner, ivs, rows=rows, batch_size=batch_size)["all"] for v, (_, rows) in bound.items()}


def subspaces_of(
    ivs: Sequence[Intervention], variables: Sequence[str], site: str, positions, method: str, iia: Mapping[str, IIA], encoder=None
) -> dict[str, Subspace]:
    """Each variable's found basis as a :class:`Subspace` (positions as a base-layer spec; a named
    position of the encoder becomes its index, or ``"per-call"`` when it differs per example)."""
    spec = encoder.position_spec(positions) if encoder is not None else _subspace_positions(positions)
    out = {}
    with torch.no_grad():
        for v, iv in zip(variables, ivs):
            r = iv.R.detach().cpu().float()
            meta = {"variable": v, "method": method, "positions": positions}
            if v in iia:
                meta["iia"] = iia[v].value
            out[v] = Subspace(r, site, positions=spec, metadata=meta)
    return out


def _subspace_positions(positions):
    if positions is None or isinstance(positions, (int, list, tuple)):
        return positions
    return "per-call"


def train_selected(
    run_train: Runner,
    run_test: Runner,
    site: str,
    sizes: Mapping[str, int],
    width: int,
    cfg: TrainConfig,
    starts: Sequence[tuple[str, Tensor | None, int]],
    *,
    objective: Objective,
    select: str = "train_iia",
    selection_size: int = 512,
    checks_per_epoch: int = 1,
    progress: bool | None = None,
    desc: str = "DAS",
) -> tuple[list[Intervention], Curve, Selection]:
    """One run per start ``(label, start rows or None for random, seed)``; the reported state
    chosen on training counterfactuals (see :mod:`steerlab.alignment.selection`)."""
    rows = _eval_rows(len(run_train), selection_size, cfg.seed + 2)
    per_epoch = cfg.loop().steps_per_epoch(len(run_train))
    every = max(1, per_epoch // checks_per_epoch)
    sel = Selection(objective.to_json(), select, [s[0] for s in starts], rows=int(rows.numel()))
    best: tuple[float, int, Checkpoints, list[Intervention], Curve] | None = None
    for i, (_, init, seed) in enumerate(starts):
        ivs = build_subspace_interventions(site, sizes, width, seed, init=init)
        ck = Checkpoints(_parameters(ivs), lambda ivs=ivs: evaluate(run_train, ivs, rows=rows)["all"].value, i)

        def on_step(step: int, total: int, ck=ck) -> None:
            if step == 0 or (select == "train_iia" and step % every == 0):
                ck.check(step)

        curve = train(run_train, ivs, cfg.with_seed(seed), evaluator=run_test, on_step=on_step, loss=objective, progress=progress,
                      desc=desc if len(starts) == 1 else f"{desc} ({starts[i][0]})")
        if not all(bool(torch.isfinite(p).all()) for p in ck.params):
            # a diverged run (NaN activations, an exploding loss) must not hide behind a finite earlier state:
            # its basis goes out as it is, and the Subspace check names the failure
            sel.chosen_run, sel.chosen_step = i, len(curve.loss)
            return ivs, curve, sel
        ck.check(len(curve.loss))
        sel.start_iia.append(ck.first)
        sel.final_iia.append(ck.last)
        sel.checks += ck.checks
        score = ck.best if select == "train_iia" else ck.last
        if best is None or score > best[0]:
            best = (score, i, ck, ivs, curve)
    score, i, ck, ivs, curve = best
    if select == "train_iia":
        ck.restore()
    sel.chosen_run, sel.iia = i, score
    sel.chosen_step = ck.best_step if select == "train_iia" else len(curve.loss)
    return ivs, curve, sel


class DAS:
    """Distributed alignment search at one site (see the module docstring).

    Args:
        lab: the wrapped model.
        site: where to look, e.g. ``"blocks.6.resid_post"`` or ``"module:layers.0:output"``.
        size: the subspace size, the same for every variable or ``{variable: size}``.
        variables: the causal variables to align (default: those the training data intervenes).
        positions: where in the sequence: a name the encoder knows (``"last"``,
            ``"adjective"``), an int, or ``None`` (every position / no position axis).
        epochs: training epochs (Adam, the learning rate decaying linearly to 0).
        batch_size: counterfactuals per step.
        lr: the learning rate.
        seed: the initial subspace and the data order.
        controls: also train on a re-initialised copy of the model and search
            neuron-aligned alignments of the same size (on by default).
        random_init_scope: what the random-init control re-initialises: ``"all"``,
            ``"trained"`` or a list of module paths (see
            :func:`~steerlab.alignment.controls.random_init`); the result says which.
        localist_limit: enumerate every neuron assignment up to this many, else
            sample ``localist_samples`` of them; chosen on up to
            ``selection_size`` training examples, reported on the test set.
        objective: what training minimises: ``"smooth_zero_one"``, ``"cross_entropy"``,
            ``"hinge"`` or an :class:`~steerlab.alignment.objectives.Objective`
            (default: :func:`~steerlab.alignment.objectives.default_objective`).
        init: where the first run starts: ``"random"``, ``"localist"`` (the best
            neuron-aligned subspace, the localist control's) or a :class:`Subspace`
            (``{variable: Subspace}`` for several variables).
        restarts: further runs, each from a random start.
        select: ``"train_iia"`` reports the state with the best IIA on ``selection_size``
            training counterfactuals over every run's start, ``checks_per_epoch``
            checkpoints per epoch and end; ``"final"`` the best run's last step.
            The test set is never used to choose (see :mod:`steerlab.alignment.selection`).
    """

    method = "DAS"

    def __init__(
        self,
        lab: Lab,
        *,
        site: str,
        size: int | Mapping[str, int] = 8,
        variables: str | Sequence[str] | None = None,
        positions: PositionSpec = None,
        epochs: int = 5,
        batch_size: int = 64,
        lr: float = 1e-2,
        seed: int = 0,
        controls: bool = True,
        random_init_scope: str | Sequence[str] = "all",
        localist_limit: int = 20_000,
        localist_samples: int = 64,
        selection_size: int = 512,
        eval_size: int | None = 512,
        objective: str | Objective | dict[str, Any] | None = None,
        init: str | Subspace | Mapping[str, Subspace] = "random",
        restarts: int = 0,
        select: str = "train_iia",
        checks_per_epoch: int = 1,
    ):
        if not isinstance(lab, Lab):
            raise ConfigError(f"DAS needs a Lab (steerlab.wrap(model)); got {type(lab).__name__}")
        self.objective = make_objective(objective)
        if not (init in ("random", "localist") or isinstance(init, (Subspace, Mapping))):
            raise ConfigError(f"init={init!r}: expected 'random', 'localist', a Subspace or {{variable: Subspace}}")
        if not isinstance(restarts, int) or isinstance(restarts, bool) or restarts < 0:
            raise ConfigError(f"restarts={restarts!r}: expected a non-negative int (further random starts)")
        if select not in SELECT_RULES:
            raise ConfigError(f"select={select!r}: expected one of {list(SELECT_RULES)}")
        if not isinstance(checks_per_epoch, int) or checks_per_epoch < 1:
            raise ConfigError(f"checks_per_epoch={checks_per_epoch!r}: expected a positive int")
        self.init, self.restarts, self.select, self.checks_per_epoch = init, restarts, select, checks_per_epoch
        self.lab = lab
        resolved = lab.resolve(site)
        self.site = resolved.name
        check_positions_at(lab, resolved, positions)
        self.size = size
        self.variables = [variables] if isinstance(variables, str) else (None if variables is None else list(variables))
        self.positions = list(positions) if isinstance(positions, tuple) else positions
        self.cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, eval_size=eval_size)
        self.controls = controls
        self.random_init_scope = random_init_scope
        self.localist_limit, self.localist_samples, self.selection_size = localist_limit, localist_samples, selection_size
        self._result: DASResult | None = None

    # -- the fitted result ----------------------------------------------------------------
    @property
    def result(self) -> DASResult:
        """The :class:`DASResult` of the last :meth:`fit` (:class:`NotFitted` before it)."""
        if self._result is None:
            raise NotFitted(f"this {self.method} at {self.site!r} is not fitted yet: call fit(train, test) first "
                            "(it returns the result, also kept as .result)")
        return self._result

    @property
    def subspaces(self) -> dict[str, Subspace]:
        """Each variable's found :class:`Subspace` (the last fit's)."""
        return self.result.subspaces

    @property
    def iia(self) -> dict[str, IIA]:
        """Held-out IIA per intervened set and ``"all"`` (the last fit's)."""
        return self.result.iia

    # -- validation ---------------------------------------------------------------------
    def width(self) -> int:
        shape = self.lab.facts.site_shape(self.lab.resolve(self.site))
        if len(shape) != 1:
            raise ConfigError(f"{self.site!r} is a per-head site {shape}; DAS aligns whole-vector sites (resid, attn.out, mlp.*, module:...)")
        return shape[0]

    def resolve_sizes(self, variables: Sequence[str]) -> dict[str, int]:
        return resolve_sizes(self.size, variables, self.site, self.width())

    def _variables(self, train: CounterfactualDataset) -> list[str]:
        if not isinstance(train, CounterfactualDataset):
            raise DataError(f"fit() takes a CounterfactualDataset; got {type(train).__name__}")
        have = list(train.variables)
        want = self.variables or have
        for v in want:
            if v not in train.causal_model.values:
                raise DataError(f"variable {v!r} is not in {train.causal_model.name} (variables: {list(train.causal_model.variables)})")
        if set(want) != set(have):
            raise DataError(f"the training data intervenes {have} but DAS aligns {want}; they must be the same variables")
        return [v for v in have]

    # -- fitting ------------------------------------------------------------------------------
    def fit(self, train: CounterfactualDataset, test: CounterfactualDataset | None = None, *, progress: bool | None = None) -> DASResult:
        """Train on ``train``; report IIA and controls on ``test`` (default: ``train``).

        ``progress``: a bar over the fit's phases (caching, training, evaluation,
        controls) with each training's own bar inside it; default: when the output
        is a terminal or a notebook (:mod:`steerlab.interventions.progress`)."""
        variables = self._variables(train)
        sizes = self.resolve_sizes(variables)
        test = test if test is not None else train
        _check_same_task(train, test)
        if self.init != "localist":
            self._starts(variables, sizes)  # a given start is checked before any compute
        timings: dict[str, float] = {}
        phases = 3 + (self.init == "localist") + (3 if self.controls else 0)
        with bar(total=phases, desc=f"{self.method} {self.site}", unit="phase", progress=progress) as b:
            t0 = time.perf_counter()
            store = _phase(b, "caching activations", lambda: store_for(self.lab, [train, test], [self.site]))
            run_train, run_test = Runner(store, train, self.site, self.positions), Runner(store, test, self.site, self.positions)
            timings["cache"] = time.perf_counter() - t0
            self._localist = None
            if self.init == "localist":
                t0 = time.perf_counter()
                self._localist = _phase(b, "localist start", lambda: self._localist_search(run_train, run_test, sizes))
                timings["localist"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            ivs, curve, selection = _phase(b, "training", lambda: self._train(run_train, run_test, sizes, self._starts(variables, sizes),
                                                                            progress=progress))
            timings["train"] = time.perf_counter() - t0
            result = _phase(b, "evaluating", lambda: self._result_of(ivs, curve, selection, run_test, variables, sizes, train, test, timings))
            if self.controls:
                t0 = time.perf_counter()
                self._controls(result, run_train, run_test, train, test, sizes, b, progress)
                timings["controls"] = time.perf_counter() - t0
        self._result = result
        return result

    def _result_of(self, ivs, curve, selection, run_test, variables, sizes, train, test, timings) -> DASResult:
        """The result before controls: held-out IIA, the full-vector bound and the DAS IIA on its rows."""
        iia = evaluate(run_test, ivs, batch_size=self.cfg.eval_batch_size)
        bound = full_vector_bound(run_test, test, batch_size=self.cfg.eval_batch_size)
        return DASResult(
            site=self.site, positions=self.positions, variables=tuple(variables), sizes=self._final_sizes(ivs, sizes),
            subspaces=subspaces_of(ivs, variables, self.site, self.positions, self.method, iia, train.encoder), iia=iia,
            full_vector={v: x[0] for v, x in bound.items()}, bounded=bounded_iia(run_test, ivs, bound, batch_size=self.cfg.eval_batch_size),
            curve=curve, method=self.method, config=self._config(train, test), timings=timings, fingerprint=self.lab.fingerprint(),
            selection=selection,
        )

    # -- starts, runs and selection ------------------------------------------------------
    def _starts(self, variables: Sequence[str], sizes: Mapping[str, int]) -> list[tuple[str, Tensor | None, int]]:
        """``(label, start rows or None for random, seed)`` per run."""
        seed, width = self.cfg.seed, self.width()
        if self.init == "random":
            first = (f"random (seed {seed})", None, seed)
        elif self.init == "localist":
            dims = [d for v in variables for d in self._localist.dims[v]]
            first = ("localist", torch.eye(width)[dims], seed)
        else:
            subs = {variables[0]: self.init} if isinstance(self.init, Subspace) else dict(self.init)
            if set(subs) != set(variables):
                raise ConfigError(f"init gives subspaces for {sorted(subs)}; expected one for each of {list(variables)}")
            for v in variables:
                if subs[v].size != sizes[v] or subs[v].width != width:
                    raise SubspaceSizeError(f"init[{v!r}] is {subs[v].size} x {subs[v].width}; expected {sizes[v]} x {width}")
            rows = torch.cat([subs[v].basis for v in variables])
            first = ("given subspace", orthonormal_rows(rows.T), seed)
        return [first] + [(f"random (seed {seed + r})", None, seed + r) for r in range(1, self.restarts + 1)]

    def _train(self, run_train: Runner, run_test: Runner, sizes: dict[str, int], starts: list[tuple[str, Tensor | None, int]], *,
               progress: bool | None = None, desc: str | None = None) -> tuple[list[Intervention], Curve, Selection]:
        return train_selected(run_train, run_test, self.site, sizes, self.width(), self.cfg, starts, objective=self.objective,
                              select=self.select, selection_size=self.selection_size, checks_per_epoch=self.checks_per_epoch,
                              progress=progress, desc=desc or self.method)

    def _localist_search(self, run_train: Runner, run_test: Runner, sizes: Mapping[str, int]):
        from steerlab.alignment.controls import localist_alignment

        return localist_alignment(run_train, run_test, sizes, self.width(), limit=self.localist_limit, samples=self.localist_samples,
                                  selection_size=self.selection_size, seed=self.cfg.seed)


    def _final_sizes(self, ivs, sizes: dict[str, int]) -> dict[str, int]:
        return dict(sizes)

    def _config(self, train, test) -> dict[str, Any]:
        init = self.init if isinstance(self.init, str) else "given subspace"
        return {**self.cfg.to_json(), "n_train": len(train), "n_test": len(test), "method": self.method,
                "objective": self.objective.describe(), "init": init, "restarts": self.restarts, "select": self.select}

    def _controls(self, result: DASResult, run_train: Runner, run_test: Runner, train, test, sizes, b: Bar, progress) -> None:
        from steerlab.alignment.controls import random_init

        reuse = self._localist is not None and dict(result.sizes) == dict(sizes)
        loc = self._localist if reuse else _phase(b, "localist control", lambda: self._localist_search(run_train, run_test, result.sizes))
        if reuse:
            b.update(1)
        result.localist, result.localist_method, result.localist_dims = loc.iia, loc.method, loc.dims
        ri = random_init(self.lab, seed=self.cfg.seed, scope=self.random_init_scope)
        result.random_init_scope = ri.description
        rstore = _phase(b, "random-init activations", lambda: store_for(ri.lab, [train, test], [self.site]))
        r_train, r_test = Runner(rstore, train, self.site, self.positions), Runner(rstore, test, self.site, self.positions)
        # the same objective, runs and selection, from random starts (a localist start would need its own search)
        starts = [(f"random (seed {self.cfg.seed + r})", None, self.cfg.seed + r) for r in range(self.restarts + 1)]
        r_ivs, r_curve, _ = _phase(b, "random-init training", lambda: self._train(r_train, r_test, sizes, starts, progress=progress,
                                                                                  desc=f"{self.method} (random init)"))
        result.random_init = evaluate(r_test, r_ivs, batch_size=self.cfg.eval_batch_size)
        result.random_init_curve = r_curve


def _phase(b: Bar, name: str, work):
    """Run one phase of a fit under the fit's bar: its name shown while it runs, the bar advanced after."""
    b.set_postfix(phase=name)
    out = work()
    b.update(1)
    return out


class BoundlessDAS(DAS):
    """Boundless DAS: one variable, the subspace size learned (see the module docstring).

    The boundary (a fraction of the width) starts at ``init_boundary``; the
    temperature of its sigmoid mask ``σ((b·d − i) / τ)`` (``τ`` in dimensions)
    falls geometrically from ``temperature[0]`` to ``temperature[1]`` over
    training; ``boundary_penalty`` times the boundary is added to the loss. The
    found subspace is the first ``round(boundary × width)`` rows of the
    rotation, and its IIA is that of the hard subspace.

    Defaults by measurement (benchmarks/README.md): pyvene's ``τ`` 50 → 0.1 and
    penalty 1 leave the mask a half-blend of every dimension for most of
    training on a narrow site (τ > d = 16), the rotation learns nothing and the
    boundary collapses (hierarchical equality WX, layer 1: 0.71–0.73 at size 1
    over 3 MLP seeds, where DAS at size 1 reaches 0.99); ``τ`` 5 → 0.1 with
    penalty 0.1 reaches 0.98–1.00 there, 0.59–0.73 at layer 2 (old 0.55–0.58;
    DAS's best 0.73–0.74: one seed of three still short), and equals the old
    defaults on SmolLM2 polarity.
    """

    method = "Boundless DAS"

    def __init__(
        self,
        lab: Lab,
        *,
        site: str,
        variables: str | Sequence[str] | None = None,
        positions: PositionSpec = None,
        init_boundary: float = 0.5,
        temperature: tuple[float, float] = (5.0, 0.1),
        boundary_penalty: float = 0.1,
        boundary_lr: float = 1e-2,
        **kwargs,
    ):
        super().__init__(lab, site=site, size=1, variables=variables, positions=positions, **kwargs)
        if self.init == "localist":
            raise ConfigError("Boundless DAS learns the size, so it has no localist start of its own; "
                              "give init=a Subspace (a localist or DAS result's) instead")
        if not (len(temperature) == 2 and temperature[0] > 0 and temperature[1] > 0):
            raise ConfigError(f"temperature={temperature!r}: expected (start, end), both > 0")
        self.init_boundary, self.temperature = init_boundary, tuple(float(t) for t in temperature)
        self.boundary_penalty, self.boundary_lr = float(boundary_penalty), float(boundary_lr)

    def resolve_sizes(self, variables: Sequence[str]) -> dict[str, int]:
        if len(variables) != 1:
            raise ConfigError(f"Boundless DAS aligns one variable at a time; got {list(variables)}")
        return {variables[0]: self.width()}

    def _starts(self, variables: Sequence[str], sizes: Mapping[str, int]) -> list[tuple[str, Tensor | None, int]]:
        return super()._starts(variables, {v: getattr(self.init, "size", 1) for v in variables})

    def _train(self, run_train: Runner, run_test: Runner, sizes: dict[str, int], starts: list[tuple[str, Tensor | None, int]], *,
               progress: bool | None = None, desc: str | None = None) -> tuple[list[Intervention], Curve, Selection]:
        """One run per start; each run's final hard subspace scored on training counterfactuals
        (intermediate states are not candidates: their size is still moving), the best reported."""
        rows = _eval_rows(len(run_train), self.selection_size, self.cfg.seed + 2)
        sel = Selection(self.objective.to_json(), self.select, [s[0] for s in starts], rows=int(rows.numel()))
        best = None
        for i, (_, init, seed) in enumerate(starts):
            hard, curve, start_iia = self._run(run_train, run_test, init, seed, rows, progress, desc or self.method)
            final = evaluate(run_train, [hard], rows=rows)["all"].value
            sel.start_iia.append(start_iia)
            sel.final_iia.append(final)
            sel.checks += 2
            if best is None or final > best[0]:
                best = (final, i, hard, curve)
        final, i, hard, curve = best
        sel.chosen_run, sel.chosen_step, sel.iia = i, len(curve.loss), final
        return [hard], curve, sel

    def _run(self, run_train: Runner, run_test: Runner, init: Tensor | None, seed: int, rows: Tensor, progress, desc: str):
        width = self.width()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            boundary = self.init_boundary if init is None else init.shape[0] / width
            iv = BoundlessSubspaceInterchange(self.site, width=width, init_boundary=boundary, temperature=self.temperature[0])
            if init is not None:  # the given rows first, completed to a rotation
                full = orthonormal_rows(torch.cat([init, torch.randn(width - init.shape[0], width)]).T)
                iv.rotation = Orthonormal(width, width, full)
        k0 = max(iv.size, 1)
        start_iia = evaluate(run_train, [SubspaceInterchange(self.site, size=k0, width=width, init=iv.rotation().detach()[:k0])],
                             rows=rows)["all"].value
        t0, t1 = self.temperature
        temps: list[float] = []

        def schedule(step: int, total: int) -> None:
            frac = step / max(total - 1, 1)
            iv.set_temperature(t0 * (t1 / t0) ** frac)
            temps.append(iv.temperature)

        groups = [
            {"params": list(iv.rotation.parameters()), "lr": self.cfg.lr},
            {"params": [iv.boundary], "lr": self.boundary_lr},
        ]

        def penalty() -> Tensor:
            return self.boundary_penalty * iv.boundary.clamp(0, 1)

        def record(curve: Curve) -> None:
            curve.size.append(iv.size)

        curve = train(run_train, [iv], self.cfg.with_seed(seed), evaluator=run_test, extra_loss=penalty, on_step=schedule,
                      on_epoch=record, groups=groups, loss=self.objective, progress=progress, desc=desc)
        curve.temperature = temps
        k = max(iv.size, 1)
        hard = SubspaceInterchange(self.site, size=k, width=width, init=iv.rotation().detach()[:k])
        return hard, curve, start_iia

    def _final_sizes(self, ivs, sizes: dict[str, int]) -> dict[str, int]:
        return {v: ivs[0].size for v in sizes}


def resolve_sizes(size: int | Mapping[str, int], variables: Sequence[str], site: str, width: int) -> dict[str, int]:
    """``{variable: size}``, checked to fit (disjointly) in ``width``."""
    if isinstance(size, Mapping):
        extra, missing = set(size) - set(variables), set(variables) - set(size)
        if extra or missing:
            raise ConfigError(f"size={dict(size)!r} must give a size for exactly the variables {list(variables)}")
        sizes = {v: size[v] for v in variables}
    else:
        sizes = {v: size for v in variables}
    for v, k in sizes.items():
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise SubspaceSizeError(f"size {k!r} for {v!r}: expected a positive int (the subspace dimension)")
    total = sum(sizes.values())
    if total > width:
        what = f"a subspace of size {total}" if len(sizes) == 1 else f"disjoint subspaces of sizes {sizes} ({total} in all)"
        verb = "does" if len(sizes) == 1 else "do"
        raise SubspaceSizeError(f"{what} {verb} not fit site {site!r} of width {width}; expected a total <= {width}")
    return sizes


def store_for(lab: Lab, datasets: Sequence[CounterfactualDataset], sites: Sequence[str]) -> ActivationStore:
    """One activation store over the distinct inputs of ``datasets`` (one encoder)."""
    seen: dict[tuple, int] = {}
    inputs = []
    for ds in datasets:
        for s in ds.table().inputs:
            k = tuple(sorted(s.items()))
            if k not in seen:
                seen[k] = len(inputs)
                inputs.append(s)
    return ActivationStore(lab, datasets[0].encoder, inputs, sites)


def _check_same_task(train: CounterfactualDataset, test: CounterfactualDataset) -> None:
    if test.causal_model is not train.causal_model or test.encoder is not train.encoder:
        if test.encoder.labels != train.encoder.labels or test.output != train.output:
            raise DataError("train and test datasets come from different tasks (causal model, encoder or labels differ)")
    if set(test.variables) != set(train.variables):
        raise DataError(f"the test data intervenes {list(test.variables)} but the training data {list(train.variables)}")
