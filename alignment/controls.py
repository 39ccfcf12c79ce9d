"""Controls that every DAS number needs beside it.

* **Random initialisation** (:func:`random_init_lab`): the same architecture
  with freshly initialised weights. A network that computes nothing should
  not yield a high IIA; if it does, the alignment method, not the model, is
  doing the work.
* **Localist alignment** (:func:`localist_alignment`): the best *neuron-aligned*
  alignment of the same size — each variable gets its own set of the site's
  coordinates, interchanged with ``Interchange(site, dims=...)``. Every
  disjoint assignment is tried when there are at most ``limit`` of them,
  otherwise ``samples`` random ones; the best on a selection split of the
  training data is reported on the test data, and the result says which
  method chose it (and a sampled search says so in its table column).
* **The full-vector interchange** (:func:`full_vector_bound`): swapping the
  whole vector at the site and positions. It moves *everything* the site
  carries, so it bounds a subspace interchange of ``V`` only on counterfactuals
  where moving the variables the site may carry beside ``V`` (its side
  variables, :meth:`CausalModel.side_variables`) from the same source asks for
  the same output as moving ``V`` alone: there, a subspace edit that beats the
  whole vector suggests an interpretability illusion. The bound is computed on
  those examples only, and the DAS IIA beside it on the same examples.
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
import itertools
import math
import random
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Bool
from torch import Tensor, nn

from steerlab.alignment._activations import Runner
from steerlab.alignment.counterfactuals import CounterfactualDataset
from steerlab.alignment.iia import IIA, evaluate_iia
from steerlab.interventions.errors import ConfigError
from steerlab.interventions.lab import Lab, wrap
from steerlab.interventions.ops import Interchange

__all__ = [
    "random_init",
    "RandomInit",
    "random_init_lab",
    "reinitialise",
    "localist_alignment",
    "LocalistAlignment",
    "count_assignments",
    "bound_rows",
    "full_vector_bound",
]


def reinitialise(model: nn.Module, *, seed: int = 0, modules: Sequence[str] | None = None) -> nn.Module:
    """Re-initialise ``model``'s weights in place, as at construction (Hugging Face
    models through their own ``_init_weights``; other modules through each
    submodule's ``reset_parameters``). The global RNG is left as it was.

    ``modules``: dotted paths of the submodules to re-initialise, each with
    everything inside it (``fnmatch`` patterns allowed, ``""`` is the model
    itself); default: the whole model. Raises :class:`ConfigError` when a path
    matches no submodule or when no parameter changed.
    """
    chosen = _matching_modules(model, modules)
    inside = {id(m) for path in chosen for m in model.get_submodule(path).modules()}
    params = [p for m in model.modules() if id(m) in inside for p in m.parameters(recurse=False)]
    before = [p.detach().clone() for p in params]
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        init = getattr(model, "_init_weights", None)
        for m in model.modules():
            if id(m) not in inside:
                continue
            if callable(init):
                init(m)
            elif hasattr(m, "reset_parameters"):
                m.reset_parameters()
    changed = any(not torch.equal(a, p) for a, p in zip(before, params))
    if not changed:
        raise ConfigError(f"could not re-initialise {type(model).__name__}{_where(modules)}: none of the modules there has "
                          "reset_parameters() (or an _init_weights that changes it)")
    return model


def _where(modules) -> str:
    return "" if modules is None else f" (modules {list(modules)})"


def _matching_modules(model: nn.Module, modules: Sequence[str] | None) -> list[str]:
    """Module paths for ``modules`` (outermost only: a path inside another chosen one is dropped)."""
    if modules is None:
        return [""]
    if isinstance(modules, str):
        modules = [modules]
    names = [n for n, _ in model.named_modules()]
    out: list[str] = []
    for pat in modules:
        hit = [n for n in names if n == pat or (pat and fnmatch.fnmatchcase(n, pat))]
        if not hit:
            close = difflib.get_close_matches(pat, names, n=3)
            raise ConfigError(f"random-init scope: no submodule matches {pat!r}" + (f"; did you mean {close}?" if close else ""))
        out += [n for n in hit if n not in out]
    return [n for n in out if not any(o != n and (o == "" or n.startswith(o + ".")) for o in out)]


@dataclass
class RandomInit:
    """A re-initialised copy of a lab's model, and what was re-initialised."""

    lab: Lab
    scope: str | list[str]
    modules: list[str]
    description: str


def random_init(lab: Lab, *, seed: int = 0, scope: str | Sequence[str] = "all") -> RandomInit:
    """A :class:`Lab` over a copy of ``lab``'s model with part of it re-initialised (the original is untouched).

    ``scope``: ``"all"`` (every module), ``"trained"`` (the modules holding
    parameters that were trainable in the model as given to ``wrap``: a model
    with frozen parts keeps them), or a list of module paths / ``fnmatch``
    patterns (e.g. ``["layers.0", "layers.1"]``, ``["model.layers.1[0-5]"]``).
    The result's ``description`` is what a report prints beside the control.
    """
    model = lab.model
    if scope == "all":
        paths, what = None, "all modules"
    elif scope == "trained":
        owners = sorted({n.rpartition(".")[0] for n in lab.trained_parameters()})
        if not owners:
            raise ConfigError("random-init scope 'trained': no parameter of the model was trainable when it was wrapped")
        paths, what = owners, f"the {len(owners)} modules with trained parameters"
    elif isinstance(scope, str) or not all(isinstance(x, str) for x in scope):
        raise ConfigError(f"random-init scope {scope!r}: expected 'all', 'trained' or a list of module paths")
    else:
        paths = list(scope)
        what = f"modules {', '.join(paths)}"
    chosen = _matching_modules(model, paths)
    copy_ = reinitialise(copy.deepcopy(model), seed=seed, modules=paths)
    n_params = sum(p.numel() for path in chosen for p in copy_.get_submodule(path).parameters())
    total = sum(p.numel() for p in copy_.parameters())
    description = f"{what} re-initialised ({n_params:,d} of {total:,d} parameters; seed {seed})"
    rlab = wrap(copy_, lab.tokenizer, example_input=lab.facts.example_input)
    return RandomInit(rlab, scope if isinstance(scope, str) else list(scope), chosen, description)


def random_init_lab(lab: Lab, *, seed: int = 0, scope: str | Sequence[str] = "all") -> Lab:
    """The :class:`Lab` of :func:`random_init` (the original model is untouched)."""
    return random_init(lab, seed=seed, scope=scope).lab


def count_assignments(width: int, sizes: Mapping[Hashable, int]) -> int:
    """Ordered disjoint choices of ``sizes[v]`` coordinates per variable out of ``width``."""
    out, left = 1, width
    for k in sizes.values():
        out *= math.comb(left, k)
        left -= k
    return out


def _assignments(width: int, sizes: list[int], limit: int, samples: int, seed: int) -> tuple[list[list[tuple[int, ...]]], str]:
    total = count_assignments(width, dict(enumerate(sizes)))
    spec = ", ".join(str(k) for k in sizes)
    if total <= limit:
        out: list[list[tuple[int, ...]]] = [[]]
        for k in sizes:
            out = [a + [c] for a in out for c in itertools.combinations([d for d in range(width) if not any(d in x for x in a)], k)]
        return out, f"exhaustive: all {total} disjoint neuron assignments (sizes {spec} of {width})"
    rng = random.Random(seed)
    picks, seen = [], set()
    for _ in range(samples * 20):
        if len(picks) == samples:
            break
        perm = rng.sample(range(width), sum(sizes))
        a, i = [], 0
        for k in sizes:
            a.append(tuple(sorted(perm[i : i + k])))
            i += k
        if tuple(a) not in seen:
            seen.add(tuple(a))
            picks.append(a)
    return picks, f"best of {len(picks)} sampled neuron subsets (sizes {spec} of {width}; {total:.3g} possible; seed {seed})"


@dataclass
class LocalistAlignment:
    """The chosen neuron assignment (``dims``), its test IIA, how it was searched
    (``method``), and every candidate tried with its accuracy on the selection rows."""

    dims: dict[str, list[int]]
    iia: dict[str, IIA]
    method: str
    selection_iia: float
    candidates: list[list[tuple[int, ...]]] = field(default_factory=list)
    scores: Tensor | None = None
    selection_rows: Tensor | None = None

    @property
    def exhaustive(self) -> bool:
        return self.method.startswith("exhaustive")


def localist_alignment(
    select: Runner,
    test: Runner,
    sizes: Mapping[str, int],
    width: int,
    *,
    limit: int = 20_000,
    samples: int = 64,
    selection_size: int = 512,
    seed: int = 0,
    max_rows: int = 65_536,
) -> LocalistAlignment:
    """The best neuron-aligned alignment of ``sizes`` (see the module docstring).

    Candidates are scored on up to ``selection_size`` examples of ``select``,
    packing as many candidates into one forward as ``max_rows`` allows (a
    localist interchange is a full-vector interchange with a source that
    equals the base outside the chosen coordinates). The winner is evaluated
    on ``test`` with one ``Interchange(site, dims=...)`` per variable.
    """
    variables = list(select.table.variables)
    cands, method = _assignments(width, [sizes[v] for v in variables], limit, samples, seed)
    n = len(select)
    g = torch.Generator().manual_seed(seed + 2)
    rows = torch.arange(n) if n <= selection_size else torch.randperm(n, generator=g)[:selection_size].sort().values
    masks = torch.zeros(len(cands), len(variables), width, dtype=torch.bool)
    for c, a in enumerate(cands):
        for j, dims in enumerate(a):
            masks[c, j, list(dims)] = True
    score = _score(select, rows, masks, max_rows)
    best = int(score.argmax())
    dims = {v: list(cands[best][j]) for j, v in enumerate(variables)}
    ivs = [Interchange(test.site, dims=dims[v]) for v in variables]
    t = test.table

    def predict(r: Tensor) -> Tensor:
        return test.run(r, ivs, [test.source_slice(r, j)[..., dims[v]] for j, v in enumerate(variables)])

    iia = evaluate_iia(predict, t.labels, t.intervened, t.variables)
    return LocalistAlignment(dims, iia, method, float(score[best]), cands, score, rows)


def _score(runner: Runner, rows: Tensor, masks: Bool[Tensor, "candidate var width"], max_rows: int) -> Tensor:
    """Selection accuracy of every candidate mask (packed into as few forwards as fit)."""
    t = runner.table
    base = runner.base_slice(rows)  # [b, (k,) d]
    srcs = [runner.source_slice(rows, j) for j in range(len(t.variables))]
    on = t.intervened[rows].to(base.dtype)  # [b, vars]
    labels = t.labels[rows]
    b = rows.shape[0]
    per = max(1, max_rows // b)
    iv = Interchange(runner.site)
    out = torch.empty(masks.shape[0])
    mid = (1,) * (base.dim() - 2)
    with torch.no_grad():
        for a in range(0, masks.shape[0], per):
            m = masks[a : a + per].to(base.dtype)  # [c, vars, d]
            c = m.shape[0]
            mixed = base.unsqueeze(0).expand(c, *base.shape).clone()
            for j, s in enumerate(srcs):
                w = m[:, j].view(c, 1, *mid, -1) * on[:, j].view(1, b, *mid, 1)
                mixed = mixed + w * (s - base).unsqueeze(0)
            scores = runner.run(rows, [iv], [mixed.reshape(c * b, *base.shape[1:])], repeat=c)
            correct = scores.argmax(-1).cpu().view(c, b) == labels.unsqueeze(0)
            out[a : a + c] = correct.float().mean(1)
    return out


def bound_rows(dataset: CounterfactualDataset, variable: str) -> Tensor:
    """Examples of ``dataset`` on which the full-vector interchange bounds ``variable``'s.

    The examples that intervene ``variable`` alone and whose counterfactual label
    does not change when every side variable of ``variable`` (the variables
    neither upstream nor downstream of it, which the site may carry beside it)
    is taken from the same source too. On the others the whole vector asks the
    network for another answer than ``variable`` does, so it bounds nothing.
    """
    cm, out = dataset.causal_model, dataset.output
    side = cm.side_variables(variable)
    keep = []
    for i, ex in enumerate(dataset.examples):
        if tuple(ex.sources) != (variable,):
            continue
        src = ex.sources[variable]
        joint = cm.interchange(ex.base, {u: src for u in (variable, *side)})[out] if side else ex.label
        if joint == ex.label:
            keep.append(i)
    return torch.tensor(keep, dtype=torch.long)


def full_vector_bound(runner: Runner, dataset: CounterfactualDataset, *, batch_size: int = 256) -> dict[str, tuple[IIA, Tensor]]:
    """Per variable: the full-vector interchange's IIA on its :func:`bound_rows`, and those rows.

    A variable none of whose examples qualifies is left out (nothing bounds it there).
    """
    t = runner.table
    iv = Interchange(runner.site)
    out: dict[str, tuple[IIA, Tensor]] = {}
    for j, v in enumerate(t.variables):
        rows = bound_rows(dataset, v)
        if rows.numel() == 0:
            continue
        res = evaluate_iia(
            lambda r, j=j: runner.run(r, [iv], [runner.source_slice(r, j)]),
            t.labels, t.intervened, t.variables, rows=rows, batch_size=batch_size,
        )
        out[v] = (res["all"], rows)
    return out
