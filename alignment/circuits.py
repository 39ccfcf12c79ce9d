"""Circuits of attention heads: path patching and faithfulness under mean ablation.

**Path patching** (Wang et al. 2022, App. B; Goldowsky-Dill et al. 2023). For a sender
head ``h`` and receivers ``R``, on clean inputs ``x`` and corrupted inputs ``x'`` with the
same token layout (IOI's ABC prompts)::

    sender run    the clean run, head h's output (attn.z) taken from x', every other head
                  frozen at its clean output; MLPs and norms recomputed
    receivers R = the logits:        the sender run's output is measured
    receivers R = heads' q/k/v:      a receiver run, the clean run except R's inputs (at
                                     their positions) taken from the sender run, is measured
    effect(h)   = metric(measured) − metric(clean)        relative: effect / mean metric(clean)

so only the paths ``h → R`` (through MLPs, not through other heads) carry ``x'``'s value.
Senders are packed ``C`` per forward (rows ``c·B .. c·B+B−1`` patch sender ``c``): each
layer's ``attn.z`` is replaced by one precomputed value, the clean one with the sender's
head from ``x'`` in that sender's rows, and a forward that needs no layer below its
lowest sender resumes from the clean run's residual stream there.

**Faithfulness** (Wang et al. 2022, §4). Every head outside a circuit ``C`` is mean-ablated:
its output replaced, at every position, by its mean over the corrupted prompts of the
same group (IOI: the same template, so the same positions), and
``faithfulness = mean F(C) / mean F(M)`` with ``F`` the metric and ``M`` the whole model.
Circuit heads keep their own outputs at every position (the paper keeps them only at the
positions of their class; keeping all is the more lenient reading). Random circuits of
the same size are the control.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

from steerlab.interventions.errors import BatchMismatch, ConfigError, ShapeMismatch, UnitError
from steerlab.interventions.graph import Graph, SourceValue
from steerlab.interventions.inputs import Inputs
from steerlab.interventions.metrics import Metric, as_metric
from steerlab.interventions.ops import Interchange
from steerlab.interventions.prefix import Prefix

__all__ = ["Head", "Receiver", "Circuit", "path_patching", "PathPatching", "faithfulness", "Faithfulness", "head_means"]

Head = tuple[int, int]  # (layer, head)

#: tokens per packed forward (rows × sequence), by device type
_TOKENS = {"cpu": 1024}
_TOKENS_ACCELERATOR = 8192


@dataclass(frozen=True)
class Receiver:
    """Where a sender's effect must arrive: the input ``kind`` (``"q"``, ``"k"`` or ``"v"``) of
    ``heads`` of block ``layer``, at ``positions`` (real-token indices: an int, or one per
    example as a ``LongTensor[batch]``)."""

    layer: int
    heads: tuple[int, ...]
    kind: str = "q"
    positions: int | Tensor = -1

    @property
    def site(self) -> str:
        return f"blocks.{self.layer}.attn.{self.kind}"

    def __repr__(self) -> str:
        pos = self.positions if isinstance(self.positions, int) else "per-example"
        return f"Receiver({self.site}, heads={list(self.heads)}, positions={pos})"


@dataclass(frozen=True)
class Circuit:
    """A set of attention heads, ``(layer, head)`` pairs."""

    heads: frozenset[Head]
    name: str = "circuit"

    @staticmethod
    def of(heads: Iterable[Head], name: str = "circuit") -> Circuit:
        return Circuit(frozenset((int(L), int(h)) for L, h in heads), name)

    def __len__(self) -> int:
        return len(self.heads)

    def __or__(self, other: Circuit) -> Circuit:
        return Circuit(self.heads | other.heads, f"{self.name} + {other.name}")

    def by_layer(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for L, h in sorted(self.heads):
            out.setdefault(L, []).append(h)
        return out

    def __repr__(self) -> str:
        return f"Circuit({self.name!r}, {len(self)} heads: {', '.join(f'{L}.{h}' for L, h in sorted(self.heads))})"


# -- shared checks -------------------------------------------------------------------------


def _layout(lab, clean, corrupt) -> tuple[Inputs, Inputs]:
    """Both inputs, checked to share their batch and token layout (path patching aligns them position by position)."""
    a = lab.facts.inputs(clean)
    b = lab.facts.inputs(corrupt)
    if a.batch != b.batch:
        raise BatchMismatch(f"clean has {a.batch} examples and corrupt {b.batch}; expected one corrupted prompt per clean one")
    ia, ib = a.mask_info(), b.mask_info()
    if ia.seq != ib.seq or not (torch.equal(ia.starts, ib.starts) and torch.equal(ia.lengths, ib.lengths)):
        raise ShapeMismatch(
            "clean and corrupt must have the same token layout (the same lengths and padding), so that each "
            "position of one is the same role in the other; IOI's ABC prompts do"
        )
    return a, b


def _head_count(lab) -> int:
    return lab.resolve("blocks.0.attn.z").n_heads


def _heads(lab, heads, what: str) -> list[Head]:
    n, H = lab.n_layers, _head_count(lab)
    if isinstance(heads, str) and heads == "all":
        return [(L, h) for L in range(n) for h in range(H)]
    items = list(heads) if isinstance(heads, (list, tuple, set, frozenset, Circuit)) else None
    if isinstance(heads, Circuit):
        items = sorted(heads.heads)
    ok = items is not None and all(
        isinstance(x, (tuple, list)) and len(x) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in x) for x in items
    )
    if not ok or not items:
        raise ConfigError(f"{what}={heads!r:.80}: expected 'all' or a non-empty list of (layer, head) pairs")
    bad = [x for x in items if not (0 <= x[0] < n and 0 <= x[1] < H)]
    if bad:
        raise UnitError(f"{what}: {bad[:3]} out of range; the model has {n} layers x {H} heads")
    return sorted({(int(L), int(h)) for L, h in items})


def _metric(lab, metric) -> Metric:
    m = as_metric(metric)
    return m.bind(lab) if m.tokenizer is None and lab.tokenizer is not None and hasattr(m, "ids") else m


def _check_metric(v, rows: int) -> Tensor:
    if not isinstance(v, Tensor) or v.shape != (rows,):
        got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
        raise ShapeMismatch(f"the metric returned {got}; expected one value per example, shape ({rows},)")
    return v.detach().float().cpu()


class _Measure:
    """Runs that end in the metric: only the last ``tail`` logits when every row ends at the last column."""

    def __init__(self, lab, metric: Metric, inputs: Inputs):
        info = inputs.mask_info()
        ends = bool((info.starts + info.lengths == info.seq).all())
        self.keep = metric.tail if ends and metric.tail is not None and lab.facts.is_hf else None
        self.kwargs = {**lab.facts.no_cache, **({"logits_to_keep": self.keep} if self.keep else {})}
        self.metric = metric

    def __call__(self, output, inputs: Inputs, rows: int) -> Tensor:
        return _check_metric(self.metric(output, None if self.keep else inputs), rows)


def _positions(spec, info, what: str) -> Tensor:
    """Real-token positions ``[batch]`` (an int for all, or one each), checked and counted from the start."""
    B = info.batch
    if isinstance(spec, int) and not isinstance(spec, bool):
        p = torch.full((B,), spec, dtype=torch.long)
    elif isinstance(spec, Tensor) and spec.dim() == 1 and spec.shape[0] == B and not spec.is_floating_point():
        p = spec.long().cpu()
    else:
        raise UnitError(f"{what}={spec!r:.60}: expected an int or a LongTensor[{B}] of real-token indices")
    lengths = info.lengths.cpu()
    real = torch.where(p < 0, p + lengths, p)
    if bool(((real < 0) | (real >= lengths)).any()):
        raise UnitError(f"{what}: a position is outside its example (lengths {lengths.tolist()[:8]})")
    return real


# -- path patching -----------------------------------------------------------------------


def _receivers(lab, receivers, B: int, info) -> list[tuple[Receiver, Tensor]]:
    out = []
    for r in receivers:
        if not isinstance(r, Receiver):
            raise ConfigError(f"receivers: expected Receiver objects (or None for the logits); got {type(r).__name__}")
        if r.kind not in ("q", "k", "v"):
            raise ConfigError(f"{r!r}: kind must be 'q', 'k' or 'v'")
        site = lab.resolve(r.site)
        bad = [h for h in r.heads if not 0 <= h < site.n_heads]
        if not r.heads or bad:
            raise UnitError(f"{r!r}: heads must be a non-empty subset of 0..{site.n_heads - 1}")
        out.append((r, _positions(r.positions, info, f"{r!r} positions")))
    return out


def path_patching(
    lab,
    clean,
    corrupt,
    *,
    metric,
    senders="all",
    receivers: Sequence[Receiver] | None = None,
    sender_positions: int | Tensor | None = None,
    configs_per_forward: int | None = None,
    progress: bool = False,
) -> PathPatching:
    """The effect of each sender head's path to ``receivers`` (see the module docstring).

    ``senders``: ``"all"`` or a list of ``(layer, head)``; ``receivers``: ``None`` (the
    logits) or :class:`Receiver` s, every sender below the lowest receiver's layer.
    ``sender_positions``: where a sender's output is corrupted (default: every position).
    ``metric``: per example, e.g. ``sl.metrics.logit_diff(io_ids, s_ids)``.
    """
    a, b = _layout(lab, clean, corrupt)
    info = a.mask_info()
    B, n = a.batch, lab.n_layers
    send = _heads(lab, senders, "senders")
    recv = _receivers(lab, receivers or [], B, info)
    top = min((r.layer for r, _ in recv), default=n)
    if send[-1][0] >= top:
        raise ConfigError(f"sender {send[-1]} is not below the lowest receiver layer {top}: it cannot reach that receiver")
    where = None if sender_positions is None else info.starts.cpu() + _positions(sender_positions, info, "sender_positions")
    if isinstance(configs_per_forward, bool) or not (configs_per_forward is None or (isinstance(configs_per_forward, int) and configs_per_forward > 0)):
        raise ConfigError(f"configs_per_forward={configs_per_forward!r}: expected a positive int")
    m = _metric(lab, metric)
    measure = _Measure(lab, m, a)
    layers = sorted({L for L, _ in send})
    with torch.no_grad():
        prefixes, cache = lab.prefixes(a, sorted(set(layers) | ({top} if recv else set())), sites=[f"blocks.{L}.attn.z" for L in range(layers[0], top)])
        z_clean = {L: cache[f"blocks.{L}.attn.z"] for L in range(layers[0], top)}
        z_bad = lab.collect(b, [f"blocks.{L}.attn.z" for L in layers])
        clean_metric = measure(lab.run(a, **measure.kwargs).output, a, B)
        corrupt_metric = measure(lab.run(b, **measure.kwargs).output, b, B)
        C = configs_per_forward or max(1, _TOKENS.get(lab.device.type, _TOKENS_ACCELERATOR) // (B * info.seq))
        chunks = [send[i : i + C] for i in range(0, len(send), C)]
        if progress:
            from tqdm.auto import tqdm

            chunks = tqdm(chunks, desc="path patching", unit="forward")
        out = []
        for chunk in chunks:
            freeze = _freeze(chunk, z_clean, z_bad, range(chunk[0][0], top), B, where)
            out.append(_run_chunk(lab, a, chunk, freeze, recv, prefixes, top, measure))
    return PathPatching(
        senders=send, per_example=torch.cat(out).view(len(send), B), clean_metric=clean_metric, corrupt_metric=corrupt_metric,
        n_layers=n, n_heads=_head_count(lab), receivers=[repr(r) for r, _ in recv] or ["logits"], metric=m.name,
        forwards=len(chunks) * (2 if recv else 1),
    )


def _freeze(chunk: list[Head], z_clean: dict, z_bad, layers, B: int, where: Tensor | None) -> list[Interchange]:
    """Per layer, the whole attn.z replaced: clean everywhere, the sender's head from the corrupted run in its rows."""
    C = len(chunk)
    ivs = []
    for L in layers:
        value = z_clean[L].repeat(C, *([1] * (z_clean[L].dim() - 1)))  # [C*B, seq, head, d_head]
        for c, (sl, h) in enumerate(chunk):
            if sl != L:
                continue
            rows = slice(c * B, (c + 1) * B)
            bad = z_bad[f"blocks.{L}.attn.z"]
            if where is None:
                value[rows, :, h] = bad[:, :, h]
            else:
                i = torch.arange(B, device=value.device)
                value[rows][i, where.to(value.device), h] = bad[i, where.to(value.device), h]
        ivs.append(Interchange(f"blocks.{L}.attn.z", source=SourceValue(value)))
    return ivs


def _run_chunk(lab, a: Inputs, chunk, freeze, recv, prefixes: dict[int, Prefix], top: int, measure: _Measure) -> Tensor:
    C, B = len(chunk), a.batch
    packed = a.repeat(C)
    if not recv:  # the sender run is measured; below its lowest sender it is the clean run
        low = chunk[0][0]
        prefix = prefixes[low].repeat(C) if low > 0 else None
        return measure(lab.run(packed, freeze, prefix=prefix, **measure.kwargs).output, packed, C * B)
    g = Graph()
    sender = g.run(packed, freeze, name="sender")
    patches = [
        Interchange(r.site, heads=list(r.heads), positions=pos.repeat(C)[:, None], source=sender) for r, pos in recv
    ]
    receiver = g.run(packed, patches, name="receiver", output=True)
    res = lab.execute(g, prefix=prefixes[top].repeat(C) if top > 0 else None, **measure.kwargs)
    return measure(res[receiver].output, packed, C * B)


@dataclass
class PathPatching:
    """Per sender head, the metric when only its path to the receivers is corrupted."""

    senders: list[Head]
    per_example: Float[Tensor, "sender batch"]
    clean_metric: Float[Tensor, " batch"]
    corrupt_metric: Float[Tensor, " batch"]
    n_layers: int
    n_heads: int
    receivers: list[str]
    metric: str = "metric"
    forwards: int = 0
    meta: dict = field(default_factory=dict)

    @property
    def clean_value(self) -> float:
        return float(self.clean_metric.mean())

    def _grid(self, v: Tensor) -> Float[Tensor, "layer head"]:
        g = torch.full((self.n_layers, self.n_heads), math.nan)
        for (L, h), x in zip(self.senders, v, strict=True):
            g[L, h] = x
        return g

    @property
    def effect(self) -> Float[Tensor, "layer head"]:
        """``mean(metric patched) − mean(metric clean)`` per head (NaN where not a sender)."""
        return self._grid((self.per_example - self.clean_metric).mean(-1))

    @property
    def relative(self) -> Float[Tensor, "layer head"]:
        """The effect as a share of the clean metric (the paper's ΔF / F)."""
        return self.effect / self.clean_value

    @property
    def se(self) -> Float[Tensor, "layer head"]:
        """Standard error of each head's effect over examples."""
        d = self.per_example - self.clean_metric
        return self._grid(d.std(-1) / math.sqrt(d.shape[-1]))

    def top(self, k: int = 5, *, sign: int = -1) -> list[tuple[Head, float]]:
        """The ``k`` heads whose relative effect is most negative (``sign=-1``: they carry the
        clean behaviour) or most positive (``sign=1``)."""
        rel = self.relative
        vals = [(h, float(rel[h])) for h in self.senders]
        return sorted(vals, key=lambda x: sign * -x[1])[:k]

    def heads(self, threshold: float, *, sign: int = -1) -> list[Head]:
        """Heads whose relative effect is beyond ``threshold`` in the direction ``sign`` (``-1``: below ``-threshold``)."""
        rel = self.relative
        return [h for h in self.senders if sign * float(rel[h]) > threshold]

    def table(self, k: int = 10) -> str:
        out = [f"path patching to {', '.join(self.receivers)}: {self.metric}, clean {self.clean_value:.3f}, corrupted {float(self.corrupt_metric.mean()):.3f}"]
        out.append(f"{'head':>6} {'effect':>9} {'relative':>9} {'se':>7}")
        for (L, h), rel in self.top(k) + self.top(min(3, k), sign=1):
            out.append(f"{L:>3}.{h:<2} {float(self.effect[L, h]):>9.3f} {rel:>9.1%} {float(self.se[L, h]):>7.3f}")
        return "\n".join(out)

    def __repr__(self) -> str:
        (L, h), v = self.top(1)[0]
        return f"PathPatching({len(self.senders)} senders -> {', '.join(self.receivers)}; strongest {L}.{h} {v:.1%})"

    def plot(self, **kwargs):
        """A layer × head heatmap of the relative effect (:func:`steerlab.viz.path_patching_heatmap`)."""
        from steerlab.viz import path_patching_heatmap

        return path_patching_heatmap(self, **kwargs)


# -- faithfulness ------------------------------------------------------------------------


def head_means(lab, corrupt, *, groups: Tensor | None = None) -> dict[int, Float[Tensor, "batch pos head d_head"]]:
    """Per layer, each example's mean-ablation value of every head: the mean of ``attn.z`` over
    the corrupted examples of its group (``groups``: a ``LongTensor[batch]``, default one
    group), position by position (a group's examples must share their token layout)."""
    b = lab.facts.inputs(corrupt)
    B = b.batch
    g = torch.zeros(B, dtype=torch.long) if groups is None else groups
    if not isinstance(g, Tensor) or g.shape != (B,) or g.is_floating_point():
        raise ConfigError(f"groups: expected a LongTensor[{B}] (one group id per example)")
    info = b.mask_info()
    for k in g.unique():
        rows = (g == k).nonzero()[:, 0]
        if not (bool((info.starts[rows] == info.starts[rows[0]]).all()) and bool((info.lengths[rows] == info.lengths[rows[0]]).all())):
            raise ShapeMismatch(f"group {int(k)}: its examples have different token layouts; a mean is taken position by position")
    cache = lab.collect(b, "blocks.*.attn.z")
    _, inv = g.unique(return_inverse=True)
    out = {}
    for L in range(lab.n_layers):
        z = cache[f"blocks.{L}.attn.z"]
        sums = torch.zeros((int(inv.max()) + 1, *z.shape[1:]), dtype=z.dtype, device=z.device).index_add_(0, inv.to(z.device), z)
        counts = torch.bincount(inv, minlength=sums.shape[0]).to(z.device, z.dtype)
        out[L] = (sums / counts.view(-1, *([1] * (z.dim() - 1))))[inv.to(z.device)]
    return out


def _ablated(lab, a: Inputs, keep: frozenset[Head], means: dict, measure: _Measure, H: int) -> Tensor:
    ivs = []
    for L, mean in means.items():
        drop = [h for h in range(H) if (L, h) not in keep]
        if drop:
            ivs.append(Interchange(f"blocks.{L}.attn.z", heads=drop, source=SourceValue(mean[:, :, drop])))
    with torch.no_grad():
        return measure(lab.run(a, ivs, **measure.kwargs).output, a, a.batch)


def faithfulness(
    lab, circuit: Circuit | Iterable[Head], clean, corrupt, *, metric, groups: Tensor | None = None, random_circuits: int = 10, seed: int = 0
) -> Faithfulness:
    """``F(circuit) / F(model)`` under mean ablation of every other head (see the module
    docstring), beside ``random_circuits`` random head sets of the same size and the
    empty circuit (every head ablated)."""
    a, b = _layout(lab, clean, corrupt)
    circ = circuit if isinstance(circuit, Circuit) else Circuit.of(circuit)
    _heads(lab, sorted(circ.heads), "circuit")
    if isinstance(random_circuits, bool) or not isinstance(random_circuits, int) or random_circuits < 0:
        raise ConfigError(f"random_circuits={random_circuits!r}: expected a non-negative int")
    H = _head_count(lab)
    m = _metric(lab, metric)
    measure = _Measure(lab, m, a)
    with torch.no_grad():
        means = head_means(lab, b, groups=groups)
        full = measure(lab.run(a, **measure.kwargs).output, a, a.batch)
    kept = _ablated(lab, a, circ.heads, means, measure, H)
    empty = _ablated(lab, a, frozenset(), means, measure, H)
    everyone = [(L, h) for L in range(lab.n_layers) for h in range(H)]
    rng = random.Random(seed)
    controls = [Circuit.of(rng.sample(everyone, len(circ)), f"random {i}") for i in range(random_circuits)]
    randoms = [_ablated(lab, a, c.heads, means, measure, H) for c in controls]
    return Faithfulness(circ, full, kept, empty, controls, randoms, m.name)


@dataclass
class Faithfulness:
    """The metric with only a circuit's heads left un-ablated, beside the whole model, no head, and random circuits."""

    circuit: Circuit
    full: Float[Tensor, " batch"]  # F(M) per example
    kept: Float[Tensor, " batch"]  # F(C)
    empty: Float[Tensor, " batch"]  # F(∅): every head mean-ablated
    random_circuits: list[Circuit]
    random: list[Tensor]  # F(R) per random circuit
    metric: str = "metric"

    @property
    def score(self) -> float:
        """``mean F(C) / mean F(M)``: the share of the metric the circuit alone recovers."""
        return float(self.kept.mean() / self.full.mean())

    @property
    def se(self) -> float:
        """Standard error of :attr:`score` over examples (the full model's mean held fixed)."""
        return float(self.kept.std() / math.sqrt(len(self.kept)) / self.full.mean())

    @property
    def random_scores(self) -> list[float]:
        return [float(r.mean() / self.full.mean()) for r in self.random]

    @property
    def empty_score(self) -> float:
        return float(self.empty.mean() / self.full.mean())

    def table(self) -> str:
        rs = self.random_scores
        rows = [
            f"{self.metric}: model {float(self.full.mean()):.3f}",
            f"{self.circuit.name} ({len(self.circuit)} heads): {float(self.kept.mean()):.3f} -> faithfulness {self.score:.1%} ± {self.se:.1%}",
            f"no head: {float(self.empty.mean()):.3f} -> {self.empty_score:.1%}",
        ]
        if rs:
            rows.append(
                f"{len(rs)} random circuits of {len(self.circuit)} heads: mean {sum(rs) / len(rs):.1%}, "
                f"best {max(rs):.1%}, worst {min(rs):.1%}"
            )
        return "\n".join(rows)

    def __repr__(self) -> str:
        return f"Faithfulness({self.circuit.name!r}: {self.score:.1%}; random best {max(self.random_scores, default=math.nan):.1%})"

    def plot(self, **kwargs):
        """The circuit's score beside the random circuits' and the empty circuit's (:func:`steerlab.viz.faithfulness_chart`)."""
        from steerlab.viz import faithfulness_chart

        return faithfulness_chart(self, **kwargs)
