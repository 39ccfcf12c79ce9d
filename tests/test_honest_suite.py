"""RELIABILITY row 14: an honest suite, checked over the whole tests/ tree (AST scan).

* every test function asserts something: an ``assert``, ``pytest.raises`` /
  ``pytest.warns``, a call of a helper named ``assert*`` / ``check*``, or a call
  of a helper of the tests tree that (transitively) does one of these;
* nothing is skipped or expected to fail: no ``pytest.skip`` / ``skipif`` /
  ``xfail`` / ``importorskip``, no ``unittest`` skips, no reruns;
* no test is silently dropped: no two tests of one name in a module (the
  second hides the first), no test functions in files pytest does not collect.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
_BANNED = {"skip", "skipif", "xfail", "importorskip", "skipTest", "skipIf", "skipUnless", "expectedFailure", "flaky"}


def _files() -> list[Path]:
    return sorted(p for p in TESTS.rglob("*.py") if "__pycache__" not in p.parts)


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _call_name(node: ast.Call) -> str:
    f = node.func
    if isinstance(f, ast.Attribute):
        return f.attr
    if isinstance(f, ast.Name):
        return f.id
    return ""


def _asserts_directly(fn: ast.AST) -> bool:
    for node in ast.walk(fn):
        if isinstance(node, ast.Assert):
            return True
        if isinstance(node, ast.Call):
            name = _call_name(node).lstrip("_")
            if name in ("raises", "warns", "deprecated_call") or name.startswith(("assert", "check")):
                return True
    return False


def _calls(fn: ast.AST) -> set[str]:
    """Helpers called by plain name (``helper(...)``; ``obj.run(...)`` is not a helper of the tests tree)."""
    return {n.func.id for n in ast.walk(fn) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}


def _helpers() -> dict[str, list[ast.AST]]:
    """Every function (and method) defined anywhere in the tests tree, by name."""
    out: dict[str, list[ast.AST]] = {}
    for path in _files():
        for node in ast.walk(_parse(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.setdefault(node.name, []).append(node)
    return out


def _asserting(helpers: dict[str, list[ast.AST]]) -> set[str]:
    """Names of helpers that assert, directly or through other helpers (a fixed point)."""
    good = {name for name, defs in helpers.items() if all(_asserts_directly(d) for d in defs)}
    changed = True
    while changed:
        changed = False
        for name, defs in helpers.items():
            if name not in good and all(_asserts_directly(d) or _calls(d) & good for d in defs):
                good.add(name)
                changed = True
    return good


def _tests(tree: ast.Module):
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test"):
            yield node.name, node
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name.startswith("test"):
                    yield f"{node.name}.{item.name}", item


def test_every_test_asserts_something():
    helpers = _helpers()
    good = _asserting(helpers)
    silent, n = [], 0
    for path in _files():
        for name, fn in _tests(_parse(path)):
            n += 1
            if not (_asserts_directly(fn) or _calls(fn) & good):
                silent.append(f"{path.relative_to(ROOT)}::{name}")
    assert n > 100, "the scan found too few tests to be looking at the right tree"
    assert silent == [], f"{len(silent)} test(s) assert nothing: {silent}"


def test_nothing_is_skipped_or_expected_to_fail():
    found = []
    for path in _files():
        for node in ast.walk(_parse(path)):
            name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else None
            if name in _BANNED:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
    assert found == [], found


def test_no_reruns_or_skips_configured():
    cfg = (ROOT / "pyproject.toml").read_text()
    section = cfg[cfg.index("[tool.pytest.ini_options]"):]
    assert not re.search(r"--reruns|rerunfailures|--lf\b|--last-failed|-p no:|--deselect|xfail_strict\s*=\s*false|--runxfail", section)


def test_no_test_is_hidden_or_uncollected():
    problems = []
    for path in _files():
        tree = _parse(path)
        names = [name for name, _ in _tests(tree)]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            problems.append(f"{path.relative_to(ROOT)}: defined twice {dupes}")
        if names and not path.name.startswith("test_"):
            problems.append(f"{path.relative_to(ROOT)}: test functions in a file pytest does not collect")
    assert problems == [], problems


def test_the_scan_catches_a_test_without_an_assertion(tmp_path):
    """The checker itself: each kind of silent test is caught, each kind of assertion accepted."""
    src = '''
import pytest
def helper_that_checks(x):
    assert x
def helper_that_delegates(x):
    helper_that_checks(x)
def test_silent():
    run_the_model()
def test_assert():
    assert 1
def test_raises():
    with pytest.raises(ValueError):
        int("x")
def test_named_helper():
    torch.testing.assert_close(a, b)
def test_via_helpers():
    helper_that_delegates(1)
def test_method_named_like_a_helper():
    obj.helper_that_checks(1)
@pytest.mark.skip
def test_skipped():
    assert 1
'''
    tree = ast.parse(src)
    helpers = {n.name: [n] for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    good = _asserting(helpers)
    verdict = {name: bool(_asserts_directly(fn) or _calls(fn) & good) for name, fn in _tests(tree)}
    assert verdict == {"test_silent": False, "test_assert": True, "test_raises": True, "test_named_helper": True,
                       "test_via_helpers": True, "test_method_named_like_a_helper": False, "test_skipped": True}
    assert any(isinstance(n, ast.Attribute) and n.attr in _BANNED for n in ast.walk(tree))
