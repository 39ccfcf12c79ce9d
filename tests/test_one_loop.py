"""One training loop under every entry point: DAS, ``reft.train`` and ``steerlab train`` draw the same batches
for the same seed (the loop's ``batch_order``), ``steerlab train`` and ``reft.train`` give the same losses and
weights bit for bit with shuffling, accumulation and warm-up, and neither reads a device value inside a step."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T
from safetensors.torch import load_file

import steerlab as sl
import steerlab.alignment.das as das_module
import steerlab.reft.loop as loop
from steerlab import reft
from steerlab.alignment import DAS, tasks
from steerlab.interventions import fileformat
from steerlab.interventions.training import LoopSettings, batch_order
from steerlab.models import embedded_path
from steerlab.training import RunConfig, train_from_config
from tests.interventions.test_training_loop import SyncLog
from tests.reliability import one_thread_fixture

_one_thread = one_thread_fixture()

N, BATCH, EPOCHS, SEED = 8, 3, 2, 5
PROMPTS = [f"Question {i}: what is {i} plus {i + 1}?" for i in range(N)]
RESPONSES = [f"It is {2 * i + 1}." for i in range(N)]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny random LLaMA saved as a model folder, with SmolLM2's tokenizer: a MODEL for ``steerlab train``."""
    tok = T.AutoTokenizer.from_pretrained(embedded_path("smollm2-135m"))
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                        num_key_value_heads=1, pad_token_id=tok.pad_token_id, initializer_range=0.3)
    folder = tmp_path_factory.mktemp("tiny-llama")
    T.LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


class _Indexed(torch.utils.data.Dataset):
    """A dataset whose examples carry their index, and a collator that records the indices of each batch."""

    def __init__(self, ds):
        self.ds, self.seen = ds, []

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return {**self.ds[i], "_index": i}

    def collator(self, tok):
        inner = reft.ReftDataCollator(tok)

        def collate(items):
            self.seen.append([it.pop("_index") for it in items])
            return inner(items)

        return collate


def _expected(n: int, **kw) -> list[list[int]]:
    return [m.tolist() for _, _, group in batch_order(n, LoopSettings(**kw)) for m in group]


def test_the_same_seed_gives_the_same_batches_through_every_entry_point(tiny_folder, tmp_path, monkeypatch):
    want = _expected(N, epochs=EPOCHS, batch_size=BATCH, seed=SEED)
    assert len(want) == EPOCHS * 3 and sorted(sum(want[:3], [])) == list(range(N))

    # reft.train
    model, tok = sl.load(str(tiny_folder))
    torch.manual_seed(SEED)
    rm = reft.get_reft_model(model, reft.ReftConfig(layers=[1], rank=2, positions="l1"), tokenizer=tok)
    try:
        data = _Indexed(reft.InstructionDataset(tok, PROMPTS, RESPONSES, positions="l1", chat_template=False))
        reft.train(rm, data, epochs=EPOCHS, batch_size=BATCH, seed=SEED, lr=0.02, collator=data.collator(tok), progress=False)
    finally:
        rm.unwrap()
    assert data.seen == want

    # DAS: the rows each step trains on
    task = tasks.hierarchical_equality(seed=0)
    lab = sl.wrap(task.model(seed=0), example_input=task.example_input())
    train, _ = task.datasets(n_train=N, n_test=4, seed=0)
    assert len(train) == N
    rows_seen = []
    objective = das_module.objective

    def recording(runner, rows, ivs):
        rows_seen.append(rows.tolist())
        return objective(runner, rows, ivs)

    monkeypatch.setattr(das_module, "objective", recording)
    try:
        with SyncLog() as log:
            DAS(lab, site=task.site(1), size=2, epochs=EPOCHS, batch_size=BATCH, seed=SEED, controls=False).fit(train, progress=False)
    finally:
        lab.unwrap()
    assert rows_seen == want
    # DAS's own step code reads nothing; the loop reads the loss once per interval (10 steps: at the end of the 6)
    assert not {"objective", "loss_of", "train"} & set(log.made_in("alignment/das.py"))
    assert log.made_in("interventions/training.py") == {"flush": 2}


def _run_file(folder, tiny_folder, **train) -> RunConfig:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data.jsonl").write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in zip(PROMPTS, RESPONSES)))
    body = "\n".join(f"{k} = {json.dumps(v)}" for k, v in train.items())
    (folder / "run.toml").write_text(f'model = "{tiny_folder}"\noutput_dir = "out"\n[reft]\nlayers = [1, 2]\nrank = 2\n'
                                     f'positions = "f1+l1"\n[data]\nfile = "data.jsonl"\n[train]\n{body}\n')
    return RunConfig.from_toml(folder / "run.toml")


def test_steerlab_train_is_reft_train_bit_for_bit(tiny_folder, tmp_path, monkeypatch):
    """Shuffled, accumulated, warmed up: the run file and the Python call see the same batches (token for token)
    and end with the same losses and weights, exactly; a run stopped and resumed ends there too."""
    settings = dict(epochs=3, lr=0.05, batch_size=2, gradient_accumulation_steps=2, warmup_ratio=0.25, seed=SEED, checkpoint_every=3)
    batches: dict[str, list[torch.Tensor]] = {}
    original = loop.step_loss

    def recording(name):
        def step(model, batch):
            batches.setdefault(name, []).append(batch["input_ids"].clone())
            return original(model, batch)
        return step

    monkeypatch.setattr(loop, "step_loss", recording("cli"))
    run = train_from_config(_run_file(tmp_path / "cli", tiny_folder, **settings), log=lambda line: None)
    assert run.finished and run.steps == 6  # 8 examples: 4 micro-batches of 2, 2 per step, 3 epochs

    monkeypatch.setattr(loop, "step_loss", recording("python"))
    model, tok = sl.load(str(tiny_folder))
    torch.manual_seed(SEED)  # what steerlab train does before building the interventions
    rm = reft.get_reft_model(model, reft.ReftConfig(layers=[1, 2], rank=2, positions="f1+l1"), tokenizer=tok)
    try:
        ds = reft.InstructionDataset(tok, PROMPTS, RESPONSES, positions=rm.positions, chat_template=False)
        res = reft.train(rm, ds, epochs=3, lr=0.05, batch_size=2, gradient_accumulation_steps=2, warmup_ratio=0.25, seed=SEED,
                         progress=False)
        rm.save_pretrained(tmp_path / "python")
    finally:
        rm.unwrap()
    assert len(batches["cli"]) == len(batches["python"]) == 12
    assert all(torch.equal(a, b) for a, b in zip(batches["cli"], batches["python"]))
    assert run.losses == res.losses and res.losses[-1] < res.losses[0]
    mine, theirs = load_file(str(fileformat.weights_path(run.final))), load_file(str(fileformat.weights_path(tmp_path / "python")))
    assert sorted(mine) == sorted(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)

    monkeypatch.setattr(loop, "step_loss", original)
    cfg = _run_file(tmp_path / "stopped", tiny_folder, **settings)
    first = train_from_config(cfg, max_steps=4, log=lambda line: None)
    assert first.steps == 4 and first.final is None
    rest = train_from_config(cfg, resume=True, log=lambda line: None)
    assert rest.resumed_from == 4 and rest.losses == run.losses  # the checkpoint written where it stopped
    resumed = load_file(str(fileformat.weights_path(rest.final)))
    assert all(torch.equal(mine[k], resumed[k]) for k in mine)


def test_first_and_last_checkpoint_of_a_stopped_run(tiny_folder, tmp_path):
    cfg = _run_file(tmp_path / "r", tiny_folder, epochs=1, batch_size=2, checkpoint_every=3, keep_checkpoints=5)
    run = train_from_config(cfg, max_steps=2, log=lambda line: None)
    assert [p.name for p in run.checkpoints] == ["checkpoint-000002"]  # stopped early: a checkpoint where it stopped
    more = train_from_config(cfg, resume=True, log=lambda line: None)
    assert more.resumed_from == 2 and [p.name for p in more.checkpoints] == ["checkpoint-000003", "checkpoint-000004"]


def test_a_reft_step_reads_no_device_value_outside_the_model(tiny_folder):
    """The loop's own code (the loss positions found on the host copy of the labels, the loss read once per
    logging interval) adds no value read to a ReFT step; what the base model's forward reads is the engine's."""
    model, tok = sl.load(str(tiny_folder))
    torch.manual_seed(0)
    rm = reft.get_reft_model(model, reft.ReftConfig(layers=[1], rank=2, positions="f1+l1"), tokenizer=tok)
    try:
        ds = reft.InstructionDataset(tok, PROMPTS, RESPONSES, positions=rm.positions, chat_template=False)
        with SyncLog() as log:
            res = reft.train(rm, ds, epochs=3, batch_size=2, log_every=4, progress=False)
    finally:
        rm.unwrap()
    assert res.steps == 12
    assert log.made_in("interventions/training.py") == {"flush": 2 * 3}  # steps 4, 8, 12
    assert set(log.made_in("reft/loop.py")) <= {"collate", "loss_positions", "<lambda>"}  # host side, before the batch moves
    assert log.made_in("reft/loop.py")["step_loss"] == 0


def test_the_reft_config_train_table_is_one_function():
    from steerlab.interventions.errors import ConfigError
    from steerlab.training import TRAIN_KEYS, parse_train_table

    assert parse_train_table({"epochs": 2, "lr": 1, "gradient_accumulation_steps": 4}) == {"epochs": 2, "lr": 1.0,
                                                                                            "gradient_accumulation_steps": 4}
    assert {"log_every", "gradient_accumulation_steps", "warmup_ratio", "seed", "shuffle"} <= set(TRAIN_KEYS)
    for table, message in [({"log_every": 0}, "train.log_every = 0; expected a positive integer"),
                           ({"gradient_accumulation_steps": "2"}, "train.gradient_accumulation_steps = '2'; expected int"),
                           ({"weight_decay": -0.1}, "train.weight_decay = -0.1; expected a number >= 0"),
                           ({"epoch": 3}, "unknown setting train.epoch"),
                           ([1, 2], "train must be a table")]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            parse_train_table(table, "exp.toml")
