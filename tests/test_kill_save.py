"""RELIABILITY row 16: a kill at any filesystem step of a save loses nothing.

Each save runs in a forked child whose filesystem calls (``mkdir``, creating
``open``, ``write``, ``fsync``, ``replace``, ``rename``, ``unlink``) are
counted; the child sends itself ``SIGKILL`` right after the n-th one, for
every n, and also halfway through each ``write`` (half the bytes on disk).
After every kill the folder must hold one complete, loadable save, the old
or the new one (a folder that had none may have none), every other file in
it must be byte-identical, and the next save must succeed and leave only its
own two files beside the user's. Scenarios: a first save into a folder of
user files, a save over a version-2 save, over a version-1 save, over a save
of identical content, and a ReFT model's ``save_pretrained`` (the whole
high-level path).

``python -m tests.test_kill_save`` prints the table of kills tried and saves lost.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers as T

import steerlab as sl
from steerlab import reft
from steerlab.interventions import fileformat
from tests.reliability import one_thread_fixture

_one_thread = one_thread_fixture()
HERE = Path(__file__).resolve().parent
V1 = HERE / "regression" / "v1"
SITE = "blocks.1.resid_post"
_STEPS = ("mkdir", "open", "write", "fsync", "replace", "rename", "unlink", "rmdir")


def _user_files(d: Path) -> dict[str, bytes]:
    d.mkdir(parents=True, exist_ok=True)
    (d / "notes.md").write_text("keep me\n")
    (d / "checkpoint-7").mkdir(exist_ok=True)
    (d / "checkpoint-7" / "optimizer.pt").write_bytes(b"\x80\x04 someone else's")
    (d / "weights.safetensors.bak").write_bytes(b"a user's backup")
    return _theirs(d)


def _theirs(d: Path) -> dict[str, bytes]:
    ours = lambda n: n == fileformat.CONFIG_NAME or n.startswith(("weights-", ".steerlab-")) or n == fileformat.WEIGHTS_NAME  # noqa: E731
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file() and not ours(p.relative_to(d).parts[0])}


# --------------------------------------------------------------------------- the child: count, then kill
def _arm(kill_at: int | None, mid_write: bool, counter: list[int]) -> None:
    """Wrap the child's ``os`` filesystem calls: count each; SIGKILL after call ``kill_at`` (or halfway into it)."""

    def wrap(name: str, fn: Callable):
        def call(*args, **kwargs):
            if name == "open" and not (len(args) > 1 and args[1] & os.O_CREAT):
                return fn(*args, **kwargs)  # reading or locking: not a step
            n = counter[0] + 1
            if mid_write and name == "write" and n == kill_at:
                data = bytes(args[1])
                fn(args[0], data[: max(1, len(data) // 2)])
                os.kill(os.getpid(), signal.SIGKILL)
            out = fn(*args, **kwargs)
            counter[0] = n
            if n == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return out

        return call

    for name in _STEPS:
        setattr(os, name, wrap(name, getattr(os, name)))


def _in_child(save: Callable[[], None], kill_at: int | None, mid_write: bool = False) -> tuple[str, int]:
    """Run ``save`` in a forked child armed as :func:`_arm` says: ``("killed" | "done" | "failed", steps)``."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns to pytest
        os.close(r)
        code = 0
        counter = [0]
        try:
            _arm(kill_at, mid_write, counter)
            save()
        except BaseException:
            code = 3
        os.write(w, str(counter[0]).encode())
        os._exit(code)
    os.close(w)
    data = b""
    while chunk := os.read(r, 64):
        data += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        return "killed", kill_at or 0
    return ("done" if os.WEXITSTATUS(status) == 0 else "failed"), int(data or b"0")


# --------------------------------------------------------------------------- scenarios
@dataclass
class Scenario:
    name: str
    prepare: Callable[[Path], None]  # the folder before the save (user files, maybe an old save)
    write: Callable[[Path], None]  # the save under test (not `save`: nnsight gives every object a `.save`)
    state: Callable[[Path], str]  # "old" | "new" | "none"; raises if the folder holds a broken save
    has_old: bool


def _model():
    return T.LlamaForCausalLM.from_pretrained(V1 / "model").eval()


@pytest.fixture(scope="module")
def scenarios() -> list[Scenario]:
    return make_scenarios()


def make_scenarios() -> list[Scenario]:
    lab = sl.wrap(_model())
    old_ivs = [sl.Add(SITE, torch.arange(32.0)), sl.Scale(SITE, factor=2.0)]
    new_ivs = [sl.Add(SITE, torch.full((32,), 9.0)), sl.SubspaceInterchange(SITE, size=3, width=32)]

    def ivs_state(d: Path) -> str:
        if not (d / fileformat.CONFIG_NAME).exists():
            return "none"
        ivs = lab.load_interventions(d)
        if [iv.type_name for iv in ivs] == ["add", "subspace_interchange"] and float(ivs[0].vector[0]) == 9.0:
            return "new"
        if [iv.type_name for iv in ivs] == ["add", "scale"]:
            return "old"
        if len(ivs) == 9:  # the version-1 fixture
            return "old"
        raise AssertionError(f"an unexpected save: {[iv.type_name for iv in ivs]}")

    def v1_old(d: Path) -> None:
        _user_files(d)
        for f in (V1 / "interventions").iterdir():
            shutil.copy(f, d / f.name)

    same = [sl.Scale(SITE, factor=4.0)]

    def same_state(d: Path) -> str:
        (iv,) = lab.load_interventions(d)
        assert iv.factor == 4.0
        return "new"

    rm = reft.get_reft_model(_model(), [reft.LoReFT(SITE, rank=2, width=32, positions="l1")])
    fresh = _model()

    def reft_state(d: Path) -> str:
        if not (d / fileformat.CONFIG_NAME).exists():
            return "none"
        loaded = reft.ReftModel.from_pretrained(d, fresh)
        try:
            return "new" if torch.equal(loaded.interventions[0].weight, rm.interventions[0].weight) else "other"
        finally:
            loaded.unwrap()

    return [
        Scenario("first save into a folder of user files", _user_files, lambda d: lab.save(d, new_ivs), ivs_state, False),
        Scenario("over a version-2 save", lambda d: (_user_files(d), lab.save(d, old_ivs)), lambda d: lab.save(d, new_ivs), ivs_state, True),
        Scenario("over a version-1 save", v1_old, lambda d: lab.save(d, new_ivs), ivs_state, True),
        Scenario("identical content over itself", lambda d: (_user_files(d), lab.save(d, same)), lambda d: lab.save(d, same), same_state, True),
        Scenario("ReftModel.save_pretrained into a Trainer folder", _user_files, lambda d: rm.save_pretrained(d), reft_state, False),
    ]


@dataclass
class Outcome:
    scenario: str
    kills: int = 0
    old: int = 0
    new: int = 0
    none: int = 0
    lost: int = 0  # a broken save, an unexpected one, or a user's file changed
    messages: list[str] | None = None


def run_scenario(sc: Scenario, root: Path) -> Outcome:
    """Every kill point of ``sc`` (after each step, and halfway into each write)."""
    probe = root / "probe"
    sc.prepare(probe)
    status, steps = _in_child(lambda: sc.write(probe), None)
    assert status == "done" and steps >= 6, (status, steps)
    out = Outcome(sc.name, messages=[])
    for mid_write in (False, True):
        for n in range(1, steps + 1):
            d = root / f"k{n}{'w' if mid_write else ''}"
            sc.prepare(d)
            theirs = _theirs(d)
            status, _ = _in_child(lambda d=d: sc.write(d), n, mid_write)
            if status != "killed":
                continue  # a write that is not the n-th step: nothing to cut halfway
            out.kills += 1
            try:
                state = sc.state(d)
                assert _theirs(d) == theirs, "a user's file changed"
                assert state in ("old", "new") or (state == "none" and not sc.has_old), f"the folder holds {state}"
                setattr(out, state, getattr(out, state) + 1)
                sc.write(d)  # the next save recovers: only its own two files beside the user's
                assert sc.state(d) == "new" and _theirs(d) == theirs
                assert sorted(set(os.listdir(d)) - {p.split("/")[0] for p in theirs}) == sorted([fileformat.CONFIG_NAME, fileformat.weights_path(d).name])
            except (AssertionError, sl.SteerlabError) as e:
                out.lost += 1
                out.messages.append(f"kill after step {n}{' (mid-write)' if mid_write else ''}: {type(e).__name__}: {e}")
            shutil.rmtree(d)
    shutil.rmtree(probe)
    return out


_NAMES = ["first save into a folder of user files", "over a version-2 save", "over a version-1 save",
          "identical content over itself", "ReftModel.save_pretrained into a Trainer folder"]


@pytest.mark.parametrize("name", _NAMES)
def test_a_kill_at_any_step_of_a_save_leaves_one_complete_save(scenarios, tmp_path, name):
    (sc,) = [s for s in scenarios if s.name == name]
    out = run_scenario(sc, tmp_path)
    assert out.lost == 0, "\n".join(out.messages or [])
    assert out.kills >= 8
    assert out.new >= 1 and (out.old >= 1 if sc.has_old and name != "identical content over itself" else True)


def table(root: Path) -> str:  # pragma: no cover - the report
    rows = [run_scenario(sc, root / str(i)) for i, sc in enumerate(make_scenarios())]
    lines = ["| save | kills tried | old save found | new save found | no save (none before) | saves lost |", "|---|---|---|---|---|---|"]
    lines += [f"| {o.scenario} | {o.kills} | {o.old} | {o.new} | {o.none} | {o.lost} |" for o in rows]
    lines.append(f"| **all** | {sum(o.kills for o in rows)} | {sum(o.old for o in rows)} | {sum(o.new for o in rows)} | "
                 f"{sum(o.none for o in rows)} | {sum(o.lost for o in rows)} |")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    import tempfile

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        print(table(Path(tmp)))
