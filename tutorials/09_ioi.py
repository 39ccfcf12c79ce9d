# %% [markdown]
# # Indirect object identification in SmolLM2-135M: a circuit of attention heads
#
# **Run time.** Full mode about 90 min on 2 CPU cores (estimated from `benchmarks/ioi_circuit.py`, which runs the same searches, on a busy shared machine); fast mode (`STEERLAB_FAST=1`, what the tests run) about a minute.
#
# **Question.** Given *"Then, Mary and John went to the store. John gave a drink to"*, a language
# model should say *" Mary"*: the name mentioned once (the indirect object, IO), not the one
# mentioned twice (the subject, S). Wang et al. (2022, "Interpretability in the Wild") found the
# circuit GPT-2 small uses: **name mover** heads at the last token attend to the IO and copy it
# to the output (and **negative name movers** write against it); **S-inhibition** heads, earlier,
# move the information that S is duplicated to the last token, where it steers the name movers'
# queries away from S; **induction and duplicate-token heads**, earlier still, notice at S's second
# mention that it is a repeat. Their 26-head circuit alone, every other head mean-ablated, keeps
# 87 % of the logit difference. Does SmolLM2-135M do IOI the same way, and how much of the
# behaviour do the heads we find carry on prompts with names they never saw?
#
# **Method.** Path patching on a run graph. The corrupted prompts are the paper's ABC prompts: the
# same sentence with three other names (*"Then, Alice and Bob went to the store. Carol gave a
# drink to"*), which carry no information about which name repeats. To measure a head's *path*
# to a receiver, run the clean prompt with that head's output taken from the ABC run and every
# other head frozen at its clean output (only MLPs recompute); the receiver is the logits (name
# movers), or the name movers' queries at the last token, taken into an otherwise clean run
# (S-inhibition heads), or the S-inhibition heads' keys and values at S's second mention (the
# heads that detect the duplication). The score is the logit difference `logit(IO) − logit(S)` at
# the last token; a head's effect is the change it causes, as a share of the clean logit difference.
#
# With `STEERLAB_FAST=1` (the test suite sets it) the search uses 6 prompts, the name movers are
# sought in layers 21 and up and each later step only in the four layers below the previous
# step's heads, with fewer held-out prompts; the checks are the same.

# %%
import os

import torch

import steerlab as sl
from steerlab.alignment import Circuit, Receiver, faithfulness, path_patching
from steerlab.alignment.tasks import ioi

FAST = os.environ.get("STEERLAB_FAST") == "1"
model, tok = sl.load("smollm2-135m")
lab = sl.wrap(model, tok)
H = lab.resolve("blocks.0.attn.z").n_heads  # 9 query heads per layer
task = ioi()
train = task.prompts(6 if FAST else 30, tok, split="train", seed=1)  # circuit discovery
test = task.prompts(24 if FAST else 60, tok, split="test", seed=2)  # held out: names never seen in discovery
print(task, train, test, sep="\n")
print(train.texts[0], "|", train.corrupted_texts[0])

# %% [markdown]
# ## 1. The behaviour

# %%
def logit_diff(data, corrupted=False):
    inputs = data.encode(corrupted=corrupted)
    with torch.no_grad():
        return data.metric(lab.run(inputs).output, inputs)


clean_ld, abc_ld = logit_diff(test), logit_diff(test, corrupted=True)
print(f"held-out prompts: logit diff IO - S {clean_ld.mean():.2f}, correct {(clean_ld > 0).float().mean():.0%}; ABC prompts {abc_ld.mean():.2f}")
assert clean_ld.mean() > 3 and (clean_ld > 0).float().mean() >= 0.85  # SmolLM2 does IOI
assert abs(abc_ld.mean()) < 1  # the ABC prompts carry no preference for either name

# %% [markdown]
# ## 2. Name movers: path patching to the logits
#
# Every head of the layers searched is a sender; the heatmap is each head's effect on the logit
# difference when only its direct path (and the MLPs after it) sees the ABC prompt. Blue heads
# carry the behaviour.

# %%
clean, corrupt = train.encode(), train.encode(corrupted=True)
first = 21 if FAST else 0
movers = path_patching(lab, clean, corrupt, metric=train.metric, senders=[(L, h) for L in range(first, 30) for h in range(H)])
print(movers.table(8))
movers.plot()

# %% [markdown]
# Before reading it, check one cell by hand: the sender run of the strongest head spelled out as
# interventions: its output from the ABC prompt, every other head of its layer and of the layers
# above frozen at the clean prompt's output.

# %%
(L, h), strongest = movers.top(1)[0]
by_hand = [sl.Interchange(f"blocks.{L}.attn.z", heads=[h], source=corrupt)]
by_hand += [sl.Interchange(f"blocks.{L}.attn.z", heads=[x for x in range(H) if x != h], source=clean)]
by_hand += [sl.Interchange(f"blocks.{layer}.attn.z", source=clean) for layer in range(L + 1, 30)]
with torch.no_grad():
    hand = train.metric(lab.run(clean, by_hand).output, clean)
print(f"head {L}.{h}: path patching {movers.per_example[movers.senders.index((L, h))].mean():.4f}, by hand {hand.mean():.4f}")
assert torch.allclose(movers.per_example[movers.senders.index((L, h))], hand, atol=1e-3)

# %% [markdown]
# The name movers: the heads whose path moves the logit difference down by more than 1 % of it
# (at most six). Some heads push the other way (by more than 2 %): they write *against* the
# answer, like the paper's negative name movers.

# %%
name_movers = [head for head, v in movers.top(6) if v < -0.01]
negative = [head for head, v in movers.top(3, sign=1) if v > 0.02]
print("name movers:", [f"{a}.{b} ({movers.relative[a, b]:.0%})" for a, b in name_movers])
print("negative name movers:", [f"{a}.{b} (+{movers.relative[a, b]:.0%})" for a, b in negative])
assert strongest < -0.2 and len(name_movers) >= 2  # a few heads carry most of it, as in GPT-2 small
assert negative  # and some write against it

# %% [markdown]
# ## 3. S-inhibition: path patching to the name movers' queries
#
# Now the receivers are the name movers' queries at the last token (`attn.q`, before rotary
# embedding): each sender's output is corrupted, the result read into the name movers' queries,
# and an otherwise clean run measured. The heads that matter here tell the name movers which
# name *not* to copy.

# %%
nm_layer = min(a for a, _ in name_movers)
receivers = [Receiver(a, tuple(hs), "q", positions=train.positions("END")) for a, hs in Circuit.of(name_movers).by_layer().items()]
low = nm_layer - 4 if FAST else 0
inhibition = path_patching(lab, clean, corrupt, metric=train.metric, receivers=receivers, senders=[(a, b) for a in range(low, nm_layer) for b in range(H)])
print(inhibition.table(8))
inhibition.plot()

# %%
s_inhibition = [head for head, v in inhibition.top(4) if v < -0.01]
print("S-inhibition heads:", [f"{a}.{b} ({inhibition.relative[a, b]:.0%})" for a, b in s_inhibition])
assert s_inhibition and inhibition.top(1)[0][1] < -0.05

# %% [markdown]
# The same path for the strongest S-inhibition head, written as a run graph: the sender run
# (its output from the ABC prompt, every other head below the name movers frozen) feeds the name
# movers' queries of a receiver run.

# %%
(a, b), _ = inhibition.top(1)[0]
g = sl.Graph()
c, x = g.run(clean, name="clean"), g.run(corrupt, name="ABC")
freeze = [sl.Interchange(f"blocks.{a}.attn.z", heads=[b], source=x)]
freeze += [sl.Interchange(f"blocks.{a}.attn.z", heads=[y for y in range(H) if y != b], source=c)]
freeze += [sl.Interchange(f"blocks.{layer}.attn.z", source=c) for layer in range(a + 1, nm_layer)]
sender = g.run(clean, freeze, name=f"sender {a}.{b}")
end = train.positions("END")[:, None]
receiver = g.run(clean, [sl.Interchange(r.site, heads=list(r.heads), positions=end, source=sender) for r in receivers], name="receiver")
with torch.no_grad():
    graph_value = train.metric(lab.execute(g)[receiver].output, clean)
assert torch.allclose(inhibition.per_example[inhibition.senders.index((a, b))], graph_value, atol=1e-3)
sl.viz.run_graph(g, lab)

# %% [markdown]
# ## 4. Who tells the S-inhibition heads that S repeats?
#
# The S-inhibition heads read, at the last token, from S's second mention. The receivers are now
# their keys and values there (`attn.k`, `attn.v`: SmolLM2 shares each key/value head among three
# query heads, so the receiver is the shared one).

# %%
kv_group = H // lab.resolve("blocks.0.attn.k").n_heads  # query heads per key/value head
s2 = train.positions("S2")
receivers3 = [Receiver(a, (b // kv_group,), kind, positions=s2) for a, b in s_inhibition for kind in ("k", "v")]
si_layer = min(a for a, _ in s_inhibition)
low3 = si_layer - 4 if FAST else 0
duplicate = path_patching(lab, clean, corrupt, metric=train.metric, receivers=receivers3, senders=[(a, b) for a in range(low3, si_layer) for b in range(H)])
print(duplicate.table(8))
duplicate.plot()

# %%
induction = [head for head, v in duplicate.top(8) if v < -0.01]
print("induction / duplicate-token heads:", [f"{a}.{b} ({duplicate.relative[a, b]:.0%})" for a, b in induction])
assert induction

# %% [markdown]
# ## 5. Faithfulness on held-out names
#
# The circuit: the name movers (negative ones included), the S-inhibition heads and the heads that
# detect the duplication. Every other head is mean-ablated (its
# output replaced by its mean over the ABC prompts of the same template, position by position) on
# the held-out prompts, and the logit difference that remains is compared with the whole model's;
# beside it, random circuits of the same size, and no head at all.

# %%
circuit = Circuit.of(name_movers + negative, "name movers") | Circuit.of(s_inhibition, "S-inhibition") | Circuit.of(induction, "duplication")
print(circuit)
result = faithfulness(lab, circuit, test.encode(), test.encode(corrupted=True), metric=test.metric, groups=test.templates, random_circuits=5 if FAST else 20)
print(result.table())
result.plot()

# %% [markdown]
# **Result.** A handful of heads found on six (or thirty) prompts carry much of SmolLM2's IOI
# behaviour on prompts with names they never saw, far more than random sets of heads of the same
# size; removing every head destroys it.

# %%
assert result.score > (0.2 if FAST else 0.5)  # a large share of the logit difference, from a few heads out of 270
assert result.score > max(result.random_scores) + 0.2
assert result.empty_score < 0.25
lab.unwrap()
