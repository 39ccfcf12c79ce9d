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
# steerlab's DAS differs from the paper's in two measured ways (section 4): after a cross-entropy
# start it minimises a smooth 0-1 loss on the label margin (which counts errors, as IIA does), and
# it reports the state with the best IIA on *training* counterfactuals, its start included. Then
# come two more questions the same tools answer: which causal variable does a found subspace
# carry (hypothesis testing, section 7), and which *neurons* carry it (desiderata-based
# masking, section 8).
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
# control stays at chance everywhere. At every layer DAS is at least as good as the best
# neuron-aligned split (a localist subspace is one DAS can reach, so anything else would be an
# optimisation failure; section 4 shows the one cross-entropy had).

# %%
layer = {L: res.get(task.site(L), None, 8) for L in (1, 2, 3)}
r = layer[1]
print(r)
assert res.best().site == task.site(1)  # the relations are found at layer 1 ...
assert r.iia["all"].value >= 0.97 and all(r.iia[k].value >= 0.95 for k in ("WX", "YZ", "WX+YZ"))
assert layer[3].iia["all"].value < r.iia["all"].value - 0.1  # ... and no longer separately at layer 3
for L, x in layer.items():  # the re-initialised network: within two standard errors of chance
    assert x.random_init["all"].near_chance, (L, str(x))
    assert abs(x.random_init["all"].value - 0.5) <= 2 * x.random_init["all"].chance_se
    # a neuron-aligned subspace is one DAS could have found: DAS is at least as good, within one standard
    # error of the difference; at layer 3 both sit near chance (about 0.5 against 0.53) and differ by
    # noise alone, where one standard error fails one run in six, so two there
    loc, das = x.localist["all"], x.iia["all"]
    assert das.value >= loc.value - (1 if L < 3 else 2) * (loc.se**2 + das.se**2) ** 0.5, (L, str(x))
assert r.iia["all"].value > r.random_init["all"].value + 0.4
assert r.localist_method == "exhaustive: all 12870 disjoint neuron assignments (sizes 8, 8 of 16)"

# %% [markdown]
# The training curve of the layer-1 alignment, with the control's curve and the levels of
# chance, the localist alignment and the full-vector interchange beside it.

# %%
r.plot()

# %% [markdown]
# **About the "full vector" line.** For a single variable the interchange of the whole vector at a
# site bounds any subspace interchange there. Here layer 1 holds *both* relations, so swapping the
# whole vector for a `WX`-only counterfactual also brings the source's `YZ` along, and the network
# then answers what the source input answers — which is the `WX` counterfactual's label only when
# the source's `YZ` equals the base's. So the bound is computed on exactly those examples (the
# result asks the causal model which variables sit beside `WX`: `Y`, `Z`, `YZ`), and the DAS IIA
# beside it on the same examples; the "above the full-vector interchange" flag compares the two.
# The check: the whole-vector swap answers what the source answers, the bound rows are the
# examples whose source agrees with the base on `YZ`, and there the whole vector is right.

# %%
rows = [i for i, e in enumerate(test) if e.intervened == ("WX",)][:300]
batch = test.collate(rows)
swapped = lab.run(batch.base, [sl.Interchange(task.site(1), source=batch.sources["WX"])]).logits.argmax(-1)
with torch.no_grad():
    source_answer = mlp(batch.sources["WX"]).argmax(-1)
assert torch.equal(swapped, source_answer)
same_yz = [i for i, e in enumerate(test) if e.intervened == ("WX",)
           and (e.sources["WX"]["Y"] == e.sources["WX"]["Z"]) == (e.base["Y"] == e.base["Z"])]
assert r.full_vector["WX"].n == len(same_yz) == r.bounded["WX"].n
assert r.full_vector["WX"].value >= 0.97 and not any(row["above_full_vector"] for row in r.rows())

# %% [markdown]
# ## 4. Why the objective matters: cross-entropy against IIA
#
# The DAS paper trains with cross-entropy. At layer 2 that fails: the neuron-aligned subspace is
# wrong on about 30% of counterfactuals but *confidently*, and cross-entropy prefers a rotation
# that is wrong on more of them but mildly — so minimising it lowers IIA, below the localist
# control and below chance. steerlab's default starts with cross-entropy (which moves a random
# start fast) and hands over, by 10% of training, to `sigmoid(−margin / τ)`, a smooth count of errors
# (the label margin is the correct label's score minus the other's; `τ` falls from 3 to 0.1);
# and it reports the state with the best IIA on training counterfactuals, its start included. Here at layer 2, from the same random start, on the same data: the paper's recipe,
# the default, the default started at the localist subspace, and the localist control. The full
# table over three seeds and three layers, beside pyvene's DAS, is in `benchmarks/README.md`
# (`benchmarks/das_hierarchical_equality.py`).

# %%
from steerlab.alignment import DAS

kw = dict(site=task.site(2), size=8, epochs=4 if FAST else 5, batch_size=64, lr=0.01, seed=0, controls=False)
paper_recipe = DAS(lab, objective="cross_entropy", select="final", **kw).fit(train, test)
default = DAS(lab, **kw).fit(train, test)
from_localist = DAS(lab, init="localist", **kw).fit(train, test)
loc2 = layer[2].localist["all"]
print(f"layer 2: cross-entropy, last step {paper_recipe.iia['all']}\n"
      f"         default (smooth 0-1, selected on training data) {default.iia['all']}\n"
      f"         default from the localist start {from_localist.iia['all']}\n"
      f"         localist control {loc2}")
print(default.selection.describe())
assert paper_recipe.iia["all"].value < loc2.value - 0.1  # cross-entropy loses to the neurons ...
assert default.iia["all"].value >= loc2.value - (loc2.se**2 + default.iia["all"].se ** 2) ** 0.5  # ... the default does not
assert from_localist.selection.iia >= from_localist.selection.start_iia[0]  # never below its start on training data
assert default.config["objective"].startswith("cross-entropy handing over to a smooth 0-1 loss")

# %% [markdown]
# ## 5. The interchange by hand
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
# ## 6. In which subspace? The representations projected onto it
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
# ## 7. Which variable does the subspace carry? Competing hypotheses
#
# The `WX` subspace was trained to carry `WX`. A sharper question: of several hypotheses about
# what interchanging it does — it moves `WX`, it moves `YZ`, it moves the output `O`, it does
# nothing — which one does the network follow, on the *same* counterfactual inputs?
# `compare_hypotheses` runs the intervention once per example and scores every hypothesis's
# predicted label against the network's answer, with a paired comparison (McNemar's exact test)
# between each pair; only the examples where two hypotheses disagree can separate them.

# %%
from steerlab.alignment import Hypothesis, compare_hypotheses

hyps = [Hypothesis(f"moves {v}", cm, v) for v in ("WX", "YZ", "O")]
ht = compare_hypotheses(lab, hyps, task.encoder, site=task.site(1), subspace=r.subspaces["WX"], n=600 if FAST else 2000,
                        seed=5, sampler=task.sampler("test"))
print(ht)
ht.plot()

# %%
assert ht.best() == "moves WX" and ht.iia["moves WX"].value >= 0.95
for other in ("moves YZ", "moves O", "no effect (base answer)"):
    p = ht.pair("moves WX", other)
    assert p.diff > 0.2 and p.p_value < 1e-6, (other, p)

# %% [markdown]
# ## 8. Which neurons? Desiderata-based masking
#
# DAS finds a rotated subspace; desiderata-based masking (DBM) asks which of the 16 *neurons* of
# layer 1 to interchange, learning a sigmoid mask per neuron with a penalty on how many stay
# open. Sweeping the penalty gives the trade-off between sparsity and IIA; a random mask of as
# many neurons is the control. (A neuron mask is a localist alignment that needs no search, so
# it sits at or below the exhaustive localist control of the same size.)

# %%
from steerlab.alignment import mask_tradeoff

masks = mask_tradeoff(lab, train, test, site=task.site(1), sparsities=[0.0, 0.3, 1.0, 3.0], epochs=3 if FAST else 5, seed=0)
print(masks)
masks.plot()

# %%
rows = masks.rows()
assert rows[0]["units"] >= rows[-1]["units"]  # more pressure, fewer neurons
kept = [x for x in masks.results if 0 < sum(x.sizes.values()) < 32]
assert kept, "some penalty keeps part of the layer"
for x in kept:  # the learned mask beats a random mask of the same size
    assert x.iia["all"].value > x.random_mask["all"].value + 0.05, str(x)

# %% [markdown]
# ## 9. Against the paper
#
# | | paper (Geiger et al. 2023) | `benchmarks/das_hierarchical_equality.py` (3 seeds) | this notebook |
# |---|---|---|---|
# | DAS, layer 1, 8 + 8 dims | 1.00 | see `benchmarks/README.md` | printed below |
# | best localist alignment | 0.60 (brute force) / 0.73 (closest) | see `benchmarks/README.md` | printed below |
# | random-init network | near 0.5 | near 0.5 | printed below |
#
# DAS reproduces: at layer 1 a distributed 8 + 8-dimensional alignment makes the network follow
# the causal model on held-out entities, at or near the paper's 1.00, and the re-initialised
# network stays at chance. The localist control does **not** reproduce the paper's gap: our
# exhaustive neuron-aligned search reaches well above 0.60 / 0.73 on our networks. The training
# recipe is the likely reason (see `HierarchicalEquality.train_model`): with weight decay 0.3 most
# first-layer units serve one pair of entities, so a split of the neurons into two halves already
# separates the relations well. DAS is still at least as good, as it must be.

# %%
print(f"paper: DAS {PAPER['das_layer1_size8']:.2f}, localist {PAPER['localist_brute_force']:.2f} (brute force) / "
      f"{PAPER['localist_closest']:.2f} (closest), random init {PAPER['random_init']:.2f}")
print(f"here:  DAS {r.iia['all']}, localist {r.localist['all']}, random init {r.random_init['all']}")
assert r.iia["all"].value >= PAPER["das_layer1_size8"] - 0.03
assert r.localist["all"].value > PAPER["localist_closest"]  # the honest difference from the paper, stated above

# %% [markdown]
# **Answer.** The MLP computes the two equality relations at its first hidden layer, each in an
# 8-dimensional subspace of the 16 units, disjoint from the other's; interchanging those subspaces
# makes it follow the causal model on nearly every held-out counterfactual, the subspace moves
# `WX` and not `YZ` or the output, a randomly initialised network gives chance, and the best
# split of the neurons themselves comes close but not above.
