"""Activation-patching sweeps, packed: many patch configurations per forward.

``sweep(lab, base, source, sites=..., positions=..., heads=..., metric=...)``
patches the source run's value into the base run at one configuration at a
time, a configuration being a site and one position slot (layer × position)
or a site and one head (layer × head), and reports the metric of each
patched run. It equals the serial loop ::

    for site, p in configs:
        metric(lab.run(base, [Interchange(site, positions=p, source=source)]), base)

computed with far fewer forwards:

* **Packing.** ``C`` configurations share a forward: the base batch is
  repeated ``C`` times (copy-major, rows ``c*B .. c*B+B-1`` belong to
  configuration ``c``), and at each site one intervention patches, per row,
  that row's positions (a per-row ``LongTensor[rows, k]``, ``-1`` where the row
  patches elsewhere) and, for head sweeps, that row's head (a per-row mask).
  Gather, scatter and the head mask are vectorised over rows.
* **Prefix reuse.** The residual stream entering every layer where a chunk
  starts is collected once in the unpatched base run; a chunk whose earliest
  site is in layer ``L`` resumes from it (:class:`~steerlab.interventions.prefix.Prefix`,
  repeated ``C`` times) and runs only blocks ``L ..``.
* **Sources once.** The source values at every swept site are collected in
  one source forward, which also gives the source ("clean") metric.

Positions count real tokens (``0`` first, ``-1`` last) on each side
separately, whatever the padding side. A slot beyond an example's length
(``positions="all"`` over examples of different lengths) patches nothing
there: its per-example value is NaN and ``SweepResult.filled`` is ``False`` (means skip
it; a NaN the metric itself returns in a patched cell stays a NaN in the mean).

Two generalisations keep the same contract:

* **Site groups.** An entry of ``sites`` may be a list of names, patched
  together as one configuration (as a position group is): ROME's 10-layer
  windows are ``[[f"blocks.{l}.mlp.out" for l in window] ...]``.
* **Base interventions.** ``base_interventions`` act in the base run and in
  every patched run, so the base is itself intervened (causal tracing: noise
  at the subject's embeddings, with the clean run as the source); each
  configuration equals ``lab.run(base, [*base_interventions, Interchange(...)])``.
  In a packed forward each of the ``C`` copies of the base gets its own call
  of the intervention on its ``B`` rows, so a seeded :class:`~steerlab.interventions.ops.Noise`
  draws the same noise in every copy as in the base run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, no_type_check

import torch
from torch import Tensor

from steerlab.interventions.errors import BatchMismatch, ConfigError, ShapeMismatch, SourceError, UnitError, checked_first
from steerlab.interventions.graph import SourceValue
from steerlab.interventions.lab import Lab
from steerlab.interventions.inputs import Inputs, ModelInputs, check_inputs
from steerlab.interventions.metrics import Metric, as_metric
from steerlab.interventions.ops import Collect, Intervention
from steerlab.interventions.prefix import Prefix
from steerlab.interventions.progress import track
from steerlab.interventions.sites import ResolvedSite
from steerlab.interventions.sweep_result import SweepResult
from steerlab.interventions.units import MaskInfo, Positions, PositionSpec

__all__ = ["sweep", "SweepResult"]

#: the most tokens in one packed forward when ``configs_per_forward`` is not
#: given (its logits, ``rows × seq × vocab``, bound its memory), by device type
AUTO_TOKENS = {"cpu": 1024}
AUTO_TOKENS_ACCELERATOR = 8192
#: a block call's fixed cost in "token · d_model²" units: one more forward costs
#: as much as ``OVERHEAD / d_model²`` more tokens (measured: SmolLM2 on a CPU core;
#: kernel launches make it ~100x larger on a GPU)
OVERHEAD = {"cpu": 1e7}
OVERHEAD_ACCELERATOR = 1e9
_NONE = 1 << 30  # padding of the slot table: never a real position


class _Default:
    def __repr__(self) -> str:
        return "'all' (for a head sweep: None)"


_DEFAULT = _Default()  # positions: "all" for a site sweep, None (every position at once) for a head sweep


class _RowPatch(Intervention):
    """Interchange with per-row positions (from the placement) and an optional per-row head mask."""

    sourced = True

    def __init__(self, site: str, positions: Tensor, source: SourceValue, mask: Tensor | None):
        super().__init__(site, positions=positions, source=source)
        self.mask = mask  # [rows, 1, head, 1] bool, or None: every head

    def forward(self, base: Tensor, source: Tensor | None = None) -> Tensor:
        source = self.require_source(source)
        src = source.to(base.dtype)
        return src if self.mask is None else torch.where(self.mask, src, base)


class _Tiled(Intervention):
    """A base intervention in a packed forward of ``copies`` × its batch: the wrapped
    intervention is called once per copy, on that copy's rows, exactly as in the base run."""

    def __init__(self, inner: Intervention, copies: int):
        pos = inner.positions
        positions = pos.tensor.repeat(copies, 1) if pos.kind == "tensor" and pos.tensor is not None else pos
        src = inner.source
        if isinstance(src, SourceValue):  # per-example values and slots: one copy per packed copy
            tile = lambda t: t if t is None or t.shape[0] == 1 else t.repeat(copies, *([1] * (t.dim() - 1)))  # noqa: E731
            src = SourceValue(tile(src.value), tile(src.valid))
        super().__init__(inner.site, positions=positions, heads=inner.heads, dims=inner.dims)
        self.sourced = inner.sourced  # instance attribute: the engine asks each intervention
        self.source, self.source_positions, self.source_site = src, inner.source_positions, inner.source_site
        self.inner, self.copies = inner, copies

    def forward(self, base: Tensor, source: Tensor | None = None) -> Tensor:
        parts = base.chunk(self.copies)
        if source is None:
            return torch.cat([self.inner(p) for p in parts])
        srcs = source.chunk(self.copies) if source.shape[0] == base.shape[0] else [source] * self.copies
        return torch.cat([self.inner(p, s) for p, s in zip(parts, srcs, strict=True)])


@dataclass
class _Plan:
    """Everything validated before compute."""

    sites: list[ResolvedSite]  # every swept site once
    groups: list[tuple[int, ...]]  # each configuration's sites (indices into ``sites``)
    starts: list[int]  # per group: the first block its value depends on
    slots: list[tuple[int, ...] | None]  # None: every position at once
    heads: list[int] | None
    base: Inputs
    source: Inputs
    base_info: MaskInfo
    source_info: MaskInfo
    metric: Metric
    per_forward: int | None  # None: chosen by cost (see _chunks)
    base_interventions: list[Intervention]
    #: blocks whose input a base intervention edits: a prefix there would hold the edit
    #: already and the live edit would apply it twice, so a chunk resumes one block lower
    edited_inputs: set[int] = field(default_factory=set)

    def start(self, chunk) -> int:
        s = min(self.starts[c[0]] for c in chunk)
        while s in self.edited_inputs:
            s -= 1
        return max(s, 0)

    @property
    def configs(self) -> list[tuple[int, int, int]]:
        heads = self.heads if self.heads is not None else [-1]
        return [(s, q, h) for s in range(len(self.groups)) for q in range(len(self.slots)) for h in range(len(heads))]

    def label(self, g: int) -> str:
        return "+".join(self.sites[i].name for i in self.groups[g])


def _sites(lab, sites) -> tuple[list[ResolvedSite], list[tuple[int, ...]]]:
    """The swept sites (each once) and the configurations' groups of them: a pattern entry
    gives one group per site it names, a list entry one group of every site its patterns name."""
    entries = [sites] if isinstance(sites, str) else list(sites) if isinstance(sites, (list, tuple)) else None
    ok = lambda e: isinstance(e, str) or (isinstance(e, (list, tuple)) and e and all(isinstance(p, str) for p in e))  # noqa: E731
    if not entries or not all(ok(e) for e in entries):
        raise ConfigError(
            f"sites={sites!r}: expected a site name or pattern ('blocks.*.resid_post'), or a list whose entries "
            "are names or patterns or lists of them (a group of sites patched together)"
        )
    out: dict[str, ResolvedSite] = {}
    groups: list[tuple[int, ...]] = []
    names = [name for e in entries for p in ([e] if isinstance(e, str) else e) for name in lab.facts.expand(p)]
    lab.facts.probe([lab.resolve(name) for name in dict.fromkeys(names)])  # every site's shape in one probe forward

    @no_type_check  # a closure made per call: the suite's runtime checker would decorate it on every call
    def add(name: str) -> int:
        site = lab.resolve(name)
        if site.name not in out:
            if not lab.facts.has_positions(site):
                raise UnitError(
                    f"site {site.name!r} has no position axis (its value is [batch, width]); "
                    "a patching sweep needs [batch, pos, ...]"
                )
            out[site.name] = site
        return list(out).index(site.name)

    for e in entries:
        if isinstance(e, str):
            groups += [(add(name),) for name in lab.facts.expand(e)]
        else:
            groups.append(tuple(dict.fromkeys(add(name) for p in e for name in lab.facts.expand(p))))
    return list(out.values()), list(dict.fromkeys(groups))


def _heads(lab, sites: list[ResolvedSite], heads) -> list[int] | None:
    if heads is None:
        return None
    flat = [s for s in sites if not s.n_heads]
    if flat:
        raise UnitError(
            f"heads={heads!r} sweeps heads, but {flat[0].name!r} is not a per-head site; "
            "head sweeps take attn.q|k|v|z sites (e.g. sites='blocks.*.attn.z')"
        )
    counts = {s.n_heads for s in sites}
    if len(counts) > 1:
        raise UnitError(f"the swept sites have different head counts {sorted(counts)}; sweep attn.q/z and attn.k/v separately")
    n = counts.pop()
    if isinstance(heads, str) and heads == "all":
        return list(range(n))
    hs = [heads] if isinstance(heads, int) and not isinstance(heads, bool) else heads
    if not isinstance(hs, (list, tuple, range)) or not hs or not all(isinstance(h, int) and not isinstance(h, bool) for h in hs):
        raise UnitError(f"heads={heads!r}: expected 'all', an int or a list of ints")
    bad = [h for h in hs if not 0 <= h < n]
    if bad:
        raise UnitError(f"heads={bad} out of range: the swept sites have {n} heads (0..{n - 1})")
    return list(hs)


def _check_positions(positions: object) -> None:
    """A sweep's ``positions`` as written: 'all', None, a spec like 'l5', an int, or a list of positions
    and groups of positions."""
    if positions is None or positions is _DEFAULT:
        return
    if isinstance(positions, str):
        if positions != "all" and Positions(positions).kind != "firstlast":  # Positions raises on a malformed spec
            raise UnitError(f"positions={positions!r}: expected 'all', None, a spec like 'l5' or 'f3+l3', or a list")
    elif isinstance(positions, (list, tuple, range)) and positions:
        for p in positions:
            if not (_is_int(p) or (isinstance(p, (list, tuple)) and p and all(_is_int(x) for x in p))):
                raise UnitError(f"positions={positions!r}: each entry is a position (int) or a group of positions (list of ints)")
    elif not _is_int(positions):
        raise UnitError(f"positions={positions!r}: expected 'all', None, an int, a list of ints (or of groups) or a spec like 'l5'")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_base_interventions(ivs: object) -> None:
    if not isinstance(ivs, Intervention) and (not isinstance(ivs, (list, tuple)) or not all(isinstance(iv, Intervention) for iv in ivs)):
        raise ConfigError(f"base_interventions={ivs!r:.80}: expected a list of Intervention objects")


def position_slots(positions, base_info: MaskInfo, source_info: MaskInfo) -> list[tuple[int, ...] | None]:
    """One slot per swept position (or group of positions patched together): the ``positions``
    grammar of :func:`sweep` (and of attribution), checked against both batches' real tokens."""
    nb, ns = base_info.host_lengths(), source_info.host_lengths()
    if positions is None or (isinstance(positions, str) and positions == "all"):
        if nb != ns:
            raise ShapeMismatch(
                f"positions={positions!r} aligns base and source token by token, but their real lengths differ "
                f"(base {nb}, source {ns}); give positions= explicitly (e.g. [-1] or [0, -2, -1])"
            )
        if positions is None:
            return [None]
        return [(p,) for p in range(max(nb))]
    _check_positions(positions)
    if isinstance(positions, str):
        spec = Positions(positions)
        slots: list = [(p,) for p in range(spec.first)] + [(p,) for p in range(-spec.last, 0)]
    elif isinstance(positions, int):
        slots = [(positions,)]
    else:
        slots = [(p,) if isinstance(p, int) else tuple(p) for p in positions]
    flat = [p for s in slots for p in s]
    Positions(flat).validate(base_info, "positions")
    Positions(flat).validate(source_info, "positions (in the source)")
    return slots


def _per_forward(configs_per_forward) -> int | None:
    if configs_per_forward is None:
        return None
    if isinstance(configs_per_forward, bool) or not isinstance(configs_per_forward, int) or configs_per_forward < 1:
        raise ConfigError(f"configs_per_forward={configs_per_forward!r}: expected a positive int")
    return configs_per_forward


def _chunks(plan: _Plan, lab) -> list[list[tuple[int, int, int]]]:
    """Split the configurations into packed forwards.

    Given ``configs_per_forward``: consecutive runs of that many. Otherwise by
    cost: a forward from layer ``s`` with ``r`` rows of ``T`` tokens costs about
    ``(L - s) * (overhead + r * T)`` (``overhead`` in tokens, see ``OVERHEAD``),
    so configurations whose patches start high are packed apart from those
    that start low when that saves more compute than the extra forwards cost.
    The minimum over splits of the start-sorted configurations (dynamic programming).
    """
    configs = plan.configs
    if plan.per_forward is not None:
        return [configs[i : i + plan.per_forward] for i in range(0, len(configs), plan.per_forward)]
    dev = lab.device.type
    tokens = plan.base_info.batch * plan.base_info.seq
    cap = max(1, AUTO_TOKENS.get(dev, AUTO_TOKENS_ACCELERATOR) // tokens)
    overhead = OVERHEAD.get(dev, OVERHEAD_ACCELERATOR) / (lab.d_model or 512) ** 2
    L = lab.n_layers if lab.facts.has_layers else 1
    start = (lambda c: plan.starts[c[0]]) if lab.facts.has_layers else (lambda c: 0)
    order = sorted(configs, key=start)  # stable: site-major within a start layer
    depth = [L - start(c) for c in order]
    best = [0.0] + [math.inf] * len(order)
    cut = [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        for i in range(max(0, j - cap), j):  # chunk order[i:j] runs from order[i]'s layer up
            cost = best[i] + depth[i] * (overhead + (j - i) * tokens)
            if cost < best[j]:
                best[j], cut[j] = cost, i
    chunks, j = [], len(order)
    while j > 0:
        chunks.append(order[cut[j] : j])
        j = cut[j]
    return chunks[::-1]


def _base_interventions(lab, ivs, batch: int) -> list[Intervention]:
    """Check ``base_interventions``: sourceless, or reading a :class:`SourceValue` of the base's batch (or 1)."""
    _check_base_interventions(ivs)
    out = [ivs] if isinstance(ivs, Intervention) else list(ivs)
    for iv in out:
        src = iv.source
        if iv.sourced and not isinstance(src, SourceValue):
            raise SourceError(
                f"base_interventions: {type(iv).__name__} at {iv.site!r} reads from {src!r:.60}; a base intervention "
                "acts in every packed row, so a sourced one needs a precomputed SourceValue (lab.source_value(iv))"
            )
        if isinstance(src, SourceValue) and src.value.shape[0] not in (1, batch):
            raise BatchMismatch(f"base_interventions: the SourceValue at {iv.site!r} has batch {src.value.shape[0]}; expected {batch} or 1")
        lab.prepare(iv)
    return out


def _plan(lab, base, source, sites, positions, heads, metric, configs_per_forward, base_interventions=()) -> _Plan:
    m = as_metric(metric)
    if m.tokenizer is None:
        m = m.bind(lab)  # resolves token strings now, before any compute
    b = lab.facts.inputs(base)
    s = lab.facts.inputs(source)
    if s.batch not in (1, b.batch):
        raise BatchMismatch(
            f"the source has batch {s.batch} but the base has {b.batch}; expected equal batches (or a source of 1, broadcast)"
        )
    if s.batch != b.batch:
        s = s.repeat(b.batch)  # one source for every example: its metric is per example too
    rs, groups = _sites(lab, sites)
    hs = _heads(lab, rs, heads)
    bi, si = b.mask_info(), s.mask_info()
    slots = position_slots(positions, bi, si)
    starts = [min(rs[i].layer if rs[i].layer is not None else 0 for i in g) for g in groups]
    ivs = _base_interventions(lab, base_interventions, b.batch)
    blocks = list(lab.layers) if lab.facts.has_layers else []
    edited = {i for iv in ivs for i, blk in enumerate(blocks) if (r := lab.resolve(iv.site)).module is blk and r.port.io == "input"}
    return _Plan(rs, groups, starts, slots, hs, b, s, bi, si, m, _per_forward(configs_per_forward), ivs, edited)


def _slot_table(plan: _Plan, device) -> Tensor:
    """``[slot, k]`` real-token positions, padded with a value that is never valid."""
    full = max(plan.base_info.host_lengths())
    rows = [list(range(full)) if s is None else list(s) for s in plan.slots]
    k = max(len(r) for r in rows)
    return torch.tensor([r + [_NONE] * (k - len(r)) for r in rows], dtype=torch.long, device=device)


def _real(p: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """Real-token indices (negative counted from the end) and whether each exists."""
    r = torch.where(p < 0, p + lengths[:, None], p)
    return r, (p != _NONE) & (r >= 0) & (r < lengths[:, None])


def _chunk_interventions(plan: _Plan, chunk: list[tuple[int, int, int]], table: Tensor, values: dict[str, Tensor]):
    """One :class:`_RowPatch` per site in ``chunk``; and which (config, example) cells patch nothing."""
    dev = table.device
    B = plan.base_info.batch
    cfg = torch.tensor(chunk, dtype=torch.long, device=dev)  # [c, (site, slot, head)]
    row_cfg = cfg.repeat_interleave(B, dim=0)  # rows c*B + i
    ex = torch.arange(B, device=dev).repeat(len(chunk))
    p = table[row_cfg[:, 1]]  # [rows, k]
    base_real, base_ok = _real(p, plan.base_info.lengths.to(dev)[ex])
    src_real, src_ok = _real(p, plan.source_info.lengths.to(dev)[ex])
    ok = base_ok & src_ok
    src_idx = (plan.source_info.starts.to(dev)[ex][:, None] + src_real).clamp(0, plan.source_info.seq - 1)
    ivs = []
    member = torch.zeros(len(plan.groups), len(plan.sites), dtype=torch.bool)
    for g, sites in enumerate(plan.groups):
        member[g, list(sites)] = True
    member = member.to(dev)
    for s in sorted({i for c in chunk for i in plan.groups[c[0]]}):
        site = plan.sites[s]
        here = member[row_cfg[:, 0], s][:, None] & ok
        pos = torch.where(here, base_real, torch.full_like(base_real, -1))
        src = values[site.name][ex[:, None], src_idx]  # [rows, k, ...]
        mask = None
        if plan.heads is not None:
            head_ids = torch.tensor(plan.heads, device=dev)[row_cfg[:, 2]]
            mask = torch.nn.functional.one_hot(head_ids, site.n_heads).bool()[:, None, :, None]
        ivs.append(_RowPatch(site.name, pos.cpu() if dev.type == "cpu" else pos, SourceValue(src), mask))
    empty = ~ok.any(1).view(len(chunk), B)
    return ivs, empty


def _check_metric(v, rows: int, name: str) -> Tensor:
    if not isinstance(v, Tensor) or v.shape != (rows,):
        got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
        raise ShapeMismatch(f"the metric {name!r} returned {got}; expected one value per example, shape ({rows},)")
    return v.detach().float()


def _model_kwargs(lab) -> dict:
    return lab.facts.no_cache


def _logit_window(lab, plan: _Plan, metric: Metric) -> int | None:
    """How many final padded positions hold every logit ``metric`` reads, when the model
    can compute only those (``logits_to_keep``); None: all. The LM head is a large part of
    a small model's forward (SmolLM2: a 49k-word vocabulary, ~7 blocks' worth per token)."""
    if metric.tail is None or not lab.facts.takes("logits_to_keep"):
        return None
    info = plan.base_info
    first = int((info.starts + info.lengths - metric.tail).min())  # the earliest padded index read
    return info.seq - max(first, 0)


def _tail(inputs: Inputs, window: int) -> Inputs:
    """``inputs`` cut to their last ``window`` positions (what the kept logits line up with)."""
    seq = inputs.seq
    cut = lambda v: v[:, -window:] if isinstance(v, Tensor) and v.dim() == 2 and v.shape[1] == seq else v  # noqa: E731
    return Inputs(tuple(cut(a) for a in inputs.args), {k: cut(v) for k, v in inputs.kwargs.items()})


def _base_and_source(lab, plan: _Plan, starts: set[int]):
    """The unpatched runs: base metric and the residual entering each chunk's first layer;
    source metric and the source value at every swept site."""
    kw = _model_kwargs(lab)
    pre = [Collect(f"blocks.{L}.resid_pre", name=f"pre{L}") for L in sorted(starts) if L > 0]
    b = lab.run(plan.base, [*plan.base_interventions, *pre], **kw)
    metric = plan.metric.against(b.output, plan.base)
    base_metric = _check_metric(metric(b.output, plan.base), plan.base_info.batch, metric.name)
    s = lab.run(plan.source, [Collect(site.name) for site in plan.sites], **kw)
    source_metric = _check_metric(metric(s.output, plan.source), plan.base_info.batch, metric.name)
    prefixes = {L: Prefix(L, b.cache[f"pre{L}"], lab.facts.tuple_len) for L in starts if L > 0}
    return metric, base_metric, source_metric, {site.name: s.cache[site.name] for site in plan.sites}, prefixes


@checked_first(base=check_inputs, source=check_inputs, metric=as_metric, positions=_check_positions, base_interventions=_check_base_interventions)
def sweep(
    lab: Lab,
    base: ModelInputs,
    source: ModelInputs,
    *,
    metric: Metric | Callable[[Any, Inputs], Tensor],
    sites: str | Sequence[str | Sequence[str]] = "blocks.*.resid_post",
    positions: PositionSpec | Sequence[int | Sequence[int]] | _Default = _DEFAULT,
    heads: Literal["all"] | int | Sequence[int] | None = None,
    base_interventions: Sequence[Intervention] | Intervention = (),
    configs_per_forward: int | None = None,
    progress: bool | None = None,
) -> SweepResult:
    """Patch ``source`` into ``base`` at each configuration; the metric of each patched run.

    ``sites``: a name, a pattern (``"blocks.*.attn.out"``) or a list of them;
    an entry that is itself a list is one group of sites patched together.
    ``positions``: ``"all"`` (each real position in turn), a list whose entries
    are positions or groups of positions patched together (``[0, [3, 4], -1]``),
    a spec (``"l5"``: the last five in turn), or ``None`` (all positions at
    once). ``heads``: ``None`` (whole site), ``"all"`` or a list: a layer × head
    sweep at per-head sites (``attn.z``), each head at ``positions`` (default
    there: every position at once). ``metric``: a :mod:`~steerlab.interventions.metrics`
    metric or ``fn(output, inputs) -> Float[Tensor, "batch"]`` (``inputs``: an
    :class:`~steerlab.interventions.inputs.Inputs`, ``inputs.mask_info()`` says
    where each row's real tokens are; a packed batch repeats the examples).
    ``base_interventions``: interventions applied in the base run and in every
    patched run, before the patch (sourceless, or reading a :class:`SourceValue`);
    ``base_metric`` is then the intervened base's (causal tracing's corrupted run).
    ``configs_per_forward``: configurations packed into one forward (default:
    chosen by cost, at most ``AUTO_TOKENS`` tokens per forward; see :func:`_chunks`).
    ``progress``: a bar over the packed forwards (default: when the output is a
    terminal or a notebook; see :mod:`steerlab.interventions.progress`).
    """
    if positions is _DEFAULT:
        positions = "all" if heads is None else None
    plan = _plan(lab, base, source, sites, positions, heads, metric, configs_per_forward, base_interventions)
    chunks = _chunks(plan, lab)
    starts = {plan.start(ch) for ch in chunks} if lab.facts.has_layers else set()
    with torch.no_grad():
        metric, base_metric, source_metric, values, prefixes = _base_and_source(lab, plan, starts)
        grid, filled = _run_chunks(lab, plan, chunks, metric, values, prefixes, progress)
    return SweepResult(
        per_example=grid,
        filled=filled,
        base_metric=base_metric.cpu(),
        source_metric=source_metric.cpu(),
        sites=[plan.label(g) for g in range(len(plan.groups))],
        layers=[_group_layer(plan, g) for g in range(len(plan.groups))],
        positions=[None if s is None else list(s) for s in plan.slots],
        tokens=_labels(lab, plan),
        heads=plan.heads,
        metric=metric.name,
        forwards=len(chunks),
        configs_per_forward=max(len(c) for c in chunks),
    )


def _run_chunks(lab, plan: _Plan, chunks, metric: Metric, values: dict, prefixes: dict, progress: bool | None) -> tuple[Tensor, Tensor]:
    """The packed forwards; the per-example metric grid ``[site, slot, head, example]`` and which
    of its cells were patched (``False``: the slot lies beyond that example's length)."""
    configs = plan.configs
    index = {c: i for i, c in enumerate(configs)}
    table = _slot_table(plan, lab.device)
    B = plan.base_info.batch
    out = torch.full((len(configs), B), math.nan)  # in the order of plan.configs
    filled = torch.zeros(len(configs), B, dtype=torch.bool)  # a cell beyond an example's length stays empty
    window = _logit_window(lab, plan, metric)
    kwargs = {**_model_kwargs(lab), **({"logits_to_keep": window} if window else {})}
    for chunk in track(chunks, desc="patching sweep", unit="forward", progress=progress):
        ivs, empty = _chunk_interventions(plan, chunk, table, values)
        ivs = [_Tiled(iv, len(chunk)) for iv in plan.base_interventions] + ivs  # edits run in order: the patch last
        start = plan.start(chunk)
        prefix = prefixes[start].repeat(len(chunk)) if start in prefixes else None
        packed = plan.base.repeat(len(chunk))
        res = lab.run(packed, ivs, prefix=prefix, **kwargs)
        seen = _tail(packed, window) if window else packed
        v = _check_metric(metric(res.output, seen), len(chunk) * B, metric.name).view(len(chunk), B).cpu()
        rows = [index[c] for c in chunk]
        out[rows] = v.masked_fill(empty.cpu(), math.nan)
        filled[rows] = ~empty.cpu()
    n_heads = len(plan.heads) if plan.heads is not None else 1
    shape = (len(plan.groups), len(plan.slots), n_heads, B)
    return out.view(shape), filled.view(shape)


def _group_layer(plan: _Plan, g: int) -> int | None:
    layers = {plan.sites[i].layer for i in plan.groups[g]}
    return layers.pop() if len(layers) == 1 else None


def _labels(lab, plan: _Plan) -> list[str]:
    return slot_labels(lab.tokenizer, plan.base, plan.base_info, plan.slots)


def slot_labels(tok, base: Inputs, info: MaskInfo, slots: Sequence[Sequence[int] | None]) -> list[str]:
    """One label per slot: the token there in the longest base example (shared by sweeps and attribution)."""
    lengths = info.host_lengths()
    ref = lengths.index(max(lengths))
    ids = base.kwargs.get("input_ids")
    start = int(info.starts[ref])

    def one(p: int) -> str:
        r = p + lengths[ref] if p < 0 else p
        if ids is None or tok is None or not 0 <= r < lengths[ref]:
            return str(p)
        return tok.decode([int(ids[ref, start + r])])

    def label(slot: Sequence[int] | None) -> str:
        if slot is None:
            return "all"
        contiguous = all(b == a + 1 for a, b in zip(slot, slot[1:], strict=False))
        return ("" if contiguous else "+").join(one(p) for p in slot)

    return [label(s) for s in slots]
