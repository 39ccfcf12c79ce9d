"""Steering directions from labelled text: DiffMean, PCA, linear probe, CAA, ActAdd.

Each finder reads activations at one site of a wrapped model (``lab.collect``)
and returns a :class:`~steerlab.interventions.Subspace` of size 1 at that site:
a unit direction ``v`` (``basis[0]``), oriented so that the positive class
projects higher, with metadata

- ``method``: which finder made it;
- ``scale``: the length of the raw vector the method defines (the mean
  difference for DiffMean, CAA and ActAdd; the difference of the class means'
  projections for PCA and the probe);
- ``norm``: the median norm of the site's token activations in the data, the
  unit of a steering factor.

The thing a steering method applies is then an ordinary ``Add``:
``h' = h + α · norm · v`` (``steerlab.reft.steering_add(direction, α)``),
saveable and composable like any intervention; at ``α = 0`` it is the
unsteered model exactly.

Tokens: every real token of a text, except the first one by default
(``skip_first=True``): in LLaMA-like models the first position is the
attention sink, whose activation is huge and the same whatever the text, so it
would swamp means and max-pooled projections alike.

=========  ==================================================================
finder     the vector (before normalising)
=========  ==================================================================
diff_mean  mean of the positive texts' token activations minus the negatives'
           (AxBench's DiffMean; Marks & Tegmark 2023)
pca        first principal component of paired differences of per-text mean
           activations, signs of the pairs randomised first (RepE, Zou 2023)
probe      the weight of an L2-regularised logistic regression on per-text
           mean activations (AxBench's linear probe)
caa        mean over A/B questions of (activation at the matching answer
           letter − at the other letter) (Rimsky et al. 2024)
actadd     activation at the last token of one prompt minus another's
           (Turner et al. 2023; steerlab adds it as one vector at every
           position, where the paper adds the position-wise difference of the
           pair at the first positions of the prompt)
=========  ==================================================================
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from steerlab.interventions import Lab, Subspace
from steerlab.interventions.errors import ConfigError, DataError, checked_first
from steerlab.interventions.probe import fit_logistic

__all__ = [
    "token_activations",
    "diff_mean",
    "pca",
    "probe",
    "caa",
    "ab_questions",
    "actadd",
    "logistic_regression",
]


def _texts(name: str, texts) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence) or not texts or not all(isinstance(t, str) and t for t in texts):
        raise DataError(f"{name}: expected a non-empty list of non-empty strings; got {texts!r:.80}")
    return list(texts)


def _site(lab: Lab, site: str) -> str:
    if not isinstance(lab, Lab):
        raise ConfigError(f"expected a Lab (steerlab.wrap(model, tokenizer)); got {type(lab).__name__}")
    return lab.resolve(site).name  # unknown sites fail here, before any forward


def token_activations(
    lab: Lab, texts: Sequence[str], site: str, *, batch_size: int = 32, skip_first: bool = True
) -> list[Float[Tensor, "pos d_model"]]:
    """The activations at ``site`` of each text's real tokens (float32, on the CPU), one tensor per text.

    Texts are tokenised as the lab's tokenizer does by default (no chat template).
    ``skip_first`` drops each text's first token (see the module docstring).
    """
    texts, name = _texts("texts", texts), _site(lab, site)
    if lab.tokenizer is None:
        raise DataError("token_activations needs a tokenizer: wrap(model, tokenizer)")
    out: list[Tensor] = []
    for i in range(0, len(texts), batch_size):
        chunk = texts[i : i + batch_size]
        enc = lab.tokenizer(chunk, return_tensors="pt", padding=True)
        enc = {k: v.to(lab.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        with torch.no_grad():
            acts = lab.collect(enc, name)[name].float().cpu()
        mask = enc["attention_mask"].bool().cpu()
        for row, m in zip(acts, mask):
            real = row[m]
            if skip_first:
                if real.shape[0] < 2:
                    raise DataError(f"text {chunk[len(out) % batch_size]!r:.60} has one token; skip_first=True leaves none")
                real = real[1:]
            out.append(real)
    return out


def _median_norm(acts: list[Tensor]) -> float:
    return float(torch.cat(acts).norm(dim=-1).median())


def _direction(vector: Tensor, site: str, method: str, *, scale: float, norm: float, **meta) -> Subspace:
    length = float(vector.norm())
    if not length > 0:
        raise DataError(f"{method}: the positive and negative texts give the same activations at {site!r} (a zero vector)")
    return Subspace((vector / length)[None], site, metadata={"method": method, "scale": scale, "norm": norm, **meta})


def diff_mean(
    lab: Lab, site: str, positives: Sequence[str], negatives: Sequence[str], *, batch_size: int = 32, skip_first: bool = True
) -> Subspace:
    """``v ∝ mean(h over the positives' tokens) − mean(h over the negatives' tokens)``."""
    pos = token_activations(lab, _texts("positives", positives), site, batch_size=batch_size, skip_first=skip_first)
    neg = token_activations(lab, _texts("negatives", negatives), site, batch_size=batch_size, skip_first=skip_first)
    diff = torch.cat(pos).mean(0) - torch.cat(neg).mean(0)
    return _direction(diff, lab.resolve(site).name, "diffmean", scale=float(diff.norm()), norm=_median_norm(pos + neg))


def _means(acts: list[Tensor]) -> Float[Tensor, "batch d_model"]:
    return torch.stack([a.mean(0) for a in acts])


def _orient(v: Tensor, pos: Tensor, neg: Tensor) -> tuple[Tensor, float]:
    """``v`` flipped so that the positives' mean projection is the larger; and the gap between the two."""
    gap = float((pos @ v).mean() - (neg @ v).mean())
    return (v, gap) if gap >= 0 else (-v, -gap)


def pca(
    lab: Lab, site: str, positives: Sequence[str], negatives: Sequence[str], *, seed: int = 0, batch_size: int = 32, skip_first: bool = True
) -> Subspace:
    """First principal component of the paired differences ``mean(h(pos_i)) − mean(h(neg_i))``.

    Pairs are ``zip(positives, negatives)``; each difference's sign is flipped
    at random (``seed``) before centring, as RepE does, so that the component
    finds the axis the pairs differ along rather than their mean.
    """
    pos_t, neg_t = _texts("positives", positives), _texts("negatives", negatives)
    n = min(len(pos_t), len(neg_t))
    if n < 2:
        raise DataError(f"pca needs at least 2 pairs; got {n}")
    pos = _means(token_activations(lab, pos_t[:n], site, batch_size=batch_size, skip_first=skip_first))
    neg = _means(token_activations(lab, neg_t[:n], site, batch_size=batch_size, skip_first=skip_first))
    rng = random.Random(seed)
    signs = torch.tensor([rng.choice((-1.0, 1.0)) for _ in range(n)])
    diffs = (pos - neg) * signs[:, None]
    diffs = diffs - diffs.mean(0)
    v = torch.linalg.svd(diffs, full_matrices=False).Vh[0]
    v, gap = _orient(v, pos, neg)
    norm = float(torch.cat([pos, neg]).norm(dim=-1).median())
    return _direction(v, lab.resolve(site).name, "pca", scale=gap, norm=norm, explained=_explained(diffs))


def _explained(diffs: Tensor) -> float:
    s = torch.linalg.svdvals(diffs)
    return float(s[0] ** 2 / (s**2).sum())


def probe(
    lab: Lab,
    site: str,
    positives: Sequence[str],
    negatives: Sequence[str],
    *,
    weight_decay: float = 1e-3,
    max_iter: int = 200,
    batch_size: int = 32,
    skip_first: bool = True,
) -> Subspace:
    """The weight ``w`` of a logistic regression ``σ(w·x + b)`` on per-text mean activations,
    minimising the mean cross-entropy ``+ weight_decay · |w|²`` (L-BFGS, deterministic)."""
    pos = _means(token_activations(lab, _texts("positives", positives), site, batch_size=batch_size, skip_first=skip_first))
    neg = _means(token_activations(lab, _texts("negatives", negatives), site, batch_size=batch_size, skip_first=skip_first))
    x = torch.cat([pos, neg]).double()
    y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).double()
    w, b = logistic_regression(x, y, weight_decay=weight_decay, max_iter=max_iter)
    acc = float((((x @ w + b) > 0).double() == y).double().mean())
    v, gap = _orient(w.float(), pos, neg)
    norm = float(torch.cat([pos, neg]).norm(dim=-1).median())
    return _direction(v, lab.resolve(site).name, "probe", scale=gap, norm=norm, train_accuracy=acc, bias=float(b) / float(w.norm()))


def logistic_regression(x: Float[Tensor, "batch width"], y: Float[Tensor, " batch"], *, weight_decay: float, max_iter: int = 200) -> tuple[Tensor, Tensor]:
    """``(w, b)`` minimising ``mean BCE(x w + b, y) + weight_decay |w|²`` (L-BFGS from zero).

    Features are standardised for the optimisation and the solution mapped
    back, so ``w`` acts on ``x`` itself (:func:`steerlab.interventions.probe.fit_logistic`)."""
    return fit_logistic(x, y, weight_decay=weight_decay, max_iter=max_iter).in_input_space()


def _last_token(lab: Lab, texts: list[str], site: str, batch_size: int) -> Float[Tensor, "batch d_model"]:
    name = _site(lab, site)
    rows = []
    for i in range(0, len(texts), batch_size):
        enc = lab.tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True)
        enc = {k: v.to(lab.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        with torch.no_grad():
            rows.append(lab.collect(enc, name, positions=-1)[name][:, 0].float().cpu())
    return torch.cat(rows)


def ab_questions(
    question: str, positives: Sequence[str], negatives: Sequence[str], *, seed: int = 0
) -> list[tuple[str, str, str]]:
    """CAA's A/B format from example texts: ``(prompt, matching letter, other letter)`` per pair.

    The prompt is ``"{question}\\n\\nChoices:\\n(A) …\\n(B) …\\n\\nAnswer: ("``; which
    choice is the positive example is drawn at random (``seed``), so the letter
    itself carries no signal.
    """
    pos, neg = _texts("positives", positives), _texts("negatives", negatives)
    rng = random.Random(seed)
    items = []
    for p, n in zip(pos, neg):
        first_is_pos = rng.random() < 0.5
        a, b = (p, n) if first_is_pos else (n, p)
        prompt = f"{question}\n\nChoices:\n(A) {a}\n(B) {b}\n\nAnswer: ("
        items.append((prompt, "A", "B") if first_is_pos else (prompt, "B", "A"))
    return items


def _check_items(items: object) -> None:
    if not items or not isinstance(items, Sequence) or not all(
        isinstance(it, (tuple, list)) and len(it) == 3 and all(isinstance(s, str) for s in it) for it in items
    ):
        raise DataError(f"caa items: expected a non-empty list of (prompt, matching answer, other answer) strings; got {items!r:.80}")


@checked_first(items=_check_items)
def caa(lab: Lab, site: str, items: Sequence[tuple[str, str, str] | list[str]], *, batch_size: int = 32) -> Subspace:
    """``v ∝ mean_i [h(prompt_i + matching_i) − h(prompt_i + other_i)]`` at the answer's last token.

    ``items``: ``(prompt, matching answer, other answer)``, e.g. from :func:`ab_questions`.
    """
    match = _last_token(lab, [p + m for p, m, _ in items], site, batch_size)
    other = _last_token(lab, [p + o for p, _, o in items], site, batch_size)
    diff = (match - other).mean(0)
    norm = float(torch.cat([match, other]).norm(dim=-1).median())
    return _direction(diff, lab.resolve(site).name, "caa", scale=float(diff.norm()), norm=norm, n_items=len(items))


def actadd(lab: Lab, site: str, positive: str, negative: str) -> Subspace:
    """``v ∝ h(positive)[-1] − h(negative)[-1]``: one prompt pair (e.g. ``"Love"`` / ``"Hate"``)."""
    if not (isinstance(positive, str) and positive and isinstance(negative, str) and negative):
        raise DataError(f"actadd takes two non-empty prompts; got {positive!r} and {negative!r}")
    acts = _last_token(lab, [positive, negative], site, 2)
    diff = acts[0] - acts[1]
    return _direction(diff, lab.resolve(site).name, "actadd", scale=float(diff.norm()), norm=float(acts.norm(dim=-1).mean()),
                      pair=[positive, negative])
