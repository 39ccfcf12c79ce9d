# %% [markdown]
# # Which steering method works on my model?
#
# **Question.** You want SmolLM2-135M-Instruct to answer in French whatever it is asked. Should you
# just *say so* in the system prompt, add a steering vector (difference of means, a probe's weight, a
# CAA answer-letter contrast, an ActAdd prompt pair), or train something (ReFT-r1, LoReFT, LoRA)? And
# which of the directions would *detect* French best? AxBench (Wu et al. 2025) asked this on Gemma-2
# for 500 concepts and found that prompting beats every representation method at steering, while
# difference-in-means, probes and ReFT-r1 lead at detection (ROC AUC ≈ 0.94–0.95). Here is the same
# comparison, on your model, offline, in one call.
#
# **How it is scored** (each in [0, 1], AxBench's three axes with offline judges):
# - *concept score*: a judge — here `py3langid` (language identification, model in its package), which
#   counts only because it is measured at ≥ 0.80 accuracy on held-out labelled sentences;
# - *instruction relevance*: MiniLM cosine similarity of the response to the instruction;
# - *fluency*: the unsteered model's perplexity of the response relative to its own answers, times
#   the share of 3-grams that do not repeat;
# - their *harmonic mean* per response. Each steering factor is chosen on validation instructions and
#   the table reports held-out test instructions.
#
# Full mode (the three shipped concepts, every method, three seeds) is `benchmarks/steer_eval.py`:
# about an hour on 2 CPU cores. This notebook runs one concept and six methods; with `STEERLAB_FAST=1`
# (the test suite sets it) fewer instructions and shorter generations. Measured on the project's
# 2-core machine under heavy shared load (about 14 runnable processes): fast mode 437 s; full mode
# was not timed (it generates about four times as many tokens).

# %%
import os

import steerlab as sl
from steerlab.alignment import directions
from steerlab.reft import concepts, judges
from steerlab.steering import Recipe, compare

FAST = os.environ.get("STEERLAB_FAST") == "1"
model, tok = sl.load("smollm2-135m")
lab = sl.wrap(model, tok)
embedder = sl.wrap(*sl.load("minilm-l6"))
french = concepts.french()
print(french.description, "|", len(french.positives), "French sentences,", len(french.negatives), "English ones")
print(french.sources)

# %% [markdown]
# ## 1. The judge, measured before it is trusted
#
# `py3langid` on held-out French sentences (Amazon.fr reviews) against English ones (tweets and New
# York Times snippets), all lengths and at most 10 words: the kind of short text a steered model writes.

# %%
judge, checks = judges.language_judge("fr")
for c in checks:
    print(c)
print(judge.score(["Bonjour, je voudrais un café.", "Hello, I would like a coffee."]))

# %%
assert all(c.accuracy >= judges.JUDGE_FLOOR for c in checks)

# %% [markdown]
# ## 2. A direction, by hand
#
# `directions.diff_mean` is the difference of the mean activations of French and English sentences
# at one layer's residual stream, as a one-dimensional `Subspace`; `reft.steering_add` turns it into
# an ordinary `Add` intervention, `h ← h + factor · norm · v`, where `norm` is the layer's typical
# activation length.

# %%
split = french.split(n_train=32, n_test=32, n_val_instructions=2, n_test_instructions=3)
LAYER = 12
v = directions.diff_mean(lab, f"blocks.{LAYER}.resid_post", split.train_positives, split.train_negatives)
print(v, v.metadata)
prompt = sl.reft.format_prompt(tok, "Describe your ideal weekend.")
for factor in (0.0, 0.4):
    out = lab.generate([prompt], [sl.reft.steering_add(v, factor)], decode=True, max_new_tokens=24, do_sample=False)
    print(f"factor {factor}: {out.texts[0]!r}")

# %% [markdown]
# ## 3. Every method, one call
#
# `compare` builds each contender (the system-prompt baseline, five directions, ReFT-r1 trained with
# `reft.train`), sweeps the factors on validation instructions, and scores the test instructions.

# %%
recipe = Recipe(layer=LAYER, factors=(0.2, 0.4, 0.8) if not FAST else (0.2, 0.6), n_train=16 if FAST else 32,
                n_val_instructions=2 if FAST else 4, n_test_instructions=3 if FAST else 8,
                max_new_tokens=12 if FAST else 32, epochs=1 if FAST else 3)
methods = ["prompt", "diffmean", "probe", "caa", "actadd", "reft_r1"]
result = compare(lab, concepts=[french], methods=methods, recipe=recipe, embedder=embedder, progress=False)
print(result.table())

# %%
result.plot("table")

# %%
result.plot("sweep", concept="french")

# %%
result.plot("auroc")

# %% [markdown]
# ## 4. What the numbers say
#
# The checks below are the claims this notebook makes: the judge is trustworthy, prompting puts more
# French in the answers than the unsteered model, and the difference of means detects French far
# above chance (AxBench's detection result).

# %%
cells = {c["method"]: c for c in result.cells()}
print({m: round(c["concept_score"], 2) for m, c in cells.items()})
auc = {d["method"]: d["auroc"] for d in result.detection}
print(auc)

# %%
assert result.judge_accuracy("french") >= judges.JUDGE_FLOOR
assert cells["prompt"]["concept_score"] > cells["none"]["concept_score"]
assert auc["diffmean"] > 0.9
assert max(cells[m]["concept_score"] for m in ("diffmean", "probe", "caa", "actadd", "reft_r1")) > cells["none"]["concept_score"]

# %% [markdown]
# ## 5. Keep what won
#
# Every contender is an ordinary intervention: save the chosen steering vector in steerlab's file
# format and reload it, or run the whole comparison from a shell with `steerlab steer-eval`.

# %%
best = cells["diffmean"]["factor"]
lab.save("french-steer", [sl.reft.steering_add(v, best)])
reloaded = lab.load_interventions("french-steer")
print(reloaded, f"factor {best}")
sl.viz.save(result.plot("table"), "steer-eval.html")
