"""``[attribution]``: attribution patching (AtP, AtP*) on one pair of the task's prompts, and inside the [das] subspace.

:func:`~steerlab.interventions.attribution_patching` estimates every cell's patching effect
(layers × positions, × heads or × neurons) from one base forward + backward and one
source forward; ``exact = true`` also runs the exact sweep of the same cells and
compares them cell by cell, ``refine = k`` patches the top ``k`` exactly. With a
``[das]`` table in the file, the subspace it finds is attributed too:
:func:`~steerlab.interventions.subspace_attribution` (per layer × token, inside the
subspace and in its complement), :func:`~steerlab.interventions.integrated_gradients`
along its interchange path (with the completeness check) and
:func:`~steerlab.interventions.direction_logits` (the tokens each direction writes).

The base/source pair is drawn as ``[patch]`` draws it (the same seed gives the same
pair), keeping only pairs whose prompts have equal token counts, since positions are
aligned token by token; or give ``base`` and ``source``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from steerlab.experiment.core import Context, Step, StepOutput, register_step
from steerlab.experiment.steps._common import answer, boolean, draw_pair, int_list, pair_table, positive_int
from steerlab.experiment.steps._figures import save_figures
from steerlab.interventions.errors import ConfigError

KEYS = {
    "sites": "site names or patterns (default \"blocks.*.resid_post\"); or give families",
    "families": "site families at every layer, e.g. [\"resid_post\", \"attn.out\", \"mlp.out\"] (each blocks.L.FAMILY)",
    "layers": "the layers of families (default: every layer)",
    "positions": "\"all\" (each position in turn; the default for whole sites), \"none\" (all at once; the default with heads or "
                 "neurons), a spec such as \"l3\", or a list of integers",
    "heads": "\"all\" or a list of heads: layers × heads at per-head sites (attn.z, attn.q, attn.k, attn.v)",
    "neurons": "true (every feature) or a list of feature indices: layers × neurons at whole-vector sites (e.g. mlp.post)",
    "metric": "logit_diff (default), logit, prob or logprob, read at the last token",
    "tokens": "the metric's tokens: [good, bad] for logit_diff, [token] for the others (default: the source's answer, then the base's)",
    "base": "table: the base prompt's input values, e.g. { NAME = \"John\" } (default: drawn from the task)",
    "source": "table: the source prompt's input values, whose answer differs from the base's (default: drawn)",
    "qk_fix": "AtP*'s attention-saturation fix at attn.q / attn.k sites: the softmax recomputed exactly (default false; no extra forward)",
    "grad_drop": "AtP*'s GradDrop: one extra backward pass per layer, ranks cells by the mean |estimate| without each layer (default false)",
    "refine": "patch the k cells with the largest estimates exactly (default 0)",
    "exact": "also run the exact sweep of the same cells and compare: rank correlation and top-k overlap per site family (default false)",
    "top_k": "k of the top-k overlap (default 10)",
    "subspace": "attribute the [das] step's subspace: per layer × token inside it and outside, integrated gradients, direct logits "
                "(default true when the file has [das])",
    "ig_steps": "Gauss-Legendre nodes of the integrated gradients inside the subspace (default 16; 0 skips them)",
}
METRICS = ("logit_diff", "logit", "prob", "logprob")
KIND_SUBSPACE = "subspace_attribution"  # the file-format kind of the subspace part


@dataclass
class AttributionConfig:
    sites: list[str]
    positions: Any  # absent: attribution_patching's default
    heads: Any
    neurons: Any
    metric: str
    tokens: list[str] | None
    base: dict | None
    source: dict | None
    qk_fix: bool
    grad_drop: bool
    refine: int
    exact: bool
    top_k: int
    subspace: bool
    ig_steps: int
    has_positions: bool


def _sites(table: dict, where: str) -> list[str]:
    if "sites" in table and ("families" in table or "layers" in table):
        raise ConfigError(f"{where}: give sites, or families (and layers), not both")
    if "layers" in table and "families" not in table:
        raise ConfigError(f"{where}: layers selects the layers of families; add families = [\"resid_post\"] (or give sites)")
    if "families" in table:
        fams = table["families"] if isinstance(table["families"], list) else [table["families"]]
        if not fams or not all(isinstance(f, str) and f and not f.startswith("blocks.") and "*" not in f for f in fams):
            raise ConfigError(f"{where}.families = {table['families']!r}: expected site families, e.g. [\"resid_post\", \"attn.out\", \"mlp.out\"]")
        layers = int_list(table["layers"], "layers", where) if "layers" in table else ["*"]
        return [f"blocks.{layer}.{f}" for f in fams for layer in layers]
    value = table.get("sites", "blocks.*.resid_post")
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(s, str) and s for s in items):
        raise ConfigError(f"{where}.sites = {value!r}: expected a site name, a pattern or a list of them")
    return items


def _positions(table: dict, where: str) -> Any:
    from steerlab.interventions import Positions

    pos = table.get("positions", "all")
    if pos == "none":
        return None
    if isinstance(pos, list) and pos and all(isinstance(p, int) and not isinstance(p, bool) for p in pos):
        return pos
    if isinstance(pos, str):
        try:
            ok = pos == "all" or Positions(pos).kind == "firstlast"
        except Exception:  # noqa: BLE001 - any parse failure is the same bad value
            ok = False
        if ok:
            return pos
    raise ConfigError(f"{where}.positions = {pos!r}: expected \"all\", \"none\", a spec such as \"l3\" or \"f2+l2\", or a list of integers")


def _units(table: dict, where: str) -> tuple[Any, Any]:
    heads, neurons = table.get("heads"), table.get("neurons")
    if heads is not None and neurons is not None:
        raise ConfigError(f"{where}: give heads or neurons, not both (a cell is a head or a feature)")
    if heads is not None and heads != "all":
        heads = int_list(heads, "heads", where)
    if neurons is not None and neurons is not True:
        if neurons is False:
            neurons = None
        else:
            neurons = int_list(neurons, "neurons", where)
    return heads, neurons


def parse(table: dict, ctx: Context) -> AttributionConfig:
    where = f"{ctx.experiment.where} [attribution]"
    metric = table.get("metric", "logit_diff")
    if metric not in METRICS:
        raise ConfigError(f"{where}.metric = {metric!r}: expected one of {', '.join(METRICS)}")
    tokens = table.get("tokens")
    if tokens is not None:
        want = 2 if metric == "logit_diff" else 1
        tokens = tokens if isinstance(tokens, list) else [tokens]
        if len(tokens) != want or not all(isinstance(t, str) and t for t in tokens):
            raise ConfigError(f"{where}.tokens = {table['tokens']!r}: {metric} takes {want} token string{'s' * (want > 1)}"
                              + (", [good, bad], e.g. [\" Paris\", \" Rome\"]" if want == 2 else ", e.g. [\" Paris\"]"))
    heads, neurons = _units(table, where)
    refine = table.get("refine", 0)
    if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
        raise ConfigError(f"{where}.refine = {refine!r}: expected the number of top cells to patch exactly (an integer >= 0)")
    ig_steps = table.get("ig_steps", 16)
    if isinstance(ig_steps, bool) or not isinstance(ig_steps, int) or ig_steps < 0:
        raise ConfigError(f"{where}.ig_steps = {ig_steps!r}: expected an integer >= 0 (0 skips integrated gradients)")
    exact = boolean(table, "exact", False, where)
    if exact and neurons is not None:
        raise ConfigError(f"{where}: exact = true sweeps sites or heads; a neuron grid has no batched sweep (use refine = k)")
    has_das = "das" in ctx.experiment.configs
    subspace = boolean(table, "subspace", has_das, where)
    if subspace and not has_das:
        raise ConfigError(f"{where}.subspace = true attributes the subspace of the file's [das] step; add a [das] table")
    base, source = pair_table(table, ctx, where, "the metric would not move")
    return AttributionConfig(
        sites=_sites(table, where), positions=_positions(table, where), heads=heads, neurons=neurons, metric=metric, tokens=tokens,
        base=base, source=source, qk_fix=boolean(table, "qk_fix", False, where), grad_drop=boolean(table, "grad_drop", False, where),
        refine=refine, exact=exact, top_k=positive_int(table, "top_k", 10, where), subspace=subspace, ig_steps=ig_steps,
        has_positions="positions" in table,
    )


def plan(c: AttributionConfig) -> str:
    method = "AtP*" if c.qk_fix and c.grad_drop else "AtP+QK" if c.qk_fix else "AtP+GradDrop" if c.grad_drop else "AtP"
    units = f" × heads {c.heads}" if c.heads is not None else f" × neurons {c.neurons}" if c.neurons is not None else ""
    pos = repr(c.positions) if c.has_positions else "default"
    pair = f"base {c.base} and source {c.source}" if c.base else "a base/source pair drawn from the task"
    extra = [f"exact sweep of the same cells (top-{c.top_k} overlap)"] if c.exact else []
    extra += [f"the top {c.refine} cells patched exactly"] if c.refine else []
    extra += [f"the [das] subspace per layer × token, integrated gradients ({c.ig_steps} steps), direct logits"] if c.subspace else []
    return (f"{method} at {c.sites}{units}, positions {pos}, on {pair}; metric {c.metric}"
            + (f" of {c.tokens}" if c.tokens else " of the answers") + ("; " + "; ".join(extra) if extra else ""))


# -- the pair and the metric ----------------------------------------------------------------------------------
def metric_of(c: AttributionConfig, task, base: dict, source: dict):
    """The step's metric (steerlab.interventions.metrics) with its tokens."""
    from steerlab.interventions import metrics

    tokens = c.tokens or [task.answers[answer(task, source)], task.answers[answer(task, base)]]
    if c.metric == "logit_diff":
        return metrics.logit_diff(tokens[0], tokens[1])
    return getattr(metrics, c.metric)(tokens[0])


def _unit_kwargs(c: AttributionConfig) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    if c.has_positions:
        kw["positions"] = c.positions
    if c.heads is not None:
        kw["heads"] = c.heads
    return kw


# -- running ---------------------------------------------------------------------------------------------------
def run(c: AttributionConfig, ctx: Context) -> StepOutput:
    from steerlab.interventions import attribution_patching, sweep
    from steerlab.viz import Pre

    lab, task = ctx.lab, ctx.task
    base, source = (c.base, c.source) if c.base else draw_pair(task, ctx.seed, "[attribution]", tokenizer=lab.tokenizer)
    enc = task.encoder(lab.tokenizer)
    b_text, s_text = enc.text(base), enc.text(source)
    metric = metric_of(c, task, base, source)
    folder = ctx.out / "attribution"
    fp = lab.fingerprint()
    result = attribution_patching(lab, b_text, s_text, metric=metric, sites=c.sites, neurons=c.neurons, qk_fix=c.qk_fix,
                                  grad_drop=c.grad_drop, refine=c.refine, **_unit_kwargs(c))
    files = [result.save(folder / "result", fingerprint=fp)]
    figures: dict[str, Any] = {f"{result.method} estimate": result.plot()}
    summary: dict[str, Any] = {"base": b_text, "source": s_text, "metric": result.metric, "method": result.method,
                               "base_value": float(result.base_value), "source_value": float(result.source_value),
                               "cells": int(result.effect.numel()), "top": [list(t) for t in result.top(c.top_k)], "refined": result.refined()}
    text = [result.table()]
    if c.exact:
        exact = sweep(lab, b_text, s_text, metric=metric, sites=c.sites, **_unit_kwargs(c))
        files.append(exact.save(folder / "exact", fingerprint=fp))
        cmp = result.compare(exact, k=c.top_k)
        figures[f"{result.method} vs exact patching"] = cmp.plot()
        summary.update({"spearman": cmp.spearman, "pearson": cmp.pearson, "overlap": cmp.overlap, "families": cmp.rows(),
                        "failures": cmp.failures(5), "exact_forwards": exact.forwards})
        text.append(cmp.table())
    if c.subspace:
        summary["subspace"] = _subspace(c, ctx, metric, base, source, folder, figures, files, text)
    files += save_figures(figures, folder)
    figures["tables"] = Pre("\n\n".join(text))
    return StepOutput(summary=summary, figures=figures, files=files, text="\n\n".join(text), result=result,
                      inputs={"attribution:pair": _sha({"base": base, "source": source, "base_text": b_text, "source_text": s_text,
                                                        "metric": result.metric})})


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _subspace(c: AttributionConfig, ctx: Context, metric, base: dict, source: dict, folder, figures: dict, files: list,
              text: list) -> dict[str, Any]:
    """Subspace attribution, integrated gradients and direct logits of each subspace the [das] step found."""
    from steerlab.interventions import direction_logits, integrated_gradients, subspace_attribution

    lab, task = ctx.lab, ctx.task
    enc = task.encoder(lab.tokenizer)
    b_text, s_text = enc.text(base), enc.text(source)
    das = ctx.outputs["das"].result
    out: dict[str, Any] = {}
    for variable, sub in das.subspaces.items():
        sa = subspace_attribution(lab, b_text, sub, metric=metric, source=s_text)
        files.append(save_subspace_attribution(sa, folder / f"subspace_{variable}", lab.fingerprint()))
        figures[f"attribution inside the {variable} subspace (layers × tokens)"] = sa.plot()
        text.append(sa.table())
        row: dict[str, Any] = {"site": sub.site, "size": sub.size, "inside": _nan_list(sa.inside[..., 0].nansum(1)),
                               "outside": _nan_list(sa.outside[..., 0].nansum(1))}
        if c.ig_steps:
            ig = integrated_gradients(lab, b_text, s_text, sub, metric=metric, steps=c.ig_steps, positions=_ig_positions(ctx, enc, base, source))
            files.append(save_integrated_gradients(ig, folder / f"ig_{variable}", lab.fingerprint()))
            figures[f"integrated gradients inside the {variable} subspace"] = ig.plot()
            text.append(ig.table())
            row.update({"ig_total": float(ig.total.mean()), "ig_exact": float(ig.exact.mean()), "ig_completeness": ig.completeness(),
                        "ig_per_direction": [float(x) for x in ig.per_direction]})
        dl = direction_logits(lab, sub, inputs=b_text, metric=metric)
        figures[f"what each {variable} direction writes (direct logits)"] = dl.plot()
        text.append(dl.table())
        row["promoted"] = [[t for t, _ in p] for p in dl.promoted]
        out[variable] = row
    return out


def _ig_positions(ctx: Context, enc, base: dict, source: dict):
    """Where the [das] step intervened, as real-token indices of base and source (they must agree)."""
    import torch

    pos = ctx.experiment.configs["das"].positions
    if pos is None:
        return None
    where = [enc.positions(pos, [s], enc.encode([s])) for s in (base, source)]
    if not torch.equal(where[0], where[1]):
        raise ConfigError(f"[attribution]: the [das] position {pos!r} is token {int(where[0][0, 0])} of the base but "
                          f"{int(where[1][0, 0])} of the source; give a base and source where it is the same token")
    return int(where[0][0, 0])  # one example each side: a real-token index (IG repeats the base along its path)


def _nan_list(x) -> list:
    return [None if v != v else float(v) for v in x.tolist()]


def save_subspace_attribution(sa, directory, fingerprint: dict | None = None):
    """A :class:`~steerlab.interventions.SubspaceAttribution` in the one file format (kind ``subspace_attribution``)."""
    from steerlab.interventions import fileformat

    config = {"sites": sa.sites, "layers": sa.layers, "tokens": sa.tokens, "mode": sa.mode, "metric": sa.metric, "subspace": sa.subspace}
    tensors = {"inside": sa.inside, "outside": sa.outside, "directions": sa.directions, "base_metric": sa.base_metric}
    if sa.source_metric is not None:
        tensors["source_metric"] = sa.source_metric
    return fileformat.save(directory, kind=KIND_SUBSPACE, config=config, tensors=tensors, fingerprint=fingerprint,
                           nonfinite=("inside", "outside", "directions"))


def save_integrated_gradients(ig, directory, fingerprint: dict | None = None):
    """An :class:`~steerlab.interventions.IntegratedGradients` in the one file format (kind ``integrated_gradients``)."""
    from steerlab.interventions import fileformat

    positions = ig.positions.tolist() if hasattr(ig.positions, "tolist") else ig.positions
    config = {"steps": ig.steps, "metric": ig.metric, "site": ig.site, "positions": positions, "subspace": ig.subspace}
    tensors = {"attributions": ig.attributions, "base_metric": ig.base_metric, "interchanged_metric": ig.interchanged_metric}
    return fileformat.save(directory, kind="integrated_gradients", config=config, tensors=tensors, fingerprint=fingerprint)


register_step(Step("attribution", parse=parse, run=run, plan=plan, keys=KEYS, order=35,
                   doc="attribution patching (AtP / AtP*) on a pair of the task's prompts, optionally against the exact sweep, and "
                       "inside the [das] subspace; saves attribution/result (AttributionResult.load), attribution/exact, "
                       "attribution/subspace_*, attribution/ig_* and their figures"))
