"""Every Python snippet in README.md runs, in order, in one namespace (so the README stays true).

Snippets assert their own results where they show one; this test also checks
that the README still holds the two commands CI and newcomers rely on.
"""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_both_commands():
    text = README.read_text()
    assert "<!-- test-command -->" in text and "<!-- demo-command -->" in text
    bash = _blocks("bash")
    assert any("pytest" in b and "HF_HUB_OFFLINE=1" in b and "torch==2.13.0" in b for b in bash)
    assert any("steerlab demo" in b for b in bash)


def test_readme_python_snippets_run(tmp_path, monkeypatch):
    blocks = _blocks("python")
    assert blocks, "the README shows no Python snippet"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"README.md[python block {i}]", "exec"), namespace)
        except Exception as e:  # re-raise with the snippet, so a failure points at the README
            raise AssertionError(f"README python block {i} failed: {type(e).__name__}: {e}\n---\n{code}") from e
