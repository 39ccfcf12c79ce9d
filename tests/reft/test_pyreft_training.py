"""Ten training steps of :func:`steerlab.reft.train` follow pyreft's trajectory within 1e-5 where the
parametrisations coincide, and a plain-torch QR training where they do not.

The peer's step is what ``pyreft.ReftTrainerForCausalLM`` runs: its ``compute_loss`` (pyvene's
intervened forward, the model's own loss) under ``torch.optim.AdamW`` with the Hugging Face linear
schedule and the Trainer's weight-decay groups (no decay on biases); the Trainer's gradient clipping
(``max_grad_norm=1``) has no counterpart in steerlab and is left out. The order is the one
``steerlab.reft.train`` documents: one ``randperm(n)`` per epoch from a generator seeded with
``seed``, consecutive micro-batches. The parameters are compared after every step, the losses at
every step.

- LoReFT with ``R`` frozen (``W``, ``b`` trained), DiReFT (pyreft's ``NodireftIntervention``) and
  NoReFT: the same function of the same parameters, so the same trajectory.
- LoReFT with ``R`` trained: pyreft moves ``R`` on torch's Householder parametrisation, steerlab
  on ``R = Q(A)ᵀ`` (QR); equal gradients at the start (``test_pyreft_equivalence``), different
  steps after it by design. So steerlab's trained ``A``, ``R``, ``W``, ``b`` are compared with a
  hand-written plain-torch training of the QR parametrisation (hooks on the decoder layers).
"""

from __future__ import annotations

import pyreft
import pytest
import torch
import transformers
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.data import Dataset

from steerlab import reft
from tests.archs import tiny_model
from tests.peers import padded_positions, qr_rows
from tests.reft.test_pyreft_equivalence import D, LAYERS, RANK, TYPES, copy_into, theirs_of
from tests.reliability import one_thread_fixture

_one_thread = one_thread_fixture()

N, BATCH, STEPS, EPOCHS, SEED = 10, 4, 10, 4, 3  # 3 steps an epoch (4 + 4 + 2 examples): 10 steps reach epoch 4
LR, DECAY = 2e-2, 0.05


class _Tok:
    """What the collator needs from a tokenizer: a pad id and a side (the tiny model has no tokenizer)."""

    pad_token_id = 0

    def __init__(self, side: str):
        self.padding_side = side

    def __call__(self, *args, **kwargs):  # pragma: no cover - the collator only checks it is callable
        raise NotImplementedError


class _Rows(Dataset):
    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def examples() -> _Rows:
    """Prompts of 4-8 tokens and responses of 2-3 (loss on the response); positions f1+l2 per example."""
    g = torch.Generator().manual_seed(11)
    out = []
    for _ in range(N):
        n, m = int(torch.randint(4, 9, (), generator=g)), int(torch.randint(2, 4, (), generator=g))
        ids = torch.randint(3, 90, (n + m,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * n + ids[n:], "intervention_positions": torch.tensor([[0, n - 2, n - 1]])})
    return _Rows(out)


def order() -> list[Tensor]:
    """The micro-batches of :func:`steerlab.reft.train` (``shuffle=True``), from its documented rule."""
    g, batches = torch.Generator().manual_seed(SEED), []
    while len(batches) < STEPS:
        perm = torch.randperm(N, generator=g)
        batches += [perm[a : a + BATCH] for a in range(0, N, BATCH)]
    return batches[:STEPS]


def train_ours(rm: reft.ReftModel, side: str) -> tuple[list[float], list[list[Tensor]]]:
    """steerlab's loop; the trainable parameters after every optimiser step."""
    params = [p for p in rm.interventions.parameters() if p.requires_grad]
    after: list[list[Tensor]] = []
    hook = register_optimizer_step_post_hook(lambda *_: after.append([p.detach().clone() for p in params]))
    try:
        result = reft.train(rm, examples(), epochs=EPOCHS, max_steps=STEPS, lr=LR, batch_size=BATCH, weight_decay=DECAY,
                            collator=reft.ReftDataCollator(_Tok(side)), seed=SEED, progress=False)
    finally:
        hook.remove()
    return result.losses, after


def train_peer(params: dict[str, nn.Parameter], loss_of, side: str, *, no_decay=lambda name: name.endswith("bias")):
    """The Hugging Face Trainer's step on ``loss_of(batch)``: AdamW, decay on all but biases, linear schedule."""
    groups = [{"params": [p for n, p in params.items() if not no_decay(n)], "weight_decay": DECAY},
              {"params": [p for n, p in params.items() if no_decay(n)], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=LR)
    schedule = transformers.get_linear_schedule_with_warmup(opt, 0, STEPS)
    collate, data = reft.ReftDataCollator(_Tok(side)), examples()
    losses, after = [], []
    for rows in order():
        loss = loss_of(collate([data[i] for i in rows.tolist()]))
        loss.backward()
        opt.step()
        schedule.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
        after.append([p.detach().clone() for p in params.values()])
    return losses, after


def pyreft_loss(prm):
    def loss_of(batch: dict) -> Tensor:
        pos = padded_positions(batch["intervention_positions"][:, 0], batch["attention_mask"])
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": batch["labels"],
                  "intervention_locations": torch.tensor(pos)[:, None, :].expand(-1, len(LAYERS), -1)}
        return pyreft.ReftTrainer.compute_loss(None, prm, inputs)  # pyreft's own loss (its `self` is unused)
    return loss_of


def assert_same_trajectory(ours, theirs, names):
    (l_ours, p_ours), (l_theirs, p_theirs) = ours, theirs
    assert len(l_ours) == len(l_theirs) == STEPS
    torch.testing.assert_close(torch.tensor(l_ours), torch.tensor(l_theirs), atol=1e-5, rtol=0)
    for step, (a, b) in enumerate(zip(p_ours, p_theirs)):
        for name, x, y in zip(names, a, b):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=0, msg=lambda m: f"step {step + 1}, {name}: {m}")
    gap = max(float((x - y).abs().max()) for a, b in zip(p_ours, p_theirs) for x, y in zip(a, b))
    moved = max(float((x - y).abs().max()) for x, y in zip(p_ours[-1], p_ours[0]))
    print(f"largest gap over the trajectory {gap:.1e}, loss gap {max(abs(x - y) for x, y in zip(l_ours, l_theirs)):.1e}; parameters moved {moved:.3f}")
    assert moved > 0.05  # the trajectory goes somewhere: thousands of times the tolerance


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("kind", ["loreft_frozen_R", "direft", "noreft"])
def test_ten_steps_follow_pyreft(kind, side):
    make_ours, make_theirs = TYPES["loreft" if kind == "loreft_frozen_R" else kind]
    if kind == "loreft_frozen_R":
        ivs = [reft.LoReFT(f"blocks.{layer}.resid_post", rank=RANK, positions="per-call", train_rotation=False) for layer in LAYERS]
    else:
        ivs = [make_ours(f"blocks.{layer}.resid_post", torch.float32) for layer in LAYERS]
    rm = reft.get_reft_model(tiny_model("llama"), ivs)
    pivs = [make_theirs(torch.float32) for _ in LAYERS]
    for iv, piv in zip(rm.interventions, pivs):
        copy_into(iv, piv, leaf=False)
    reps = [{"layer": layer, "component": "block_output", "low_rank_dimension": RANK, "intervention": piv}
            for layer, piv in zip(LAYERS, pivs)]
    prm = pyreft.get_reft_model(tiny_model("llama"), pyreft.ReftConfig(representations=reps), set_device=False)
    names = [f"{i}.{n}" for i, iv in enumerate(rm.interventions) for n, p in iv.named_parameters() if p.requires_grad]
    theirs_params = {n: theirs_of(pivs[int(n.split(".")[0])], n.split(".", 1)[1]) for n in names}
    if kind == "loreft_frozen_R":
        assert not any("rotation" in n for n in names)
        for piv in pivs:
            piv.rotate_layer.requires_grad_(False)
    assert_same_trajectory(train_ours(rm, side), train_peer(theirs_params, pyreft_loss(prm), side), names)


def test_trained_R_follows_a_plain_torch_QR_training():
    """LoReFT with ``R`` trained (two layers, left padding) against hooks written here: ``R = qr_rows(A)``
    and ``h + (W h + b - R h)ᵀ R`` at the positions, AdamW on ``A``, ``W``, ``b`` (no decay on ``A``, ``b``)."""
    rm = reft.get_reft_model(tiny_model("llama"), [reft.LoReFT(f"blocks.{layer}.resid_post", rank=RANK, positions="per-call")
                                                   for layer in LAYERS])
    model = tiny_model("llama")
    leaves = {f"{i}.{n}": nn.Parameter(p.detach().clone()) for i, iv in enumerate(rm.interventions) for n, p in iv.named_parameters()}
    where: dict[str, Tensor] = {}

    def edit(i: int):
        def hook(module, args, h):
            a, w, b = (leaves[f"{i}.{n}"] for n in ("rotation.weight", "weight", "bias"))
            r, idx = qr_rows(a), where["pos"][..., None].expand(-1, -1, D)
            s = h.gather(1, idx)
            return h.scatter(1, idx, s + (s @ w.T + b - s @ r.T) @ r)
        return hook

    for i, layer in enumerate(LAYERS):
        model.model.layers[layer].register_forward_hook(edit(i))

    def loss_of(batch: dict) -> Tensor:
        where["pos"] = torch.tensor(padded_positions(batch["intervention_positions"][:, 0], batch["attention_mask"]))
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss

    ours = train_ours(rm, "left")  # steerlab never decays A (an orthonormal map), nor biases
    theirs = train_peer(leaves, loss_of, "left", no_decay=lambda n: n.endswith("bias") or "rotation" in n)
    names = list(leaves)
    assert names == [f"{i}.{n}" for i, iv in enumerate(rm.interventions) for n, _ in iv.named_parameters()]
    assert_same_trajectory(ours, theirs, names)
    for i, iv in enumerate(rm.interventions):  # and the R each one ends with
        torch.testing.assert_close(qr_rows(iv.rotation.weight), qr_rows(leaves[f"{i}.rotation.weight"]), atol=1e-5, rtol=0)
