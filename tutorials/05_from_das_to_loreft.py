# %% [markdown]
# # From a DAS subspace to a LoReFT steer
#
# **Run time.** Full mode about 18 min on 2 CPU cores (measured on a busy shared machine); fast mode (`STEERLAB_FAST=1`, what the tests run) about a minute.
#
# **Question.** DAS finds *where* a model keeps a variable: a small subspace of one hidden state whose
# interchange carries the variable from one input to another. Is that subspace also a good place to
# *steer*? If a LoReFT may only write inside the subspace DAS found, can it flip the model's answer, and
# does it do better there than inside a random subspace of the same size?
#
# **The behaviour.** Given `"Review: The {noun} was {adjective}.\nSentiment:"`, SmolLM2-135M-Instruct
# answers " Positive" or " Negative" by the adjective's polarity: a variable, `POLARITY`, that is no token
# of the prompt.
#
# **The path, in one vocabulary.**
# 1. `steerlab.alignment.search` trains DAS for `POLARITY` at the answer position (the last token) of a
#    few layers, with its controls, and returns each layer's `Subspace`.
# 2. `reft.LoReFT.from_subspace(subspace, positions="l1")` puts a LoReFT on exactly that subspace: `R` is
#    frozen to the DAS basis, only `W` and `b` train (`h ← h + Rᵀ(W h + b − R h)`).
# 3. Train it on a few reviews of both polarities to answer the target polarity; the control is the same
#    LoReFT on a random subspace of the same size, trained identically.
# 4. Measure on held-out reviews (adjectives never used in DAS or LoReFT training, and a few free-form
#    reviews): how many reviews of the *other* polarity get the target answer.
#
# `steerlab demo` runs this pipeline from the command line. With `STEERLAB_FAST=1` (the test suite sets
# it) the search covers two layers instead of six; the checks are the same.

# %%
import os
import random
import re

import torch

import steerlab as sl
from steerlab import reft
from steerlab.alignment import search, tasks

FAST = os.environ.get("STEERLAB_FAST") == "1"
SEED, SIZE, TARGET = 0, 4, "negative"
model, tok = sl.load("smollm2-135m")
task = tasks.sentiment(seed=SEED)  # adjectives split into disjoint train and test sets
lab = sl.wrap(model, tok)
task

# %% [markdown]
# ## 1. Locate: DAS for `POLARITY` at the answer position
#
# For each layer, DAS trains a 4-dimensional subspace of the last token's residual stream so that
# interchanging it from a source review makes the model answer the *source's* polarity. Beside each
# IIA (interchange-intervention accuracy, on counterfactuals built from held-out adjectives): the same
# training on a randomly re-initialised model, the best neuron-aligned subspace of the same size, and the
# interchange of the whole vector, the upper bound.

# %%
LAYERS = [14, 22] if FAST else [6, 10, 14, 18, 22, 26]
N = 32 if FAST else 64
train_cf, test_cf = task.datasets(lab, n_train=N, n_test=N, seed=SEED)
found = search(lab, train_cf, test_cf, sites=[f"blocks.{L}.resid_post" for L in LAYERS], positions="last", sizes=[SIZE],
               epochs=3, batch_size=16, seed=SEED, localist_samples=8, selection_size=N, eval_size=N)
print(found)
found.plot()

# %% [markdown]
# The chosen subspace: the layer with the best IIA (the lowest, on a tie), among layers whose IIA does not exceed the
# full-vector interchange (a subspace edit that beats swapping the whole vector would suggest an
# illusion). Its held-out representations, projected onto the subspace and coloured by `POLARITY`:

# %%
rows = [r for r in found.rows() if r["variable"] == "POLARITY"]
ok = [r for r in rows if not r["above_full_vector"]] or rows
pick = max(ok, key=lambda r: (r["iia"], -r["layer"]))
chosen = found.get(pick["site"], "last", SIZE)
subspace = chosen.subspaces["POLARITY"]
print(f"chosen: {subspace}, IIA {pick['iia']:.3f} (random-init control {pick['random_init']:.3f}, "
      f"localist {pick['localist']:.3f}, full vector {pick['full_vector']:.3f})")
projection = sl.viz.subspace_projection(chosen, lab, test_cf)
lab.unwrap()
projection

# %%
assert pick["iia"] > 0.75  # POLARITY is found, on adjectives DAS never trained on
assert pick["iia"] > pick["random_init"] + 0.2  # and not by a model that knows nothing
assert subspace.size == SIZE and subspace.site == pick["site"]

# %% [markdown]
# ## 2. The held-out reviews and the LoReFT training data
#
# Held out: templated reviews with the task's *test* adjectives (never used in DAS training, nor below),
# and hand-written free-form reviews outside the template. Training: eight templated reviews with
# *training* adjectives, half of each polarity, all labelled with the target answer " Negative" (the
# model's own spelling of its answers).

# %%
FREE_FORM = [
    ("positive", "The staff were friendly and the room was spotless."),
    ("negative", "The room was dirty and the staff ignored us."),
    ("positive", "I loved every minute of this film."),
    ("negative", "I walked out of the film after half an hour."),
]
rng = random.Random(SEED)
test_adj = task.splits["test"]
held_out = [(f"The {rng.choice(task.nouns)} was {a}.", task.polarity[a]) for a in test_adj]
held_out += [(text, pol) for pol, text in FREE_FORM]
prompts = [f"Review: {review}\nSentiment:" for review, _ in held_out]

by_polarity = {p: [a for a in task.splits["train"] if task.polarity[a] == p] for p in ("positive", "negative")}
train_adj = rng.sample(by_polarity["positive"], 4) + rng.sample(by_polarity["negative"], 4)
train_prompts = [task.template.format(noun=rng.choice(task.nouns), adjective=a) for a in train_adj]
WORD = TARGET.capitalize()
print(f"{len(prompts)} held-out reviews ({sum(p != TARGET for _, p in held_out)} of the other polarity); "
      f"{len(train_prompts)} training reviews, e.g. {train_prompts[0]!r} -> ' {WORD}'")


def answer(text):
    """The first word of a generated answer, lower-cased."""
    m = re.search(r"[A-Za-z]+", text)
    return m[0].lower() if m else ""


def steered_count(texts):
    """How many held-out reviews of the other polarity get the target answer."""
    return sum(answer(t) == TARGET for t, (_, pol) in zip(texts, held_out) if pol != TARGET)

# %% [markdown]
# ## 3. Steer: a LoReFT on the DAS subspace, and the control
#
# `LoReFT.from_subspace` takes the subspace's site and size; `positions="l1"` edits the last prompt
# token, where DAS found `POLARITY`. The control: `LoReFT(site, rank=4, train_rotation=False)` draws a
# random orthonormal `R` and freezes it. Both train the same `W` and `b` (`2·4·576 + 4 = 4,612`
# parameters) with the same seed, data and steps.

# %%
EPOCHS, NEW_TOKENS = 24, 4
runs = {
    "DAS subspace": lambda: reft.LoReFT.from_subspace(subspace, positions="l1"),
    "random subspace": lambda: reft.LoReFT(subspace.site, rank=SIZE, width=subspace.width, positions="l1", train_rotation=False),
}
texts, curves, kept = {}, {}, {}
for name, make in runs.items():
    torch.manual_seed(SEED)
    iv = make()
    rm = reft.get_reft_model(model, [iv], tokenizer=tok)
    if name == "DAS subspace":
        rm.print_trainable_parameters()
        with rm.disabled():
            texts["before"] = rm.generate(prompts, max_new_tokens=NEW_TOKENS, do_sample=False).texts
        w0 = iv.weight.detach().clone()
    data = reft.InstructionDataset(tok, train_prompts, [f" {WORD}"] * len(train_prompts), positions="l1", chat_template=False, add_eos=False)
    curves[name] = reft.train(rm, data, epochs=EPOCHS, lr=2e-2, batch_size=len(data), cache_prefix=True, seed=SEED)
    texts[name] = rm.generate(prompts, max_new_tokens=NEW_TOKENS, do_sample=False).texts
    if name == "DAS subspace":  # the per-token effect on the first held-out review of the other polarity that it steers
        flipped = next(i for i, (t, (_, pol)) in enumerate(zip(texts[name], held_out)) if pol != TARGET and answer(t) == TARGET)
        effect = reft.steering_effect(rm, prompts[flipped], max_new_tokens=NEW_TOKENS)
        kept = {"R": iv.R.detach().clone(), "A": iv.rotation.weight.detach().clone(), "W": iv.weight.detach().clone(),
                "frozen": not iv.rotation.weight.requires_grad}
    rm.unwrap()
sl.viz.reft_training_curve(curves)

# %% [markdown]
# ## 4. Generations and steering rates

# %%
for (review, pol), before, das, rand in zip(held_out, texts["before"], texts["DAS subspace"], texts["random subspace"]):
    print(f"({pol}) {review}\n    before {before!r}   DAS subspace {das!r}   random subspace {rand!r}")
n_other = sum(p != TARGET for _, p in held_out)
rates = {k: steered_count(texts[k]) for k in ("before", "DAS subspace", "random subspace")}
correct = sum(answer(t) == p for t, (_, p) in zip(texts["before"], held_out))
print(f"\nthe model alone answers {correct}/{len(held_out)} held-out reviews correctly")
print(f"held-out {'positive' if TARGET == 'negative' else 'negative'} reviews answered '{WORD}': "
      + ", ".join(f"{k} {v}/{n_other}" for k, v in rates.items()))

# %% [markdown]
# The per-token effect of the steer on a positive held-out review that it flips (teacher-forced
# log-probabilities with and without the LoReFT): the answer token moves, the rest hardly.

# %%
print(effect)
sl.viz.token_effects(effect)

# %% [markdown]
# **Result.** Before training, the model answers the held-out positive reviews " Positive"; the LoReFT
# confined to the DAS subspace turns them to " Negative", reviews outside the template included. The
# same LoReFT in a random 4-dimensional subspace, trained the same way, moves few or none: where DAS found
# `POLARITY` is where a rank-4 edit can change it. (The steered answers come out in lower case, " negative",
# the spelling of the task's labels, although the LoReFT was trained on " Negative": the edit sets the
# polarity and the model words it.) The checks: `R` is still exactly the DAS basis (only
# `W` and `b` trained), and the seeded LoReFT steers more held-out reviews of the other polarity than the
# model did alone (at least half of them), and more than the random-subspace control. The steer is not
# strong: the target answer wins, but with a probability of only about 0.15 to 0.35 (see the per-token effect),
# and with another seed (`SEED = 1`) it flips 5 of the 8 reviews instead of 8. Eight training reviews and
# 24 steps are a small budget; `steerlab demo` trains longer on more reviews.

# %%
assert kept["frozen"] and torch.equal(kept["A"].T, subspace.basis)  # the stored basis is DAS's, bit for bit
assert torch.allclose(kept["R"], subspace.basis, atol=1e-6)  # R = QR(basis) reproduces it to fp32 rounding
assert not torch.equal(kept["W"], w0)  # W trained
assert rates["DAS subspace"] > rates["before"], rates
assert rates["DAS subspace"] >= n_other / 2, rates  # at least half of them (8/8 with this seed, 5/8 with seed 1)
assert rates["DAS subspace"] > rates["random subspace"], rates
