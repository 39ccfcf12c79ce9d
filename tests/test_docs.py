"""The documentation: the API reference builds from the docstrings in strict mode (a broken reference
fails the build), and docs/cli.md documents every key of the experiment format and every data format."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from steerlab.data import DATA_FORMATS
from steerlab.experiment.core import MODEL_KEYS, TOP_KEYS, registered_steps
from steerlab.experiment.task import OPS, TASK_KEYS

ROOT = Path(__file__).resolve().parents[1]


def mkdocs(config: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config), "--site-dir", str(site)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_the_api_reference_builds_in_strict_mode(tmp_path):
    # as on a fresh clone: the hook must lay the package out before mkdocstrings reads its search path
    shutil.rmtree(ROOT / "build" / "docs-packages", ignore_errors=True)
    done = mkdocs(ROOT / "mkdocs.yml", tmp_path / "site")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "WARNING" not in done.stderr, done.stderr[-3000:]
    page = (tmp_path / "site" / "api" / "alignment" / "index.html").read_text()
    # the mapped layer folders were read as steerlab.* and their docstrings rendered
    for text in ("steerlab.alignment.DAS", "BoundlessDAS", "Distributed alignment search at one site", "interchange-intervention"):
        assert text in page, text
    experiment = (tmp_path / "site" / "api" / "experiment" / "index.html").read_text()
    assert "register_step" in experiment and "PromptTask" in experiment
    assert (tmp_path / "site" / "cli" / "index.html").is_file()


@pytest.mark.slow
def test_a_broken_reference_fails_the_build(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# broken\n\n::: steerlab.alignment.NoSuchThing\n")
    config = (ROOT / "mkdocs.yml").read_text().split("nav:")[0]  # the same settings, without the nav
    plugins = (ROOT / "mkdocs.yml").read_text().split("plugins:")[1]
    text = (config.replace("docs_dir: docs", f"docs_dir: {docs}").replace("docs/hooks/package_map.py", str(ROOT / "docs/hooks/package_map.py"))
            + "plugins:" + plugins.replace("[build/docs-packages]", f"[{ROOT / 'build/docs-packages'}]"))
    (tmp_path / "mkdocs.yml").write_text(text)
    done = mkdocs(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert done.returncode != 0
    assert "steerlab.alignment.NoSuchThing" in done.stderr


def test_cli_md_documents_every_key_and_data_format():
    text = (ROOT / "docs" / "cli.md").read_text()
    tables = {"(top level)": TOP_KEYS, "[model]": MODEL_KEYS, "[task]": TASK_KEYS}
    tables.update({f"[{name}]": step.keys for name, step in registered_steps().items()})
    for table, keys in tables.items():
        if table != "(top level)":
            assert f"### `{table}`" in text, table
        for key in keys:
            if key in ("model", "task"):
                continue  # the tables themselves
            assert f"`{key}`" in text, f"docs/cli.md does not document {table} {key}"
    for key in ("parents", "map", "rows", "op", "python", "values", *OPS):
        assert f"`{key}`" in text, key
    for suffix in DATA_FORMATS:
        assert f"`{suffix}`" in text, suffix
