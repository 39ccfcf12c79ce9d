"""RELIABILITY row 19: nesting and unwrapping. One wrapper per model unless stacked on purpose; a
wrapper used after ``unwrap()`` is a named error; unwrapping in any order gives the model back as the
user handed it over (``requires_grad`` flags, train/eval mode, gradient checkpointing, the Trainer's
input-grad hook, ``.grad``), including after the Hugging Face ``Trainer``."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
import transformers as T

import steerlab as sl
from steerlab import reft
from tests.archs import tiny_inputs, tiny_model
from tests.reliability import assert_unchanged, one_thread_fixture, snapshot

_one_thread = one_thread_fixture()
CFG = dict(layers=[0, 2], rank=2, positions="f1+l1")


def _model():
    m = tiny_model("llama")
    m.model.layers[1].mlp.requires_grad_(False)  # the user's own mix of flags, to be restored exactly
    return m


def _flags(m) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in m.named_parameters()}


@pytest.mark.parametrize("order", ["first_wrapped_first", "last_wrapped_first"])
def test_wrap_twice_is_refused_unless_stacked_and_any_unwrap_order_restores_the_flags(order):
    m = _model()
    flags = _flags(m)
    first = sl.wrap(m)
    with pytest.raises(sl.AlreadyWrapped, match="already wrapped by Lab.*unwrap\\(\\) first.*stack=True"):
        sl.wrap(m)
    assert not any(p.requires_grad for p in m.parameters())  # the refused wrap changed nothing
    second = sl.wrap(m, stack=True)
    for lab in ([first, second] if order == "first_wrapped_first" else [second, first]):
        assert not any(p.requires_grad for p in m.parameters())  # still held by the other
        lab.unwrap()
    assert _flags(m) == flags


@pytest.mark.parametrize("order", ["lab_first", "reft_first"])
def test_get_reft_model_on_a_wrapped_model_is_refused_unless_stacked(order):
    m = _model()
    flags = _flags(m)
    lab = sl.wrap(m)
    with pytest.raises(sl.AlreadyWrapped):
        reft.get_reft_model(m, reft.ReftConfig(**CFG))
    rm = reft.get_reft_model(m, reft.ReftConfig(**CFG), stack=True)
    for w in ([lab, rm] if order == "lab_first" else [rm, lab]):
        w.unwrap()
    assert _flags(m) == flags


def test_a_second_reft_model_on_the_same_model_is_refused():
    """Re-running a notebook cell would stack two edits silently (and ``disabled()`` of the second would
    still show the first's): refused, named."""
    m = _model()
    x = tiny_inputs("llama")
    with torch.no_grad():
        base = m(**x).logits
    rm1 = reft.get_reft_model(m, reft.ReftConfig(**CFG))
    with pytest.raises(sl.AlreadyWrapped, match="ReftModel|Lab"):
        reft.get_reft_model(m, reft.ReftConfig(**CFG))
    with rm1.disabled(), torch.no_grad():
        assert torch.equal(m(**x).logits, base)
    rm1.unwrap()


def test_an_unwrapped_reft_model_is_a_named_error():
    m = _model()
    x = tiny_inputs("llama")
    rm = reft.get_reft_model(m, reft.ReftConfig(**CFG))
    rm.lab.unwrap()  # the lab under it, directly
    with pytest.raises(sl.NotWrapped, match="unwrapped"):
        rm(**x)
    rm2 = reft.get_reft_model(m, reft.ReftConfig(**CFG))
    rm2.unwrap()
    with pytest.raises(sl.NotWrapped):
        rm2.generate(x, max_new_tokens=2, pad_token_id=0)
    with pytest.raises(sl.NotWrapped):
        rm2(**x)
    with pytest.raises(sl.NotWrapped):
        rm2.enable()
    lab = sl.wrap(m)
    lab.unwrap()
    with pytest.raises(sl.NotWrapped, match="this Lab was unwrapped"):
        lab.run(x)


def test_a_lab_dropped_without_unwrap_lets_go_of_the_model():
    m = _model()
    flags = _flags(m)
    sl.wrap(m).run(tiny_inputs("llama"))  # the lab is dropped at once
    gc.collect()
    assert _flags(m) == flags
    sl.wrap(m).unwrap()  # and the model can be wrapped again without stack=True


def test_unknown_keywords_and_push_to_hub_are_errors():
    m = _model()
    with pytest.raises(TypeError, match="tokenzier"):
        reft.get_reft_model(m, reft.ReftConfig(**CFG), tokenzier=None)
    with pytest.raises(TypeError, match="tokenzier"):
        sl.wrap(m, tokenzier=None)
    sl.wrap(m).unwrap()  # the refused calls wrapped nothing
    rm = reft.get_reft_model(m, reft.ReftConfig(**CFG), set_device=True, disable_model_grads=True)  # pyreft's keywords
    with pytest.raises(sl.Unsupported, match="save_pretrained"):
        rm.push_to_hub("someone/model")
    rm.unwrap()


def test_interventions_deep_copy_after_a_training_step():
    m = _model()
    rm = reft.get_reft_model(m, reft.ReftConfig(**CFG))
    x = tiny_inputs("llama", pad=1, side="left")
    opt = torch.optim.SGD([p for p in rm.parameters() if p.requires_grad], lr=0.1)
    rm(**x).logits.sum().backward()
    opt.step()
    clone = copy.deepcopy(rm.interventions)
    for a, b in zip(clone.parameters(), rm.interventions.parameters()):
        assert torch.equal(a, b) and a is not b
    rm.unwrap()


def test_unwrap_after_the_trainer_gives_the_model_back_as_handed_over(tmp_path):
    """The Hugging Face Trainer switches the model to train mode, turns on gradient checkpointing,
    hooks the input embeddings (``enable_input_require_grads``) and leaves gradients; ``unwrap()``
    undoes all of it: two forwards agree again, and every hook, flag and tensor is as before."""
    from steerlab.models import embedded_path
    from tests.reft.test_training import _args, _data  # the training tests' recipe

    tok = T.AutoTokenizer.from_pretrained(embedded_path("smollm2-135m"))
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                        num_key_value_heads=1, pad_token_id=tok.pad_token_id, attention_dropout=0.3)
    m = T.LlamaForCausalLM(cfg).eval()
    before = snapshot(m)
    x = tok(["a b c", "d e"], return_tensors="pt", padding=True)
    rm = reft.get_reft_model(m, reft.ReftConfig(layers=[1, 2], rank=2, positions="f1+l1"), tokenizer=tok)
    trainer = reft.ReftTrainerForCausalLM(model=rm, args=_args(tmp_path, max_steps=2, gradient_checkpointing=True,
                                                                 gradient_checkpointing_kwargs={"use_reentrant": True}),
                                          train_dataset=_data(tok, rm))
    trainer.train()
    rm.model.enable_input_require_grads()  # what the Trainer does for reentrant checkpointing (and PEFT users call)
    assert m.training and m.is_gradient_checkpointing
    assert rm.unwrap() is m
    assert not m.training and not m.is_gradient_checkpointing
    assert all(p.grad is None for p in m.parameters())
    with torch.no_grad():
        assert torch.equal(m(**x).logits, m(**x).logits)  # no dropout left on
    assert_unchanged(m, before, what="train then unwrap")
