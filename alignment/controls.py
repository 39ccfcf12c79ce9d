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
  method chose it.
"""

from __future__ import annotations

import copy
import itertools
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from jaxtyping import Bool
from torch import Tensor, nn

from steerlab.alignment._activations import Runner
from steerlab.alignment.iia import IIA, evaluate_iia
from steerlab.interventions.errors import ConfigError
from steerlab.interventions.lab import Lab, wrap
from steerlab.interventions.ops import Interchange

__all__ = ["random_init_lab", "reinitialise", "localist_alignment", "LocalistAlignment", "count_assignments"]


def reinitialise(model: nn.Module, *, seed: int = 0) -> nn.Module:
    """Re-initialise ``model``'s weights in place, as at construction (Hugging Face
    models through their own ``_init_weights``; other modules through each
    submodule's ``reset_parameters``). The global RNG is left as it was."""
    before = [p.detach().clone() for p in model.parameters()]
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        init = getattr(model, "_init_weights", None)
        for m in model.modules():
            if callable(init):
                init(m)
            elif m is not model and hasattr(m, "reset_parameters"):
                m.reset_parameters()
        if not callable(init) and hasattr(model, "reset_parameters"):
            model.reset_parameters()
    changed = any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    if not changed:
        raise ConfigError(f"could not re-initialise {type(model).__name__}: none of its modules has reset_parameters()")
    return model


def random_init_lab(lab: Lab, *, seed: int = 0) -> Lab:
    """A :class:`Lab` over a re-initialised copy of ``lab``'s model (the original is untouched)."""
    model = reinitialise(copy.deepcopy(lab.model), seed=seed)
    return wrap(model, lab.tokenizer, example_input=lab.facts.example_input)


def count_assignments(width: int, sizes: Mapping[str, int]) -> int:
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
    dims: dict[str, list[int]]
    iia: dict[str, IIA]
    method: str
    selection_iia: float


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
    return LocalistAlignment(dims, iia, method, float(score[best]))


def _score(runner: Runner, rows: Tensor, masks: Bool[Tensor, "c vars d"], max_rows: int) -> Tensor:
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
