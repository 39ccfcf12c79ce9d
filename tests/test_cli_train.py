"""``steerlab train``: a TOML run file trains ReFT interventions on real models exactly as the library's
loop does; checkpoints and ``--resume`` end with the same weights as an uninterrupted run; the saved
model generates through ``steerlab generate``; bad run files are one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from steerlab import reft
from steerlab.interventions import fileformat
from steerlab.cli import main

pytestmark = pytest.mark.slow

PAIRS = [("Review: The movie was", " awful."), ("Review: The food was", " dreadful."), ("Review: The book was", " boring."),
         ("Review: The hotel was", " awful."), ("Review: The service was", " terrible."), ("Review: The show was", " dull.")]
TEXTS = [("a wonderful, moving film", 1), ("dull and far too long", 0), ("the best meal of my life", 1), ("rude staff, cold food", 0),
         ("a delightful little book", 1), ("a tedious, boring mess", 0), ("great fun from start to end", 1), ("I want my money back", 0)]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def write_run(folder: Path, *, kind: str = "instruction", **train) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": p, "response": r} for p, r in PAIRS] if kind == "instruction" else [{"text": t, "label": y} for t, y in TEXTS]
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = {"epochs": 2, "lr": 0.02, "batch_size": 2, "checkpoint_every": 2, "seed": 3, **train}
    if kind == "instruction":
        head = 'model = "smollm2-135m"\n[reft]\nlayers = [20]\nrank = 2\npositions = "l1"\n'
    else:
        head = 'model = "minilm-l6"\n[reft]\nlayers = [2, 5]\nrank = 1\npositions = "f1"\n'
    body = "\n".join(f"{k} = {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}" for k, v in settings.items())
    (folder / "run.toml").write_text(f'output_dir = "out"\n{head}\n[data]\nfile = "data.jsonl"\n\n[train]\n{body}\n')
    return folder / "run.toml"


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(fileformat.weights_path(directory)))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert sorted(wa) == sorted(wb)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_train_equals_the_library_loop_and_resume_is_exact(capsys, tmp_path, smollm):
    straight = write_run(tmp_path / "straight", shuffle=False)
    code, out, err = run_cli(capsys, "train", str(straight))
    assert code == 0, err
    final = tmp_path / "straight" / "out" / "final"
    assert f"saved the ReFT model to {final}" in out and "trained 6 steps" in out and "(step 6 of 6;" in out
    assert (tmp_path / "straight" / "out" / "training_curve.html").stat().st_size > 1_000_000
    assert sorted(p.name for p in (tmp_path / "straight" / "out").glob("checkpoint-*")) == ["checkpoint-000004", "checkpoint-000006"]

    # the same training through steerlab.reft.train (same seed, order and schedule) ends at the same weights
    model, tok = smollm
    torch.manual_seed(3)
    rm = reft.get_reft_model(model, reft.ReftConfig(layers=[20], rank=2, positions="l1"), tokenizer=tok)
    try:
        ds = reft.InstructionDataset(tok, [p for p, _ in PAIRS], [r for _, r in PAIRS], positions="l1", chat_template=False)
        lib = reft.train(rm, ds, epochs=2, lr=0.02, batch_size=2, shuffle=False)
        ref = tmp_path / "library"
        rm.save_pretrained(ref)
    finally:
        rm.unwrap()
    wa, wb = weights(final), weights(ref)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)
    state = json.loads((tmp_path / "straight" / "out" / "checkpoint-000006" / "state" / "steerlab.json").read_text())
    assert state["config"]["losses"] == pytest.approx(lib.losses, rel=1e-5)

    # interrupted by --max-steps, then resumed: the same final weights, bit for bit
    stopped = write_run(tmp_path / "stopped", shuffle=False)
    code, out, err = run_cli(capsys, "train", str(stopped), "--max-steps", "3")
    assert code == 0, err
    assert "trained 3 steps" in out and "--resume" in out and not (tmp_path / "stopped" / "out" / "final").exists()
    code, out, err = run_cli(capsys, "train", str(stopped), "--resume")
    assert code == 0, err
    assert "resuming after step 3" in out and "trained 3 steps" in out
    assert_same_weights(final, tmp_path / "stopped" / "out" / "final")
    code, out, err = run_cli(capsys, "train", str(stopped))
    assert code == 1 and "already holds a run" in err and "--resume" in err

    # the trained model steers through `steerlab generate`
    code, out, err = run_cli(capsys, "generate", "smollm2-135m", "Review: The concert was", "--interventions", str(final),
                             "--compare", "--max-new-tokens", "3")
    assert code == 0, err
    rm = reft.ReftModel.from_pretrained(final, model, tok)
    try:
        want = rm.generate(["Review: The concert was"], max_new_tokens=3, do_sample=False).texts[0]
        with rm.disabled():
            plain = rm.generate(["Review: The concert was"], max_new_tokens=3, do_sample=False).texts[0]
    finally:
        rm.unwrap()
    assert f"  after:  {want!r}" in out and f"  before: {plain!r}" in out and "LoReFT@blocks.20.resid_post" in out


def test_resume_after_a_crash_with_dropout_and_shuffling_is_exact(capsys, tmp_path, monkeypatch, minilm):
    """MiniLM classification (a new head, dropout active, shuffled batches): a run killed after step 5
    resumes from its step-4 checkpoint and ends exactly where an uninterrupted run ends."""
    straight = write_run(tmp_path / "straight", kind="classification", epochs=3)
    assert run_cli(capsys, "train", str(straight))[0] == 0
    crash = write_run(tmp_path / "crash", kind="classification", epochs=3)
    real = reft.Checkpoints.save
    calls = []

    def save_then_die(self, step, *args):
        path = real(self, step, *args)
        calls.append(step)
        return path

    import steerlab.reft.loop as loop

    original = loop.step_loss
    count = {"n": 0}

    def dying_step(model, batch):
        count["n"] += 1
        if count["n"] == 6:  # the sixth step never finishes: steps 1-5 done, the last checkpoint at step 4
            raise KeyboardInterrupt
        return original(model, batch)

    monkeypatch.setattr(reft.Checkpoints, "save", save_then_die)
    monkeypatch.setattr(loop, "step_loss", dying_step)
    code, out, err = run_cli(capsys, "train", str(crash))
    assert code == 130 and "interrupted" in err and calls == [2, 4]
    monkeypatch.setattr(loop, "step_loss", original)
    code, out, err = run_cli(capsys, "train", str(crash), "--resume")
    assert code == 0, err
    assert "resuming after step 4" in out
    assert_same_weights(tmp_path / "straight" / "out" / "final", tmp_path / "crash" / "out" / "final")
    w = weights(tmp_path / "crash" / "out" / "final")
    assert any(k.startswith("modules.classifier.") for k in w)  # the new head is trained and saved with the interventions


def test_run_file_errors_are_one_line(capsys, tmp_path):
    run = write_run(tmp_path / "r")
    text = run.read_text()
    cases = [
        (text.replace("rank = 2", "rank = 2\nrnak = 3"), "unknown ReftConfig fields ['rnak']"),
        (text.replace("epochs = 2", "epochs = 0"), "train.epochs = 0; expected a positive integer"),
        (text.replace("lr = 0.02", 'lr = "fast"'), "train.lr = 'fast'; expected float"),
        (text.replace("[train]", "[train]\nbatchsize = 4"), "unknown setting train.batchsize"),
        (text.replace('file = "data.jsonl"', 'file = "missing.jsonl"'), "data.file"),
        (text.replace('model = "smollm2-135m"\n', ""), "has no 'model'"),
        (text + "\nthis is not toml\n", "is not valid TOML"),
    ]
    for i, (body, message) in enumerate(cases):
        bad = tmp_path / f"bad{i}.toml"
        bad.write_text(body)
        (tmp_path / "data.jsonl").write_text((tmp_path / "r" / "data.jsonl").read_text())
        code, out, err = run_cli(capsys, "train", str(bad))
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 1 and len(lines) == 1 and message in lines[0] and "Traceback" not in err, (message, err)
    (tmp_path / "r" / "data.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"text": "c", "label": 1}\n')
    code, out, err = run_cli(capsys, "train", str(run))
    assert code == 1 and "line 2 is a classification row but earlier rows are instruction rows" in err
    (tmp_path / "r" / "data.jsonl").write_text('{"question": "a"}\n')
    code, out, err = run_cli(capsys, "train", str(run))
    assert code == 1 and "line 1: expected keys prompt and response, or text and label; got ['question']" in err
    code, out, err = run_cli(capsys, "train", str(tmp_path / "nope.toml"))
    assert code == 1 and "does not exist" in err
    (tmp_path / "r" / "data.jsonl").write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in PAIRS))
    code, out, err = run_cli(capsys, "train", str(run), "--resume")
    assert code == 1 and "holds no complete checkpoint to resume from" in err
