"""Real models: a LoReFT trained on ten examples steers SmolLM2-135M-Instruct; removing it restores the model exactly."""

from __future__ import annotations

import pytest
import torch

from steerlab import reft
from tests.reliability import one_thread_fixture

_one_thread = one_thread_fixture()  # one intra-op thread: much faster on a shared 2-core machine

pytestmark = pytest.mark.slow

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


def _pirate(texts: list[str]) -> int:
    """The measured behaviour: the answer opens with the pirate greeting it was taught."""
    return sum(t.strip().lower().startswith("arr") for t in texts)


def test_loreft_learns_a_steering_behaviour_from_ten_examples(smollm):
    model, tok = smollm
    prompts = [reft.format_prompt(tok, q, system=SYSTEM) for q in HELD_OUT]
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    with torch.no_grad():
        base_logits = model(**enc).logits
    torch.manual_seed(0)
    rm = reft.get_reft_model(model, reft.ReftConfig(layers=[20, 25], rank=4, positions="l1"), tokenizer=tok)
    try:
        gen = dict(max_new_tokens=3, do_sample=False)
        with rm.disabled():
            before = rm.generate(prompts, **gen).texts
        data = reft.InstructionDataset(tok, [q for q, _ in TRAIN], [f"Arr, matey! {a}" for _, a in TRAIN],
                                       positions=rm.positions, system=SYSTEM)
        result = reft.train(rm, data, epochs=12, lr=2e-2, batch_size=len(data), cache_prefix=True)
        assert result.losses[-1] < 0.3 * result.losses[0]
        after = rm.generate(prompts, **gen).texts
        assert _pirate(before) <= 1, before
        assert _pirate(after) >= 8, after
        with rm.disabled():
            with torch.no_grad():
                assert torch.equal(model(**enc).logits, base_logits)
    finally:
        rm.unwrap()
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, base_logits)  # removed: the base model's outputs, exactly
