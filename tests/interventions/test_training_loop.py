"""The one training loop (steerlab.interventions.training): its order, schedule and accumulation against a
hand-written loop, exact resume from checkpoints (dropout included), refusals, and no host sync in a step."""

from __future__ import annotations

import math
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from steerlab.interventions.errors import ConfigError, DataError
from steerlab.interventions.training import Checkpoints, LoopSettings, batch_order, lr_factor, run_loop

N, D = 11, 5


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, D, generator=g), torch.randn(N, generator=g)


def _model(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(D, 8), nn.Dropout(dropout), nn.Tanh(), nn.Linear(8, 1))


def _run(model, settings, *, checkpoints=None, progress=False, x=None, y=None):
    x, y = _data() if x is None else (x, y)
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr)
    res = run_loop(N, lambda rows: rows, lambda rows: ((model(x[rows]).squeeze(-1) - y[rows]) ** 2).mean(), opt, settings,
                   checkpoints=checkpoints, progress=progress)
    return res, opt


def _reference(model, settings):
    """The documented loop written out by hand: one generator, one permutation per epoch, slices,
    groups of `a` micro-batches (a short last group averaged over its own count), warm-up then linear decay."""
    x, y = _data()
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr)
    g = torch.Generator().manual_seed(settings.seed)
    micro = math.ceil(N / settings.batch_size)
    spe = math.ceil(micro / settings.gradient_accumulation_steps)
    total = min(spe * settings.epochs, settings.max_steps or 10**9)
    warm = int(settings.warmup_ratio * total)
    losses, step = [], 0
    for _ in range(settings.epochs):
        perm = torch.randperm(N, generator=g) if settings.shuffle else torch.arange(N)
        batches = [perm[i : i + settings.batch_size] for i in range(0, N, settings.batch_size)]
        for k in range(0, len(batches), settings.gradient_accumulation_steps):
            if step == total:
                return losses
            group = batches[k : k + settings.gradient_accumulation_steps]
            lr = settings.lr * ((step + 1) / warm if step < warm else (total - step) / (total - warm))
            for pg in opt.param_groups:
                pg["lr"] = lr
            value = 0.0
            for rows in group:
                loss = ((model(x[rows]).squeeze(-1) - y[rows]) ** 2).mean() / len(group)
                loss.backward()
                value += loss.item()
            opt.step()
            opt.zero_grad()
            losses.append(value)
            step += 1
    return losses


@pytest.mark.parametrize("kw", [
    dict(epochs=3, batch_size=4),
    dict(epochs=2, batch_size=2, gradient_accumulation_steps=2, warmup_ratio=0.3, seed=7),
    dict(epochs=4, batch_size=3, shuffle=False, max_steps=7, log_every=3),
], ids=["plain", "accumulation+warmup", "sequential+max_steps"])
def test_the_loop_equals_a_hand_written_loop(kw):
    settings = LoopSettings(lr=0.05, **kw)
    ours, theirs = _model(), _model()
    res, _ = _run(ours, settings)
    want = _reference(theirs, settings)
    assert res.steps == len(want) == settings.total_steps(N)
    torch.testing.assert_close(torch.tensor(res.losses), torch.tensor(want), rtol=1e-6, atol=1e-7)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    start = _model()
    assert any(not torch.equal(a, b) for a, b in zip(ours.parameters(), start.parameters()))


def test_batch_order_is_one_seeded_shuffle():
    s = LoopSettings(epochs=3, batch_size=4, seed=3)
    order = list(batch_order(N, s))
    assert [step for _, step, _ in order] == list(range(9)) and [e for e, _, _ in order] == [0] * 3 + [1] * 3 + [2] * 3
    g = torch.Generator().manual_seed(3)
    for epoch in range(3):
        rows = torch.cat([m for e, _, group in order if e == epoch for m in group])
        assert torch.equal(rows, torch.randperm(N, generator=g))  # one stream, one draw per epoch
    assert [len(m) for _, _, (m,) in order[:3]] == [4, 4, 3]
    other = list(batch_order(N, LoopSettings(epochs=3, batch_size=4, seed=4)))
    assert any(not torch.equal(a[2][0], b[2][0]) for a, b in zip(order, other))
    grouped = list(batch_order(N, LoopSettings(epochs=1, batch_size=2, gradient_accumulation_steps=4)))
    assert [len(group) for _, _, group in grouped] == [4, 2]  # six micro-batches: a group of 4, then the rest
    assert [lr_factor(s, 10, 2) for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 0.125]


def test_resume_from_a_checkpoint_is_exact_with_dropout(tmp_path):
    """Interrupted after 4 of 9 steps (checkpoints at 3 and 4), then resumed: the same losses and the same
    weights, bit for bit, as an uninterrupted run; dropout makes the RNG part of the state."""
    settings = LoopSettings(epochs=3, batch_size=4, lr=0.05, seed=2, warmup_ratio=0.2)
    straight = _model(dropout=0.3)
    torch.manual_seed(10)
    full, _ = _run(straight, settings, checkpoints=Checkpoints(tmp_path / "a", every=3))
    assert [p.name for p in full.checkpoints] == ["checkpoint-000003", "checkpoint-000006", "checkpoint-000009"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["checkpoint-000006", "checkpoint-000009"]  # keep=2

    model = _model(dropout=0.3)
    saved = {}
    ck = Checkpoints(tmp_path / "b", every=3, stop_after=4,
                     save_model=lambda d: torch.save(model.state_dict(), d / "model.pt"),
                     load_model=lambda d: model.load_state_dict(torch.load(d / "model.pt", weights_only=True)))
    torch.manual_seed(10)
    first, _ = _run(model, settings, checkpoints=ck)
    assert first.steps == 4 and not first.finished and [p.name for p in first.checkpoints] == ["checkpoint-000003", "checkpoint-000004"]
    saved["step4"] = [p.detach().clone() for p in model.parameters()]
    model = _model(dropout=0.3)  # a fresh process: fresh weights, another RNG state
    torch.manual_seed(999)
    ck.load_model = lambda d: model.load_state_dict(torch.load(d / "model.pt", weights_only=True))
    ck.save_model = lambda d: torch.save(model.state_dict(), d / "model.pt")
    ck.resume, ck.stop_after = True, None
    rest, _ = _run(model, settings, checkpoints=ck)
    assert rest.resumed_from == 4 and rest.finished and rest.losses[:4] == first.losses
    assert rest.losses == full.losses
    for a, b in zip(model.parameters(), straight.parameters()):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(saved["step4"], straight.parameters()))


def test_checkpoints_refuse_what_they_cannot_resume(tmp_path):
    settings = LoopSettings(epochs=2, batch_size=4, lr=0.05)
    _run(_model(), settings, checkpoints=Checkpoints(tmp_path, every=2, stop_after=2))
    with pytest.raises(ConfigError, match="already holds checkpoints of a run; resume it"):
        _run(_model(), settings, checkpoints=Checkpoints(tmp_path, every=2))
    with pytest.raises(ConfigError, match=r"other settings \(loop: checkpoint .*'lr': 0.05.*this run .*'lr': 0.1"):
        _run(_model(), LoopSettings(epochs=2, batch_size=4, lr=0.1), checkpoints=Checkpoints(tmp_path, every=2, resume=True))
    with pytest.raises(ConfigError, match="holds no complete checkpoint to resume from"):
        _run(_model(), settings, checkpoints=Checkpoints(tmp_path / "empty", every=2, resume=True))
    (tmp_path / "checkpoint-000002" / "state" / "steerlab.json").unlink()  # an incomplete checkpoint is ignored
    assert Checkpoints(tmp_path).found() == []


@pytest.mark.parametrize("bad, message", [
    (dict(epochs=0), "epochs=0: expected a positive int"),
    (dict(batch_size=2.5), "batch_size=2.5: expected a positive int"),
    (dict(lr=-1.0), "lr=-1.0: expected a positive learning rate"),
    (dict(warmup_ratio=1.0), r"warmup_ratio=1.0: expected a fraction in \[0, 1\)"),
    (dict(gradient_accumulation_steps=0), "gradient_accumulation_steps=0"),
    (dict(max_steps=0), "max_steps=0: expected a positive int or None"),
])
def test_settings_are_checked_before_any_step(bad, message):
    with pytest.raises(ConfigError, match=message):
        LoopSettings(**bad)


def test_empty_data_is_refused():
    with pytest.raises(DataError, match="the training dataset is empty"):
        run_loop(0, lambda r: r, lambda r: torch.zeros(()), torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), LoopSettings())


#: calls that make the host wait for a device (on a GPU): reading values, or shapes that depend on values
SYNCS = {"item", "tolist", "__float__", "__int__", "__bool__", "__index__", "nonzero", "numpy", "cpu", "masked_select", "unique",
         "argwhere", "bincount"}


class SyncLog(TorchFunctionMode):
    """Every value-reading torch call, with the function that made it: the first frame outside torch, or
    ``torch.optim`` for the optimiser's own (Adam reads its step counters, which live on the host even when
    the parameters are on a GPU)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNCS:
            f = sys._getframe(1)
            while f is not None and "/torch/" in f.f_code.co_filename and "/torch/optim/" not in f.f_code.co_filename:
                f = f.f_back
            code = f.f_code if f is not None else None
            where = "torch.optim" if code is not None and "/torch/optim/" in code.co_filename else Path(code.co_filename).as_posix() if code else "?"
            self.calls.append((name, where, code.co_name if code else "?"))
        return func(*args, **(kwargs or {}))

    def made_in(self, suffix: str) -> Counter:
        return Counter(fn for _, file, fn in self.calls if file.endswith(suffix))


def test_a_step_reads_no_value_the_loss_is_read_per_logging_interval():
    settings = LoopSettings(epochs=4, batch_size=3, lr=0.05, log_every=5)  # 16 steps: reads at 5, 10, 15 and 16
    x, y = _data()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with SyncLog() as log:
        res = run_loop(N, lambda rows: rows, lambda rows: ((model(x[rows]).squeeze(-1) - y[rows]) ** 2).mean(), opt, settings,
                       progress=True)
    assert res.steps == 16
    assert log.made_in("interventions/training.py") == Counter({"flush": 2 * 4})  # stack -> cpu, tolist: once per interval
    assert [c for c in log.calls if "test_training_loop" in c[1]] == []


def test_progress_shows_a_bar_only_when_asked_or_on_a_terminal(capsys, monkeypatch):
    settings = LoopSettings(epochs=1, batch_size=4, lr=0.05, log_every=1)
    _run(_model(), settings, progress=None)  # pytest's captured stderr is no terminal
    assert capsys.readouterr().err == ""
    _run(_model(), settings, progress=True)
    err = capsys.readouterr().err
    assert "train: 100%" in err and "3/3" in err and "loss=" in err
    _run(_model(), settings, progress=False)
    assert capsys.readouterr().err == ""
