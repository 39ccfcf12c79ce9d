"""The numbers the steering evaluation computes, each a small function checked by hand in the tests.

For a response ``y`` to an instruction ``x`` (AxBench's three axes, scored
offline here, each in ``[0, 1]``):

- **concept score**: the concept's judge on ``y`` (:mod:`steerlab.reft.judges`);
- **instruction relevance**: ``max(0, cos(e(x), e(y)))`` with ``e`` the
  mean-pooled MiniLM sentence embedding (all-MiniLM-L6-v2's own pooling);
- **fluency**: ``(1 − repetition(y)) · min(1, ppl_ref / ppl(y))``: the base
  model's perplexity of ``y`` given the prompt, relative to ``ppl_ref`` (the
  geometric mean perplexity of the unsteered model's own responses to the
  same instructions), times the share of ``y``'s word 3-grams that do not
  repeat an earlier one;
- **harmonic mean** of the three, per response (0 if any is 0), then averaged.

Concept detection: each text's score is its largest projection onto the
direction over its tokens (max-pooled), and :func:`auroc` compares held-out
positives with negatives (the Mann–Whitney statistic; ties count one half).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from steerlab.interventions import Lab, Subspace
from steerlab.interventions.errors import DataError

__all__ = [
    "repetition_rate",
    "harmonic_mean",
    "fluency",
    "auroc",
    "response_perplexity",
    "relevance",
    "token_projections",
    "max_projection",
]


def repetition_rate(text: str, n: int = 3) -> float:
    """The share of the text's word ``n``-grams that repeat an earlier one (0 for fewer than ``n`` words)."""
    words = text.lower().split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def harmonic_mean(*values: float) -> float:
    """``k / Σ 1/v``; 0 if any value is 0 (or below)."""
    if not values:
        raise DataError("harmonic_mean of nothing")
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def fluency(perplexity: float, repetition: float, reference_perplexity: float) -> float:
    """``(1 − repetition) · min(1, reference_perplexity / perplexity)``."""
    if not perplexity > 0 or not reference_perplexity > 0:
        raise DataError(f"perplexities must be positive; got {perplexity} and {reference_perplexity}")
    return (1.0 - repetition) * min(1.0, reference_perplexity / perplexity)


def auroc(positives: Sequence[float] | Tensor, negatives: Sequence[float] | Tensor) -> float:
    """Area under the ROC curve: ``P(score(pos) > score(neg)) + ½ P(equal)``."""
    p = torch.as_tensor(positives, dtype=torch.float64).flatten()
    q = torch.as_tensor(negatives, dtype=torch.float64).flatten()
    if not len(p) or not len(q):
        raise DataError(f"auroc needs positives and negatives; got {len(p)} and {len(q)}")
    greater = (p[:, None] > q[None, :]).double().sum()
    ties = (p[:, None] == q[None, :]).double().sum()
    return float((greater + 0.5 * ties) / (len(p) * len(q)))


def response_perplexity(lab: Lab, prompts: Sequence[str], responses: Sequence[str], *, batch_size: int = 16) -> list[float]:
    """The model's perplexity of each response given its (already formatted) prompt, with no interventions:
    ``exp(mean NLL of the response tokens)``; an empty response gets ``inf``."""
    if len(prompts) != len(responses):
        raise DataError(f"{len(prompts)} prompts but {len(responses)} responses")
    tok = lab.tokenizer
    out: list[float] = []
    for i in range(0, len(prompts), batch_size):
        rows = []
        for p, r in zip(prompts[i : i + batch_size], responses[i : i + batch_size]):
            pi = tok(p, add_special_tokens=False)["input_ids"]
            ri = tok(r, add_special_tokens=False)["input_ids"]
            rows.append((pi, ri))
        width = max(len(pi) + len(ri) for pi, ri in rows)
        ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for j, (pi, ri) in enumerate(rows):
            seq = pi + ri
            ids[j, : len(seq)] = torch.tensor(seq)
            mask[j, : len(seq)] = 1
            labels[j, len(pi) : len(seq)] = torch.tensor(ri, dtype=torch.long)
        with torch.no_grad():
            logits = lab.run({"input_ids": ids.to(lab.device), "attention_mask": mask.to(lab.device)}).logits.float().cpu()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="none").view(len(rows), -1)
        counts = (labels[:, 1:] != -100).sum(-1)
        for j in range(len(rows)):
            out.append(math.exp(float(nll[j].sum() / counts[j])) if counts[j] else math.inf)
    return out


def relevance(embedder: Lab, instructions: Sequence[str], responses: Sequence[str], *, site: str | None = None) -> list[float]:
    """``max(0, cos)`` of the mean-pooled embeddings of each instruction and its response (MiniLM by default:
    its last block's output, as sentence-transformers pools it)."""
    from steerlab.reft.judges import mean_pooled

    if len(instructions) != len(responses):
        raise DataError(f"{len(instructions)} instructions but {len(responses)} responses")
    site = site or f"blocks.{embedder.n_layers - 1}.resid_post"
    a = mean_pooled(embedder, list(instructions), site)
    b = mean_pooled(embedder, list(responses), site)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    return [max(0.0, float(c)) for c in cos]


def token_projections(lab: Lab, texts: Sequence[str], direction: Subspace, *, batch_size: int = 32, skip_first: bool = True) -> list[Float[Tensor, " pos"]]:
    """``h_t · v`` at the direction's site for every real token of each text (the first skipped by default)."""
    name = lab.resolve(direction.site).name
    v = direction.basis[0]
    out = []
    for i in range(0, len(texts), batch_size):
        enc = lab.tokenizer(list(texts[i : i + batch_size]), return_tensors="pt", padding=True)
        enc = {k: t.to(lab.device) for k, t in enc.items() if k in ("input_ids", "attention_mask")}
        with torch.no_grad():
            acts = lab.collect(enc, name)[name].float().cpu()
        for row, m in zip(acts, enc["attention_mask"].bool().cpu()):
            proj = row[m] @ v
            out.append(proj[1:] if skip_first and len(proj) > 1 else proj)
    return out


def max_projection(lab: Lab, texts: Sequence[str], direction: Subspace, **kwargs) -> Float[Tensor, " batch"]:
    """Each text's largest token projection onto the direction (AxBench's max-pooled detection score)."""
    return torch.stack([p.max() for p in token_projections(lab, texts, direction, **kwargs)])
