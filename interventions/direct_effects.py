"""What a direction or a head writes: direct logit attribution and downstream effects.

* :func:`direction_logits` — for each basis direction ``r`` of a subspace, the
  logits it writes directly: ``W_U (γ ⊙ c(w) / σ)`` with ``w`` the direction as
  a residual-stream vector (``r`` itself at residual sites and at ``attn.out`` /
  ``mlp.out``; at ``attn.z`` or ``mlp.post``, ``r`` sent through the output
  projection that reads the site) and ``σ`` the final norm's scale in the given
  run (1 without one: the ranking of tokens does not depend on it). The tokens
  it promotes (largest) and suppresses (smallest). A basis direction's sign is
  arbitrary: ``−r`` swaps the two lists.
* :func:`head_logit_attribution` — each head's direct effect on a metric at one
  position: its output through ``o_proj`` (``c_h``), the frozen-scale final
  norm and the unembedding, dotted with ``∂metric/∂logits``. With the MLPs'
  and the embedding's direct effects beside it, the parts add up to the
  metric's first-order read-out (for ``logit_diff`` on a model without biases,
  to the logit difference itself: ``rest`` is then ~0).
* :func:`direction_effects` — patch one direction at a time at the subspace's
  site and positions (``h ← h + c r``: ``c = r·(s − h)``, the one-dimensional
  interchange from a source, or a fixed ``scale``) and measure, at each later
  site, how far the activation at those positions moves along ``r`` and in
  all, and what the metric does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

from steerlab.interventions.errors import ConfigError, SubspaceSizeError
from steerlab.interventions.gradients import check_metric
from steerlab.interventions.graph import SourceValue
from steerlab.interventions.inputs import Inputs
from steerlab.interventions.logit_lens import ReadOut, tokens_of
from steerlab.interventions.metrics import as_metric
from steerlab.interventions.ops import Collect, Lambda
from steerlab.interventions.subspace import Subspace
from steerlab.interventions.units import Positions

__all__ = [
    "direction_logits",
    "DirectionLogits",
    "head_logit_attribution",
    "HeadLogitAttribution",
    "direction_effects",
    "DirectionEffects",
]

_RESIDUAL = ("resid_pre", "resid_mid", "resid_post", "attn.out", "mlp.out", "embed")
_PROJECTED = ("attn.z", "mlp.post")  # read by a linear output projection (the site's module input)


def _kind(name: str) -> str:
    return name.split(".", 2)[2] if name.startswith("blocks.") else name


def _written(lab, subspace: Subspace) -> Float[Tensor, "rank d_model"]:
    """Each basis direction as the residual-stream vector it writes."""
    site = lab.resolve(subspace.site)
    kind = _kind(site.name)
    R = subspace.basis.to(lab.device)
    if kind in _RESIDUAL:
        if R.shape[1] != lab.d_model:
            raise SubspaceSizeError(f"the subspace has width {R.shape[1]}; {site.name!r} has width {lab.d_model}")
        return R
    if kind not in _PROJECTED or site.port.io != "input":
        raise ConfigError(
            f"{site.name!r} writes nothing to the residual stream directly ({kind}); direct logit attribution takes "
            f"subspaces at {', '.join(_RESIDUAL)} or at {', '.join(_PROJECTED)} (through the output projection)"
        )
    width = lab.facts.site_shape(site)
    full = width[0] * width[1] if len(width) == 2 else width[0]
    heads = list(subspace.heads) if subspace.heads is not None else ([0] if len(width) == 1 else None)
    if len(width) == 2 and heads is None:
        raise ConfigError(f"a subspace at {site.name!r} without heads= has width {subspace.width}; which head's output does it live in?")
    x = torch.zeros(R.shape[0], full, device=lab.device)
    step = width[1] if len(width) == 2 else full
    for h in heads or [0]:
        x[:, h * step : h * step + R.shape[1]] += R
    with torch.no_grad():
        zero = site.module.forward(torch.zeros(1, full, device=lab.device, dtype=lab.dtype)).float()
        return site.module.forward(x.to(lab.dtype)).float() - zero


@dataclass
class DirectionLogits:
    """Per basis direction: the ``k`` tokens it promotes and suppresses most, with their logits;
    ``logits`` (``[k_dir, vocab]``) holds every token's; ``metric_effects`` the direct effect of one
    unit of each direction on a metric (when one was given)."""

    promoted: list[list[tuple[str, float]]]
    suppressed: list[list[tuple[str, float]]]
    site: str
    scale: float
    logits: Float[Tensor, "rank vocab"] | None = None
    metric: str | None = None
    metric_effects: list[float] | None = None
    subspace: dict = field(default_factory=dict)
    tokenizer: object = field(default=None, repr=False)

    def rank(self, token: str | int) -> list[int]:
        """Where ``token`` ranks among each direction's logits (0 = promoted most)."""
        if self.logits is None:
            raise ConfigError("this result keeps no logits")
        if isinstance(token, str):
            if self.tokenizer is None:
                raise ConfigError("a token string needs the tokenizer; pass its id")
            ids = self.tokenizer.encode(token, add_special_tokens=False)
            if len(ids) != 1:
                raise ConfigError(f"{token!r} is {len(ids)} tokens; expected one")
            token = ids[0]
        return [int((row > row[token]).sum()) for row in self.logits]

    def table(self, digits: int = 2) -> str:
        out = [f"direct logit attribution of each direction at {self.site} (final-norm scale {self.scale:.3g})"]
        for i, (p, s) in enumerate(zip(self.promoted, self.suppressed, strict=True)):
            extra = f"  [{self.metric}: {self.metric_effects[i]:+.{digits + 1}f} per unit]" if self.metric_effects else ""
            out.append(f"direction {i}: promotes " + ", ".join(f"{t!r} {v:+.{digits}f}" for t, v in p) + extra)
            out.append(" " * (len(str(i)) + 11) + "suppresses " + ", ".join(f"{t!r} {v:+.{digits}f}" for t, v in s))
        return "\n".join(out)

    def __repr__(self) -> str:
        return "DirectionLogits\n" + self.table()

    def plot(self, **kwargs):
        """Bars of the promoted and suppressed tokens per direction (:func:`steerlab.viz.direction_tokens`)."""
        from steerlab.viz import direction_tokens

        return direction_tokens(self, **kwargs)


def direction_logits(lab, subspace: Subspace, *, inputs=None, position: int = -1, k: int = 10, metric=None) -> DirectionLogits:
    """The tokens each basis direction of ``subspace`` promotes and suppresses, directly.

    With ``inputs``, the final norm's scale is that of their last layer at real-token
    ``position`` (mean over examples), so values are logits per unit of the direction in that
    run; without, the scale is 1. With ``metric`` (and ``inputs``), also each direction's direct
    effect on it: ``∂metric/∂logits · W_U (γ ⊙ c(w)/σ)`` at that position.
    """
    if not isinstance(subspace, Subspace):
        raise ConfigError(f"expected a Subspace; got {type(subspace).__name__}")
    if metric is not None and inputs is None:
        raise ConfigError("metric= needs inputs= (the run whose gradient on the logits weighs each token)")
    read = ReadOut(lab)
    w = _written(lab, subspace)
    sigma = torch.ones(1, 1, device=w.device)
    effects = None
    if inputs is not None:
        inp = lab.facts.inputs(inputs)
        last = f"blocks.{lab.n_layers - 1}.resid_post"
        with torch.no_grad():
            res = lab.run(inp, [Collect(last, positions=position)], **lab.facts.no_cache)
        sigma = read.scale(res.cache[lab.resolve(last).name][:, 0].float()).mean().view(1, 1)
        if metric is not None:
            u = _metric_pullback(lab, read, inp, res.logits, metric, position).mean(0)  # [d]
            with torch.no_grad():
                effects = [float(x) for x in (read.frozen(w, sigma) * u).sum(-1)]
    with torch.no_grad():
        logits = read.unembed(read.frozen(w, sigma))  # [k, vocab]
    dec = (lambda t: lab.tokenizer.decode([t])) if lab.tokenizer is not None else str
    kk = min(k, logits.shape[-1])
    top, bottom = logits.topk(kk, dim=-1), logits.topk(kk, dim=-1, largest=False)
    promoted = [[(dec(int(t)), float(v)) for t, v in zip(ti, tv, strict=True)] for ti, tv in zip(top.indices, top.values, strict=True)]
    suppressed = [[(dec(int(t)), float(v)) for t, v in zip(ti, tv, strict=True)] for ti, tv in zip(bottom.indices, bottom.values, strict=True)]
    meta = {"size": subspace.size, **{a: b for a, b in subspace.metadata.items() if isinstance(b, (str, int, float))}}
    name = None if metric is None else as_metric(metric).name
    return DirectionLogits(promoted, suppressed, lab.resolve(subspace.site).name, float(sigma), logits.cpu(), name, effects, meta, lab.tokenizer)


def _metric_pullback(lab, read: ReadOut, inp: Inputs, logits: Tensor, metric, position: int) -> Float[Tensor, "batch d_model"]:
    """``W_Uᵀ ∂metric/∂logits`` at real-token ``position``, per example."""
    m = as_metric(metric)
    m = m.bind(lab) if m.tokenizer is None else m
    z = logits.detach().float().requires_grad_(True)
    with torch.enable_grad():
        value = check_metric(m(z, inp), inp.batch, m.name)
        (g,) = torch.autograd.grad(value.sum(), z)
    rows = Positions(position).resolve(inp.mask_info())[:, 0]
    return read.pullback(g[torch.arange(inp.batch, device=g.device), rows])


@dataclass
class HeadLogitAttribution:
    """Direct effects on a metric at one position: per layer × head (``heads``), per layer's
    MLP (``mlp``) and of the embedding (``embed``), per example; ``metric_values`` is the
    metric itself and ``rest`` what the parts leave out (biases, and for a nonlinear metric
    its curvature)."""

    heads: Float[Tensor, "layer head batch"]
    mlp: Float[Tensor, "layer batch"]
    embed: Float[Tensor, " batch"]
    metric_values: Float[Tensor, " batch"]
    metric: str
    position: int
    token: str

    @property
    def rest(self) -> Float[Tensor, " batch"]:
        return self.metric_values - self.heads.sum((0, 1)) - self.mlp.sum(0) - self.embed

    def top(self, k: int = 5) -> list[tuple[int, int, float]]:
        """The ``k`` heads with the largest mean |direct effect|: ``(layer, head, effect)``."""
        g = self.heads.mean(-1)
        order = g.abs().flatten().argsort(descending=True)[:k]
        return [(int(i) // g.shape[1], int(i) % g.shape[1], float(g.flatten()[i])) for i in order]

    def table(self, digits: int = 2) -> str:
        g = self.heads.mean(-1)
        cols = [f"h{h}" for h in range(g.shape[1])] + ["mlp"]
        w = max(digits + 5, 4)
        out = [f"direct effect on {self.metric} at position {self.position} ({self.token!r}): metric {float(self.metric_values.mean()):+.{digits}f}, "
               f"embedding {float(self.embed.mean()):+.{digits}f}, rest {float(self.rest.mean()):+.{digits}f}",
               "layer " + " ".join(f"{c:>{w}}" for c in cols)]
        for layer in range(g.shape[0]):
            vals = [float(x) for x in g[layer]] + [float(self.mlp[layer].mean())]
            out.append(f"{layer:<5} " + " ".join(f"{v:>{w}.{digits}f}" for v in vals))
        return "\n".join(out)

    def __repr__(self) -> str:
        return "HeadLogitAttribution\n" + self.table()

    def plot(self, **kwargs):
        """Layer × head heatmap with an MLP column (:func:`steerlab.viz.head_logit_heatmap`)."""
        from steerlab.viz import head_logit_heatmap

        return head_logit_heatmap(self, **kwargs)


def head_logit_attribution(lab, inputs, *, metric, position: int = -1) -> HeadLogitAttribution:
    """Each head's (and each MLP's, and the embedding's) direct effect on ``metric`` at real-token
    ``position``: ``∂metric/∂logits · W_U (γ ⊙ c(x)/σ)`` with ``σ`` from the run (one forward)."""
    m = as_metric(metric)
    m = m.bind(lab) if m.tokenizer is None else m
    inp = lab.facts.inputs(inputs)
    info = inp.mask_info()
    Positions(position).validate(info, "position")
    read = ReadOut(lab)
    L = lab.n_layers
    z_sites = [lab.resolve(f"blocks.{x}.attn.z") for x in range(L)]
    mlp_sites = [f"blocks.{x}.mlp.out" for x in range(L)]
    last = f"blocks.{L - 1}.resid_post"
    ivs = [Collect(s.name, positions=position) for s in z_sites] + [Collect(s, positions=position) for s in [*mlp_sites, last, "embed"]]
    with torch.no_grad():
        res = lab.run(inp, ivs, **lab.facts.no_cache)
    u = _metric_pullback(lab, read, inp, res.logits, m, position)  # [b, d]
    value = check_metric(m(res.logits, inp), inp.batch, m.name)
    sigma = read.scale(res.cache[last][:, 0].float())  # [b, 1]
    direct = lambda x: (u * read.frozen(x, sigma)).sum(-1)  # noqa: E731  [b, ...d] -> [b, ...]
    heads = []
    with torch.no_grad():
        for s in z_sites:
            z = res.cache[s.name][:, 0].float()  # [b, head, d_head]
            H = z.shape[1]
            eye = torch.eye(H, device=z.device)[None, :, :, None]  # [1, head(masked), head, 1]
            parts = (z[:, None] * eye).flatten(2)  # [b, head, head*d_head]: one head's output at a time
            out = s.module.forward(parts.to(lab.dtype)).float() - s.module.forward(torch.zeros_like(parts[:, :1]).to(lab.dtype)).float()
            heads.append((u[:, None] * read.frozen(out, sigma[:, None])).sum(-1))  # [b, head]
        mlp = torch.stack([direct(res.cache[lab.resolve(x).name][:, 0]) for x in mlp_sites])
        embed = direct(res.cache[lab.resolve("embed").name][:, 0])
    tok = tokens_of(lab, inp, info)[0]
    return HeadLogitAttribution(
        torch.stack(heads).permute(0, 2, 1).cpu(), mlp.cpu(), embed.cpu(), value.detach().float().cpu(), m.name, position,
        tok[position] if -len(tok) <= position < len(tok) else str(position),
    )


@dataclass
class DirectionEffects:
    """Per basis direction × later site × example: the change of the activation at the patched
    positions along the direction (``along``) and in norm (``norm``), and the change of the
    metric (``metric_change``, ``[direction, batch]``, when a metric was given)."""

    along: Float[Tensor, "rank site batch"]
    norm: Float[Tensor, "rank site batch"]
    sites: list[str]
    layers: list[int | None]
    coefficient: Float[Tensor, "rank batch"]
    metric: str | None = None
    metric_change: Float[Tensor, "rank batch"] | None = None
    mode: str = "interchange"

    def table(self, digits: int = 3) -> str:
        a, n = self.along.mean(-1), self.norm.mean(-1)
        out = [f"each direction patched ({self.mode}); change along it / in norm at later sites"]
        out.append("site".ljust(24) + " ".join(f"{'dir ' + str(i):>16}" for i in range(a.shape[0])))
        for j, s in enumerate(self.sites):
            out.append(s.ljust(24) + " ".join(f"{float(a[i, j]):>+7.{digits}f}/{float(n[i, j]):<8.{digits}f}" for i in range(a.shape[0])))
        if self.metric_change is not None:
            out.append(f"{self.metric} change: " + ", ".join(f"dir {i} {float(v):+.{digits}f}" for i, v in enumerate(self.metric_change.mean(-1))))
        return "\n".join(out)

    def __repr__(self) -> str:
        return "DirectionEffects\n" + self.table()

    def plot(self, **kwargs):
        """Lines over later layers per direction (:func:`steerlab.viz.direction_effects_lines`)."""
        from steerlab.viz import direction_effects_lines

        return direction_effects_lines(self, **kwargs)


def direction_effects(lab, inputs, subspace: Subspace, *, source=None, scale: float = 1.0, sites=None, metric=None) -> DirectionEffects:
    """Patch each basis direction of ``subspace`` alone and follow it downstream.

    ``source``: the one-dimensional interchange ``h ← h + (r·(s − h)) r``; without it,
    ``h ← h + scale·r``. ``sites``: where to look (default: the subspace's kind of site at its
    layer and every later one). One forward of ``k × batch`` rows, and one of the base.
    """
    if not isinstance(subspace, Subspace):
        raise ConfigError(f"expected a Subspace; got {type(subspace).__name__}")
    if subspace.heads is not None:
        raise ConfigError("direction_effects follows whole-vector directions; this subspace is per head")
    site = lab.resolve(subspace.site)
    if sites is None:
        if site.layer is None:
            raise ConfigError(f"give sites= to follow a direction at {site.name!r} (it has no layer)")
        kind = _kind(site.name)
        sites = [f"blocks.{x}.{kind}" for x in range(site.layer, lab.n_layers)]
    names = [lab.resolve(n).name for s in ([sites] if isinstance(sites, str) else sites) for n in lab.facts.expand(s)]
    for n in names:
        if lab.facts.site_shape(lab.resolve(n))[-1] != subspace.width:
            raise SubspaceSizeError(f"{n!r} has width {lab.facts.site_shape(lab.resolve(n))[-1]}; the subspace has {subspace.width}")
    inp = lab.facts.inputs(inputs)
    B, K = inp.batch, subspace.size
    R = subspace.basis.to(lab.device)
    pos = subspace.positions
    rows_r = R.repeat_interleave(B, dim=0)  # [K*B, d]: row c*B + i patches direction c
    coef_store: dict = {}

    def edit(h: Tensor, s: Tensor | None = None) -> Tensor:
        r = rows_r[:, None].to(h.dtype)
        c = ((s - h) * r).sum(-1, keepdim=True) if s is not None else torch.full_like(h[..., :1], float(scale))
        coef_store["c"] = c.detach()[:, :, 0].float()
        return h + c * r

    src = None if source is None else _repeated_source(lab, site.name, pos, source, B, K)
    iv = Lambda(site.name, edit, sourced=source is not None, positions=pos, source=src)
    reads = [Collect(n, positions=pos) for n in names]
    m = None if metric is None else (lambda mm: mm.bind(lab) if mm.tokenizer is None else mm)(as_metric(metric))
    with torch.no_grad():
        base = lab.run(inp, [Collect(n, positions=pos, name=f"base:{n}") for n in names], **lab.facts.no_cache)
        patched = lab.run(inp.repeat(K), [iv, *reads], **lab.facts.no_cache)
    along, norm = [], []
    for n in names:
        d = (patched.cache[n].float() - base.cache[f"base:{n}"].float().repeat(K, *([1] * (base.cache[f"base:{n}"].dim() - 1))))
        along.append((d * rows_r[:, None]).sum(-1).mean(1).view(K, B))
        norm.append(d.norm(dim=-1).mean(1).view(K, B))
    change = None
    if m is not None:
        mb = check_metric(m(base.output, inp), B, m.name).float()
        mp = check_metric(m(patched.output, inp.repeat(K)), K * B, m.name).float().view(K, B)
        change = (mp - mb[None]).cpu()
    return DirectionEffects(
        torch.stack(along, 1).cpu(), torch.stack(norm, 1).cpu(), names, [lab.resolve(n).layer for n in names],
        coef_store["c"].mean(1).view(K, B).cpu(), None if m is None else m.name, change,
        "interchange" if source is not None else f"add {scale:g}·r",
    )


def _repeated_source(lab, site: str, positions, source, batch: int, copies: int) -> SourceValue:
    """The source's slice at ``site`` and ``positions``, for ``copies`` copies of a batch of ``batch``."""
    sv = lab.source_value(Lambda(site, lambda h, s: h, sourced=True, positions=positions, source=source))
    v = sv.value if sv.value.shape[0] == batch else sv.value.expand(batch, *sv.value.shape[1:])
    return SourceValue(v.repeat(copies, *([1] * (v.dim() - 1))))
