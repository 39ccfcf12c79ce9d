"""Gradients of a metric with respect to site values: taps on one forward, then backward.

A *tap* at a site adds a zero tensor that requires grad to the site's value,
``h ↦ h + 0``. The forward is unchanged, and the gradient of the metric with
respect to that zero is ``∂metric/∂h`` at the site with every downstream path
counted: the tap's output is what the rest of the forward reads, so sites
edited in place (``resid_mid``) and per-head sites (``attn.z``, seen as
``[batch, pos, head, d_head]``) are covered alike. The base model stays frozen;
only the taps require grad, so nothing below the lowest tap is recorded::

    taps = Taps(["blocks.3.resid_post", "blocks.5.attn.z"])
    out = lab.run(inputs, taps.interventions)
    m = metric(out.output, inputs)                   # [batch]
    grads = taps.grad(m.sum())                       # site -> ∂m/∂value, the value's shape
    taps.values["blocks.3.resid_post"]               # the value itself (detached)

Examples of a batch do not interact, so ``grad(m.sum())`` gives each
example's own gradient. :func:`metric_gradients` does the three steps; a
caller that needs several backward passes through one forward (GradDrop)
keeps the graph with ``retain_graph=True``.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, no_type_check

import torch
from jaxtyping import Float
from torch import Tensor

from steerlab.interventions.errors import ConfigError, LifetimeError, ShapeMismatch
from steerlab.interventions.inputs import Inputs
from steerlab.interventions.metrics import Metric, as_metric
from steerlab.interventions.ops import Intervention, Lambda

__all__ = ["Taps", "Gradients", "metric_gradients", "metric_inputs", "logit_window"]


class Taps:
    """Zero-valued, grad-requiring additions at ``sites`` (resolved names), one forward's worth.

    ``interventions`` go into a run (before any edit at the same site that the
    gradient should pass through, after any edit it should see); after the
    forward, ``values`` holds each site's value and :meth:`grad` the metric's
    gradient at it. A second forward overwrites both.
    """

    def __init__(self, sites: Sequence[str]):
        self.sites = list(dict.fromkeys(sites))
        self.values: dict[str, Tensor] = {}
        self._leaves: dict[str, Tensor] = {}
        self.interventions: list[Intervention] = [Lambda(s, self._tap(s)) for s in self.sites]

    def _tap(self, site: str):
        @no_type_check  # a closure made per call: the suite's runtime checker would decorate it on every call
        def tap(h: Tensor) -> Tensor:
            leaf = torch.zeros_like(h, requires_grad=True)
            self.values[site] = h.detach()
            self._leaves[site] = leaf
            return h + leaf

        return tap

    def grad(self, output: Tensor, *, retain_graph: bool = False) -> dict[str, Tensor]:
        """``∂output/∂value`` at every site (zeros where the output does not depend on it)."""
        missing = [s for s in self.sites if s not in self._leaves]
        if missing:
            raise LifetimeError(f"no forward has run through the taps at {missing[:3]}: run the model with taps.interventions first")
        if not output.requires_grad:
            raise ConfigError(
                "the metric does not depend on any tapped site (its value has no gradient): is gradient computation "
                "disabled (torch.no_grad), or does the metric ignore the model's output?"
            )
        leaves = [self._leaves[s] for s in self.sites]
        gs = torch.autograd.grad(output, leaves, retain_graph=retain_graph, allow_unused=True)
        return {s: torch.zeros_like(leaf) if g is None else g for s, leaf, g in zip(self.sites, leaves, gs, strict=True)}

    def __repr__(self) -> str:
        return f"Taps({len(self.sites)} sites)"


@dataclass
class Gradients:
    """A metric's value per example and its gradient at each site.

    ``values[site]`` / ``grads[site]`` are ``[batch, pos, ...]`` in the padded
    layout of ``inputs`` (``[batch, pos, head, d_head]`` at per-head sites).
    """

    metric: Float[Tensor, " batch"]
    values: dict[str, Tensor]
    grads: dict[str, Tensor]
    inputs: Inputs
    output: Any = None


def logit_window(lab, info, metric: Metric) -> int | None:
    """How many final padded positions hold every logit ``metric`` reads, when the model can
    compute only those (``logits_to_keep``); ``None``: all. A small model's LM head is a large
    share of its forward (SmolLM2: a 49k vocabulary), and the logits dominate its memory."""
    try:
        takes = "logits_to_keep" in inspect.signature(lab.model.forward).parameters
    except (TypeError, ValueError):
        takes = False
    if metric.tail is None or not takes:
        return None
    first = int((info.starts + info.lengths - metric.tail).min())
    return info.seq - max(first, 0)


def metric_inputs(inputs: Inputs, window: int | None) -> Inputs:
    """``inputs`` cut to their last ``window`` positions (what kept logits line up with)."""
    if not window:
        return inputs
    seq = inputs.seq
    cut = lambda v: v[:, -window:] if isinstance(v, Tensor) and v.dim() == 2 and v.shape[1] == seq else v  # noqa: E731
    return Inputs(tuple(cut(a) for a in inputs.args), {k: cut(v) for k, v in inputs.kwargs.items()})


def check_metric(v, rows: int, name: str) -> Tensor:
    """A metric's output must be one value per example."""
    if not isinstance(v, Tensor) or v.shape != (rows,):
        got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
        raise ShapeMismatch(f"the metric {name!r} returned {got}; expected one value per example, shape ({rows},)")
    return v


def metric_gradients(
    lab,
    inputs,
    sites: str | Sequence[str],
    metric,
    *,
    interventions: Sequence[Intervention] = (),
    reference=None,
) -> Gradients:
    """``metric`` on ``inputs`` and its gradient at every site of ``sites`` (names or patterns).

    ``interventions`` act in the same forward, before the taps (an edit at a
    tapped site is seen by its tap: the gradient is taken at the edited value).
    ``reference`` is the unpatched run's output for metrics that compare with
    it (``kl_to_base``); by default the run itself.
    """
    names = [lab.resolve(n).name for s in ([sites] if isinstance(sites, str) else sites) for n in lab.facts.expand(s)]
    m = as_metric(metric)
    if m.tokenizer is None:
        m = m.bind(lab)
    inp = lab.facts.inputs(inputs)
    taps = Taps(names)
    window = logit_window(lab, inp.mask_info(), m)
    kwargs = {**lab.facts.no_cache, **({"logits_to_keep": window} if window else {})}
    with torch.enable_grad():
        res = lab.run(inp, [*interventions, *taps.interventions], **kwargs)
        seen = metric_inputs(inp, window)
        ref = res.output if reference is None else reference
        bound = m.against(ref, seen)
        value = check_metric(bound(res.output, seen), inp.batch, bound.name)
        grads = taps.grad(value.float().sum())
    return Gradients(value.detach().float(), dict(taps.values), grads, inp, res.output)
