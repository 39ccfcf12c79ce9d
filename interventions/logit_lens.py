"""The logit lens, and the model's read-out (final norm + unembedding) as a map to reuse.

:func:`logit_lens` sends each layer's residual stream through the model's own
final norm and unembedding, ``logits_L = W_U · norm(h_L)``, at every position:
the top tokens per layer × position, and a metric's value there (the metric is
read at each position as if it were the last). This is nostalgebraist's logit
lens; the model's last layer gives the model's own logits (up to any
model-level soft-capping, which the lens does not apply).

:class:`ReadOut` also gives the *frozen-scale* linear map used for direct
logit attribution: RMSNorm and LayerNorm are ``norm(h) = γ ⊙ c(h) / σ(h) + β``
(``c`` centres for LayerNorm, is the identity for RMSNorm); with ``σ`` taken
from the base run at a position, a component ``x`` of the residual stream
contributes ``W_U (γ ⊙ c(x) / σ)`` to the logits, and the contributions of all
components add up to the logits (minus the terms of ``β`` and the head's bias).
``γ``, ``β`` and whether the norm centres are read off the model's own norm
module by probing it (so Gemma's ``1 + w`` and other variants need no table),
and the reconstruction is checked on the run's own activations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor

from steerlab.interventions.errors import ConfigError, SiteNotFound
from steerlab.interventions.inputs import Inputs
from steerlab.interventions.metrics import as_metric

__all__ = ["ReadOut", "logit_lens", "LogitLens"]


class ReadOut:
    """The model's final norm and unembedding (``lab.resolve("final_norm")``, ``"logits"``)."""

    def __init__(self, lab):
        try:
            self.head = lab.resolve("logits").module
        except SiteNotFound:
            raise ConfigError("the logit lens and direct logit attribution need a language-model head; this model has none") from None
        try:
            self.norm = lab.resolve("final_norm").module
        except SiteNotFound:
            self.norm = None
        self.d = lab.d_model
        self.dtype = lab.dtype
        dev = lab.device
        u = torch.ones(self.d, device=dev)
        u[1::2] = -1.0
        with torch.no_grad():
            if self.norm is None:
                self.gain, self.bias, self.centres = torch.ones(self.d, device=dev), torch.zeros(self.d, device=dev), False
            else:
                n = lambda x: self.norm.forward(x.to(self.dtype)[None, None])[0, 0].float()  # noqa: E731
                plus, minus = n(u), n(-u)
                shifted = n(u + 5.0)
                self.centres = bool(torch.allclose(shifted, plus, atol=1e-3 * float(plus.abs().max()) + 1e-6))
                uc = u - u.mean() if self.centres else u
                self.gain = (plus - minus) / 2 / uc
                self.bias = (plus + minus) / 2
            zero = torch.zeros(1, 1, self.d, device=dev, dtype=self.dtype)
            self.head_bias = self.head.forward(zero)[0, 0].float()

    def centre(self, x: Tensor) -> Tensor:
        return x - x.mean(-1, keepdim=True) if self.centres else x

    def logits(self, h: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch vocab"]:
        """``W_U · norm(h)``: the model's own read-out."""
        x = h.to(self.dtype)
        if self.norm is not None:
            x = self.norm.forward(x)
        return self.head.forward(x).float()

    def scale(self, h: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch 1"]:
        """``σ(h)`` such that ``norm(h) = γ ⊙ c(h)/σ + β`` (least squares; checked)."""
        if self.norm is None:
            return torch.ones(*h.shape[:-1], 1, device=h.device)
        with torch.no_grad():
            n = self.norm.forward(h.to(self.dtype)).float() - self.bias
        a = self.gain * self.centre(h.float())
        sigma = (a * a).sum(-1, keepdim=True) / (a * n).sum(-1, keepdim=True).clamp_min(1e-30)
        err = (a / sigma - n).norm(dim=-1).max().item() if n.numel() else 0.0
        if err > 1e-2 * max(n.norm(dim=-1).max().item(), 1e-6):
            raise ConfigError(
                f"the final norm is not of the form γ ⊙ c(h)/σ + β (reconstruction error {err:.2e}); "
                "direct logit attribution needs an RMSNorm or LayerNorm read-out"
            )
        return sigma

    def frozen(self, x: Float[Tensor, "*batch d_model"], sigma: Tensor) -> Float[Tensor, "*batch d_model"]:
        """The norm's linear map at a frozen scale: ``γ ⊙ c(x) / σ`` (no ``β``)."""
        return self.gain * self.centre(x.float()) / sigma

    def unembed(self, x: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch vocab"]:
        """``W_U x`` without the head's bias."""
        return self.head.forward(x.to(self.dtype)).float() - self.head_bias

    def pullback(self, g: Float[Tensor, "*batch vocab"]) -> Float[Tensor, "*batch d_model"]:
        """``W_Uᵀ g``: a gradient on the logits as a vector of the norm's output space."""
        x = torch.zeros(*g.shape[:-1], self.d, device=g.device, dtype=torch.float32, requires_grad=True)
        with torch.enable_grad():
            (u,) = torch.autograd.grad((self.head.forward(x.to(self.dtype)).float() * g).sum(), x)
        return u


def _real(x: Tensor, info, n: int) -> Tensor:
    """``[batch, pos, ...]`` -> ``[batch, n, ...]`` by real-token position (clamped past the end)."""
    p = torch.arange(n, device=x.device)[None]
    rows = (info.starts.to(x.device)[:, None] + p).clamp(max=x.shape[1] - 1)
    return x[torch.arange(x.shape[0], device=x.device)[:, None], rows]


def tokens_of(lab, inp: Inputs, info) -> list[list[str]]:
    """Each example's real tokens, decoded one by one."""
    ids = inp.kwargs.get("input_ids")
    out = []
    for i in range(info.batch):
        n, s = int(info.lengths[i]), int(info.starts[i])
        if ids is None or lab.tokenizer is None:
            out.append([str(p) for p in range(n)])
        else:
            out.append([lab.tokenizer.decode([int(t)]) for t in ids[i, s : s + n].tolist()])
    return out


@dataclass
class LogitLens:
    """Per site (layer) × real position × example: the ``k`` top tokens and their
    probabilities, and the metric read there (``metric_values``, ``None`` without a metric;
    NaN past an example's end)."""

    sites: list[str]
    layers: list[int | None]
    top_ids: Int[Tensor, "layer batch pos top"]
    top_probs: Float[Tensor, "layer batch pos top"]
    top_tokens: list  # [layer][batch][pos] -> list of k strings
    tokens: list[list[str]]
    metric: str | None = None
    metric_values: Float[Tensor, "layer pos batch"] | None = None
    meta: dict = field(default_factory=dict)

    def table(self, *, example: int = 0, digits: int = 2) -> str:
        """Top-1 token (and probability) per layer × token of one example."""
        toks = self.tokens[example]
        cells = [[f"{self.top_tokens[i][example][p][0]!r} {float(self.top_probs[i, example, p, 0]):.{digits}f}"
                  for p in range(len(toks))] for i in range(len(self.sites))]
        if self.metric_values is not None:
            cells = [[c + f" ({float(self.metric_values[i, p, example]):+.{digits}f})" for p, c in enumerate(row)] for i, row in enumerate(cells)]
        cols = [repr(t) for t in toks]
        ws = [max(len(c), *(len(r[j]) for r in cells)) for j, c in enumerate(cols)]
        w0 = max(5, *(len(str(x)) for x in self.layers))
        title = "logit lens: top token and probability" + (f" ({self.metric})" if self.metric else "") + f", example {example}"
        out = [title, " ".join([f"{'layer':<{w0}}"] + [f"{c:>{w}}" for c, w in zip(cols, ws, strict=True)])]
        out += [" ".join([f"{layer!s:<{w0}}"] + [f"{x:>{w}}" for x, w in zip(row, ws, strict=True)])
                for layer, row in zip(self.layers, cells, strict=True)]
        return "\n".join(out)

    def __repr__(self) -> str:
        return f"LogitLens({len(self.sites)} sites × {self.top_ids.shape[2]} positions)\n" + self.table()

    def plot(self, **kwargs):
        """Layer × token heatmap of the metric (or the top-1 probability), top tokens as text
        (:func:`steerlab.viz.logit_lens_heatmap`)."""
        from steerlab.viz import logit_lens_heatmap

        return logit_lens_heatmap(self, **kwargs)


def logit_lens(lab, inputs, *, sites="blocks.*.resid_post", metric=None, k: int = 5) -> LogitLens:
    """The logit lens at every site of ``sites`` (residual-stream sites: ``resid_pre``,
    ``resid_mid``, ``resid_post``, ``embed``) for every real token of ``inputs``.

    ``metric``: read at each position as if it were the last (``logit_diff``, ``logit``,
    ``prob``, ``logprob`` and their per-example forms). One forward (collecting the sites),
    then the read-out per site.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"k={k!r}: expected a positive int")
    names = [lab.resolve(n).name for s in ([sites] if isinstance(sites, str) else sites) for n in lab.facts.expand(s)]
    for n in names:
        w = lab.facts.site_shape(lab.resolve(n))
        if len(w) != 1 or w[0] != lab.d_model:
            raise ConfigError(f"the logit lens reads residual-stream sites (width {lab.d_model}); {n!r} has shape {w}")
    m = None
    if metric is not None:
        m = as_metric(metric)
        m = m.bind(lab) if m.tokenizer is None else m
    inp = lab.facts.inputs(inputs)
    info = inp.mask_info()
    n = int(info.lengths.max())
    read = ReadOut(lab)
    cache = lab.collect(inp, names)
    ids, probs, texts, values = [], [], [], []
    ok = torch.arange(n, device=lab.device)[None] < info.lengths.to(lab.device)[:, None]
    with torch.no_grad():
        for name in names:
            logits = read.logits(_real(cache[name], info, n))  # [b, n, vocab]
            p, i = logits.softmax(-1).topk(min(k, logits.shape[-1]), dim=-1)
            ids.append(i.cpu())
            probs.append(p.cpu())
            texts.append([[[lab.tokenizer.decode([t]) if lab.tokenizer is not None else str(t) for t in row] for row in ex]
                          for ex in i.tolist()])
            if m is not None:
                per = torch.stack([m(logits[:, [q]], None).float() for q in range(n)])  # [n, b]
                values.append(per.masked_fill(~ok.T, math.nan).cpu())
    return LogitLens(
        names, [lab.resolve(x).layer for x in names], torch.stack(ids), torch.stack(probs), texts, tokens_of(lab, inp, info),
        None if m is None else m.name, None if m is None else torch.stack(values),
    )
