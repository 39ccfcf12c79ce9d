"""Attribution inside a subspace: how much of a metric's gradient × activation lies in it.

For a :class:`~steerlab.interventions.subspace.Subspace` with orthonormal rows
``R`` (``[k, d]``; a DAS result, a steering direction, a LoReFT's ``R``) and the
metric's gradient ``g = ∂metric/∂h`` at a site, the first-order attribution of
a change ``Δ`` splits exactly into the subspace and its orthogonal complement::

    Δ · g = (R Δ) · (R g)  +  ((I − RᵀR) Δ) · g
    per direction i:  (r_i · Δ)(r_i · g)

:func:`subspace_attribution` reports both parts per layer × token (the same
kind of site at every layer: a residual-stream subspace read at each depth)
with ``Δ = h_source − h_base`` when a source is given (attribution patching
restricted to the subspace) and ``Δ = h`` otherwise (gradient × activation).

:func:`integrated_gradients` follows the interchange path inside the subspace,
``h(α) = h + α Rᵀ(R s − R h)`` for ``α`` from 0 (the base) to 1 (the
distributed interchange of the subspace from the source, what DAS trains),
and attributes the change to each direction and position::

    IG_{j,i} = (r_i · (s_j − h_j)) ∫₀¹ r_i · ∂metric/∂h_j(α) dα

(Gauss–Legendre quadrature with ``steps`` nodes). Completeness: the
attributions sum to ``metric(α=1) − metric(α=0)``, the exact interchange
effect, up to the quadrature error, which the result reports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from steerlab.interventions.errors import BatchMismatch, ConfigError, ShapeMismatch, SubspaceSizeError
from steerlab.interventions.gradients import check_metric, logit_window, metric_gradients, metric_inputs
from steerlab.interventions.graph import SourceValue
from steerlab.interventions.inputs import Inputs
from steerlab.interventions.logit_lens import tokens_of
from steerlab.interventions.metrics import as_metric
from steerlab.interventions.ops import Lambda
from steerlab.interventions.progress import track
from steerlab.interventions.subspace import Subspace
from steerlab.interventions.units import Positions

__all__ = ["subspace_attribution", "SubspaceAttribution", "integrated_gradients", "IntegratedGradients"]


def _check_subspace(subspace) -> Subspace:
    if not isinstance(subspace, Subspace):
        raise ConfigError(f"expected a Subspace (a DAS result's .subspaces[...], Subspace(basis, site)); got {type(subspace).__name__}")
    return subspace


def _layer_sites(lab, subspace: Subspace, layers) -> list[str]:
    site = lab.resolve(subspace.site)
    if site.layer is None or layers == "own":
        return [site.name]
    kind = site.name.split(".", 2)[2]
    if layers is None or (isinstance(layers, str) and layers == "all"):
        layers = range(lab.n_layers)
    elif isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if not isinstance(layers, (list, tuple, range)) or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
        raise ConfigError(f"layers={layers!r}: expected 'all', 'own', an int or a list of ints")
    names = [lab.resolve(f"blocks.{x}.{kind}").name for x in layers]
    for n in names:
        w = lab.facts.site_shape(lab.resolve(n))[-1]
        if w != subspace.width:
            raise SubspaceSizeError(f"the subspace has width {subspace.width} but {n!r} has width {w}")
    return names


def _real_grid(x: Tensor, info, n: int) -> Tensor:
    """``[batch, pos, ...]`` (padded) -> ``[batch, n, ...]`` indexed by real-token position (zeros past an example's end)."""
    p = torch.arange(n, device=x.device)[None]
    rows = (info.starts.to(x.device)[:, None] + p).clamp(max=x.shape[1] - 1)
    ok = p < info.lengths.to(x.device)[:, None]
    out = x[torch.arange(x.shape[0], device=x.device)[:, None], rows]
    return out * ok.view(*ok.shape, *([1] * (out.dim() - 2))).to(out.dtype)


@dataclass
class SubspaceAttribution:
    """Per layer × real-token position × example: the attribution inside the subspace
    (``inside``), in its complement (``outside``) and per basis direction (``directions``,
    ``[layer, pos, k, batch]``). ``mode``: ``"patch"`` (``Δ = source − base``) or
    ``"gradient×activation"``. Positions past an example's end are NaN."""

    inside: Float[Tensor, "layer pos batch"]
    outside: Float[Tensor, "layer pos batch"]
    directions: Float[Tensor, "layer pos rank batch"]
    sites: list[str]
    layers: list[int | None]
    tokens: list[list[str]]  # per example, its real tokens
    mode: str
    metric: str
    base_metric: Float[Tensor, " batch"]
    source_metric: Float[Tensor, " batch"] | None = None
    subspace: dict = field(default_factory=dict)

    @property
    def total(self) -> Float[Tensor, "layer pos batch"]:
        return self.inside + self.outside

    @property
    def share(self) -> Float[Tensor, "layer pos"]:
        """``|inside| / (|inside| + |outside|)`` of the example means: how much of the
        attribution at each layer and token the subspace carries."""
        a, b = self.inside.nanmean(-1).abs(), self.outside.nanmean(-1).abs()
        return a / (a + b).clamp_min(1e-12)

    def table(self, *, example: int = 0, digits: int = 3) -> str:
        """Inside-subspace attribution of one example, layers × tokens."""
        toks = self.tokens[example]
        g = self.inside[:, : len(toks), example]
        w0 = max(5, *(len(str(x)) for x in self.layers))
        cols = [repr(t) for t in toks]
        ws = [max(len(c), digits + 4) for c in cols]
        out = [f"{self.mode} attribution inside the subspace ({self.subspace.get('size')} dims at "
               f"{self.subspace.get('site')}), {self.metric}, example {example}"]
        out.append(" ".join([f"{'layer':<{w0}}"] + [f"{c:>{w}}" for c, w in zip(cols, ws, strict=True)]))
        for layer, row in zip(self.layers, g, strict=True):
            out.append(" ".join([f"{layer!s:<{w0}}"] + [f"{float(x):>{w}.{digits}f}" for x, w in zip(row, ws, strict=True)]))
        return "\n".join(out)

    def __repr__(self) -> str:
        return f"SubspaceAttribution({len(self.layers)} layers × {self.inside.shape[1]} positions, {self.mode})\n" + self.table()

    def plot(self, **kwargs):
        """Token × layer heatmaps inside the subspace and in its complement (:func:`steerlab.viz.subspace_attribution_heatmap`)."""
        from steerlab.viz import subspace_attribution_heatmap

        return subspace_attribution_heatmap(self, **kwargs)


def subspace_attribution(lab, base, subspace: Subspace, *, metric, source=None, layers=None) -> SubspaceAttribution:
    """Gradient × activation (or, with ``source``, attribution patching) split into ``subspace``
    and its complement, per layer × real token (see the module docstring).

    ``layers``: ``None``/``"all"`` (the subspace's kind of site at every layer), ``"own"``, or
    a list. Costs one base forward + backward (and one source forward when given).
    """
    subspace = _check_subspace(subspace)
    if subspace.heads is not None:
        raise ConfigError(f"subspace_attribution reads whole-vector sites; this subspace is on heads {list(subspace.heads)} of {subspace.site!r}")
    names = _layer_sites(lab, subspace, layers)
    inp = lab.facts.inputs(base)
    info = inp.mask_info()
    n = int(info.lengths.max())
    g = metric_gradients(lab, inp, names, metric)
    src_metric = None
    if source is not None:
        s_inp = lab.facts.inputs(source)
        if s_inp.batch not in (1, inp.batch):
            raise BatchMismatch(f"the source has batch {s_inp.batch} but the base has {inp.batch}")
        s_inp = s_inp.repeat(inp.batch) if s_inp.batch != inp.batch else s_inp
        s_info = s_inp.mask_info()
        if not torch.equal(s_info.lengths.cpu(), info.lengths.cpu()):
            raise ShapeMismatch("subspace_attribution with a source aligns tokens one by one: base and source need equal real lengths")
        with torch.no_grad():
            res = lab.run(s_inp, [], **lab.facts.no_cache)
            m = as_metric(metric)
            m = m.bind(lab) if m.tokenizer is None else m
            src_metric = check_metric(m(res.output, s_inp), inp.batch, m.name).float().cpu()
        src_vals = lab.collect(s_inp, names)
    R = subspace.basis.to(lab.device)
    ins, outs, dirs = [], [], []
    for name in names:
        h = _real_grid(g.values[name].float(), info, n)
        grad = _real_grid(g.grads[name].float(), info, n)
        delta = _real_grid(src_vals[name].float(), s_info, n) - h if source is not None else h
        pd, pg = delta @ R.T, grad @ R.T  # [b, n, k]
        per_dir = pd * pg
        inside = per_dir.sum(-1)
        ins.append(inside)
        outs.append((delta * grad).sum(-1) - inside)
        dirs.append(per_dir)
    ok = torch.arange(n, device=lab.device)[None] < info.lengths.to(lab.device)[:, None]  # [b, n]
    nan = lambda t: t.masked_fill(~ok.view(*ok.shape, *([1] * (t.dim() - 2))), math.nan)  # noqa: E731
    inside = torch.stack([nan(x) for x in ins]).permute(0, 2, 1).cpu()
    outside = torch.stack([nan(x) for x in outs]).permute(0, 2, 1).cpu()
    directions = torch.stack([nan(x) for x in dirs]).permute(0, 2, 3, 1).cpu()
    return SubspaceAttribution(
        inside, outside, directions, names, [lab.resolve(x).layer for x in names], tokens_of(lab, inp, info),
        "patch" if source is not None else "gradient×activation", as_metric(metric).name, g.metric.cpu(), src_metric,
        {"site": subspace.site, "size": subspace.size, **{k: v for k, v in subspace.metadata.items() if isinstance(v, (str, int, float))}},
    )


# -- integrated gradients along the interchange path -------------------------------------------------------
@dataclass
class IntegratedGradients:
    """IG along the interchange path inside a subspace (module docstring).

    ``attributions``: ``[batch, pos, k]`` (the subspace's positions × its directions);
    ``exact``: ``metric(α=1) − metric(α=0)`` per example; ``residual``: ``Σ IG − exact``.
    """

    attributions: Float[Tensor, "batch pos rank"]
    base_metric: Float[Tensor, " batch"]
    interchanged_metric: Float[Tensor, " batch"]
    steps: int
    metric: str
    site: str
    positions: object
    subspace: dict = field(default_factory=dict)

    @property
    def exact(self) -> Float[Tensor, " batch"]:
        return self.interchanged_metric - self.base_metric

    @property
    def total(self) -> Float[Tensor, " batch"]:
        return self.attributions.sum((1, 2))

    @property
    def residual(self) -> Float[Tensor, " batch"]:
        """``Σ IG − exact``: completeness error, per example."""
        return self.total - self.exact

    @property
    def per_direction(self) -> Float[Tensor, " rank"]:
        return self.attributions.sum(1).mean(0)

    def completeness(self) -> float:
        """``max |Σ IG − exact| / max(mean |exact|, 1e-6)``: the relative completeness error."""
        return float(self.residual.abs().max() / max(float(self.exact.abs().mean()), 1e-6))

    def table(self, digits: int = 3) -> str:
        lines = [
            f"integrated gradients inside {self.subspace.get('size')} dims at {self.site} ({self.steps} Gauss-Legendre steps), {self.metric}",
            f"exact interchange effect {float(self.exact.mean()):+.{digits}f}; sum of attributions {float(self.total.mean()):+.{digits}f}; "
            f"completeness error {self.completeness():.1e} (relative)",
        ]
        lines += [f"direction {i}: {float(v):+.{digits}f}" for i, v in enumerate(self.per_direction)]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return "IntegratedGradients\n" + self.table()

    def plot(self, **kwargs):
        """Attribution per direction (bars, with the exact effect), :func:`steerlab.viz.integrated_gradients_bars`."""
        from steerlab.viz import integrated_gradients_bars

        return integrated_gradients_bars(self, **kwargs)


def _nodes(steps: int) -> tuple[Tensor, Tensor]:
    """Gauss–Legendre nodes and weights on [0, 1]."""
    x, w = np.polynomial.legendre.leggauss(steps)
    return torch.tensor((x + 1) / 2, dtype=torch.float64), torch.tensor(w / 2, dtype=torch.float64)


def integrated_gradients(
    lab, base, source, subspace: Subspace, *, metric, steps: int = 16, positions=None, chunk: int | None = None,
    progress: bool | None = None,
) -> IntegratedGradients:
    """Integrated gradients along ``h(α) = h + α Rᵀ(R s − R h)`` at the subspace's site and units.

    ``positions`` (default: the subspace's) and its heads select where the interchange acts.
    ``steps``: Gauss–Legendre nodes; ``chunk``: nodes per forward (default: all, one forward +
    backward of ``batch × (steps + 1)`` rows); ``progress``: a bar over the chunks.
    """
    subspace = _check_subspace(subspace)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps={steps!r}: expected a positive int")
    m = as_metric(metric)
    m = m.bind(lab) if m.tokenizer is None else m
    inp = lab.facts.inputs(base)
    pos = subspace.positions if positions is None else positions
    if Positions(pos).kind == "call":
        raise ConfigError(
            f"the subspace at {subspace.site!r} was found at per-example positions ({subspace.metadata.get('positions')!r}); "
            "give positions= (an int, a list, or a LongTensor[batch, k]) for these inputs"
        )
    heads = list(subspace.heads) if subspace.heads is not None else None
    probe = Lambda(subspace.site, lambda h, s: h, sourced=True, positions=pos, heads=heads, source=source)
    lab.facts.place(probe)
    width = lab.facts.site_shape(lab.resolve(subspace.site))[-1]
    if width != subspace.width:
        raise SubspaceSizeError(f"the subspace has width {subspace.width} but {subspace.site!r} has width {width}")
    sv = lab.source_value(probe)
    if sv.value.shape[0] not in (1, inp.batch):
        raise BatchMismatch(f"the source has batch {sv.value.shape[0]} but the base has {inp.batch}")
    alphas, weights = _nodes(steps)
    alphas = torch.cat([alphas, torch.ones(1, dtype=torch.float64)])  # the last row: the full interchange
    per = len(alphas) if chunk is None else max(1, int(chunk))
    R = subspace.basis.to(lab.device)
    B = inp.batch
    window = logit_window(lab, inp.mask_info(), m)
    kwargs = {**lab.facts.no_cache, **({"logits_to_keep": window} if window else {})}
    with torch.no_grad():
        base_out = lab.run(inp, [], **kwargs).output
    seen1 = metric_inputs(inp, window)
    bound = m.against(base_out, seen1)
    base_metric = check_metric(bound(base_out, seen1), B, bound.name).float()
    attr, last = None, None
    for start in track(range(0, len(alphas), per), desc="integrated gradients", unit="forward", progress=progress):
        a = alphas[start : start + per]
        attr_c, metric_c = _path_chunk(lab, inp, a, R, sv, pos, heads, subspace.site, bound, kwargs, window)
        w = torch.cat([weights, torch.zeros(1, dtype=torch.float64)])[start : start + per].to(attr_c.device)
        part = (attr_c * w.view(-1, 1, 1, 1)).sum(0)
        attr = part if attr is None else attr + part
        if start + per >= len(alphas):
            last = metric_c[-1]
    return IntegratedGradients(
        attr.float().cpu(), base_metric.cpu(), last.float().cpu(), steps, m.name, lab.resolve(subspace.site).name, pos,
        {"size": subspace.size, **{k: v for k, v in subspace.metadata.items() if isinstance(v, (str, int, float))}},
    )


def _path_chunk(lab, inp: Inputs, alphas: Tensor, R: Tensor, sv: SourceValue, pos, heads, site, metric, kwargs, window):
    """One forward + backward over ``len(alphas)`` copies of the base: per copy, the integrand
    ``(r_i·Δ_j)(r_i·g_j(α))`` ``[n, batch, pos, k]`` and the metric ``[n, batch]``."""
    n, B = len(alphas), inp.batch
    rows = inp.repeat(n)
    a = alphas.to(lab.device).repeat_interleave(B).float()
    src = sv.value.to(lab.device)
    src = src.expand(B, *src.shape[1:]) if src.shape[0] == 1 else src
    src = src.repeat(n, *([1] * (src.dim() - 1)))
    store: dict = {}

    def path(h: Tensor, s: Tensor) -> Tensor:
        shape = (-1,) + (1,) * (h.dim() - 1)
        d = (s.float() - h.float()) @ R.T  # [rows, k, (head,) dims] coordinates of Δ
        new = h.float() + a.view(shape) * (d @ R)
        leaf = torch.zeros_like(new, requires_grad=True)
        store["delta"], store["leaf"] = d.detach(), leaf
        return (new + leaf).to(h.dtype)

    iv = Lambda(site, path, sourced=True, positions=pos, heads=heads, source=SourceValue(src, None if sv.valid is None else sv.valid.repeat(n, 1)))
    with torch.enable_grad():
        out = lab.run(rows, [iv], **kwargs)
        seen = metric_inputs(rows, window)
        value = check_metric(metric(out.output, seen), n * B, metric.name)
        (g,) = torch.autograd.grad(value.float().sum(), [store["leaf"]])
    integrand = store["delta"] * (g.float() @ R.T)  # [rows, k_pos, (head,) k]
    if integrand.dim() == 4:  # per-head subspace: sum over the selected heads
        integrand = integrand.sum(2)
    return integrand.view(n, B, *integrand.shape[1:]).double(), value.detach().view(n, B)
