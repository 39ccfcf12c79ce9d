# %% [markdown]
# # Attribution: where does SmolLM2 decide France → Paris, and what does a polarity subspace do?
#
# **Question.** Given *"The capital of Italy is"*, SmolLM2-135M says *" Rome"*; given *"… France is"*,
# *" Paris"*. Which layers, tokens and heads carry the country to the answer? Tutorial 01 answered it
# with activation patching: one forward per patched cell. Here we answer it first with **attribution
# patching** (AtP): the first-order estimate of every patch from one forward and backward of the
# Italy run and one forward of the France run,
#
# $$\text{effect}(a) \approx (a_\text{France} - a_\text{Italy}) \cdot \partial\,\text{metric} / \partial a ,$$
#
# then check the estimate by patching its top cells exactly, see where the linear estimate fails and
# what AtP\* (Kramár et al. 2024) fixes, read what the layers write (logit lens, direct logit
# attribution), and finally attribute *inside a subspace*: the 4-dimensional subspace where DAS finds a
# review's polarity.
#
# **Run time.** Fast mode (`STEERLAB_FAST=1`, what the test suite runs): exact sweeps over every
# 4th layer, DAS on 32 examples. Full mode (every layer's sweeps, DAS on 128 examples), measured on
# the shared 2-core machine: 63 s of CPU, 6.7 minutes of wall time under heavy load.

# %%
import os
import time

import steerlab as sl
from steerlab.alignment import DAS, tasks

FAST = os.environ.get("STEERLAB_FAST") == "1"
model, tok = sl.load("smollm2-135m")
lab = sl.wrap(model, tok)
ITALY, FRANCE = "The capital of Italy is", "The capital of France is"
metric = sl.metrics.logit_diff(" Paris", " Rome", tokenizer=tok)
print(f"Italy run {metric(lab.run(ITALY)).item():+.2f}, France run {metric(lab.run(FRANCE)).item():+.2f}  (logit Paris − Rome)")

# %% [markdown]
# ## 1. Attribution patching: every layer × token in one backward pass
#
# `sl.attribution_patching` takes the arguments of `sl.sweep` (sites, positions, heads) and returns a
# result with the same axes, so it prints, plots and compares like a sweep. Its values are
# `base + estimated effect`; `.estimate` is the effect itself.

# %%
t0 = time.perf_counter()
atp = sl.attribution_patching(lab, ITALY, FRANCE, metric=metric, sites="blocks.*.resid_post")
t_atp = time.perf_counter() - t0
print(f"{atp.values.numel()} cells in {t_atp:.2f} s (one source forward, one base forward + backward)")
for site, column, effect in atp.top(5):
    print(f"  {site:22s} {column:10s} {effect:+.2f}")
atp.plot(value="normalised")

# %% [markdown]
# The same for the 270 attention heads at the last token (through `attn.z`, the heads' outputs before
# the output projection):

# %%
heads = sl.attribution_patching(lab, ITALY, FRANCE, metric=metric, sites="blocks.*.attn.z", heads="all", positions=[-1])
print("heads with the largest estimated effect:", [(s.split(".")[1], c, round(v, 2)) for s, c, v in heads.top(5)])
heads.plot()

# %% [markdown]
# ## 2. Checked against exact patching
#
# `refine=k` patches the `k` highest-ranked cells exactly (packed sweeps); `compare` lines the estimate up
# against a full exact sweep of the same cells: Spearman's and Pearson's correlation and the overlap of
# the top-5 cells, per site family (cells no patch changes — the tokens before the country — are left
# out: both sides get them right for free).

# %%
refined = sl.attribution_patching(lab, ITALY, FRANCE, metric=metric, sites="blocks.*.resid_post", refine=6)
for r in refined.refined():
    print(f"  {r['site']:22s} {r['column']:10s} estimate {r['estimate']:+.2f}   exact {r['exact']:+.2f}")

STEP = 4 if FAST else 1
sites = [f"blocks.{layer}.{s}" for s in ("resid_post", "attn.out", "mlp.out") for layer in range(0, 30, STEP)]
t0 = time.perf_counter()
est = sl.attribution_patching(lab, ITALY, FRANCE, metric=metric, sites=sites)
t_est = time.perf_counter() - t0
t0 = time.perf_counter()
exact = sl.sweep(lab, ITALY, FRANCE, metric=metric, sites=sites)
t_exact = time.perf_counter() - t0
comparison = est.compare(exact, k=5)
print(f"{est.values.numel()} cells: attribution {t_est:.1f} s, exact sweep {t_exact:.1f} s ({exact.forwards} packed forwards)")
print(comparison.table())
print("where the estimate misses most:")
for f in comparison.failures(4):
    print(f"  {f['site']:22s} {f['column']:10s} estimate {f['estimate']:+.2f}   exact {f['exact']:+.2f}")
comparison.plot()

# %% [markdown]
# The checks: the refined cells are what a patch by hand gives; the attention and MLP outputs are
# ranked almost perfectly; the residual stream is ranked less well (floors from
# `tests/interventions/test_attribution_smollm.py`, measured 0.84, 1.00, 1.00 on every 4th layer).

# %%
base_value = metric(lab.run(ITALY)).item()
for r in refined.refined():  # each refined cell, patched once more by hand
    j = [f"{k}:{t!r}" for k, t in enumerate(refined.tokens)].index(r["column"])
    by_hand = metric(lab.run(ITALY, [sl.Interchange(r["site"], positions=[j], source=FRANCE)])).item() - base_value
    assert abs(r["exact"] - by_hand) < 1e-4, (r, by_hand)
rows = {r["family"]: r for r in comparison.rows()}
assert rows["attn.out"]["spearman"] > 0.95 and rows["mlp.out"]["spearman"] > 0.95
assert rows["resid_post"]["spearman"] > 0.75

# %% [markdown]
# ## 3. Where the linear estimate fails, and what AtP\* fixes
#
# A whole residual-stream state patched at once moves the run far from the base, and the first-order
# estimate is least accurate there (above: the residual stream's correlation is the lowest). The
# failure AtP\* targets is the attention softmax: a patched **key** or **query** feeds a softmax whose
# gradient is small where the attention is saturated, so AtP misjudges it. `qk_fix=True` recomputes
# the softmax exactly for query and key patches (from the layer's own q, k, v and the rotary
# embedding; checked against the layer's output) and linearises only what follows the pattern. Its
# cost is a few small products per layer, no forward pass.

# %%
keys = dict(metric=metric, sites="blocks.*.attn.k", heads="all")
plain = sl.attribution_patching(lab, ITALY, FRANCE, **keys)
fixed = sl.attribution_patching(lab, ITALY, FRANCE, qk_fix=True, **keys)
exact_keys = sl.sweep(lab, ITALY, FRANCE, metric=metric, sites="blocks.*.attn.k", heads="all")
c_plain, c_fixed = plain.compare(exact_keys, k=5), fixed.compare(exact_keys, k=5)
print(c_plain.table().splitlines()[0])
print(c_fixed.table().splitlines()[0])
c_fixed.plot()

# %%
assert c_fixed.pearson > c_plain.pearson + 0.05  # measured 0.890 -> 0.996
assert (fixed.effect - exact_keys.effect).abs().max() < 0.5 * (plain.effect - exact_keys.effect).abs().max()

# %% [markdown]
# AtP\*'s second fix, **GradDrop**, targets effects that cancel between a direct and an indirect path:
# it repeats the backward pass once per layer with the gradient through that layer's attention and MLP
# outputs set to zero, and scores each cell by the mean of the absolute estimates (30 extra backward
# passes here). `top` and `refine` then rank by that score.

# %%
t0 = time.perf_counter()
star = sl.attribution_patching(lab, ITALY, FRANCE, metric=metric, sites="blocks.*.attn.z", heads="all", positions=[-1],
                               qk_fix=True, grad_drop=True, refine=5)
print(f"AtP* with GradDrop: {time.perf_counter() - t0:.1f} s, {star.meta['backwards']} backward passes")
for r in star.refined():
    print(f"  {r['site']:18s} {r['column']:4s} estimate {r['estimate']:+.2f}   exact {r['exact']:+.2f}")
star.plot(value="score")

# %% [markdown]
# ## 4. What the layers write: the logit lens and direct logit attribution
#
# The logit lens sends each layer's residual stream through the model's own final norm and unembedding.
# Colour: the metric read at each layer and token; text: the top token there.

# %%
lens = sl.logit_lens(lab, FRANCE, metric=metric, k=5)
print("Paris − Rome read at the last token, layers 0, 5, ..., 29:", [round(float(v), 1) for v in lens.metric_values[::5, -1, 0]])
print("top tokens there after layers 20, 25, 29:", [lens.top_tokens[layer][0][-1][:3] for layer in (20, 25, 29)])
lens.plot()

# %% [markdown]
# Direct logit attribution splits the final read-out into what each head, each MLP and the embedding
# wrote (the final norm's scale frozen at this run's): the parts add up to the metric itself.

# %%
dla = sl.head_logit_attribution(lab, FRANCE, metric=metric)
print(dla.table().splitlines()[0])
print("heads writing Paris − Rome most directly:", [(layer, head, round(v, 2)) for layer, head, v in dla.top(5)])
dla.plot()

# %% [markdown]
# The heads that write the answer directly are the heads attribution patching ranked highest
# (23.4, 29.1, 29.0): the patching effect of those heads is mostly their direct effect.

# %%
assert abs(float(lens.metric_values[-1, -1, 0]) - metric(lab.run(FRANCE)).item()) < 1e-3  # the last layer is the model
assert abs(float(dla.rest[0])) < 1e-2 * abs(float(dla.metric_values[0]))  # the parts add up (LLaMA has no biases)
top_atp = {(int(s.split(".")[1]), int(c[1:])) for s, c, _ in heads.top(5)}
assert all((layer, head) in top_atp for layer, head, _ in dla.top(3))

# %% [markdown]
# ## 5. Attribution inside the polarity subspace found by DAS
#
# Tutorial 03 found where SmolLM2 keeps a review's polarity: a small subspace of the last token's
# residual stream. Train DAS for it at layer 22, then ask of a pair of reviews (negative base, positive
# source):
#
# * **per layer × token**, how much of the attribution-patching estimate lies inside the subspace and how
#   much in its orthogonal complement (`subspace_attribution`);
# * along the interchange path inside the subspace, `h(α) = h + α Rᵀ(R s − R h)` (α = 1 is DAS's
#   interchange), the **integrated gradients** of each direction — they must add up to the exact
#   interchange effect;
# * what each direction **writes**: the tokens it promotes and suppresses directly, and how it travels
#   to later layers when patched alone.

# %%
task = tasks.sentiment(seed=0)
train, test = task.datasets(lab, n_train=32 if FAST else 128, n_test=32 if FAST else 128, seed=0)
das = DAS(lab, site="blocks.22.resid_post", size=4, positions="last", epochs=3, batch_size=16, controls=False).fit(train, test)
S = das.subspaces["POLARITY"]
print(S, f"IIA {das.iia['POLARITY'].value:.2f}")
polarity = sl.metrics.logit_diff(task.label_tokens["positive"], task.label_tokens["negative"], tokenizer=tok)
negative = [task.template.format(noun="movie", adjective="terrible"), task.template.format(noun="food", adjective="awful")]
positive = [task.template.format(noun="movie", adjective="wonderful"), task.template.format(noun="food", adjective="great")]

split = sl.subspace_attribution(lab, negative, S, metric=polarity, source=positive)
print(f"share of the estimate inside the subspace at the last token: layer 10 {float(split.share[10, -1]):.2f}, "
      f"layer 22 {float(split.share[22, -1]):.2f}")
split.plot()

# %%
ig = sl.integrated_gradients(lab, negative, positive, S, metric=polarity, steps=16)
print(ig.table())
ig.plot()

# %%
writes = sl.direction_logits(lab, S, inputs=negative, metric=polarity, k=8)
print(writes.table())
print("rank of ' positive' / ' negative' among each direction's logits:", writes.rank(task.label_tokens["positive"]),
      writes.rank(task.label_tokens["negative"]))
travel = sl.direction_effects(lab, negative, S, source=positive, metric=polarity)
print(travel.table())
writes.plot()

# %%
travel.plot()

# %% [markdown]
# What the directions write *directly* is illegible: no sentiment word among their top tokens, and
# " positive" / " negative" rank in the hundreds or thousands. Their effect runs through the seven layers
# above: patched alone, each direction persists downstream (the change along it stays near its size
# while the rest of the state changes too) and moves the answer.
#
# The checks: DAS finds polarity at layer 22 (IIA on held-out adjectives); the integrated gradients add up
# to the exact interchange effect; at layer 22's last token most of the estimate lies inside the
# 4-dimensional subspace (of 576), far more than at layer 10, where the subspace is not yet in use; each direction patched alone
# moves the metric the way its integrated gradient says.

# %%
assert das.iia["POLARITY"].value > 0.75
assert ig.completeness() < 1e-3
assert float(split.share[22, -1]) > 0.6 and float(split.share[10, -1]) < 0.5 * float(split.share[22, -1])  # measured 0.98 / 0.27 (fast), 0.78 / 0.04 (full)
alone = travel.metric_change.mean(-1)
assert all(float(a) * float(b) > 0 for a, b in zip(alone, ig.per_direction) if abs(float(b)) > 0.1)

# %% [markdown]
# ## 6. One report
#
# Every figure above in one self-contained HTML file (plotly.js embedded, works offline).

# %%
path = sl.viz.report({
    "AtP: layer × token": atp.plot(value="normalised"), "AtP: heads at the last token": heads.plot(),
    "AtP vs exact patching": comparison.plot(), "keys: AtP+QK vs exact": c_fixed.plot(), "GradDrop score": star.plot(value="score"),
    "logit lens": lens.plot(), "direct effects of heads": dla.plot(), "polarity subspace: attribution by layer × token": split.plot(),
    "polarity subspace: integrated gradients": ig.plot(), "polarity subspace: tokens written": writes.plot(),
    "polarity subspace: downstream": travel.plot(),
}, "attribution_report.html", title="Attribution on SmolLM2-135M")
print(path, f"{path.stat().st_size / 1e6:.1f} MB")
assert path.stat().st_size > 1e6
lab.unwrap()
