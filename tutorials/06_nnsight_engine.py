# %% [markdown]
# # One graph, two engines: steerlab's hooks and nnsight (and NDIF)
#
# **Run time.** Full mode about 8 min on 2 CPU cores (measured 2026-12-05); fast mode (`STEERLAB_FAST=1`, what the tests run) about a minute.
#
# **Question.** A study written as a steerlab run graph — patches, a DAS subspace, a trained
# LoReFT, collected activations — should not depend on the machinery that executes it. Does the
# same graph give the same numbers when each forward is an nnsight trace instead of a set of
# PyTorch hooks, and what would be sent if it ran on NDIF, where models too large for one machine
# live?
#
# **Method.** Wrap SmolLM2-135M in nnsight's `LanguageModel`, as an nnsight user would, and give
# that to steerlab. Run the graph with `engine="hooks"` and `engine="nnsight"`; compare outputs,
# collected values and gradients; check one patch against a trace written in plain nnsight; train
# a LoReFT and run it through nnsight; then rehearse the remote path and open the request.
#
# Everything runs offline. `STEERLAB_FAST=1` (the test suite sets it) sweeps fewer layers and
# trains fewer steps; the checks are the same.

# %%
import os
import time
import warnings

import nnsight
import torch

import steerlab as sl
from steerlab.reft import LoReFT

FAST = os.environ.get("STEERLAB_FAST") == "1"
torch.set_num_threads(1 if FAST else max(1, torch.get_num_threads()))
model, tok = sl.load("smollm2-135m")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # LanguageModel is nnsight 0.8's alias of TransformersModel
    lm = nnsight.LanguageModel(model, tokenizer=tok)
lab = sl.wrap(lm)  # steerlab works on lm's module, with lm's tokenizer; engine="nnsight" traces through lm
assert lab.model is model and lab.tokenizer is tok
lab

# %% [markdown]
# ## 1. The graph
#
# Base run: *"The capital of Italy is"* (SmolLM2 answers " Rome"). Source run: the France prompt.
# The base run takes the last token's residual stream from the source at layer 24 (where tutorial 01
# found the answer at the last token), swaps an
# 8-dimensional subspace at layer 26 (DAS's edit, with a random, trainable basis), and collects
# the residual stream at layer 27. The metric is `logit(" Paris") − logit(" Rome")`.

# %%
CLEAN, CORRUPT = "The capital of France is", "The capital of Italy is"
metric = sl.metrics.logit_diff(" Paris", " Rome", tokenizer=tok)
torch.manual_seed(0)
das = sl.SubspaceInterchange("blocks.26.resid_post", size=8, width=576, positions=-1)

g = sl.Graph()
clean = g.run(CLEAN, name="france")
das.source = clean
patched = g.run(CORRUPT, [
    sl.Interchange("blocks.24.resid_post", positions=-1, source=clean),
    das,
    sl.Collect("blocks.27.resid_post", positions=-1),
], name="italy, patched")

results = {}
for engine in ("hooks", "nnsight"):
    das.rotation.weight.grad = None
    res = lab.execute(g, engine=engine)
    metric(res[patched]).sum().backward()  # the gradient DAS training would take
    results[engine] = (res, das.rotation.weight.grad.clone())
    print(f"{engine:8s} metric {metric(res[patched]).item():+.4f}")
print(f"unpatched Italy run: {metric(lab.run(CORRUPT)).item():+.4f}")

# %% [markdown]
# The checks: the patch moves the answer toward Paris, and the two engines agree on the logits
# (to 1e-4), the collected values, and the gradient reaching the DAS basis.

# %%
(h, grad_h), (n, grad_n) = results["hooks"], results["nnsight"]
assert metric(h[patched]).item() > metric(lab.run(CORRUPT)).item() + 1.0
torch.testing.assert_close(n[patched].logits, h[patched].logits, rtol=1e-4, atol=1e-4)
torch.testing.assert_close(n[patched].cache["blocks.27.resid_post"], h[patched].cache["blocks.27.resid_post"], rtol=1e-4, atol=1e-4)
assert grad_h.abs().sum() > 0
torch.testing.assert_close(grad_n, grad_h, rtol=1e-3, atol=1e-6)

# %% [markdown]
# ## 2. A layer sweep on both engines
#
# Patch the last token's residual stream at each layer: the familiar curve (the country reaches the
# last token late in the network: early patches do nothing, late ones flip the answer) comes out
# the same from both engines. The time per call is printed, not checked (this machine is shared;
# `benchmarks/bench_base.py` measures the engines' overhead properly).

# %%
layers = list(range(0, 30, 6 if FAST else 2))
curve, seconds = {}, {}
for engine in ("hooks", "nnsight"):
    t0 = time.perf_counter()
    curve[engine] = [metric(lab.run(CORRUPT, sl.Interchange(f"blocks.{L}.resid_post", positions=-1, source=CLEAN), engine=engine)).item() for L in layers]
    seconds[engine] = (time.perf_counter() - t0) / len(layers)
for L, a, b in zip(layers, curve["hooks"], curve["nnsight"]):
    print(f"layer {L:2d}   hooks {a:+.3f}   nnsight {b:+.3f}")
print(f"per call: hooks {seconds['hooks'] * 1e3:.0f} ms, nnsight {seconds['nnsight'] * 1e3:.0f} ms")

# %%
assert max(abs(a - b) for a, b in zip(curve["hooks"], curve["nnsight"])) < 1e-3
late = next(L for L, v in zip(layers, curve["hooks"]) if v > 0)  # the first layer where the patch flips the answer
assert curve["hooks"][0] < -4 and max(curve["hooks"]) > 5 and late >= 16, (late, curve["hooks"])

# %% [markdown]
# ## 3. The same patch written in plain nnsight
#
# An independent computation: nnsight's own indexing, no steerlab code. Save layer 24's output at
# the last token of the France run, write it into the Italy run.

# %%
enc_clean, enc_corrupt = tok(CLEAN, return_tensors="pt"), tok(CORRUPT, return_tensors="pt")
with torch.no_grad():
    with lm.trace(**enc_clean):
        france = lm.model.layers[24].output[:, -1].clone().save()
    with lm.trace(**enc_corrupt):
        lm.model.layers[24].output[:, -1] = france
        by_hand = lm.output.logits.save()
ours = lab.run(CORRUPT, sl.Interchange("blocks.24.resid_post", positions=-1, source=CLEAN), engine="nnsight").logits
print(f"max |difference| {(ours - by_hand).abs().max().item():.2e}")
torch.testing.assert_close(ours, by_hand, rtol=1e-5, atol=1e-5)

# %% [markdown]
# ## 4. A trained LoReFT, run through nnsight
#
# Train a rank-4 LoReFT at layer 10 (last token) to make the Italy prompt answer " Paris", with the
# hook engine; then run the trained intervention through nnsight.

# %%
torch.manual_seed(0)
loreft = LoReFT("blocks.10.resid_post", rank=4, width=576, positions=-1)
opt = torch.optim.Adam(loreft.parameters(), lr=2e-2)
paris = tok(" Paris", add_special_tokens=False).input_ids[0]
for step in range(15 if FAST else 40):
    opt.zero_grad()
    logits = lab.run(CORRUPT, loreft).logits[:, -1]
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([paris]))
    loss.backward()
    opt.step()
with torch.no_grad():
    steered = {engine: lab.run(CORRUPT, loreft, engine=engine).logits for engine in ("hooks", "nnsight")}
print(f"after training: metric {metric(steered['nnsight']).item():+.3f} (untrained model {metric(lab.run(CORRUPT)).item():+.3f})")
print("greedy next token:", repr(tok.decode(steered["nnsight"][0, -1].argmax())))

# %%
assert metric(steered["nnsight"]).item() > 0  # Paris now beats Rome
torch.testing.assert_close(steered["nnsight"], steered["hooks"], rtol=1e-4, atol=1e-4)

# %% [markdown]
# ## 5. Remote: what would be sent to NDIF
#
# `engine=sl.NNsightEngine(remote=True)` hands each trace to nnsight's NDIF backend: with an API key
# (`nnsight.CONFIG.set_default_api_key(...)` or `NDIF_API_KEY`) and a model NDIF runs
# (`nnsight.ndif.status()`), `LanguageModel("org/model", dispatch=True)` works the same way. This
# machine has no network, so we stop at the boundary: a stand-in for the network records the
# request nnsight built, then answers with nnsight's serverless rehearsal (the request is
# deserialised with local modules hidden, as on the server, and run). The model is named by
# key; the intervention code travels by value (the server has no steerlab); only the saved box
# of results comes back.

# %%
from nnsight.intervention.backends import remote as remote_backend
from nnsight.intervention.backends.local import LocalSimulationBackend

sent = []


def at_the_network_boundary(backend, request, tracer):
    blob = backend._serialize(tracer)  # the exact bytes that would be POSTed to NDIF
    sent.append({"model_key": request.model_key, "bytes": len(blob), "compressed": backend.compress})
    LocalSimulationBackend(lm)(tracer)  # nnsight's rehearsal stands in for the server


real_request = remote_backend.RemoteBackend.request
real_key = type(lm).to_model_key
type(lm).to_model_key = lambda self: 'nnsight.modeling.transformers.TransformersModel:{"repo_id": "HuggingFaceTB/SmolLM2-135M-Instruct"}'
remote_backend.RemoteBackend.request = at_the_network_boundary
try:
    with torch.no_grad():
        remote = lab.execute(g, engine=sl.NNsightEngine(remote=True))
finally:
    remote_backend.RemoteBackend.request = real_request
    type(lm).to_model_key = real_key
for i, s in enumerate(sent):
    print(f"request {i}: {s['model_key']}  payload {s['bytes']:,} bytes{' (zstd)' if s['compressed'] else ''}")
print(f"remote metric {metric(remote[patched]).item():+.4f}")

# %% [markdown]
# Two requests, one per forward of the plan (the France source run, stopped after layer 24, then
# the patched Italy run), each naming the model; the result equals the hook engine's.

# %%
assert len(sent) == 2 and all("SmolLM2-135M-Instruct" in s["model_key"] for s in sent)
torch.testing.assert_close(remote[patched].logits, h[patched].logits, rtol=1e-4, atol=1e-4)
torch.testing.assert_close(remote[patched].cache["blocks.27.resid_post"], h[patched].cache["blocks.27.resid_post"], rtol=1e-4, atol=1e-4)

# %% [markdown]
# ## Takeaways
#
# - The graph is the study; the engine is a choice. Hooks and nnsight traces agree on outputs,
#   collected values and gradients, and match a trace written in plain nnsight.
# - A model you already wrapped in nnsight is accepted as is (`sl.wrap(lm)`), and left as it was.
# - Trained interventions (a LoReFT here) run unchanged through nnsight; for NDIF the same graph
#   is serialised by nnsight's own remote path, with the model named by key. See `docs/nnsight.md`
#   for the remote steps and for models split across devices or offloaded.

# %%
lab.unwrap()
