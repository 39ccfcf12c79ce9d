"""Progress bars (steerlab.interventions.progress): shown on a terminal or in a notebook, never on a pipe or a file
unless asked, forced by ``progress=True``, silenced by ``progress=False``, the environment or ``default(False)``;
a bar inside another is transient; and each long call of the library draws one (captured output)."""

from __future__ import annotations

import io
import sys
import types

import pytest
import torch

import steerlab as sl
from steerlab.interventions import progress
from steerlab.interventions.errors import ConfigError
from steerlab.models import embedded_path
from tests.reliability import one_thread_fixture

_one_thread = one_thread_fixture()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def terminal(monkeypatch):
    """A function that replaces stderr by a terminal whose text the test can read (called in the test body:
    pytest's capture sets sys.stderr anew when the test's call starts)."""
    monkeypatch.delenv(progress.ENV, raising=False)

    def swap() -> _Terminal:
        err = _Terminal()
        monkeypatch.setattr(sys, "stderr", err)
        return err

    return swap


def _count(n: int, **kw) -> None:
    with progress.bar(total=n, desc="counting", unit="thing", **kw) as b:
        for _ in range(n):
            b.update(1)


def test_a_terminal_gets_a_bar_a_pipe_does_not(terminal, monkeypatch):
    terminal = terminal()
    _count(3)
    assert "counting: 100%" in terminal.getvalue() and "3/3" in terminal.getvalue()
    pipe = io.StringIO()  # no isatty: a file or a pipe
    monkeypatch.setattr(sys, "stderr", pipe)
    _count(3)
    assert pipe.getvalue() == ""
    _count(3, progress=True)
    assert "counting: 100%" in pipe.getvalue()


def test_false_the_environment_and_default_silence_a_terminal(terminal, monkeypatch):
    terminal = terminal()
    _count(2, progress=False)
    with progress.default(False):
        _count(2)
        _count(2, progress=True)  # an explicit argument wins over the default
    assert terminal.getvalue().count("counting: 100%") == 1
    monkeypatch.setenv(progress.ENV, "0")
    _count(2)
    assert terminal.getvalue().count("counting: 100%") == 1
    monkeypatch.setenv(progress.ENV, "1")
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert progress.enabled(None) is True
    with pytest.raises(ConfigError, match="progress='yes': expected True, False or None"):
        progress.enabled("yes")


def test_a_jupyter_kernel_gets_a_bar_without_a_terminal(monkeypatch):
    """IPython inside an IPKernelApp (what tqdm.autonotebook checks): a bar although stderr is no terminal;
    without ipywidgets it is a text bar, and no warning is raised."""
    monkeypatch.delenv(progress.ENV, raising=False)
    shell = types.SimpleNamespace(config={"IPKernelApp": {}})
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: shell))
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    assert progress.enabled(None)
    _count(2)
    assert "counting: 100%" in out.getvalue()
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: None))  # a plain IPython shell
    assert not progress.enabled(None)


def test_a_bar_inside_a_bar_is_transient_and_bars_close_on_errors(terminal):
    terminal()
    with progress.bar(total=2, desc="outer") as outer:
        with progress.bar(total=1, desc="inner") as inner:
            assert inner.leave is False
        assert outer.leave is True
    with pytest.raises(KeyboardInterrupt), progress.bar(total=5, desc="interrupted") as b:
        b.update(1)
        raise KeyboardInterrupt
    with progress.bar(total=1, desc="after") as b:
        assert b.leave is True  # the interrupted bar left no depth behind
    assert list(progress.track([1, 2, 3], desc="items", progress=False)) == [1, 2, 3]


def _tiny_lm():
    import transformers as T

    tok = T.AutoTokenizer.from_pretrained(embedded_path("smollm2-135m"))
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                        num_key_value_heads=1, pad_token_id=tok.pad_token_id)
    return T.LlamaForCausalLM(cfg).eval(), tok


def test_each_long_call_draws_its_bar(capsys):
    """sweep, DAS.fit, search and reft.train with progress=True write their bar to stderr (and results only
    to stdout); with the default, on captured (non-terminal) output, none."""
    from steerlab import reft
    from steerlab.alignment import DAS, search, tasks

    model, tok = _tiny_lm()
    lab = sl.wrap(model, tok)
    try:
        kw = dict(metric=lambda out, inputs: out.logits[:, -1, 0], sites="blocks.*.resid_post", positions=[-1])
        sl.sweep(lab, "a b c", "d e f", **kw)
        assert capsys.readouterr().err == ""
        sl.sweep(lab, "a b c", "d e f", progress=True, **kw)
        captured = capsys.readouterr()
        assert "patching sweep: 100%" in captured.err and captured.out == ""
    finally:
        lab.unwrap()

    task = tasks.hierarchical_equality(seed=0)
    lab = sl.wrap(task.model(seed=3), example_input=task.example_input())  # seed 3: the random-init control (seed 0) differs
    try:
        train, test = task.datasets(n_train=64, n_test=32, seed=0)
        DAS(lab, site=task.site(1), size=2, epochs=1, batch_size=32, controls=True, localist_samples=2).fit(train, test, progress=True)
        err = capsys.readouterr().err
        assert f"DAS {task.site(1)}: 100%" in err and "6/6" in err and "random init" in err
        search(lab, train, test, sites=[task.site(1), task.site(2)], sizes=[2], epochs=1, batch_size=32, controls=False, progress=True)
        captured = capsys.readouterr()  # each candidate's row is a result: stdout, written above the bar
        assert "DAS search: 100%" in captured.err and "2/2" in captured.err and f"{task.site(2)} pos=None size=2: iia" in captured.out
        search(lab, train, test, sites=[task.site(1)], sizes=[2], epochs=1, batch_size=32, controls=False)
        assert capsys.readouterr() == ("", "")
    finally:
        lab.unwrap()

    torch.manual_seed(0)
    rm = reft.get_reft_model(model, reft.ReftConfig(layers=[1], rank=2, positions="l1"), tokenizer=tok)
    try:
        ds = reft.InstructionDataset(tok, ["a b", "c d", "e f"], [" x", " y", " z"], positions="l1", chat_template=False)
        reft.train(rm, ds, epochs=2, batch_size=2, progress=True, log_every=2)
        err = capsys.readouterr().err
        assert "ReFT: 100%" in err and "4/4" in err and "loss=" in err
    finally:
        rm.unwrap()
