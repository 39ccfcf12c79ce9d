"""Activation caching: values computed once and reused by later calls.

* :func:`collect`: the values at some sites, in one forward that stops right
  after the last of them (an :class:`~steerlab.interventions.ActivationCache`);
* :func:`source_value`: the slice an interchange would read from a source, as a
  reusable :class:`~steerlab.interventions.SourceValue` (attached lifetimes and
  generation take one);
* :func:`prefix` / :func:`prefixes`: the residual stream entering a block
  (:class:`~steerlab.interventions.Prefix`), for forwards that resume there;
* :func:`past`: the keys and values of the first positions at every layer, for
  a prefix that also covers the first positions (:meth:`Prefix.after`).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor

from steerlab.interventions.activation_cache import ActivationCache
from steerlab.interventions.call import Bindings, running
from steerlab.interventions.engine import forward
from steerlab.interventions.errors import ConfigError, UnitError
from steerlab.interventions.facts import ModelFacts
from steerlab.interventions.graph import Graph, SourceValue
from steerlab.interventions.ops import Collect, Intervention
from steerlab.interventions.plan import Forward, Plan
from steerlab.interventions.prefix import Prefix, resume_from

__all__ = ["collect", "source_value", "prefix", "prefixes", "past"]


def collect(facts: ModelFacts, inputs: Any, sites: str | Sequence[str], *, positions=None, heads=None, detach: bool = True) -> ActivationCache:
    """The values at ``sites`` (names or patterns like ``blocks.*.resid_post``) in one forward that
    stops after the last of them; ``detach=False`` keeps their autograd graph."""
    names = [n for s in ([sites] if isinstance(sites, str) else sites) for n in facts.expand(s)]
    g = Graph()
    run = g.run(inputs, [Collect(n, positions=positions, heads=heads, detach=detach) for n in names], name="collect")
    plan = Plan.build(facts, g)
    node = plan.by_run[run.index]
    b = Bindings().stop_after(len(node.edits))
    grad = torch.is_grad_enabled() and not detach
    with running(facts.model, "collect"):
        forward(facts, Forward(node.inputs, node.edits, {}, b, True, grad, None, facts.no_cache, node))
    return ActivationCache(b.cache)


def source_value(facts: ModelFacts, iv: Intervention, inputs: Any = None) -> SourceValue:
    """The slice ``iv`` would read from ``inputs`` (default: its ``source``), as a reusable :class:`SourceValue`."""
    inputs = iv.source if inputs is None else inputs
    site = iv.source_site or iv.site
    spec = iv.effective_source_positions()
    cache = collect(facts, inputs, site, positions=spec, heads=iv.heads)
    value = cache[facts.resolve(site).name]
    if iv.dims is not None:
        value = value[..., list(iv.dims)]
    valid = None
    if spec.may_be_empty:
        valid = spec.resolve(facts.inputs(inputs).mask_info()) >= 0
    return SourceValue(value, valid)


def prefix(facts: ModelFacts, inputs: Any, layer: int) -> Prefix:
    """The residual stream entering block ``layer`` for ``inputs``, computed once."""
    out, _ = prefixes(facts, inputs, [layer])
    return out[layer % facts.n_layers]


def prefixes(facts: ModelFacts, inputs: Any, layers: Sequence[int], *, sites: Sequence[str] = ()) -> tuple[dict[int, Prefix], ActivationCache]:
    """A :class:`Prefix` for each of ``layers`` and the values at ``sites``,
    all from one forward that stops after the last of them (every position)."""
    names = list(dict.fromkeys([f"blocks.{layer}.resid_pre" for layer in layers] + list(sites)))
    cache = collect(facts, inputs, names)
    out = {}
    for layer in layers:
        key = layer % facts.n_layers
        out[key] = Prefix(key, cache[facts.resolve(f"blocks.{layer}.resid_pre").name], facts.tuple_len)
    return out, cache


def past(facts: ModelFacts, inputs: Any, start: int, *, prefix: Prefix | None = None) -> tuple[tuple[Tensor, Tensor], ...]:
    """Keys and values of the first ``start`` positions at every layer (one forward of ``inputs``
    cut to ``start`` tokens), for :meth:`Prefix.after`.

    With ``prefix`` (of the full ``inputs``), the forward starts at its layer and
    the blocks below it get empty placeholders: a forward resumed from that
    layer or above never reads them.
    """
    inp = facts.inputs(inputs)
    if not facts.is_hf or "input_ids" not in inp.kwargs:
        raise ConfigError("a KV-cache prefix needs a Hugging Face model run on input_ids")
    if not 0 < start < inp.seq:
        raise UnitError(f"start={start}: expected 0 < start < {inp.seq} (the inputs' length)")
    cut = {k: v[:, :start] if isinstance(v, Tensor) and v.dim() == 2 else v for k, v in inp.kwargs.items()}
    below = None if prefix is None else Prefix(prefix.layer, prefix.hidden[:, :start], prefix.tuple_len)
    model = facts.model
    with torch.no_grad(), running(model, "past"), resume_from(facts.layers, below, root=model) if below is not None else nullcontext():
        out = model(**cut, use_cache=True)
    cache = out.get("cache") if hasattr(out, "get") and out.get("cache") is not None else getattr(out, "past_key_values", None)
    layers = getattr(cache, "layers", None)
    if layers is None or not all(hasattr(layer, "keys") for layer in layers):
        raise ConfigError(f"{type(model).__name__} keeps a {type(cache).__name__}; a KV-cache prefix needs a DynamicCache of keys and values")
    if any(getattr(layer, "is_sliding", False) for layer in layers):
        raise ConfigError(f"{type(model).__name__}'s cache has sliding-window layers; a KV-cache prefix supports full-attention caches only")
    filled = [(layer.keys, layer.values) for layer in layers if getattr(layer, "keys", None) is not None and layer.keys.numel()]
    k0, v0 = filled[0]
    empty = (torch.zeros(()).expand_as(k0), torch.zeros(()).expand_as(v0))  # placeholders: never read
    return tuple((layer.keys, layer.values) if getattr(layer, "keys", None) is not None and layer.keys.numel() else empty for layer in layers)
