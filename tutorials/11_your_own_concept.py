# %% [markdown]
# # Locate your own concept: where does SmolLM2 keep the gender it reads off a name?
#
# **Run time.** Full mode about 16 min on 2 CPU cores (measured on a busy shared machine, one torch thread); fast mode (`STEERLAB_FAST=1`, what the tests run) about three minutes.
#
# **Question.** SmolLM2-135M-Instruct continues *"After work, John walked to the park, where"* with
# " he" and *"After work, Mary walked to the park, where"* with " she". So somewhere it computes the
# gender it associates with the name, a concept none of steerlab's shipped tasks has. Where does it
# keep it (which layer, which token), in which subspace, and can we steer the pronoun with that
# subspace?
#
# **Recipe.** The same five steps work for any concept you can write as a prompt template:
#
# 1. write the concept as a causal model over prompts (`steerlab.experiment.PromptTask`): input
#    variables and their values, the mechanism that computes the concept, the answer tokens, and
#    values held out for testing;
# 2. check that the model does the task (an alignment of a task the model fails is noise);
# 3. find it: a DAS search over layers and positions, then DAS at the best site with its controls;
# 4. steer with it: interchange only that subspace and watch the answer change;
# 5. write the experiment as a TOML file and run it with `steerlab run`: the same IIA, with every
#    input hashed beside the results.
#
# Everything runs offline on the embedded SmolLM2. With `STEERLAB_FAST=1` the search tries one
# layer (20) instead of six; every check is the same.

# %%
import os
from pathlib import Path

import torch

import steerlab as sl
from steerlab.alignment import DAS, search
from steerlab.experiment import Experiment, PromptTask

FAST = os.environ.get("STEERLAB_FAST") == "1"
model, tok = sl.load("smollm2-135m")
lab = sl.wrap(model, tok)

# %% [markdown]
# ## 1. The concept as a causal model over prompts
#
# Two inputs, `NAME` and `PLACE` (the place is a distractor: it changes the prompt, never the
# answer); `GENDER` is computed from the name, and `PRONOUN` from the gender. The model's answer is
# the pronoun, verbalised as the single tokens `" he"` and `" she"`. DAS will align `GENDER`, a
# variable that is no token of the prompt. Six names are held out: the test counterfactuals use only
# them, so a subspace that memorised the training names does not pass.
#
# From Python the mechanisms are plain functions; in a file (section 5) they are tables.

# %%
MALE = ["John", "Michael", "David", "James", "Robert", "William", "Thomas", "Peter", "Mark", "Paul", "George", "Daniel"]
FEMALE = ["Mary", "Sarah", "Emma", "Anna", "Lisa", "Laura", "Emily", "Susan", "Linda", "Julia", "Rachel", "Karen"]
PLACES = ["store", "park", "office", "beach", "library", "market"]
HELD_OUT = ["Paul", "George", "Daniel", "Linda", "Julia", "Karen"]


def gender(name):
    return "male" if name in MALE else "female"


def pronoun(g):
    return {"male": "he", "female": "she"}[g]


task = PromptTask(
    template="After work, {name} walked to the {place}, where",
    variables={"NAME": MALE + FEMALE, "PLACE": PLACES},
    mechanisms={"GENDER": (["NAME"], gender), "PRONOUN": (["GENDER"], pronoun)},
    answers={"he": " he", "she": " she"},
    intervene="GENDER",
    test_values={"NAME": HELD_OUT},
    n_train=96, n_test=48, name="pronoun-gender",
)
print(task)
print(task.causal_model.run({"NAME": "Anna", "PLACE": "park"}))
# the counterfactual DAS trains on: John's prompt, with GENDER as it is on a prompt about Mary
print(task.causal_model.interchange({"NAME": "John", "PLACE": "park"}, {"GENDER": {"NAME": "Mary", "PLACE": "store"}}))

# %% [markdown]
# ## 2. Does the model do the task?
#
# `task.accuracy` runs every input (24 names × 6 places) and compares the higher-scoring answer
# token with the causal model's pronoun.

# %%
accuracy, wrong = task.accuracy(lab)
print(f"SmolLM2 answers {100 * accuracy:.1f}% of {len(task.inputs())} prompts with the pronoun the causal model says; wrong: {wrong[:3]}")
assert accuracy >= 0.95, wrong[:5]

# %% [markdown]
# ## 3. Find it: DAS over layers × positions
#
# Two candidate places for the concept: the last token (where the answer is read) and the name's own
# token (`"name"`: the last token of the `{name}` field). At each, DAS learns a 2-dimensional
# subspace whose interchange from a source prompt should make the model answer the source's pronoun;
# IIA is measured on counterfactuals over the held-out names. Beside it, the interchange of the whole
# vector at the same place (the upper bound).

# %%
train, test = task.datasets(lab)
LAYERS = [20] if FAST else [4, 8, 12, 16, 20, 24]
found = search(lab, train, test, sites=[f"blocks.{L}.resid_post" for L in LAYERS], positions=["last", "name"], sizes=[2],
               epochs=2, batch_size=16, controls=False)
print(found)
found.plot()

# %% [markdown]
# The concept sits at the **name's token**: there DAS reaches high IIA, and at the last token not even
# the whole vector carries it (the full-vector interchange stays at chance), so the model reads the
# gender back from the name's position with attention in the layers above, when it predicts the
# pronoun.

# %%
rows = {(r["layer"], r["positions"]): r for r in found.rows()}
at_name, at_last = rows[(20, "name")], rows[(20, "last")]
assert at_name["iia"] >= 0.85 and at_name["iia"] > at_last["iia"] + 2 * at_name["se"]
assert at_last["full_vector"] <= at_last["chance"] + 0.15  # the last token does not hold it at layer 20

# %% [markdown]
# ## 4. The subspace at layer 20, with its controls
#
# DAS at the name's token of layer 20, the settings the file in section 5 uses. The controls: the same
# training on a randomly re-initialised SmolLM2 (a subspace found there would say nothing about this
# model), and the best neuron-aligned subspace of the same size.

# %%
SETTINGS = dict(size=2, positions="name", epochs=2, batch_size=16, localist_samples=16)
das = DAS(lab, site="blocks.20.resid_post", **SETTINGS).fit(train, test)
print(das)
iia = das.iia["GENDER"]
assert iia.value >= 0.85
assert iia.value > das.random_init["GENDER"].value + 2 * iia.se  # far above the random-init control
das.plot()

# %% [markdown]
# ## 5. Steer with it
#
# Read the name token's coordinates in the 2-dimensional subspace for prompts about the training
# names: men's and women's names sit apart there. Then steer prompts about the held-out men's names
# by moving only those two coordinates from the men's mean to the women's mean (adding
# `Rᵀ(μ_women − μ_men)` at the name's token of layer 20), and generate. If the subspace is the
# model's gender, the continuation switches to " she". The control: a vector of the same length in a
# random 2-dimensional subspace of the same site.

# %%
enc = task.encoder(tok)
sub = das.subspaces["GENDER"]
R = sub.basis  # [2, 576], orthonormal rows
probe = {"NAME": "Paul", "PLACE": "park"}
name_pos = int(enc.positions("name", [probe], enc.encode([probe]))[0, 0])
print(f"the name is token {name_pos} of {tok.convert_ids_to_tokens(tok(enc.text(probe)).input_ids)}")


def coordinates(names):
    texts = [enc.text({"NAME": n, "PLACE": p}) for n in names for p in PLACES]
    h = lab.collect(texts, "blocks.20.resid_post", positions=name_pos)["blocks.20.resid_post"]
    return h.reshape(len(texts), -1).float() @ R.T


train_names = [n for n in MALE + FEMALE if n not in HELD_OUT]
men = coordinates([n for n in train_names if n in MALE])
women = coordinates([n for n in train_names if n in FEMALE])
print(f"mean coordinates: men {men.mean(0).tolist()}, women {women.mean(0).tolist()}")
direction = R.T @ (women.mean(0) - men.mean(0))  # in the subspace, from the men's mean to the women's
g = torch.Generator().manual_seed(0)
random_basis = torch.linalg.qr(torch.randn(576, 2, generator=g))[0].T
random_direction = random_basis.T @ torch.randn(2, generator=g)
random_direction *= direction.norm() / random_direction.norm()

prompts = [enc.text({"NAME": n, "PLACE": p}) for n in ["Paul", "George", "Daniel"] for p in ["park", "office", "beach"]]
steer = sl.Add("blocks.20.resid_post", direction, positions=name_pos)
control = sl.Add("blocks.20.resid_post", random_direction, positions=name_pos)


def generate(interventions=()):
    texts = lab.generate(prompts, interventions, max_new_tokens=4, do_sample=False).texts
    return texts, sum(t.strip().lower().split()[:1] == ["she"] for t in texts)


(before, n_before), (after, n_after), (ctrl, n_ctrl) = generate(), generate([steer]), generate([control])
for p, b, a, c in list(zip(prompts, before, after, ctrl))[:3]:
    print(f"{p!r}\n   before {b!r}   steered in the GENDER subspace {a!r}   random subspace {c!r}")
print(f"continuations starting with 'she' (of {len(prompts)}): before {n_before}, steered {n_after}, random subspace {n_ctrl}")
assert n_before == 0 and n_after >= 7 and n_ctrl <= 1

# %% [markdown]
# ## 6. The same experiment as a file
#
# The file below is `tutorials/11_your_own_concept.toml`: the task as tables (the mechanisms as maps
# from each parent value to the variable's value), and a `[das]` table with the settings of section 4.
# `steerlab validate FILE` checks it and the model's accuracy and prints the plan; `steerlab run FILE`
# runs it. From Python the same is `Experiment.from_toml(path).run()`. The run folder holds the file
# itself, the saved result, the figures, `report.html` and `manifest.json`, with a SHA-256 of every
# input: the file, the model's weights, the task's full definition, the counterfactuals.

# %%
TOML = """# The TOML twin of tutorials/11_your_own_concept: the same concept, task and DAS, as a file.
#   steerlab validate tutorials/11_your_own_concept.toml   # the file, the model's accuracy, the plan
#   steerlab run tutorials/11_your_own_concept.toml        # DAS with controls -> tutorials/runs/pronoun-gender/
name = "pronoun-gender"
seed = 0

[model]
name = "smollm2-135m"

[task]
template = "After work, {name} walked to the {place}, where"
intervene = "GENDER"
n_train = 96                 # label-balanced counterfactuals from the training names
n_test = 48                  # from the held-out names (test_values) only

[task.variables]
NAME = ["John", "Michael", "David", "James", "Robert", "William", "Thomas", "Peter", "Mark", "Paul", "George", "Daniel",
        "Mary", "Sarah", "Emma", "Anna", "Lisa", "Laura", "Emily", "Susan", "Linda", "Julia", "Rachel", "Karen"]
PLACE = ["store", "park", "office", "beach", "library", "market"]

[task.mechanisms.GENDER]
parents = ["NAME"]

[task.mechanisms.GENDER.map]   # NAME -> GENDER, the concept
John = "male"
Mary = "female"
Michael = "male"
Sarah = "female"
David = "male"
Emma = "female"
James = "male"
Anna = "female"
Robert = "male"
Lisa = "female"
William = "male"
Laura = "female"
Thomas = "male"
Emily = "female"
Peter = "male"
Susan = "female"
Mark = "male"
Linda = "female"
Paul = "male"
Julia = "female"
George = "male"
Rachel = "female"
Daniel = "male"
Karen = "female"

[task.mechanisms.PRONOUN]
parents = ["GENDER"]
map = { male = "he", female = "she" }

[task.answers]
he = " he"
she = " she"

[task.test_values]
NAME = ["Paul", "George", "Daniel", "Linda", "Julia", "Karen"]

[das]
layer = 20
positions = "name"            # the last token of {name}: the search in the tutorial finds the concept there
size = 2
epochs = 2
batch_size = 16
"""
Path("your_concept.toml").write_text(TOML)
exp = Experiment.from_toml("your_concept.toml")
assert exp.task.sha256() == task.sha256()  # the file's tables compute exactly what the Python functions compute
print(exp.validate(check_model=False))
run = exp.run("runs/your_concept", log=lambda line: None)
print(run.manifest["inputs"]["task"], run.manifest["inputs"]["counterfactuals"])
print(f"IIA from Python {das.iia['all'].value:.4f}, from the file {run['das'].summary['iia']:.4f}")
assert abs(run["das"].summary["iia"] - das.iia["all"].value) < 1e-9
assert sorted(p.name for p in Path("runs/your_concept").iterdir()) == ["das", "experiment.toml", "manifest.json", "report.html"]

# %% [markdown]
# **What we found.** SmolLM2-135M reads a gender off a first name and keeps it at the name's own
# token: by layer 20 a 2-dimensional subspace there carries it (IIA far above the re-initialised
# model's), and the last token does not hold it even as a whole vector. Moving just those two
# coordinates to where women's names sit turns held-out men's names' " he" into " she"; a vector of
# the same length in a random subspace changes nothing. For your own concept, change the template,
# the variables, the mechanism and the answers, in Python or in the file: the rest stays as it is.
