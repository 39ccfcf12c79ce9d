"""Attribution patching (AtP; Nanda 2023) and AtP* (Kramár et al. 2024): every patch's effect, estimated.

Activation patching measures ``metric(base with a ← a_source) − metric(base)``
for one configuration per forward. Attribution patching estimates all of them
from one base forward + backward and one source forward, to first order::

    effect(site, slot, unit) ≈ Σ_{positions in slot} (a_source − a_base) · ∂metric/∂a      (at the base)

summed over the unit's features: a whole site (layers × positions), one head
of a per-head site (``heads=``: layers × heads, through ``attn.z``), or one
feature (``neurons=``: layers × neurons, e.g. at ``mlp.post``). The axes and
the slot grammar are those of :func:`~steerlab.interventions.sweeps.sweep`, and
the result is a :class:`~steerlab.interventions.attribution_result.AttributionResult`
(a ``SweepResult`` whose values are ``base + estimate``), so
``patching_heatmap`` draws both and they compare cell by cell.

AtP*'s corrections, as options:

* ``qk_fix=True`` — at ``attn.q``/``attn.k`` sites the softmax is recomputed
  exactly (:mod:`~steerlab.interventions.attention_pattern`): saturated
  attention no longer hides a query or key patch. Cost: a few ``[batch, head,
  pos, pos]`` products per layer, no extra forward.
* ``grad_drop=True`` — GradDrop: one extra backward pass per layer ``l`` with
  the gradient through layer ``l``'s residual contributions (``attn.out``,
  ``mlp.out``) set to zero; each cell also gets the score
  ``mean_l |estimate without layer l|`` (the paper's ``1/(L−1) Σ_l``), which
  exposes effects that cancel between a direct and an indirect path. The score
  has no sign; ``top`` and ``refine`` rank by it.

``refine=k`` patches the ``k`` cells with the largest estimated effect exactly
(packed sweeps for site and head cells, one forward per neuron cell).
The linear estimate is exact when the metric is linear in the patched site
(and is exactly zero for ``kl_to_base``, whose gradient vanishes at the base:
that metric is refused).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from steerlab.interventions.attention_pattern import AttentionGeometry
from steerlab.interventions.attribution_result import AttributionResult
from steerlab.interventions.errors import BatchMismatch, ConfigError, SiteNotFound, UnitError, checked_first, flag
from steerlab.interventions.gradients import Taps, check_metric, logit_window, metric_inputs
from steerlab.interventions.inputs import Inputs
from steerlab.interventions.metrics import Metric, as_metric
from steerlab.interventions.ops import Collect, Interchange, Lambda
from steerlab.interventions.progress import track
from steerlab.interventions.sites import ResolvedSite
from steerlab.interventions.sweeps import position_slots, slot_labels, sweep
from steerlab.interventions.units import MaskInfo

__all__ = ["attribution_patching", "AttributionResult"]

_NONE = 1 << 30  # padding of the slot table: never a real position


class _Default:
    def __repr__(self) -> str:
        return "'all' (heads or neurons: None)"


_DEFAULT = _Default()


@dataclass
class _Plan:
    """Everything validated before compute."""

    sites: list[ResolvedSite]
    slots: list[tuple[int, ...] | None]
    heads: list[int] | None
    neurons: list[int] | None
    base: Inputs
    source: Inputs
    base_info: MaskInfo
    source_info: MaskInfo
    metric: Metric
    qk_fix: bool
    grad_drop: bool
    refine: int

    @property
    def units(self) -> list[int] | None:
        return self.heads if self.heads is not None else self.neurons


# -- validation -------------------------------------------------------------------------------
def _sites(lab, sites) -> list[ResolvedSite]:
    patterns = [sites] if isinstance(sites, str) else list(sites) if isinstance(sites, (list, tuple)) else None
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise ConfigError(f"sites={sites!r}: expected a site name or pattern ('blocks.*.resid_post') or a list of them")
    out: dict[str, ResolvedSite] = {}
    for p in patterns:
        for name in lab.facts.expand(p):
            site = lab.resolve(name)
            if not lab.facts.has_positions(site):
                raise UnitError(f"site {site.name!r} has no position axis (its value is [batch, width]); attribution needs [batch, pos, ...]")
            out.setdefault(site.name, site)
    return list(out.values())


def _int_list(x, what: str, n: int) -> list[int]:
    if isinstance(x, str) and x == "all":
        return list(range(n))
    xs = [x] if isinstance(x, int) and not isinstance(x, bool) else x
    if not isinstance(xs, (list, tuple, range)) or not xs or not all(isinstance(h, int) and not isinstance(h, bool) for h in xs):
        raise UnitError(f"{what}={x!r}: expected 'all', an int or a list of ints")
    bad = [h for h in xs if not 0 <= h < n]
    if bad:
        raise UnitError(f"{what}={bad[:5]} out of range: the sites have {n} {what} (0..{n - 1})")
    return list(xs)


def _units(lab, sites: list[ResolvedSite], heads, neurons) -> tuple[list[int] | None, list[int] | None]:
    if heads is not None and neurons is not None and neurons is not False:
        raise UnitError("give heads= or neurons=, not both: a cell is a head or a neuron")
    if heads is not None:
        flat = [s for s in sites if not s.n_heads]
        if flat:
            raise UnitError(f"heads={heads!r}, but {flat[0].name!r} is not a per-head site; head attribution takes attn.q|k|v|z sites")
        counts = {s.n_heads for s in sites}
        if len(counts) > 1:
            raise UnitError(f"the sites have different head counts {sorted(counts)}; attribute attn.q/z and attn.k/v separately")
        return _int_list(heads, "heads", counts.pop()), None
    if neurons is None or neurons is False:
        return None, None
    per_head = [s for s in sites if s.n_heads]
    if per_head:
        raise UnitError(f"neurons= takes whole-vector sites (mlp.post, resid_post, ...); {per_head[0].name!r} is per-head: use heads=")
    widths = {lab.facts.site_shape(s)[-1] for s in sites}
    if len(widths) > 1:
        raise UnitError(f"neurons= needs sites of one width; these have widths {sorted(widths)}")
    return None, _int_list("all" if neurons is True else neurons, "neurons", widths.pop())


def _plan(lab, base, source, sites, positions, heads, neurons, metric, qk_fix, grad_drop, refine) -> _Plan:
    m = as_metric(metric)
    if getattr(m, "to_base", False):
        raise ConfigError(
            "metric=kl_to_base(): its gradient at the base run is zero (the KL is at its minimum there), so every "
            "first-order estimate is 0; use a metric of the answer (logit_diff, logprob) or an exact sweep"
        )
    if m.tokenizer is None:
        m = m.bind(lab)
    if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
        raise ConfigError(f"refine={refine!r}: expected the number of top cells to patch exactly (an int >= 0)")
    b = lab.facts.inputs(base)
    s = lab.facts.inputs(source)
    if s.batch not in (1, b.batch):
        raise BatchMismatch(f"the source has batch {s.batch} but the base has {b.batch}; expected equal batches (or a source of 1, broadcast)")
    if s.batch != b.batch:
        s = s.repeat(b.batch)
    rs = _sites(lab, sites)
    hs, ns = _units(lab, rs, heads, neurons)
    if grad_drop and lab.facts.map.layers_path is None:
        raise ConfigError("grad_drop drops each layer's gradient in turn; this model has no layer list")
    bi, si = b.mask_info(), s.mask_info()
    slots = position_slots(positions, bi, si)
    return _Plan(rs, slots, hs, ns, b, s, bi, si, m, qk_fix, grad_drop, refine)


def _kind(site: ResolvedSite) -> str:
    return site.name.split(".", 2)[2] if site.name.startswith("blocks.") else site.name


# -- the slot table -------------------------------------------------------------------------------
def _rows(plan: _Plan, device) -> tuple[Tensor, Tensor, Tensor]:
    """Padded rows of every slot's positions ``[batch, slot, k]`` in the base and the source, and
    which of them exist on both sides."""
    full = max(plan.base_info.host_lengths())
    table = [list(range(full)) if s is None else list(s) for s in plan.slots]
    k = max(len(r) for r in table)
    p = torch.tensor([r + [_NONE] * (k - len(r)) for r in table], dtype=torch.long, device=device)[None]  # [1, S, k]

    def side(info: MaskInfo):
        n = info.lengths.to(device)[:, None, None]
        r = torch.where(p < 0, p + n, p)
        ok = (p != _NONE) & (r >= 0) & (r < n)
        rows = (info.starts.to(device)[:, None, None] + r).clamp(0, info.seq - 1)
        return rows, ok

    b_rows, b_ok = side(plan.base_info)
    s_rows, s_ok = side(plan.source_info)
    return b_rows, s_rows, b_ok & s_ok


def _take(x: Tensor, rows: Tensor) -> Tensor:
    """``x[b, rows[b, j, k]]``: ``[batch, pos, ...]`` -> ``[batch, slot, k, ...]``."""
    return x[torch.arange(x.shape[0], device=x.device)[:, None, None], rows]


# -- estimates ----------------------------------------------------------------------------------------
def _linear(plan: _Plan, site: ResolvedSite, base: Tensor, source: Tensor, grad: Tensor, rows) -> Tensor:
    """``Σ (a_source − a_base) · grad`` per slot and unit: ``[batch, slot, unit]``."""
    b_rows, s_rows, valid = rows
    diff = (_take(source, s_rows).float() - _take(base, b_rows).float()) * _bcast(valid, base.dim() + 1)
    prod = (diff * _take(grad, b_rows).float()).sum(2)  # over the slot's positions: [b, S, *feat]
    if plan.heads is not None:
        return prod.sum(-1)[..., plan.heads]
    if plan.neurons is not None:
        return prod[..., plan.neurons]
    return prod.flatten(2).sum(-1, keepdim=True)


def _bcast(mask: Tensor, dim: int) -> Tensor:
    return mask.view(*mask.shape, *([1] * (dim - mask.dim()))).float()


@dataclass
class _Attention:
    """One layer's pieces for the QK fix (fixed across GradDrop passes)."""

    geo: AttentionGeometry
    scores: Tensor
    pattern: Tensor
    q_rot: Tensor
    k_rot: Tensor
    v: Tensor


def _attention(lab, plan: _Plan, layer: int, values: dict) -> _Attention:
    names = {k: f"blocks.{layer}.attn.{k}" for k in "qkvz"}
    geo = AttentionGeometry.of(lab, layer, plan.base)
    q_rot, k_rot = geo.rotate(values[names["q"]]), geo.rotate(values[names["k"]])
    scores = geo.scores(q_rot, k_rot)
    pattern = geo.pattern(scores)
    half = values[names["z"]].dtype in (torch.float16, torch.bfloat16)
    geo.check(pattern, values[names["v"]], values[names["z"]], tolerance=3e-2 if half else 1e-3)
    return _Attention(geo, scores, pattern, q_rot, k_rot, values[names["v"]])


def _qk(plan: _Plan, site: ResolvedSite, att: _Attention, source: Tensor, z_grad: Tensor, rows) -> Tensor:
    """The QK-fixed estimate at an ``attn.q`` or ``attn.k`` site: ``[batch, slot, unit]``."""
    b_rows, s_rows, valid = rows
    geo = att.geo
    grad_a = geo.pattern_gradient(z_grad, att.v)
    src = geo.rotate(_take(source, s_rows), rows=b_rows)  # the source's vectors, rotated where they are put
    validf = valid.double()
    if _kind(site) == "attn.q":
        eff = geo.query_effects(att.pattern, grad_a, src, att.k_rot, b_rows, validf)
    else:
        dk = src - _take(att.k_rot, b_rows)
        eff = geo.key_effects(att.scores, att.pattern, grad_a, att.q_rot, dk, b_rows, validf)
    eff = eff.float()
    return eff[..., plan.heads] if plan.heads is not None else eff.sum(-1, keepdim=True)


# -- the passes -------------------------------------------------------------------------------------
class _DropGrad(torch.autograd.Function):
    """Identity forward; backward passes the gradient unless this gate's layer is the dropped one."""

    @staticmethod
    def forward(ctx, h, state, layer):  # noqa: D102
        ctx.state, ctx.layer = state, layer
        return h.view_as(h)

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        return (torch.zeros_like(g) if ctx.state["drop"] == ctx.layer else g), None, None


def _gates(lab, state: dict) -> list:
    """GradDrop's gates on every layer's residual contributions (after any tap there)."""
    out = []
    for layer in range(lab.n_layers):
        for kind in ("attn.out", "mlp.out"):
            name = f"blocks.{layer}.{kind}"
            try:
                lab.resolve(name)
            except SiteNotFound:  # a family without the site (none of the supported ones) keeps its gradient
                continue
            out.append(Lambda(name, lambda h, _l=layer: _DropGrad.apply(h, state, _l)))
    return out


def _qk_layers(plan: _Plan) -> list[int]:
    if not plan.qk_fix:
        return []
    return sorted({s.layer for s in plan.sites if _kind(s) in ("attn.q", "attn.k") and s.layer is not None})


def _estimates(lab, plan: _Plan, values: dict, grads: dict, source: dict, atts: dict, rows) -> Tensor:
    """``[site, slot, unit, batch]`` for one backward pass's gradients."""
    out = []
    for site in plan.sites:
        if site.layer in atts and _kind(site) in ("attn.q", "attn.k"):
            e = _qk(plan, site, atts[site.layer], source[site.name], grads[f"blocks.{site.layer}.attn.z"], rows)
        else:
            e = _linear(plan, site, values[site.name], source[site.name], grads[site.name], rows)
        out.append(e.permute(1, 2, 0))
    return torch.stack(out)


def _cut_by_own_layer(site: ResolvedSite) -> bool:
    """Whether dropping the gradient through the site's own layer zeroes its estimate (the
    layer's attention and MLP internals): such a cell averages over the other L − 1 layers."""
    return site.layer is not None and _kind(site).startswith(("attn.", "mlp."))


def _run(lab, plan: _Plan, progress: bool | None):
    """Source forward, base forward + backward(s): base and source metrics, estimates, GradDrop scores."""
    qk_layers = _qk_layers(plan)
    extra = [f"blocks.{layer}.attn.{k}" for layer in qk_layers for k in "qkvz"]
    need_src = list(dict.fromkeys([s.name for s in plan.sites] + extra))
    with torch.no_grad():
        src = lab.run(plan.source, [Collect(n) for n in need_src], **lab.facts.no_cache)
        source_metric = check_metric(plan.metric(src.output, plan.source), plan.base_info.batch, plan.metric.name).float()
    source = {n: src.cache[n] for n in need_src}
    taps = Taps(need_src)
    state = {"drop": None}
    window = logit_window(lab, plan.base_info, plan.metric)
    kwargs = {**lab.facts.no_cache, **({"logits_to_keep": window} if window else {})}
    rows = _rows(plan, lab.device)
    with torch.enable_grad():
        res = lab.run(plan.base, [*taps.interventions, *(_gates(lab, state) if plan.grad_drop else [])], **kwargs)
        value = check_metric(plan.metric(res.output, metric_inputs(plan.base, window)), plan.base_info.batch, plan.metric.name)
        total = value.float().sum()
        grads = taps.grad(total, retain_graph=plan.grad_drop)
        atts = {layer: _attention(lab, plan, layer, taps.values) for layer in qk_layers}
        est = _estimates(lab, plan, taps.values, grads, source, atts, rows)
        score = None
        if plan.grad_drop:
            score = torch.zeros_like(est)
            for layer in track(range(lab.n_layers), desc="GradDrop", unit="backward", progress=progress):
                state["drop"] = layer
                g = taps.grad(total, retain_graph=layer < lab.n_layers - 1)
                score += _estimates(lab, plan, taps.values, g, source, atts, rows).abs()
            state["drop"] = None
            denom = torch.tensor([lab.n_layers - (1 if _cut_by_own_layer(s) else 0) for s in plan.sites], dtype=score.dtype)
            score = score / denom.clamp_min(1).view(-1, 1, 1, 1).to(score.device)
    return value.detach().float(), source_metric, est.detach(), None if score is None else score.detach()


# -- refinement ---------------------------------------------------------------------------------------
def _refine(lab, plan: _Plan, result: AttributionResult, k: int, progress: bool | None) -> None:
    """Patch the top-``k`` cells exactly; fills ``result.exact`` (NaN elsewhere)."""
    cells = result.top_cells(k)
    exact = torch.full(result.per_example.shape, math.nan)
    by_site: dict[int, set] = {}
    for i, j, u in cells:
        by_site.setdefault(i, set()).add((j, u))
    positions = None if plan.slots == [None] else [list(s) for s in plan.slots]
    forwards = 0
    for i, wanted in track(list(by_site.items()), desc="refine: exact patches", unit="site", progress=progress):
        site = plan.sites[i]
        if plan.neurons is not None:
            for j, u in wanted:
                iv = Interchange(site.name, positions=None if plan.slots[j] is None else list(plan.slots[j]),
                                 dims=[plan.neurons[u]], source=plan.source)
                with torch.no_grad():
                    out = lab.run(plan.base, [iv], **lab.facts.no_cache)
                exact[i, j, u] = plan.metric(out.output, plan.base).float().cpu()
                forwards += 2  # the patched run and its source run
            continue
        slot_ids = sorted({j for j, _ in wanted})
        unit_ids = sorted({u for _, u in wanted})
        pos = None if positions is None else [positions[j] for j in slot_ids]
        hs = None if plan.heads is None else [plan.heads[u] for u in unit_ids]
        sw = sweep(lab, plan.base, plan.source, metric=plan.metric, sites=[site.name], positions=pos, heads=hs, progress=False)
        forwards += sw.forwards + 2  # its packed forwards, its base and source runs
        for j, u in wanted:
            exact[i, j, u] = sw.per_example[0, slot_ids.index(j), unit_ids.index(u) if hs is not None else 0]
    result.exact = exact
    result.meta["refine_forwards"] = forwards


# -- labels ---------------------------------------------------------------------------------------------
def _labels(lab, plan: _Plan) -> list[str]:
    """One label per slot, as a sweep labels it."""
    return slot_labels(lab.tokenizer, plan.base, plan.base_info, plan.slots)


@checked_first(qk_fix=flag("qk_fix"), grad_drop=flag("grad_drop"))
def attribution_patching(
    lab,
    base,
    source,
    *,
    metric,
    sites="blocks.*.resid_post",
    positions=_DEFAULT,
    heads=None,
    neurons=None,
    qk_fix: bool = False,
    grad_drop: bool = False,
    refine: int = 0,
    progress: bool | None = None,
) -> AttributionResult:
    """Estimate the effect of patching ``source`` into ``base`` at every cell, from gradients.

    ``sites``, ``positions`` and ``heads`` as for :func:`~steerlab.interventions.sweeps.sweep`
    (the same cells, the same labels). ``neurons``: ``True``/``"all"`` or a list of feature
    indices: one cell per feature of whole-vector sites (default positions there: all at once).
    ``metric``: any :mod:`~steerlab.interventions.metrics` metric or function (not
    ``kl_to_base``). ``qk_fix``, ``grad_drop``: AtP*'s corrections (module docstring; their cost:
    none in forwards, and ``n_layers`` extra backward passes). ``refine=k``: patch the ``k``
    largest cells exactly (``result.exact``). Costs: one source forward (no grad), one base forward
    and backward. ``progress``: a bar over GradDrop's backward passes and the refined sites
    (default: on a terminal or in a notebook; :mod:`steerlab.interventions.progress`).
    """
    if positions is _DEFAULT:
        positions = "all" if heads is None and neurons in (None, False) else None
    plan = _plan(lab, base, source, sites, positions, heads, neurons, metric, qk_fix, grad_drop, refine)
    base_metric, source_metric, est, score = _run(lab, plan, progress)
    method = "AtP*" if qk_fix and grad_drop else "AtP+QK" if qk_fix else "AtP+GradDrop" if grad_drop else "AtP"
    result = AttributionResult(
        per_example=(est + base_metric.to(est.device)).cpu(),
        # every cell is estimated for every example: a NaN estimate is a NaN mean, never dropped
        filled=torch.ones(est.shape, dtype=torch.bool),
        base_metric=base_metric.cpu(),
        source_metric=source_metric.cpu(),
        sites=[s.name for s in plan.sites],
        layers=[s.layer for s in plan.sites],
        positions=[None if s is None else list(s) for s in plan.slots],
        tokens=_labels(lab, plan),
        heads=plan.units,
        metric=plan.metric.name,
        forwards=2,
        configs_per_forward=0,
        meta={"backwards": 1 + (lab.n_layers if grad_drop else 0)},
        unit="neuron" if plan.neurons is not None else "head",
        method=method,
        score=None if score is None else score.cpu(),
    )
    if refine:
        _refine(lab, plan, result, refine, progress)
    return result
