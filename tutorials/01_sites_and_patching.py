# %% [markdown]
# # Sites and activation patching on SmolLM2-135M
#
# **Run time.** Full mode about 3 min on 2 CPU cores (measured 2026-12-05); fast mode (`STEERLAB_FAST=1`, what the tests run) about a minute.
#
# **Question.** Given *"The capital of Italy is"*, SmolLM2-135M continues with *" Rome"*; given
# *"The capital of France is"*, with *" Paris"*. Where inside the model does the country become
# the answer: at which layer, at which token, through which attention head?
#
# **Method.** Activation patching. Run the model on the Italy prompt (the *base* run), copy one
# activation from the France prompt (the *source* run) into it, and measure how far the answer
# moves toward Paris with the logit difference `logit(" Paris") − logit(" Rome")` at the last
# token. Normalised, 0 means "as the base run" and 1 means "as the source run".
#
# Everything runs offline on the embedded SmolLM2-135M. With `STEERLAB_FAST=1` (the test suite
# sets it) the sweeps cover fewer layers; the conclusions and the checks are the same.

# %%
import os

import torch

import steerlab as sl

FAST = os.environ.get("STEERLAB_FAST") == "1"
model, tok = sl.load("smollm2-135m")
lab = sl.wrap(model, tok)  # the base model is frozen; every intervention below lasts one call
lab

# %% [markdown]
# ## 1. Sites
#
# A *site* names a place in the model in one vocabulary for every architecture: `embed`, then per
# block `blocks.L.resid_pre`, `attn.q|k|v|z` (per head), `attn.out`, `resid_mid`, `mlp.pre|post|out`,
# `resid_post`, and finally `final_norm` and `logits`. The catalog lists each site with the shape an
# intervention sees there and the module port it hooks.

# %%
catalog = lab.sites
print(f"{len(catalog)} sites; the first block:")
print("\n".join(line for line in catalog.table().splitlines() if line.startswith(("site", "blocks.0."))))

# %% [markdown]
# The checks: one `embed`, eleven sites in each of the 30 blocks, `final_norm` and `logits`; queries
# have 9 heads and keys 3 (SmolLM2 uses grouped-query attention); a LLaMA block lacks no site.

# %%
assert len(catalog) == 1 + 30 * 11 + 2
assert catalog["blocks.0.attn.q"]["shape"] == ("batch", "pos", 9, 64)
assert catalog["blocks.0.attn.k"]["shape"] == ("batch", "pos", 3, 64)
assert catalog["blocks.29.resid_post"]["shape"] == ("batch", "pos", 576)
assert catalog.missing == {}

# %% [markdown]
# ## 2. One patch, by hand
#
# `Interchange(site, positions, source)` replaces the base run's value at `site` (at the given
# token positions, counted over real tokens: `-1` is the last) with the source run's value there.
# Patching the last token's residual stream after block 25 should carry the answer over.

# %%
CLEAN, CORRUPT = "The capital of France is", "The capital of Italy is"
metric = sl.metrics.logit_diff(" Paris", " Rome", tokenizer=tok)

base_value = metric(lab.run(CORRUPT)).item()
source_value = metric(lab.run(CLEAN)).item()
patched = lab.run(CORRUPT, [sl.Interchange("blocks.25.resid_post", positions=-1, source=CLEAN)])
patched_value = metric(patched).item()
print(f"Italy run {base_value:+.3f}   France run {source_value:+.3f}   Italy run, layer 25 patched {patched_value:+.3f}")

# %% [markdown]
# The same patch in plain PyTorch: a forward hook on block 25 that records the France run's output,
# and one that writes its last token into the Italy run. The logits agree.

# %%
layer = model.model.layers[25]
saved = {}
record = layer.register_forward_hook(lambda mod, args, out: saved.update(clean=out.detach().clone()))
with torch.no_grad():
    model(**tok(CLEAN, return_tensors="pt"))
record.remove()


def write_last(mod, args, out):
    out = out.clone()
    out[:, -1] = saved["clean"][:, -1]
    return out


write = layer.register_forward_hook(write_last)
with torch.no_grad():
    by_hand = model(**tok(CORRUPT, return_tensors="pt")).logits
write.remove()

assert base_value < 0 < source_value  # the model answers Rome, then Paris
assert patched_value > 0  # after layer 25 the last token already carries "France"
assert torch.allclose(patched.logits, by_hand, atol=1e-4)

# %% [markdown]
# ## 3. A sweep: every layer × every token
#
# `sl.sweep` does that patch at every site and position in turn, packing many patched runs into one
# forward. The heatmap shows the normalised effect (hover for the values).

# %%
LAYERS = [0, 10, 20, 22, 23, 24, 25, 29] if FAST else list(range(30))
sweep = sl.sweep(lab, CORRUPT, CLEAN, sites=[f"blocks.{L}.resid_post" for L in LAYERS], positions="all", metric=metric)
print(sweep.table(normalised=True))
sl.viz.patching_heatmap(sweep, value="normalised")

# %% [markdown]
# **Result.** Up to layer 22 the whole effect sits at the token " Italy" (patching it there restores
# Paris completely); from layer 23 on it sits at the last token " is". The country is moved from its
# own token to the last one in layer 23, and nothing happens at the other tokens.

# %%
norm = sweep.normalised
assert sweep.tokens == ["The", " capital", " of", " Italy", " is"]
country, last = 3, 4
for i, L in enumerate(LAYERS):
    if L <= 22:
        assert norm[i, country] > 0.9 and abs(norm[i, last]) < 0.1, (L, norm[i])
    if L >= 23:
        assert norm[i, last] > 0.9 and abs(norm[i, country]) < 0.1, (L, norm[i])
assert norm[:, :country].abs().max() < 0.02  # "The capital of" is the same in both prompts
assert abs(norm[LAYERS.index(29), last] - 1) < 1e-3  # the last residual state is the source's exactly
assert abs(sweep.values[LAYERS.index(25), last] - patched_value) < 1e-3  # the sweep agrees with the patch by hand

# %% [markdown]
# ## 4. Which head moves it? A layer × head sweep
#
# Patch each attention head's output (`attn.z`, the per-head input of the output projection) at the
# last token only.

# %%
HEAD_LAYERS = [21, 22, 23, 24] if FAST else list(range(14, 30))
heads = sl.sweep(lab, CORRUPT, CLEAN, sites=[f"blocks.{L}.attn.z" for L in HEAD_LAYERS], heads="all", positions=[-1], metric=metric)
print(heads.top(3, normalised=True))
sl.viz.patching_heatmap(heads, value="normalised")

# %% [markdown]
# **Result.** One head, 23.4 (layer 23, head 4), carries most of the answer by itself; no head
# before layer 23 matters at the last token.

# %%
(site, head, value), *_ = heads.top(1, normalised=True)
assert (site, head) == ("blocks.23.attn.z", "h4") and value > 0.8
hn = heads.normalised
for i, L in enumerate(HEAD_LAYERS):
    if L <= 22:
        assert hn[i].abs().max() < 0.05, (L, hn[i])

# %% [markdown]
# ## 5. Path patching with a run graph
#
# Does the country reach the answer *through* head 23.4? A run graph composes runs: the *sender*
# run patches the France country token into the Italy run at layer 20; the *receiver* run is a
# plain Italy run except that head 23.4's output is taken from the sender run. Only the path
# "country token → head 23.4 → answer" is open in the receiver. A second receiver takes head 23.5
# instead, as a control.

# %%
g = sl.Graph()
clean = g.run(CLEAN, name="France")
sender = g.run(CORRUPT, [sl.Interchange("blocks.20.resid_post", positions=[-2], source=clean)], name="sender", output=True)
via_4 = g.run(CORRUPT, [sl.Interchange("blocks.23.attn.z", heads=[4], positions=[-1], source=sender)], name="via 23.4")
via_5 = g.run(CORRUPT, [sl.Interchange("blocks.23.attn.z", heads=[5], positions=[-1], source=sender)], name="via 23.5")
res = lab.execute(g)


def normalised(run):
    return (metric(res[run]).item() - base_value) / (source_value - base_value)


paths = {run.name: normalised(run) for run in (sender, via_4, via_5)}
print({k: round(v, 3) for k, v in paths.items()})
sl.viz.run_graph(g, lab)

# %% [markdown]
# **Result.** The sender alone restores Paris; through head 23.4 alone almost all of it arrives,
# through head 23.5 little. The graph's answer equals the two steps done separately: collect head
# 23.4's output in the sender run, then write it into an Italy run.

# %%
assert paths["sender"] > 0.9
assert paths["via 23.4"] > 0.8 and paths["via 23.4"] > 3 * abs(paths["via 23.5"])
step1 = lab.run(CORRUPT, [
    sl.Interchange("blocks.20.resid_post", positions=[-2], source=CLEAN),
    sl.Collect("blocks.23.attn.z", heads=[4], positions=[-1]),
])
head_value = sl.SourceValue(step1.cache["blocks.23.attn.z"])
step2 = lab.run(CORRUPT, [sl.Interchange("blocks.23.attn.z", heads=[4], positions=[-1], source=head_value)])
assert torch.allclose(step2.logits, res[via_4].logits, atol=1e-4)

# %% [markdown]
# ## 6. One report
#
# `sl.viz.report` writes the figures, text and tables into one HTML file that opens offline.

# %%
path = sl.viz.report(
    {
        "Layer × token": sl.viz.patching_heatmap(sweep, value="normalised"),
        "Layer × head at the last token": sl.viz.patching_heatmap(heads, value="normalised"),
        "The path-patching graph": sl.viz.run_graph(g, lab),
    },
    "tutorial_01_report.html",
    title="Where SmolLM2-135M moves the country to the answer",
    intro="Activation patching of 'The capital of France is' into 'The capital of Italy is', "
    "measured by logit(' Paris') - logit(' Rome') at the last token.",
    sections=[("Path patching", [[{"run": k, "normalised effect": v} for k, v in paths.items()]])],
)
assert path.stat().st_size > 1_000_000  # plotly.js is inside: the file works offline
lab.unwrap()
print(f"wrote {path}")

# %% [markdown]
# **Answer.** The country is read from its own token up to layer 22, moved to the last token at
# layer 23, mostly by head 23.4, and from there the last token's residual stream carries the
# answer to the output.
