"""Causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT").

Which hidden states carry a fact from its subject to the answer? For a prompt ``x``
with subject tokens ``S`` and answer token ``a``::

    clean        p*     = p(a | x)
    corrupted    p_     = p(a | x with e_s + ε_s for s in S),   ε_s ~ N(0, (ν σ)² I)
    restored     p(c,t) = the corrupted run, except component c at token t takes its clean value
    total effect TE = p* − p_          indirect effect IE(c, t) = p(c, t) − p_

``σ`` is the standard deviation of the subject tokens' embeddings (over the facts
traced) and ``ν = 3`` (the paper's choice). The components ``c``: the hidden state
leaving block ``L`` (``blocks.L.resid_post``), the MLP's output (``mlp.out``) and
attention's output (``attn.out``), and those two also over a window of ``w`` layers
``[L − w//2, L + w − w//2)`` restored together (the paper's Fig. 1 f, g: ``w = 10``).
Each example's corrupted run is averaged over ``samples`` noise draws, the same
draws in every restoration of that example.

Averages over facts use the paper's token classes (Fig. 2): first subject token,
middle subject tokens (each counted), last subject token, first subsequent token,
further tokens, last token; a class a prompt lacks is skipped for it (and the
first subsequent token can be the last token). The paper's two sites: an early
site, MLPs of the middle layers at the last subject token, and a late site, the
last token's hidden states in the upper layers.

Built on :func:`~steerlab.interventions.sweep`: facts with the same token length
and subject span form one batch, the noise is a base intervention (a seeded
:class:`~steerlab.interventions.Noise` at the subject's embeddings) in every
packed row, and the clean run of the same prompts is the source; every
component × token is one configuration of that one sweep.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

from steerlab.alignment.tasks.facts import Fact
from steerlab.interventions import metrics
from steerlab.interventions.errors import ConfigError, DataError
from steerlab.interventions.ops import Noise
from steerlab.interventions.sweeps import sweep

__all__ = ["trace", "noise_scale", "CausalTrace", "TOKEN_CLASSES", "KINDS"]

#: component -> its site at block ``L``
KINDS = {"hidden": "blocks.{}.resid_post", "mlp": "blocks.{}.mlp.out", "attn": "blocks.{}.attn.out"}
TOKEN_CLASSES = (
    "first subject token",
    "middle subject tokens",
    "last subject token",
    "first subsequent token",
    "further tokens",
    "last token",
)
_WINDOWED = ("mlp", "attn")


def _check(lab, facts, kinds, window, layers, samples, noise) -> tuple[list[Fact], list[int]]:
    if lab.tokenizer is None:
        raise DataError("causal tracing needs the lab's tokenizer: wrap(model, tokenizer)")
    facts = list(facts) if isinstance(facts, (list, tuple)) else None
    if not facts or not all(isinstance(f, Fact) for f in facts):
        raise DataError("facts: expected a non-empty list of Fact objects (steerlab.alignment.tasks.facts)")
    bad = [k for k in kinds if k not in KINDS]
    if not kinds or bad:
        raise ConfigError(f"kinds={list(kinds)!r}: expected some of {list(KINDS)}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ConfigError(f"window={window!r}: expected None or a positive number of layers (the paper: 10)")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ConfigError(f"samples={samples!r}: expected a positive number of noise draws per fact")
    if not (isinstance(noise, (int, float)) and noise > 0 and math.isfinite(noise)):
        raise ConfigError(f"noise={noise!r}: expected a positive multiple of the embeddings' std (the paper: 3)")
    n = lab.n_layers
    layers = list(range(n)) if layers is None else list(layers)
    if not layers or not all(isinstance(L, int) and not isinstance(L, bool) and 0 <= L < n for L in layers):
        raise ConfigError(f"layers={layers!r}: expected block indices in 0..{n - 1}")
    multi = [f for f in facts if len(lab.tokenizer(f.target, add_special_tokens=False).input_ids) != 1]
    if multi:
        raise DataError(f"{multi[0]!r}: its answer {multi[0].target!r} is not one token for this tokenizer")
    return facts, layers


def _encode(tokenizer, fact: Fact) -> tuple[list[int], list[int]]:
    ids = tokenizer(fact.prompt).input_ids
    return ids, fact.subject_tokens(tokenizer)


def noise_scale(lab, facts: Sequence[Fact]) -> float:
    """``σ``: the standard deviation of the subject tokens' embeddings over ``facts``
    (every coordinate of every subject token, pooled), as the paper computes it."""
    rows = []
    for f in facts:
        ids, subject = _encode(lab.tokenizer, f)
        cache = lab.collect({"input_ids": torch.tensor([ids], device=lab.device)}, "embed")
        rows.append(cache["embed"][0, subject])
    return float(torch.cat(rows).float().std())


def _entries(kinds, window: int | None, layers: list[int], n_layers: int) -> list[tuple[str, list[str]]]:
    """(grid name, sites restored together) for every component of every traced layer."""
    out = [(k, [KINDS[k].format(L)]) for k in kinds for L in layers]
    if window is not None and window > 1:
        for k in (k for k in kinds if k in _WINDOWED):
            for L in layers:
                lo, hi = max(0, L - window // 2), min(n_layers, L - (-window // 2))
                out.append((f"{k} window", [KINDS[k].format(i) for i in range(lo, hi)]))
    return out


@dataclass
class _Batch:
    """Facts of one token length and subject span: one sweep."""

    index: list[int]
    ids: list[list[int]]
    subject: list[int]


def _batches(lab, facts: list[Fact]) -> list[_Batch]:
    groups: dict[tuple, _Batch] = {}
    for i, f in enumerate(facts):
        ids, subject = _encode(lab.tokenizer, f)
        key = (len(ids), tuple(subject))
        b = groups.setdefault(key, _Batch([], [], subject))
        b.index.append(i)
        b.ids.append(ids)
    return [groups[k] for k in sorted(groups)]


def trace(
    lab,
    facts: Sequence[Fact],
    *,
    kinds: Sequence[str] = ("hidden", "mlp", "attn"),
    window: int | None = 10,
    layers: Sequence[int] | None = None,
    noise: float = 3.0,
    std: float | None = None,
    samples: int = 3,
    seed: int = 0,
    configs_per_forward: int | None = None,
    progress: bool = False,
) -> CausalTrace:
    """Trace ``facts`` (see the module docstring) at every token × each of ``layers``.

    ``kinds``: components restored alone (``"hidden"``, ``"mlp"``, ``"attn"``); with
    ``window`` (layers, default 10; ``None`` for none) the ``mlp`` and ``attn`` kinds are
    also restored over windows centred on each layer. ``noise``: the multiple of ``std``
    (default: :func:`noise_scale` of ``facts``) added to the subject's embeddings;
    ``samples`` noise draws per fact. The facts are traced in batches of one token length and
    subject span (sorted by length, then span); batch ``b``'s draws are those of
    ``Noise("embed", std=noise * std, seed=seed * 1_000_003 + b, positions=subject)`` on its
    prompts repeated ``samples`` times (rows: fact-major), the same in every restoration.
    """
    facts, layers = _check(lab, facts, kinds, window, layers, samples, noise)
    sigma = noise_scale(lab, facts) if std is None else float(std)
    entries = _entries(kinds, window, layers, lab.n_layers)
    grids = list(dict.fromkeys(name for name, _ in entries))
    n = len(facts)
    scores: dict[str, list[Tensor]] = {g: [torch.empty(0)] * n for g in grids}
    clean, corrupted = torch.empty(n), torch.empty(n)
    tokens: list[list[str]] = [[] for _ in facts]
    forwards = 0
    for b, batch in enumerate(_batches(lab, facts)):
        ids = torch.tensor(batch.ids, device=lab.device).repeat_interleave(samples, 0)  # rows: fact-major, then draw
        noisy = Noise("embed", std=noise * sigma, seed=seed * 1_000_003 + b, positions=batch.subject)
        metric = metrics.prob([facts[i].target for i in batch.index for _ in range(samples)], tokenizer=lab.tokenizer)
        res = sweep(
            lab, {"input_ids": ids}, {"input_ids": ids}, metric=metric, sites=[s for _, s in entries], positions="all",
            base_interventions=[noisy], configs_per_forward=configs_per_forward, progress=progress,
        )
        forwards += res.forwards
        row = {label: r for r, label in enumerate(res.sites)}  # equal groups are swept once
        per = res.per_example[[row["+".join(s)] for _, s in entries], :, 0]
        per = per.unflatten(-1, (len(batch.index), samples)).mean(-1)  # [entry, pos, fact]
        for j, i in enumerate(batch.index):
            clean[i] = res.source_metric[j * samples]
            corrupted[i] = res.base_metric[j * samples : (j + 1) * samples].mean()
            tokens[i] = [lab.tokenizer.decode([t]) for t in batch.ids[j]]
            for g in grids:
                rows = [e for e, (name, _) in enumerate(entries) if name == g]
                scores[g][i] = per[rows, :, j]
    return CausalTrace(
        facts=facts, tokens=tokens, subjects=[f.subject_tokens(lab.tokenizer) for f in facts], layers=layers,
        window=window, clean=clean, corrupted=corrupted, scores=scores, noise_std=noise * sigma, samples=samples,
        forwards=forwards,
    )


def _classes(subject: list[int], length: int) -> list[list[int]]:
    """Token indices of each of :data:`TOKEN_CLASSES` in one prompt."""
    first, last = subject[0], subject[-1]
    return [[first], list(range(first + 1, last)), [last], [last + 1] if last + 1 < length else [], list(range(last + 2, length - 1)), [length - 1]]


@dataclass
class CausalTrace:
    """Restored answer probabilities per fact, component × layer × token (see the module docstring)."""

    facts: list[Fact]
    tokens: list[list[str]]  # each prompt's tokens, decoded
    subjects: list[list[int]]  # each prompt's subject token indices
    layers: list[int]
    window: int | None
    clean: Float[Tensor, " fact"]  # p(answer), clean run
    corrupted: Float[Tensor, " fact"]  # p(answer), subject noised (mean over draws)
    scores: dict[str, list[Tensor]]  # kind -> per fact [layer, pos]: p(answer) restored
    noise_std: float
    samples: int
    forwards: int = 0  # packed forwards the sweeps took
    meta: dict = field(default_factory=dict)

    @property
    def kinds(self) -> list[str]:
        return list(self.scores)

    def _kind(self, kind: str) -> str:
        if kind not in self.scores:
            raise ConfigError(f"kind={kind!r}: this trace holds {self.kinds}")
        return kind

    @property
    def total_effect(self) -> Float[Tensor, " fact"]:
        return self.clean - self.corrupted

    @property
    def ate(self) -> float:
        """The average total effect: mean of ``p* − p_`` over facts."""
        return float(self.total_effect.mean())

    def indirect_effects(self, kind: str) -> list[Float[Tensor, "layer pos"]]:
        """Per fact, ``p(c, t) − p_`` for each traced layer × token."""
        return [s - c for s, c in zip(self.scores[self._kind(kind)], self.corrupted, strict=True)]

    def average(self, kind: str) -> Float[Tensor, "token_class layer"]:
        """The average indirect effect per token class (:data:`TOKEN_CLASSES`) and layer."""
        pools: list[list[Tensor]] = [[] for _ in TOKEN_CLASSES]
        for ie, subject in zip(self.indirect_effects(kind), self.subjects, strict=True):
            for pool, idx in zip(pools, _classes(subject, ie.shape[1]), strict=True):
                pool += [ie[:, t] for t in idx]
        nan = torch.full((len(self.layers),), math.nan)
        return torch.stack([torch.stack(p).mean(0) if p else nan for p in pools])

    def peak(self, kind: str, token_class: str) -> tuple[int, float]:
        """``(layer, AIE)`` where ``kind``'s average indirect effect at ``token_class`` is largest."""
        if token_class not in TOKEN_CLASSES:
            raise ConfigError(f"token_class={token_class!r}: expected one of {TOKEN_CLASSES}")
        row = self.average(kind)[TOKEN_CLASSES.index(token_class)]
        i = int(row.nan_to_num(-math.inf).argmax())
        return self.layers[i], float(row[i])

    def sites(self) -> dict[str, tuple[str, int, float]]:
        """The paper's two sites as measured here: ``{"early": (kind, layer, AIE), "late": ...}``:
        the MLP (windowed if traced) at the last subject token, and the hidden state at the last token."""
        mlp = "mlp window" if "mlp window" in self.scores else "mlp"
        out = {}
        if mlp in self.scores:
            out["early"] = (mlp, *self.peak(mlp, "last subject token"))
        if "hidden" in self.scores:
            out["late"] = ("hidden", *self.peak("hidden", "last token"))
        return out

    def table(self, kind: str | None = None, *, digits: int = 3) -> str:
        """Average indirect effect, rows = layers, columns = token classes (one block per kind)."""
        out = [f"{len(self.facts)} facts, {self.samples} noise draws each (std {self.noise_std:.4g}); "
               f"p(answer) clean {float(self.clean.mean()):.3f}, corrupted {float(self.corrupted.mean()):.3f}, ATE {self.ate:.3f}"]
        short = ["first subj", "mid subj", "last subj", "first after", "further", "last"]
        for k in [kind] if kind is not None else self.kinds:
            grid = self.average(k)
            out.append(f"AIE, {k}:")
            out.append(f"{'layer':>5} " + " ".join(f"{c:>11}" for c in short))
            for j, L in enumerate(self.layers):
                out.append(f"{L:>5} " + " ".join(f"{float(grid[c, j]):>11.{digits}f}" for c in range(len(short))))
        return "\n".join(out)

    def __repr__(self) -> str:
        found = "; ".join(f"{k}: {kind} layer {L} AIE {v:.3f}" for k, (kind, L, v) in self.sites().items())
        return f"CausalTrace({len(self.facts)} facts, kinds {self.kinds}, ATE {self.ate:.3f}; {found})"

    def plot(self, kind: str | None = None, *, fact: int | None = None, **kwargs):
        """Heatmaps (:func:`steerlab.viz.causal_trace`): average indirect effect per token class × layer
        for each kind (or ``kind``), or one fact's restored probability per token × layer (``fact=i``)."""
        from steerlab.viz import causal_trace

        return causal_trace(self, kind=kind, fact=fact, **kwargs)
