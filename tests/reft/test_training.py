"""Training: the plain loop and the Hugging Face Trainer (checkpoints, resume, accumulation, checkpointing, bf16, decay)."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from steerlab import reft
from steerlab.interventions import fileformat
from steerlab.interventions.errors import ConfigError, DataError
from steerlab.models import embedded_path
from tests.reliability import one_thread_fixture

_one_thread = one_thread_fixture()  # one intra-op thread: much faster on a shared 2-core machine

PROMPTS = [f"Question {i}: what is {i} plus {i + 1}?" for i in range(8)]
RESPONSES = [f"It is {2 * i + 1}." for i in range(8)]
INIT = 0.3  # a random model whose prompt tokens reach the response through attention (0.02 barely does)


@pytest.fixture(scope="module")
def tok():
    return T.AutoTokenizer.from_pretrained(embedded_path("smollm2-135m"))


def _model(tok, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    cfg = T.LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                        num_attention_heads=2, num_key_value_heads=1, pad_token_id=tok.pad_token_id, initializer_range=INIT)
    return T.LlamaForCausalLM(cfg).to(dtype).eval()


def _reft(tok, seed=0, dropout=0.0, dtype=torch.float32, layers=(1, 2)):
    model = _model(tok, seed, dtype)
    torch.manual_seed(seed + 1)
    return reft.get_reft_model(model, reft.ReftConfig(layers=list(layers), rank=2, positions="f1+l1", dropout=dropout), tokenizer=tok)


def _data(tok, rm):
    return reft.InstructionDataset(tok, PROMPTS, RESPONSES, positions=rm.positions, chat_template=False)


def _state(rm):
    return {n: p.detach().clone() for n, p in rm.named_parameters() if p.requires_grad}


def _args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=2, learning_rate=5e-2, max_steps=4, report_to=[], use_cpu=True,
                seed=0, disable_tqdm=True, save_strategy="no", logging_strategy="no", train_sampling_strategy="sequential",
                dataloader_num_workers=0)
    return T.TrainingArguments(**{**base, **kw})


def test_plain_loop_trains_only_the_interventions(tok):
    rm = _reft(tok)
    base = {n: p.detach().clone() for n, p in rm.model.named_parameters()}
    before = _state(rm)
    res = reft.train(rm, _data(tok, rm), epochs=6, lr=5e-2, batch_size=4, weight_decay=0.1)
    assert res.steps == 12 and res.losses[-1] < res.losses[0] - 0.3  # it learns (a random model learns slowly)
    assert all(torch.equal(p, base[n]) for n, p in rm.model.named_parameters())
    assert all(p.grad is None for p in rm.model.parameters())
    assert all(not torch.equal(p, before[n]) for n, p in rm.named_parameters() if p.requires_grad)
    R = rm.interventions[0].R
    torch.testing.assert_close(R @ R.T, torch.eye(2), atol=1e-6, rtol=0)
    assert not rm.training and "TrainResult(steps=12" in repr(res)


def test_cached_prefix_trains_exactly_as_the_full_forward(tok):
    runs = []
    for cache in (False, True):
        rm = _reft(tok)
        res = reft.train(rm, _data(tok, rm), epochs=3, lr=5e-2, batch_size=8, shuffle=False, cache_prefix=cache)
        runs.append((res.losses, _state(rm)))
    torch.testing.assert_close(torch.tensor(runs[0][0]), torch.tensor(runs[1][0]), atol=1e-5, rtol=1e-5)
    for n, p in runs[0][1].items():
        torch.testing.assert_close(p, runs[1][1][n], atol=1e-5, rtol=1e-5)
    rm = _reft(tok)
    with pytest.raises(ConfigError, match="cache_prefix=True needs the whole dataset in one batch; it has 8 examples and batch_size=4"):
        reft.train(rm, _data(tok, rm), batch_size=4, cache_prefix=True)
    with pytest.raises(DataError, match="the training dataset is empty"):
        reft.train(rm, [], batch_size=4)


def test_trainer_checkpoints_reload_and_resume_to_the_same_weights(tok, tmp_path):
    rm = _reft(tok, dropout=0.2)  # dropout: the resumed run must restore the RNG as well
    trainer = reft.ReftTrainerForCausalLM(model=rm, args=_args(tmp_path / "a", max_steps=6, save_strategy="steps", save_steps=3),
                                          train_dataset=_data(tok, rm))
    trainer.train()
    full = _state(rm)
    ckpt = tmp_path / "a" / "checkpoint-3"
    names = {p.name for p in ckpt.iterdir()}
    assert {"steerlab.json", fileformat.weights_path(ckpt).name} <= names and "model.safetensors" not in names
    # the final save into the output folder keeps the checkpoints there (a save owns only its own files)
    before = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file()}
    trainer.save_model()
    after = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file()}
    assert {k: after.get(k) for k in before if "checkpoint-" in str(k)} == {k: v for k, v in before.items() if "checkpoint-" in str(k)}
    assert any("checkpoint-" in str(k) for k in before)
    assert torch.equal(reft.ReftModel.from_pretrained(tmp_path / "a", _model(tok), tok).interventions[0].weight, rm.interventions[0].weight)
    # a checkpoint reloads as a ReFT model on a fresh copy of the base model
    loaded = reft.ReftModel.from_pretrained(tmp_path / "a" / "checkpoint-6", _model(tok), tok)
    for n, p in loaded.named_parameters():
        if n.startswith("interventions."):
            assert torch.equal(p, full[n])
    loaded.unwrap()
    # resume from step 3 in a fresh process-like setting: same weights at step 6
    rm2 = _reft(tok, dropout=0.2)
    t2 = reft.ReftTrainerForCausalLM(model=rm2, args=_args(tmp_path / "b", max_steps=6, save_strategy="steps", save_steps=3),
                                     train_dataset=_data(tok, rm2))
    t2.train(resume_from_checkpoint=str(ckpt))
    resumed = _state(rm2)
    assert any(not torch.equal(full[n], p) for n, p in _state(_reft(tok, dropout=0.2)).items())
    for n, p in full.items():
        torch.testing.assert_close(resumed[n], p, atol=1e-7, rtol=0)


def test_trainer_never_decays_the_orthonormal_maps(tok, tmp_path):
    rm = _reft(tok)
    trainer = reft.ReftTrainerForCausalLM(model=rm, args=_args(tmp_path, weight_decay=0.5), train_dataset=_data(tok, rm))
    opt = trainer.create_optimizer()
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    rotations = [iv.rotation.weight for iv in rm.interventions]
    assert decayed and not any(id(p) in decayed for p in rotations)
    assert all(id(iv.weight) in decayed for iv in rm.interventions)


def test_gradient_accumulation_and_checkpointing_match_the_plain_step(tok, tmp_path):
    results = {}
    for name, kw in {"plain": dict(per_device_train_batch_size=4), "accum": dict(per_device_train_batch_size=2, gradient_accumulation_steps=2),
                     "ckpt": dict(per_device_train_batch_size=4, gradient_checkpointing=True)}.items():
        rm = _reft(tok)
        reft.ReftTrainerForCausalLM(model=rm, args=_args(tmp_path / name, max_steps=2, **kw), train_dataset=_data(tok, rm)).train()
        results[name] = _state(rm)
        rm.unwrap()
    start = _state(_reft(tok))
    assert any(not torch.equal(start[n], p) for n, p in results["plain"].items())
    for other in ("accum", "ckpt"):
        for n, p in results["plain"].items():
            torch.testing.assert_close(results[other][n], p, atol=1e-6, rtol=1e-5)


def test_bf16_training_keeps_R_fp32_and_orthonormal(tok, tmp_path):
    rm = _reft(tok, dtype=torch.bfloat16)
    iv = rm.interventions[0]
    assert iv.weight.dtype == torch.bfloat16 and iv.rotation.weight.dtype == torch.float32
    before = _state(rm)
    reft.ReftTrainerForCausalLM(model=rm, args=_args(tmp_path, bf16=True, max_steps=3), train_dataset=_data(tok, rm)).train()
    after = _state(rm)
    assert all(not torch.equal(before[n], p) for n, p in after.items())
    assert iv.weight.dtype == torch.bfloat16
    R = iv.R
    torch.testing.assert_close(R @ R.T, torch.eye(2), atol=1e-6, rtol=0)


def test_trainer_refuses_a_plain_model(tok, tmp_path):
    with pytest.raises(ConfigError, match="trains a steerlab ReftModel"):
        reft.ReftTrainerForCausalLM(model=_model(tok), args=_args(tmp_path))
