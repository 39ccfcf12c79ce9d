# %% [markdown]
# # Distributed alignment search on hierarchical equality
#
# **Run time.** Full mode about 5 min on 2 CPU cores (measured 2026-12-05); fast mode (`STEERLAB_FAST=1`, what the tests run) about a minute.
#
# **Question.** A small MLP learns the *hierarchical equality* task of the DAS paper (Geiger, Wu,
# Potts, Icard and Goodman, *Finding Alignments Between Interpretable Causal Variables and
# Distributed Neural Representations*, 2023): given four entities `w, x, y, z` (random vectors in
# `[-1, 1]^4`), output whether `(w = x) = (y = z)`. A natural algorithm first computes the two
# equality relations `WX = (w = x)` and `YZ = (y = z)`, then compares them. Does the network
# compute them too, and if so, **where** (which hidden layer) and **in which subspace**?
#
# **Method.** Distributed alignment search (DAS). At a hidden layer, learn an orthonormal basis
# `R` (rows: a `k`-dimensional subspace per variable) such that the *interchange* `h' = h + Rᵀ(R s − R h)`
# (base activation `h`, activation `s` of a source input) makes the network output what the
# causal model outputs when `WX` (or `YZ`, or both) takes its value from the source. The score
# is the interchange-intervention accuracy (IIA) on held-out counterfactuals built from entities
# the network never saw. Beside every IIA, two controls: the same training on a randomly
# re-initialised network (it should stay at chance, 0.5), and the best *neuron-aligned*
# (localist) alignment of the same size, searched exhaustively.
#
# With `STEERLAB_FAST=1` (the test suite sets it) DAS trains on fewer counterfactuals and tries
# one subspace size; the conclusions and the checks are the same.

# %%
import os

import torch

import steerlab as sl
from steerlab.alignment import search, tasks
from steerlab.alignment.tasks.hierarchical_equality import PAPER

FAST = os.environ.get("STEERLAB_FAST") == "1"
torch.set_num_threads(1)  # 16-wide layers: thread hand-offs cost more than the arithmetic
task = tasks.hierarchical_equality(seed=0)
task

# %% [markdown]
# ## 1. The causal model and its counterfactuals
#
# The task ships its causal model: inputs `W, X, Y, Z` (entity ids), the two relations `WX` and
# `YZ`, and the output `O = (WX = YZ)`. A counterfactual example is a *base* input, a source
# input for each intervened variable, and the label the causal model gives when each intervened
# variable takes its value on its source. The examples intervene `WX` alone, `YZ` alone, and both
# (each from its own source); their labels are balanced.

# %%
cm = task.causal_model
print(cm)
train, test = task.datasets(n_train=4000 if FAST else 10_000, n_test=2000, seed=0)
ex = test[0]
print("base   ", ex.base, "->", cm.run(ex.base))
for v, src in ex.sources.items():
    print(f"source for {v}", src, "->", cm.run(src)[v])
print("counterfactual label", ex.label, "(the base's own label:", ex.base_label, ")")

# %% [markdown]
# The counterfactual labels, recomputed from the entity ids alone (no causal model): `WX` is
# `w = x` of its source if `WX` is intervened, else of the base; the same for `YZ`; the label is
# whether the two agree.

# %%


def label_by_hand(ex) -> bool:
    src_wx, src_yz = ex.sources.get("WX", ex.base), ex.sources.get("YZ", ex.base)
    return (src_wx["W"] == src_wx["X"]) == (src_yz["Y"] == src_yz["Z"])


assert all(label_by_hand(e) == e.label for e in list(train) + list(test))
assert {e.intervened for e in test} == {("WX",), ("YZ",), ("WX", "YZ")}
assert abs(sum(e.label for e in test) / len(test) - 0.5) < 0.05  # balanced: chance is 0.5

# %% [markdown]
# ## 2. The network
#
# A 3-layer MLP with hidden size 16 (input: the four vectors concatenated), trained on entities
# of the training split and tested on held-out entities. The paper trains it to about 100%; the
# recipe here (AdamW with weight decay 0.3, one-cycle schedule) reaches at least 99%.

# %%
mlp, accuracy = task.train_model(seed=0, n_train=200_000 if FAST else 300_000)
lab = sl.wrap(mlp, example_input=task.example_input())
print(mlp)
print(f"accuracy on held-out entities: {accuracy:.4f}")
assert accuracy >= 0.99

# %% [markdown]
# ## 3. Where? A search over the three hidden layers
#
# `search` trains DAS at every hidden layer (`task.site(L)` names layer `L`'s output, counted from
# 1 as in the paper) and subspace size, with both controls beside each candidate: the same
# training on a re-initialised network, and the best localist alignment of the same size over
# all 12,870 ways to give `WX` and `YZ` 8 disjoint neurons each. Every activation below a site is
# computed once and reused by every epoch and candidate.

# %%
SIZES = [8] if FAST else [2, 4, 8]
res = search(
    lab, train, test, sites=[task.site(L) for L in (1, 2, 3)], sizes=SIZES,
    epochs=4 if FAST else 5, batch_size=64, lr=0.01, seed=0, selection_size=512, eval_size=512,
)
print(res)
res.plot(variable="all")

# %% [markdown]
# **Result.** With 8 dimensions per relation, DAS at layer 1 makes the network follow the
# causal model on held-out counterfactuals almost always; by layer 3 the relations have been
# merged into the answer and no subspace of the layer holds them separately. The random-init
# control stays at chance everywhere. (The full run also tries 2 and 4 dimensions per relation:
# at layer 1 DAS still reaches about 0.94 there, while the best localist split of 2 + 2 or
# 4 + 4 neurons falls to about 0.65.)
#
# Layer 2 is a caveat, not a finding: there DAS stays at (or a little below) chance while the
# exhaustive localist search reaches about 0.6–0.7, so some of each relation is still readable
# at layer 2 and our short DAS training (4–5 epochs, learning rate 0.01, one seed) does not find
# it. A DAS number is a lower bound on what a layer holds; where a control beats it, the
# optimisation, not the network, is what failed. "DAS ≥ localist" is checked where DAS converged,
# at layer 1.

# %%
layer = {L: res.get(task.site(L), None, 8) for L in (1, 2, 3)}
r = layer[1]
print(r)
assert res.best().site == task.site(1)  # the relations are found at layer 1 ...
assert r.iia["all"].value >= 0.95 and all(r.iia[k].value >= 0.93 for k in ("WX", "YZ", "WX+YZ"))
assert layer[3].iia["all"].value < r.iia["all"].value - 0.1  # ... and no longer separately at layer 3
for L, x in layer.items():  # the re-initialised network: within two standard errors of chance
    assert x.random_init["all"].near_chance, (L, str(x))
    assert abs(x.random_init["all"].value - 0.5) <= 2 * x.random_init["all"].chance_se
assert r.iia["all"].value > r.random_init["all"].value + 0.4
# a neuron-aligned subspace is one DAS could have found: the distributed one is at least as good
assert r.localist_method == "exhaustive: all 12870 disjoint neuron assignments (sizes 8, 8 of 16)"
assert r.iia["all"].value >= r.localist["all"].value

# %% [markdown]
# The training curve of the layer-1 alignment, with the control's curve and the levels of
# chance, the localist alignment and the full-vector interchange beside it.

# %%
r.plot()

# %% [markdown]
# **About the "full vector" line.** For a language task the interchange of the whole vector at a
# site is the upper bound of any subspace interchange there. Here it is not: layer 1 holds *both*
# relations, so swapping the whole vector for a `WX`-only counterfactual also brings the source's
# `YZ` along, and the network then answers what the source input answers. That is right only
# when the source's `YZ` happens to equal the base's, about half of the time. So where several
# variables are aligned at one site, the result does not raise its "above the full-vector
# interchange" flag (it would be a false alarm). The check: the full-vector interchange predicts
# exactly the source's own output, its IIA is near 0.5, and no row is flagged.

# %%
rows = [i for i, e in enumerate(test) if e.intervened == ("WX",)][:300]
batch = test.collate(rows)
swapped = lab.run(batch.base, [sl.Interchange(task.site(1), source=batch.sources["WX"])]).logits.argmax(-1)
with torch.no_grad():
    source_answer = mlp(batch.sources["WX"]).argmax(-1)
assert torch.equal(swapped, source_answer)
assert abs(r.full_vector["WX"].value - 0.5) < 0.1 and abs(r.full_vector["YZ"].value - 0.5) < 0.1
assert not any(row["above_full_vector"] for row in r.rows())

# %% [markdown]
# ## 4. The interchange by hand
#
# An independent check of the reported IIA, in plain PyTorch on the MLP's own modules: compute the
# layer-1 activations of the base and of each source, replace each relation's coordinates
# `h ← h + (s − h) Rᵀ R` with the learned basis `R = result.subspaces[v].basis` (rows that do not
# intervene `v` carry the base as their source, an identity), run layers 2, 3 and the head, and
# compare the predictions with the counterfactual labels on all 2,000 held-out examples.

# %%
batch = test.collate(range(len(test)))
with torch.no_grad():
    h = mlp.layers[0](batch.base)
    for v in ("WX", "YZ"):
        R = r.subspaces[v].basis
        s = mlp.layers[0](batch.sources[v])
        h = h + (s - h) @ R.T @ R
    by_hand = mlp.head(mlp.layers[2](mlp.layers[1](h)))
iia_by_hand = (by_hand.argmax(-1) == batch.labels).float().mean().item()
library = lab.run(batch.base, [r.intervention(v, source=batch.sources[v]) for v in ("WX", "YZ")]).logits
print(f"IIA by hand {iia_by_hand:.4f}   reported {r.iia['all'].value:.4f}")
assert torch.allclose(by_hand, library, atol=1e-5)
assert torch.equal(by_hand.argmax(-1), library.argmax(-1))
assert iia_by_hand == r.iia["all"].value
# the two subspaces are orthonormal and disjoint, so the order of the two edits does not matter
W, Y = r.subspaces["WX"].basis, r.subspaces["YZ"].basis
assert torch.allclose(W @ W.T, torch.eye(8), atol=1e-5) and torch.allclose(W @ Y.T, torch.zeros(8, 8), atol=1e-5)

# %% [markdown]
# ## 5. In which subspace? The representations projected onto it
#
# The held-out base inputs at layer 1, projected onto the first two of the 8 coordinates of the
# `WX` subspace and coloured by `WX`; then the same points coloured by `YZ`. A linear probe on
# the 8 coordinates reads `WX` off them, and reads `YZ` much worse: the subspace carries its own
# relation.

# %%
sample = test[:600]
sl.viz.subspace_projection(r, lab, sample, variable="WX")

# %%
sl.viz.subspace_projection(r, lab, sample, variable="WX", coloured_by="YZ")

# %%


def probe_accuracy(projection) -> float:
    """Training accuracy of a least-squares linear probe for a True/False variable."""
    y = torch.tensor([1.0 if v else -1.0 for v in projection.values])
    x = torch.cat([projection.coords, torch.ones(len(y), 1)], 1)
    w = torch.linalg.lstsq(x, y[:, None]).solution
    return ((x @ w).squeeze(1).sign() == y).float().mean().item()


probe = {
    (sub, var): probe_accuracy(r.project(lab, sample, variable=sub, coloured_by=var))
    for sub in ("WX", "YZ") for var in ("WX", "YZ")
}
print({f"{var} from the {sub} subspace": round(a, 3) for (sub, var), a in probe.items()})
assert probe["WX", "WX"] > 0.8 and probe["YZ", "YZ"] > 0.8
assert probe["WX", "WX"] > probe["WX", "YZ"] + 0.15 and probe["YZ", "YZ"] > probe["YZ", "WX"] + 0.15

# %% [markdown]
# ## 6. Against the paper
#
# | | paper (Geiger et al. 2023) | `benchmarks/das_hierarchical_equality.py` (3 seeds) | this notebook |
# |---|---|---|---|
# | DAS, layer 1, 8 + 8 dims | 1.00 | 0.978 ± 0.020 | printed below |
# | best localist alignment | 0.60 (brute force) / 0.73 (closest) | 0.926 | printed below |
# | random-init network | near 0.5 | near 0.5 | printed below |
#
# DAS reproduces: at layer 1 a distributed 8 + 8-dimensional alignment makes the network follow
# the causal model on held-out entities, at or near the paper's 1.00, and the re-initialised
# network stays at chance. The localist control does **not** reproduce the paper's gap: our
# exhaustive neuron-aligned search reaches well above 0.60 / 0.73 on our networks. The training
# recipe is the likely reason (see `HierarchicalEquality.train_model`): with weight decay 0.3 most
# first-layer units serve one pair of entities, so a split of the neurons into two halves already
# separates the relations fairly well. DAS still beats it, as it must (a localist alignment is
# one of the subspaces DAS can reach).

# %%
print(f"paper: DAS {PAPER['das_layer1_size8']:.2f}, localist {PAPER['localist_brute_force']:.2f} (brute force) / "
      f"{PAPER['localist_closest']:.2f} (closest), random init {PAPER['random_init']:.2f}")
print(f"here:  DAS {r.iia['all']}, localist {r.localist['all']}, random init {r.random_init['all']}")
assert r.iia["all"].value >= PAPER["das_layer1_size8"] - 0.05
assert r.localist["all"].value > PAPER["localist_closest"]  # the honest difference from the paper, stated above

# %% [markdown]
# **Answer.** The MLP computes the two equality relations at its first hidden layer, each in an
# 8-dimensional subspace of the 16 units, disjoint from the other's; interchanging those subspaces
# makes it follow the causal model on about 98% of held-out counterfactuals, a randomly
# initialised network gives chance, and the best split of the neurons themselves comes second.
