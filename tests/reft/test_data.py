"""Datasets and the collator: response-only loss, chat templates, per-example positions, padding sides, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as T
from torch.nn import functional as F

from steerlab import reft
from steerlab.interventions.errors import DataError, PositionOutOfRange
from steerlab.models import embedded_path
from tests.reliability import one_thread_fixture

_one_thread = one_thread_fixture()  # one intra-op thread: much faster on a shared 2-core machine


@pytest.fixture(scope="module")
def smol_tok():
    return T.AutoTokenizer.from_pretrained(embedded_path("smollm2-135m"))


@pytest.fixture(scope="module")
def minilm_tok():
    return T.AutoTokenizer.from_pretrained(embedded_path("minilm-l6"))


PROMPTS = ["What is the capital of France?", "Say hi."]
RESPONSES = ["Paris.", "Hi there, friend!"]


def test_chat_template_and_response_only_labels(smol_tok):
    ds = reft.InstructionDataset(smol_tok, PROMPTS, RESPONSES, positions="f2+l2", system="Be brief.")
    for i, ex in enumerate(ds):
        msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPTS[i]}]
        prompt_text = smol_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        full_text = smol_tok.apply_chat_template(msgs + [{"role": "assistant", "content": RESPONSES[i]}], tokenize=False)
        assert smol_tok.decode(ex["input_ids"]) == full_text
        n = len(smol_tok(prompt_text)["input_ids"])
        assert ds.prompt_lengths[i] == n
        assert ex["labels"][:n] == [-100] * n
        response = smol_tok.decode([t for t in ex["labels"] if t != -100])
        assert response.startswith(RESPONSES[i]) and "<|im_end|>" in response  # the turn's end is learned too
        assert ex["intervention_positions"].tolist() == [[0, 1, n - 2, n - 1]]


def test_plain_text_format_appends_eos(smol_tok):
    ds = reft.InstructionDataset(smol_tok, PROMPTS, RESPONSES, positions="l1", chat_template=False)
    ex = ds[0]
    p = smol_tok(PROMPTS[0])["input_ids"]
    assert ex["input_ids"][: len(p)] == p and ex["input_ids"][-1] == smol_tok.eos_token_id
    assert ex["intervention_positions"].tolist() == [[len(p) - 1]]
    assert reft.format_prompt(smol_tok, "x", chat_template=False) == "x"
    assert reft.format_prompt(smol_tok, "x").endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("side", ["left", "right"])
def test_collator_pads_either_side_with_the_same_positions(smol_tok, side):
    ds = reft.InstructionDataset(smol_tok, PROMPTS, RESPONSES, positions="f1+l1", tied=False)
    batch = reft.ReftDataCollator(smol_tok, padding_side=side)([ds[0], ds[1]])
    lengths = [len(ds[0]["input_ids"]), len(ds[1]["input_ids"])]
    L = max(lengths)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, L)
    for i, n in enumerate(lengths):
        real = slice(0, n) if side == "right" else slice(L - n, L)
        assert batch["input_ids"][i, real].tolist() == ds[i]["input_ids"]
        assert batch["labels"][i, real].tolist() == ds[i]["labels"]
        assert batch["attention_mask"][i].sum() == n
        assert (batch["labels"][i][batch["attention_mask"][i] == 0] == -100).all()
    assert batch["intervention_positions"].shape == (2, 2, 1)
    assert batch["intervention_positions"].tolist() == [[[0], [ds.prompt_lengths[0] - 1]], [[0], [ds.prompt_lengths[1] - 1]]]


def test_loss_is_on_the_response_only(smol_tok):
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=len(smol_tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1)
    model = T.LlamaForCausalLM(cfg).eval()
    rm = reft.get_reft_model(model, reft.ReftConfig(layers=[1], rank=2, positions="l1"))
    ds = reft.InstructionDataset(smol_tok, PROMPTS, RESPONSES, positions=rm.positions)
    batch = reft.ReftDataCollator(smol_tok)([ds[0], ds[1]])
    with torch.no_grad():
        out = rm(**batch)
    # by hand: cross-entropy of the response tokens only, each predicted from the token before it
    logits, losses = out.logits, []
    for i in range(2):
        n_p, n = ds.prompt_lengths[i], len(ds[i]["input_ids"])
        targets = batch["input_ids"][i, n_p:n]
        losses.append(F.cross_entropy(logits[i, n_p - 1 : n - 1], targets, reduction="none"))
    torch.testing.assert_close(out.loss, torch.cat(losses).mean())
    from steerlab.reft.loop import step_loss

    torch.testing.assert_close(step_loss(rm, dict(batch)), out.loss)  # the head only at labelled positions


def test_classification_dataset_positions_and_labels(minilm_tok):
    ds = reft.ClassificationDataset(minilm_tok, ["a fine film", "dull"], [1, 0], positions="f1+l1")
    batch = reft.ReftDataCollator(minilm_tok)([ds[0], ds[1]])
    assert batch["labels"].tolist() == [1, 0] and batch["labels"].dtype == torch.long
    n0 = len(minilm_tok("a fine film")["input_ids"])
    assert batch["intervention_positions"][0].tolist() == [[0, n0 - 1]]  # [CLS] and [SEP]
    reg = reft.ClassificationDataset(minilm_tok, ["x"], [0.5])
    assert reft.ReftDataCollator(minilm_tok)([reg[0]])["labels"].dtype == torch.float32


def test_bad_input_gets_named_errors(smol_tok):
    no_pad = copy.deepcopy(smol_tok)
    no_pad.pad_token = None
    with pytest.raises(DataError, match="has no pad token, so batches cannot be padded; set tokenizer.pad_token"):
        reft.InstructionDataset(no_pad, PROMPTS, RESPONSES)
    with pytest.raises(DataError, match="has no pad token"):
        reft.ReftDataCollator(no_pad)
    with pytest.raises(DataError, match="the dataset is empty"):
        reft.InstructionDataset(smol_tok, [], [])
    with pytest.raises(DataError, match="the dataset is empty"):
        reft.ClassificationDataset(smol_tok, [], [])
    with pytest.raises(DataError, match="2 prompts but 1 responses"):
        reft.InstructionDataset(smol_tok, PROMPTS, RESPONSES[:1])
    with pytest.raises(PositionOutOfRange, match="position 40 is beyond the prompt of example 0, which has 5 tokens"):
        reft.InstructionDataset(smol_tok, ["Say hi to me."], ["Hi"], positions=[0, 40], chat_template=False)
    with pytest.raises(DataError, match="prompts\\[1\\] is int; expected text"):
        reft.InstructionDataset(smol_tok, ["a", 3], ["b", "c"])
    with pytest.raises(DataError, match="leaves no room for a response within max_length=4"):
        reft.InstructionDataset(smol_tok, ["a long prompt here"], ["b"], chat_template=False, max_length=4)
    ds = reft.InstructionDataset(smol_tok, PROMPTS, RESPONSES, positions="l1", chat_template=False)
    bad = dict(ds[0], intervention_positions=torch.tensor([[99]]))
    with pytest.raises(PositionOutOfRange, match=r"intervention_positions\[0, 0, 0\] = 99 but example 0 has \d+ real tokens"):
        reft.ReftDataCollator(smol_tok)([bad, ds[1]])
    with pytest.raises(DataError, match="cannot collate an empty batch"):
        reft.ReftDataCollator(smol_tok)([])
