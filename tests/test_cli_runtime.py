"""``--threads`` and ``--no-progress`` on every command: the thread count a command runs with (and gets back
after), the default policy (OMP_NUM_THREADS, else min(physical cores, 4, cores not busy)), one-line errors."""

from __future__ import annotations

import io
import os
import sys

import pytest
import torch

import steerlab.cli as cli
import steerlab.threads as threads
from steerlab.interventions import progress

#: the smallest valid command line of each command
COMMANDS = {
    "sites": ["sites", "minilm-l6"],
    "patch": ["patch", "m", "--base", "a", "--source", "b", "--good", " x", "--bad", " y"],
    "generate": ["generate", "m", "hello"],
    "das": ["das", "--task", "sentiment", "--layer", "3"],
    "search": ["search", "--task", "sentiment", "--layers", "3"],
    "train": ["train", "run.toml"],
    "demo": ["demo"],
}


def test_every_command_takes_threads_and_no_progress():
    parser = cli.build_parser()
    commands = set(parser._subparsers._group_actions[0].choices)  # every registered command, new ones included
    assert set(COMMANDS) <= commands
    for name in commands:
        argv = COMMANDS.get(name, [name])
        args = parser.parse_args([*argv, "--threads", "3", "--no-progress"])
        assert args.threads == 3 and args.no_progress is True, name
        args = parser.parse_args(["--threads", "2", *argv])  # before the command name too
        assert args.threads == 2 and not getattr(args, "no_progress", False), name


def test_a_command_runs_with_its_threads_and_gives_them_back(monkeypatch, capsys):
    seen = {}

    def fake_sites(args):
        seen["threads"] = torch.get_num_threads()
        seen["bar"] = progress.enabled(None)
        return 0

    monkeypatch.setattr(cli, "_cmd_sites", fake_sites)
    before = torch.get_num_threads()
    monkeypatch.setattr(sys, "stderr", type("Tty", (io.StringIO,), {"isatty": lambda self: True})())
    monkeypatch.delenv(progress.ENV, raising=False)
    assert cli.main(["sites", "minilm-l6", "--threads", "2"]) == 0
    assert seen == {"threads": 2, "bar": True} and torch.get_num_threads() == before
    assert cli.main(["--threads", "1", "sites", "minilm-l6", "--no-progress"]) == 0
    assert seen == {"threads": 1, "bar": False} and torch.get_num_threads() == before
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cli.main(["sites", "minilm-l6"]) == 0
    assert seen["threads"] == 1  # the default respects OMP_NUM_THREADS


def test_bad_threads_is_a_one_line_error(capsys):
    assert cli.main(["sites", "minilm-l6", "--threads", "0"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "steerlab: error: --threads 0: expected a positive number of threads"
    assert cli.main(["sites", "minilm-l6", "--threads", "two"]) == 2
    assert "--threads: invalid int value: 'two'" in capsys.readouterr().err


@pytest.mark.parametrize("cores, load, want", [(2, 0.1, 2), (2, 0.8, 1), (2, 1.6, 1), (2, 9.0, 1), (8, 0.5, 4), (8, 6.2, 2),
                                               (1, 0.0, 1)])
def test_the_default_leaves_busy_cores_alone(monkeypatch, cores, load, want):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "physical_cores", lambda: cores)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (load, load, load))
    assert threads.default_threads() == want
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.default_threads() == 3


def test_physical_cores_is_what_this_process_may_use():
    assert 1 <= threads.physical_cores() <= len(os.sched_getaffinity(0))
