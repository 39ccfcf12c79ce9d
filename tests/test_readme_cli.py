"""The README's shell session runs: each ``$ steerlab ...`` command in its ``console`` blocks gives
the output shown under it (numbers to the printed precision), after the README's Python snippets
before it have run in the same folder (one of them saves the intervention a command loads)."""

from __future__ import annotations

import math
import re
import shlex
from pathlib import Path

from steerlab.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def session() -> list[tuple[str, list[str]]]:
    """``(command, expected output lines)`` for every ``$`` command, joining ``\\`` continuations."""
    out: list[tuple[str, list[str]]] = []
    for block in _blocks("console"):
        lines = block.splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            assert line.startswith("$ "), f"console block: expected a '$ ' command, got {line!r}"
            cmd = line[2:]
            while cmd.endswith("\\"):
                i += 1
                cmd = cmd[:-1] + lines[i].strip()
            i += 1
            expected = []
            while i < len(lines) and not lines[i].startswith("$ "):
                expected.append(lines[i])
                i += 1
            out.append((cmd, expected))
    return out


def _same_line(got: str, want: str, tol: float) -> bool:
    """Equal words, except numbers, which may differ by ``tol`` (the last printed digit)."""
    g, w = got.split(), want.split()
    if len(g) != len(w):
        return False
    for a, b in zip(g, w, strict=True):
        if a == b:
            continue
        try:
            if not math.isclose(float(a.rstrip(",")), float(b.rstrip(",")), abs_tol=tol):
                return False
        except ValueError:
            return False
    return True


def test_readme_console_session_runs_as_shown(tmp_path, monkeypatch, capsys):
    commands = session()
    assert [c.split()[:2] for c, _ in commands] == [["steerlab", "sites"], ["steerlab", "patch"], ["steerlab", "generate"]]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace: dict = {"__name__": "__readme__"}
    for i, code in enumerate(_blocks("python")):  # up to the save the commands load (the rest: tests/test_readme.py)
        exec(compile(code, f"README.md[python block {i}]", "exec"), namespace)
        if 'lab.save("swap-country"' in code:
            break
    capsys.readouterr()
    for cmd, expected in commands:
        argv = shlex.split(cmd)
        status = main(argv[1:])
        out, err = capsys.readouterr()
        assert status == 0, f"{cmd}\n{err}"
        got = out.splitlines()
        assert len(got) == len(expected), f"{cmd}\n--- got\n{out}--- README shows\n" + "\n".join(expected)
        for g, w in zip(got, expected, strict=True):
            assert _same_line(g, w, tol=2e-3), f"{cmd}\n got: {g!r}\nREADME: {w!r}"
    assert (tmp_path / "patching.html").stat().st_size > 1_000_000


def test_the_test_command_installs_chromium_only_when_missing():
    """The browser tests need Chromium: CI's one-line test command installs Debian's package, and
    leaves a machine that has one alone."""
    text = README.read_text()
    block = text.split("<!-- test-command -->", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0].strip()
    assert "\n" not in block, "the test command stays one line"
    assert block.startswith("(command -v chromium >/dev/null || (apt-get update -qq && ")
    assert "apt-get install -y -qq chromium" in block.split("&& python3 -m venv")[0]
