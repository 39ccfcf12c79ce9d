"""RELIABILITY row 18: hostile and damaged files at scale, against every loader.

Valid saves of each kind (interventions of nine types, a run graph, a
``Subspace``, a ``ReftModel`` with a ``ReftConfig``, a ``DASResult``, a
``SearchResult``), in format version 2 and version 1, are mutated by class:
byte flips in tensors, truncation, safetensors header edits, JSON field
deletions, JSON type changes, huge values, NaN, dtype and shape lies,
config-vs-record contradictions, fingerprint removal, symbolic links and
pickles renamed. Each mutated folder is loaded in a forked child (so a loader
that allocated or leaked could not hide it, and the peak resident memory of
the attempt can be read from ``/proc``), with every unpickling entry point
raising. Every attempt must end in a :class:`~steerlab.SteerlabError`: none
loads silently (byte flips in version-1 files, which carry no checksum, are
the one stated exception, and are counted apart), none raises anything else,
none tries to unpickle, and none raises the peak resident memory by 100 MB.

The mutation classes live in ``tests/fuzz_mutations.py``. ``tests/fuzz_files_main.json`` lists the mutations that the code before the
version-2 format accepted (measured with ``python -m tests.test_fuzz_files
--write DIR`` and ``tests/fuzz_files_main.py DIR`` run against that code);
every class holds some.

``python -m tests.test_fuzz_files`` prints the table of loader × class.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import resource
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as T

import steerlab as sl
from steerlab import reft
from steerlab.alignment import IIA, Curve, DASResult, SearchResult
from tests.fuzz_mutations import CLASSES, Mutation, Save, mutations
from tests.reliability import one_thread_fixture

_one_thread = one_thread_fixture()
HERE = Path(__file__).resolve().parent
V1 = HERE / "regression" / "v1"
SITE = "blocks.1.resid_post"
LOADERS = ("interventions", "graph", "subspace", "reft", "das_result", "das_search")
PEERS = ("import_pyreft", "import_pyvene")  # a peer's pickled save, read only by these two (tensors only)
MEMORY_LIMIT = 100 * 2**20


# --------------------------------------------------------------------------- the valid saves
@dataclass
class Env:
    lab: Any  # on model a: interventions, graphs, subspaces, results
    model_b: Any  # for ReftModel.from_pretrained (it wraps the model itself)

    @property
    def fp(self) -> dict:
        return self.lab.fingerprint()

    def loader(self, name: str) -> Callable[[Path], Any]:
        fp = self.fp
        return {
            "interventions": lambda d: self.lab.load_interventions(d),
            "graph": lambda d: self.lab.load_graph(d),
            "subspace": lambda d: sl.Subspace.load(d, fingerprint=fp),
            "reft": lambda d: reft.ReftModel.from_pretrained(d, self.model_b).unwrap(),  # leaves model b as found
            "das_result": lambda d: DASResult.load(d, fingerprint=fp),
            "das_search": lambda d: SearchResult.load(d, fingerprint=fp),
            "import_pyreft": lambda d: reft.import_pyreft(d, self.model_b, positions="l1").unwrap(),
            "import_pyvene": lambda d: sl.import_pyvene(d, self.lab),
        }[name]


def _model():
    return T.LlamaForCausalLM.from_pretrained(V1 / "model").eval()


def _basis(k: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(32, k, generator=torch.Generator().manual_seed(seed)))[0].T


def das_result(fp: dict, site: str = SITE, seed: int = 0) -> DASResult:
    subs = {"X": sl.Subspace(_basis(2, seed), site, positions=[-1], metadata={"variable": "X"}),
            "Y": sl.Subspace(_basis(3, seed + 1), site, positions=[-1], metadata={"variable": "Y"})}
    iia = lambda v: IIA(v, 200, 0.5)  # noqa: E731
    curve = Curve(loss=[1.2, 0.7, 0.4], epoch_step=[3], epoch_iia=[0.8], temperature=[], size=[])
    return DASResult(site=site, positions=[-1], variables=("X", "Y"), sizes={"X": 2, "Y": 3}, subspaces=subs,
                     iia={"X": iia(0.81), "Y": iia(0.77), "all": iia(0.79)}, full_vector={"X": iia(0.9), "Y": iia(0.88)},
                     curve=curve, random_init={"all": iia(0.52)}, random_init_curve=copy.deepcopy(curve), localist={"all": iia(0.6)},
                     localist_method="exhaustive", localist_dims={"X": [0, 1], "Y": [2, 3, 4]}, config={"lr": 0.01, "epochs": 1},
                     timings={"fit": 1.5}, fingerprint=fp)


def make_bases(root: Path, env: Env) -> dict[tuple[str, str], Path]:
    """A valid save of each loader's kind, as version 2 and version 1."""
    v2 = root / "v2"
    lab = env.lab
    lab.save(v2 / "interventions", lab.load_interventions(V1 / "interventions"))
    lab.save(v2 / "graph", lab.load_graph(V1 / "graph"))
    sl.Subspace.load(V1 / "subspace").save(v2 / "subspace", fingerprint=env.fp)
    torch.manual_seed(4)
    rm = reft.get_reft_model(env.model_b, reft.ReftConfig(layers=[1, 2], rank=2, positions="f1+l1", tied=False))
    with torch.no_grad():
        for p in rm.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    rm.save_pretrained(v2 / "reft")
    rm.unwrap()
    das_result(env.fp).save(v2 / "das_result")
    SearchResult([das_result(env.fp), das_result(env.fp, "blocks.2.resid_post", 5)], ("X", "Y"), {"sizes": [2, 3]},
                 {"total": 3.0}, {SITE: 1, "blocks.2.resid_post": 2}, env.fp).save(v2 / "das_search")
    bases = {}
    for name in LOADERS:
        bases[(name, "v2")] = v2 / name
        bases[(name, "v1")] = to_v1(v2 / name, root / "v1" / name)
    bases[("import_pyreft", "peer")] = _pyreft_save(root / "peer" / "pyreft")
    bases[("import_pyvene", "peer")] = _pyvene_save(root / "peer" / "pyvene")
    return bases


def _pyreft_save(folder: Path) -> Path:
    import pyreft  # installed for the tests (README)

    torch.manual_seed(1)
    kinds = [pyreft.LoreftIntervention, pyreft.ConsreftIntervention, pyreft.NodireftIntervention]
    reps = [{"layer": i, "component": "block_output", "low_rank_dimension": 2,
             "intervention": K(embed_dim=32, low_rank_dimension=2, dtype=torch.float32, add_bias=False)} for i, K in enumerate(kinds)]
    pyreft.get_reft_model(_model(), pyreft.ReftConfig(representations=reps), set_device=False).save(str(folder))
    return folder


def _pyvene_save(folder: Path) -> Path:
    import pyvene as pv

    torch.manual_seed(2)
    cfg = pv.IntervenableConfig([{"layer": 0, "component": "block_output", "intervention_type": pv.RotatedSpaceIntervention},
                                 {"layer": 1, "component": "block_output", "low_rank_dimension": 3,
                                  "intervention_type": pv.LowRankRotatedSpaceIntervention}])
    pv.IntervenableModel(cfg, _model()).save(str(folder))
    return folder


def to_v1(src: Path, dst: Path) -> Path:
    """The same save in the layout of format version 1 (``weights.safetensors``, no checksum)."""
    dst.mkdir(parents=True)
    meta = json.loads((src / "steerlab.json").read_text())
    data = (src / meta.pop("weights")["file"]).read_bytes()
    meta["version"] = 1
    (dst / "steerlab.json").write_text(json.dumps(meta, indent=2))
    (dst / "weights.safetensors").write_bytes(data)
    return dst



# --------------------------------------------------------------------------- one attempt, in a forked child
class _Unpickled(BaseException):
    pass


def _refuse_unpickling(weights_only: bool = False) -> None:
    """Every unpickling entry point raises; with ``weights_only``, ``torch.load(weights_only=True)``
    still works (the peers' importers: torch's restricted unpickler, tensors only)."""
    def refuse(*a, **k):
        raise _Unpickled("a steerlab load path tried to unpickle")

    real = torch.load

    def torch_load(*a, **k):
        if weights_only and k.get("weights_only") is True:
            return real(*a, **k)
        raise _Unpickled("a steerlab load path tried to unpickle" + (" without weights_only=True" if weights_only else ""))

    for mod, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")]:
        setattr(mod, name, refuse)
    torch.load = torch_load


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _one(load: Callable[[Path], Any], d: Path) -> dict[str, Any]:
    """``load(d)``: its outcome and the peak resident memory it added (``/proc``: torch's allocations too)."""
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark to the current RSS
    rss0 = _status("VmRSS")
    try:
        load(d)
        out = {"outcome": "loaded"}
    except _Unpickled as e:
        out = {"outcome": "unpickled", "error": str(e)}
    except sl.SteerlabError as e:
        out = {"outcome": "named", "error": f"{type(e).__name__}: {e}"[:400]}
    except BaseException as e:  # noqa: BLE001 - exactly what the battery looks for
        out = {"outcome": "unnamed", "error": f"{type(e).__name__}: {e}"[:400]}
    out["memory"] = _status("VmHWM") - rss0
    return out


def attempts(load: Callable[[Path], Any], dirs: list[Path], *, weights_only: bool = False) -> list[dict[str, Any]]:
    """``load`` on each folder, in one forked child (one fork per batch keeps the battery fast; the
    peak-RSS mark is reset before each attempt). A child that dies marks the rest ``crashed``."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            _refuse_unpickling(weights_only)
            soft, hard = resource.getrlimit(resource.RLIMIT_AS)
            resource.setrlimit(resource.RLIMIT_AS, (_status("VmSize") + 2 * 2**30, hard))  # a runaway allocation fails here, not the machine
            for d in dirs:
                os.write(w, (json.dumps(_one(load, d)) + "\n").encode())
        except BaseException as e:  # noqa: BLE001
            os.write(w, (json.dumps({"outcome": "harness", "error": repr(e)[:400], "memory": 0}) + "\n").encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 1 << 16):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    got = [json.loads(line) for line in data.decode().splitlines()]
    return got + [{"outcome": "crashed", "error": "the child died", "memory": 0}] * (len(dirs) - len(got))


def run_all(root: Path, env: Env, *, write: Path | None = None) -> list[tuple[Mutation, dict]]:
    bases = make_bases(root / "bases", env)
    for (loader, fmt), base in bases.items():  # the unmutated saves load
        (got,) = attempts(env.loader(loader), [base], weights_only=loader in PEERS)
        assert got["outcome"] == "loaded", (loader, fmt, got)
    muts = mutations(bases)
    dirs = []
    for i, m in enumerate(muts):
        d = (write or root) / f"{i:04d}"
        shutil.copytree(bases[(m.loader, m.fmt)], d)
        m.apply(Save(d, m.fmt))
        dirs.append(d)
        if write is not None:
            (d.parent / f"{i:04d}.id").write_text(f"{m.loader}\n{m.id}\n")
    if write is not None:
        return []
    results: dict[int, dict] = {}
    for loader in (*LOADERS, *PEERS):
        idx = [i for i, m in enumerate(muts) if m.loader == loader]
        results.update(zip(idx, attempts(env.loader(loader), [dirs[i] for i in idx], weights_only=loader in PEERS)))
    for d in dirs:
        _remove(d)
    return [(m, results[i]) for i, m in enumerate(muts)]


def _remove(d: Path) -> None:
    for extra in (d.parent / (d.name + ".elsewhere"), d.parent / (d.name + ".json")):
        extra.unlink(missing_ok=True)
    shutil.rmtree(d, ignore_errors=True)


def exempt(m: Mutation) -> bool:
    """The stated exception: flipped bytes in a file without a checksum (format version 1, a peer's
    pickle) may leave finite values of the right shapes."""
    return m.cls == "byte flips" and m.fmt in ("v1", "peer")


def table(results: list[tuple[Mutation, dict]]) -> str:
    """loader × class: tried / refused with a named error / loaded (and any other outcome)."""
    lines = ["| loader | " + " | ".join(CLASSES) + " | all |", "|---" * (len(CLASSES) + 2) + "|"]
    for loader in (*LOADERS, *PEERS, None):
        cells = []
        for cls in (*CLASSES, None):
            rows = [(m, r) for m, r in results if (loader is None or m.loader == loader) and (cls is None or m.cls == cls)]
            if not rows:
                cells.append("-")
                continue
            named = sum(r["outcome"] == "named" for _, r in rows)
            loaded = sum(r["outcome"] == "loaded" for _, r in rows)
            other = len(rows) - named - loaded
            cells.append(f"{len(rows)} / {named} / {loaded}" + (f" / {other} other" if other else ""))
        lines.append(f"| {loader or '**all**'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the test
@pytest.fixture(scope="module")
def env() -> Env:
    return Env(sl.wrap(_model()), _model())


@pytest.fixture(scope="module")
def results(env, tmp_path_factory) -> list[tuple[Mutation, dict]]:
    return run_all(tmp_path_factory.mktemp("fuzz"), env)


def test_every_mutated_file_is_refused_with_a_named_error(results):
    bad = [f"{m.id}: {r['outcome']}: {r.get('error', '')}" for m, r in results
           if r["outcome"] != "named" and not (exempt(m) and r["outcome"] == "loaded")]
    assert not bad, f"{len(bad)} of {len(results)} mutations:\n" + "\n".join(bad[:40])


def test_no_attempt_adds_100_mb(results):
    worst = max(results, key=lambda mr: mr[1]["memory"])
    assert worst[1]["memory"] < MEMORY_LIMIT, (worst[0].id, worst[1]["memory"] / 2**20)


def test_the_battery_is_large_and_covers_every_loader_and_class(results):
    assert len(results) >= 200
    assert {(m.loader, m.cls) for m, _ in results if m.loader in LOADERS} == {(x, c) for x in LOADERS for c in CLASSES}
    no_fingerprint = {(x, c) for x in PEERS for c in CLASSES if c != "fingerprint"}  # a peer's save has none
    assert {(m.loader, m.cls) for m, _ in results if m.loader in PEERS} == no_fingerprint
    assert {m.fmt for m, _ in results} == {"v1", "v2", "peer"}
    assert len({m.id for m, _ in results}) == len(results)  # names are unique


def test_each_class_holds_files_the_previous_code_accepted(results):
    """Measured once against the code before this format (see the module docstring)."""
    accepted = set(json.loads((HERE / "fuzz_files_main.json").read_text())["accepted"])
    ids = {m.id: m for m, _ in results}
    assert accepted <= set(ids), sorted(accepted - set(ids))[:5]
    assert {ids[i].cls for i in accepted} == set(CLASSES)  # (the peers' importers are new: nothing to compare)


def test_a_folder_that_is_itself_a_link_still_loads(env, tmp_path):
    """Links inside a save are refused; the save's folder may be a link (``latest -> checkpoint-500``)."""
    env.lab.save(tmp_path / "checkpoint-500", [sl.Scale(SITE, factor=2.0)])
    os.symlink(tmp_path / "checkpoint-500", tmp_path / "latest")
    assert env.lab.load_interventions(tmp_path / "latest")[0].factor == 2.0


if __name__ == "__main__":  # pragma: no cover
    import tempfile

    torch.set_num_threads(1)
    e = Env(sl.wrap(_model()), _model())
    with tempfile.TemporaryDirectory() as tmp:
        if len(sys.argv) > 2 and sys.argv[1] == "--write":
            Path(sys.argv[2]).mkdir(parents=True)
            run_all(Path(tmp), e, write=Path(sys.argv[2]))
            print(f"wrote the mutated saves to {sys.argv[2]}")
        else:
            res = run_all(Path(tmp), e)
            print(table(res))
            print(f"{len(res)} mutations; peak extra memory {max(r['memory'] for _, r in res) / 2**20:.1f} MB")
            for m, r in res:
                if r["outcome"] != "named":
                    print(m.id, r)
