"""The suite's runtime type checker (tests/conftest.py) is on, checks, and checks one vocabulary.

tests/conftest.py installs jaxtyping's import hook with beartype over every steerlab module. These
tests show it is active (every module loaded through it), that it refuses what an annotation refuses
(a wrong shape, a wrong dtype, two arguments disagreeing on a dimension), that steerlab's own checks
still come first where steerlab names the mistake, and that every dimension name in the package's
annotations is one docs/design.md lists.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pkgutil
import re
import sys
from pathlib import Path

import jaxtyping
import pytest
import torch
from beartype import beartype
from jaxtyping import Float

import steerlab as sl
from steerlab.interventions.errors import ConfigError, checked_first

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("steerlab", "interventions", "alignment", "reft", "viz")


def _all_modules() -> list[str]:
    """Every module of the package, found on disk (walking imports its packages, not its modules)."""
    names = []
    for pkg in ("steerlab", "steerlab.interventions", "steerlab.alignment", "steerlab.reft", "steerlab.viz"):
        names.append(pkg)
        names += [m.name for m in pkgutil.walk_packages(importlib.import_module(pkg).__path__, pkg + ".")]
    return sorted(set(names))


def test_every_steerlab_module_is_loaded_through_the_checker():
    modules = _all_modules()
    assert len(modules) > 100
    unchecked = []
    for name in modules:  # the spec the import system finds (a module not imported yet is not executed)
        module = sys.modules.get(name)
        spec = module.__spec__ if module is not None else importlib.util.find_spec(name)
        if type(spec.loader).__module__ != "jaxtyping._import_hook":
            unchecked.append(name)
    assert not unchecked, f"imported without the jaxtyping hook (tests/conftest.py): {unchecked}"
    assert hasattr(sl.subspace_edit, "__wrapped__") and hasattr(sl.Lab.run, "__wrapped__")


def test_a_wrong_shape_is_refused_before_compute():
    h, rotation = torch.randn(2, 5, 8), torch.linalg.qr(torch.randn(8, 3))[0].T  # [rank=3, width=8]
    target = torch.randn(2, 5, 3)
    torch.testing.assert_close(sl.subspace_edit(h, rotation, target) @ rotation.T, target)  # the right shapes run
    with pytest.raises(jaxtyping.TypeCheckError, match="parameter 'target'") as info:
        sl.subspace_edit(h, rotation, torch.randn(2, 5, 4))  # rank 4 against the rotation's 3
    assert "rank=3" in str(info.value)
    with pytest.raises(jaxtyping.TypeCheckError, match="parameter 'rotation'"):
        sl.subspace_edit(h, torch.randn(3, 7), torch.randn(2, 5, 3))  # width 7 against h's 8


def test_a_wrong_dtype_is_refused():
    rotation = torch.linalg.qr(torch.randn(8, 3))[0].T
    with pytest.raises(jaxtyping.TypeCheckError, match="parameter 'h'"):
        sl.subspace_edit(torch.randint(0, 5, (2, 5, 8)), rotation, torch.randn(2, 5, 3))  # token ids, not floats


def test_a_wrong_type_in_a_dataclass_is_refused():
    with pytest.raises(jaxtyping.TypeCheckError, match="heads"):
        sl.Subspace(torch.eye(4)[:2], "blocks.0.resid_post", heads="0,1")  # a string, not a sequence of ints


def test_steerlabs_own_check_comes_first():
    """Where steerlab names a mistake, its error wins over the checker's (which would say TypeCheckError)."""
    lab = sl.wrap(torch.nn.Linear(4, 4), example_input=torch.randn(1, 4))
    with pytest.raises(sl.NotAnIntervention, match="got str"):
        lab.run(torch.randn(1, 4), ["blocks.0.resid_post"])
    with pytest.raises(sl.NotAnIntervention, match="got str"):  # a one-shot iterator: checked once read, not consumed first
        lab.run(torch.randn(1, 4), (name for name in ["blocks.0.resid_post"]))
    with pytest.raises(sl.NotAModel, match="got str"):
        sl.wrap("gpt2")
    lab.unwrap()

    seen = []

    def positive(value: object) -> None:
        seen.append(value)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"n={value!r}: expected a positive int")

    @checked_first(n=positive)
    @jaxtyping.jaxtyped(typechecker=beartype)  # where the hook puts it: innermost
    def f(x: Float[torch.Tensor, " batch"], n: int = 1) -> int:
        return n

    assert f(torch.zeros(3)) == 1 and seen == []  # a default is not checked
    assert f(torch.zeros(3), 2) == 2 and f(torch.zeros(3), n=3) == 3 and seen == [2, 3]
    with pytest.raises(ConfigError, match="n='2': expected a positive int"):
        f(torch.zeros(3), "2")
    with pytest.raises(jaxtyping.TypeCheckError):
        f(torch.zeros(3, dtype=torch.long), 2)  # what steerlab does not check, the checker still does
    with pytest.raises(TypeError, match="has no parameter m"):
        checked_first(m=positive)(f)


def _vocabulary() -> set[str]:
    text = (ROOT / "docs" / "design.md").read_text()
    section = text[text.index("One dimension vocabulary"): text.index("keeps the list closed")]
    names = set()
    for code in re.findall(r"`([^`]+)`", section):
        names.update(t.lstrip("*") for t in re.split(r"[ ,]+", code) if re.fullmatch(r"\*?[a-z_]+", t))
    return names


def _dimension_names() -> dict[str, set[str]]:
    """Every name in a jaxtyping shape string of the package: name -> the files using it."""
    found: dict[str, set[str]] = {}
    for folder in FOLDERS:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if not (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name)
                        and node.value.id in ("Float", "Int", "Bool", "Shaped", "Num", "Integer", "Real")):
                    continue
                parts = node.slice.elts if isinstance(node.slice, ast.Tuple) else []
                if len(parts) == 2 and isinstance(parts[1], ast.Constant) and isinstance(parts[1].value, str):
                    for token in parts[1].value.split():
                        name = token.lstrip("*#")
                        if name and name != "..." and not name.isdigit():
                            found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_dimension_name_is_in_the_vocabulary():
    vocabulary, used = _vocabulary(), _dimension_names()
    assert {"batch", "pos", "d_model", "head", "d_head", "k", "vocab", "layer", "labels", "width", "rank"} <= vocabulary
    assert len(used) > 20
    stray = {name: sorted(files) for name, files in used.items() if name not in vocabulary}
    assert not stray, f"dimension names docs/design.md does not list: {stray}"


def test_the_checker_is_on_in_this_process():
    assert "steerlab" in sys.modules and any(type(f).__name__ == "_JaxtypingFinder" for f in sys.meta_path)
