"""Shared fixtures: tiny random models of every supported architecture, and the real embedded models.

Before anything imports steerlab, the jaxtyping import hook is installed: every function and
dataclass of every steerlab module is checked at runtime by beartype (standard hints and the
jaxtyping shapes, with one dimension binding per call), so an annotation that lies fails a test.
"""

from __future__ import annotations

import os
import sys
import tomllib
from importlib.abc import MetaPathFinder
from pathlib import Path

import beartype  # noqa: F401 - now: imported after pyvene, beartype's import fails (pyvene patches a builtin type)
import jaxtyping

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
#: under pytest-xdist (the README's test command runs ``-n 2``) each worker gets one core: one torch
#: thread per worker, and the same for the notebooks and CLI subprocesses the tests start
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if XDIST_WORKER:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

CHECKED_PACKAGES = ("steerlab",)


class _PackageDirs(MetaPathFinder):
    """Finds the packages pyproject maps to other folders (``steerlab.interventions`` is ``interventions/``).

    jaxtyping's hook asks Python's path finder under the parent package's ``__path__``, where a
    mapped package is not; this asks the hook itself under the folder the package lives in, so the
    mapped packages' ``__init__`` modules are checked too (their submodules are then found by the hook).
    """

    def __init__(self, hook: MetaPathFinder, root: Path) -> None:
        mapping = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
        self.hook = hook
        self.parents: dict[str, str] = {}
        for name, folder in mapping.items():
            where = root / folder
            if where.name != name.rpartition(".")[2]:
                raise RuntimeError(f"{name} maps to {folder}: a folder named otherwise is not findable by the hook")
            self.parents[name] = str(where.parent)

    def find_spec(self, fullname, path=None, target=None):
        parent = self.parents.get(fullname)
        return None if parent is None else self.hook.find_spec(fullname, [parent], target)


#: ``STEERLAB_TYPECHECK=0`` runs without the checker, only to measure what it costs
#: (tests/test_typechecking.py then fails: the suite is meant to run checked)
TYPECHECK = os.environ.get("STEERLAB_TYPECHECK", "1") != "0"
if TYPECHECK:
    if any(name == p or name.startswith(p + ".") for name in sys.modules for p in CHECKED_PACKAGES):
        raise RuntimeError("steerlab was imported before tests/conftest.py installed the jaxtyping hook")
    # PEP 484's numeric tower: an int is a float (``alpha: float`` takes ``alpha=2``), as static checkers read it
    _hook = jaxtyping.install_import_hook(list(CHECKED_PACKAGES), "beartype.beartype(conf=beartype.BeartypeConf(is_pep484_tower=True))")
    sys.meta_path.insert(0, _PackageDirs(_hook.hook, Path(__file__).resolve().parent.parent))

import pytest  # noqa: E402
import torch  # noqa: E402

if XDIST_WORKER:
    torch.set_num_threads(1)

from tests.archs import ARCHS, tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def smollm():
    """SmolLM2-135M-Instruct, real weights, fp32, eval mode: (model, tokenizer)."""
    import steerlab as sl

    return sl.load("smollm2-135m")


@pytest.fixture(scope="session")
def minilm():
    """all-MiniLM-L6-v2, real weights: (model, tokenizer)."""
    import steerlab as sl

    return sl.load("minilm-l6")


@pytest.fixture(params=sorted(ARCHS))
def arch(request) -> str:
    return request.param


@pytest.fixture
def tiny(arch):
    """A tiny random model of ``arch`` in eval mode (seeded)."""
    return tiny_model(arch)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
