# %% [markdown]
# # Causal tracing on SmolLM2-135M: where does a fact travel from its subject to the answer?
#
# **Run time.** Full mode about 70 min on 2 CPU cores (estimated from `benchmarks/causal_tracing.py`, 77 min for as many facts × noise draws, on a busy shared machine); fast mode (`STEERLAB_FAST=1`, what the tests run) about a minute.
#
# **Question.** SmolLM2-135M completes *"The capital of France is"* with *" Paris"*. Meng et al.
# (2022, "Locating and Editing Factual Associations in GPT") found two sites in GPT-2 XL that carry
# such a fact: an **early site**, the MLPs of the early-to-middle layers at the *last subject
# token*, and a **late site**, the upper layers at the *last token*. Does SmolLM2 show the same?
#
# **Method.** Causal tracing. Corrupt the run by adding Gaussian noise (3 × the standard deviation
# of the subject tokens' embeddings) to the subject's embeddings, so the model no longer knows the
# answer; then restore one component at one token to its clean value and measure how much of the
# answer's probability comes back. The *indirect effect* of that component is the restored
# probability minus the corrupted one; the *total effect* is clean minus corrupted. Components:
# the hidden state leaving block L, the MLP's output and attention's output, each alone and, for
# MLP and attention, over a window of 10 layers around L (the paper's Fig. 1 f, g).
#
# steerlab runs this as a patching sweep whose base run is itself intervened: the noise is a
# *base intervention* (a seeded `Noise` at the subject's embeddings, the same draws in every
# restoration), the clean run of the same prompt is the source, and every component × token is
# one configuration of the sweep, many packed into each forward.
#
# With `STEERLAB_FAST=1` (the test suite sets it) the facts come from two relations and the trace
# covers every fourth layer of four short facts; the conclusions and the checks are the same.

# %%
import os

import torch

import steerlab as sl
from steerlab.alignment import trace
from steerlab.alignment.tasks import facts, known_facts

FAST = os.environ.get("STEERLAB_FAST") == "1"
model, tok = sl.load("smollm2-135m")
lab = sl.wrap(model, tok)

# %% [markdown]
# ## 1. Facts the model knows
#
# `steerlab.alignment.tasks.facts` ships 400 hand-written candidates (a subject, a relation prompt
# naming it, a one-token answer). `known_facts` asks the model each one greedily and keeps those
# whose first generated token is the answer: tracing a fact the model does not know says nothing.

# %%
candidates = facts(["capital", "creator"]) if FAST else facts()
known = known_facts(lab, candidates)
print(known)
print(known.table())
kept = known.kept

# %% [markdown]
# SmolLM2-135M is small: it knows about half of these facts (capitals and famous authors more
# often than companies' countries or musicians' instruments).

# %%
assert 0.3 < known.rate < 0.95
assert len(kept) >= (40 if FAST else 50)
assert all(p == f.target for f, p in zip(known.candidates, known.predictions, strict=True) if f in kept)

# %% [markdown]
# ## 2. One restoration by hand
#
# Take one fact, corrupt its subject, and restore the hidden state leaving block 20 at the last
# token. By hand that is one run with two interventions: the noise and an interchange from the
# clean run.

# %%
fact = next(f for f in kept if f.relation == "capital")
subject = fact.subject_tokens(tok)
print(fact, "subject tokens", [tok.decode([tok(fact.prompt).input_ids[i]]) for i in subject])
sigma = sl.alignment.noise_scale(lab, kept[:20])
noise = sl.Noise("embed", std=3 * sigma, seed=0, positions=subject)
p = sl.metrics.prob(fact.target, tokenizer=tok)
clean_p = p(lab.run(fact.prompt)).item()
corrupted_p = p(lab.run(fact.prompt, [noise])).item()
restored_p = p(lab.run(fact.prompt, [noise, sl.Interchange("blocks.20.resid_post", positions=[-1], source=fact.prompt)])).item()
print(f"p({fact.target!r}): clean {clean_p:.3f}, subject noised {corrupted_p:.3f}, + block 20 restored at the last token {restored_p:.3f}")
assert corrupted_p < 0.5 * clean_p  # the noise hides the subject

# %% [markdown]
# ## 3. The trace
#
# `trace` does that for every component, layer and token, averaged over noise draws. The same
# restoration as above is one cell of it (same noise: the trace's draw for a batch of one fact
# with `seed=0` is the `Noise(seed=0)` above).

# %%
one = trace(lab, [fact], layers=[20], kinds=["hidden"], window=None, samples=1, std=sigma, seed=0)
assert abs(one.scores["hidden"][0][0, -1].item() - restored_p) < 1e-4
assert abs(one.corrupted[0].item() - corrupted_p) < 1e-4

if FAST:
    short = [f for f in kept if len(tok(f.prompt).input_ids) <= 6]
    traced = [f for f in short if f.relation == "capital"][:2] + [f for f in short if len(f.subject_tokens(tok)) > 1][:2]
    layers, samples = list(range(0, 30, 4)), 2
else:
    traced, layers, samples = kept[::max(1, len(kept) // 12)][:12], list(range(30)), 2
result = trace(lab, traced, layers=layers, samples=samples, std=sigma, seed=1)
print(result)
print(result.table("mlp window"))

# %% [markdown]
# One fact, as in the paper's Fig. 1: the restored probability per token (rows; subject tokens
# starred) and layer (columns), for each component.

# %%
result.plot(fact=0)

# %% [markdown]
# The average over the traced facts, as in the paper's Fig. 2: the indirect effect per token class
# and layer.

# %%
result.plot()

# %% [markdown]
# ## 4. The two sites
#
# Read off the average indirect effects (AIE), as shares of the average total effect (ATE).

# %%
ate = result.ate
early_kind, early_layer, early = result.sites()["early"]
_, late_layer, late = result.sites()["late"]
attn_layer, attn = result.peak("attn window", "last token")
mlp_last = result.average("mlp window")[5]  # the MLP windows at the last token
hidden_subject = result.average("hidden")[2]  # the hidden state at the last subject token
print(f"ATE {ate:.3f}")
print(f"early site: {early_kind} at the last subject token peaks at layer {early_layer}: AIE {early:.3f} ({early / ate:.0%} of the ATE)")
print(f"late site: the hidden state at the last token from layer {late_layer}: AIE {late:.3f} ({late / ate:.0%})")
print(f"attention windows at the last token peak at layer {attn_layer}: AIE {attn:.3f} ({attn / ate:.0%}); MLP windows there at most {mlp_last.max():.3f}")
print("hidden state at the last subject token, per layer:", [round(float(x), 3) for x in hidden_subject])

# %% [markdown]
# **Result.** Both sites appear. The MLP windows at the last subject token carry most of the
# total effect in the early layers (in SmolLM2 the peak is at the first windows, earlier than the
# paper's middle layers of GPT-2 XL), and their effect at the last token is small. The hidden
# state at the last subject token matters up to the middle layers and then no more, while the
# last token's hidden state takes over in the upper layers (the whole answer is there from the
# layers where attention windows at the last token peak: attention moves the fact from the
# subject to the last token).

# %%
assert ate > 0.1
assert early_layer <= 15 and early > 0.3 * ate  # early-to-middle MLPs at the last subject token
assert float(mlp_last[layers.index(early_layer)]) < 0.2 * ate  # ... and not at the last token
assert late_layer >= 20 and late > 0.8 * ate  # the upper layers at the last token
assert attn_layer > early_layer  # attention moves it later than the MLPs write it
assert float(hidden_subject[0]) > 0.5 * ate and float(hidden_subject[-1]) < 0.1 * ate
lab.unwrap()
