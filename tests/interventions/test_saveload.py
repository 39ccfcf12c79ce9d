"""RELIABILITY rows 3-6: save -> load round trips, dtypes, identity and removal, atomic writes.

Every round trip first shows the (trained) intervention changes the outputs,
then requires ``torch.equal`` outputs after loading, identical state-dict keys
and tensors, and the saved dtypes; through ``lab.save``/``lab.load_interventions``
and through a saved run graph (``lab.save(dir, graph)`` / ``lab.load_graph``).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch

import steerlab as sl
from steerlab.interventions import fileformat
from tests.archs import ENCODERS, tiny_inputs, tiny_model
from tests.reliability import one_thread_fixture

_one_thread = one_thread_fixture()

ARCHS = ["gpt2", "gpt_neo", "gpt_neox", "llama", "qwen3", "gemma2", "phi3", "bert"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TYPES = ["interchange", "subspace_interchange", "boundless_subspace_interchange", "sigmoid_mask", "add", "zero", "mean", "noise", "scale", "collect"]
SITE = "blocks.1.resid_post"
_LABS: dict = {}


def setup(arch: str, dtype: torch.dtype):
    """A wrapped tiny model (cached), a base batch (padded) and a source batch."""
    key = (arch, dtype)
    if key not in _LABS:
        model = tiny_model(arch, dtype=dtype)
        side = "right" if arch in ENCODERS else "left"
        _LABS[key] = (sl.wrap(model), tiny_inputs(arch, pad=2, side=side), tiny_inputs(arch, seed=4))
    return _LABS[key]


def out(result) -> torch.Tensor:
    o = result.output
    return o.logits if hasattr(o, "logits") and o.logits is not None else o.last_hidden_state


def train(lab, iv, x, steps: int = 3) -> None:
    """A few Adam steps pushing the last position's first outputs up."""
    before = {k: v.clone() for k, v in iv.state_dict().items()}
    opt = torch.optim.Adam([p for p in iv.parameters() if p.requires_grad], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss = -out(lab.run(x, [iv]))[:, -1, :5].float().sum()
        loss.backward()
        opt.step()
    changed = [k for k in before if not torch.equal(before[k], iv.state_dict()[k])]
    assert changed, f"training did not change {type(iv).__name__}"


def make(kind: str, lab, x, src) -> sl.Intervention:
    d = lab.d_model
    if kind == "interchange":
        return sl.Interchange(SITE, positions=[-1], source=src)
    if kind == "subspace_interchange":
        iv = sl.SubspaceInterchange(SITE, size=3, positions=[-1], source=src)
    elif kind == "boundless_subspace_interchange":
        iv = sl.BoundlessSubspaceInterchange(SITE, positions=[-1], source=src, init_boundary=0.3, temperature=0.5)
    elif kind == "sigmoid_mask":
        iv = sl.SigmoidMask(SITE, positions=[-1], source=src, init=-1.0)
    elif kind == "add":
        iv = sl.Add(SITE, positions=[-1], trainable=True, width=d, alpha=2.0)
    elif kind == "zero":
        return sl.Zero("blocks.1.attn.z", heads=[1], positions=[0, -1])
    elif kind == "mean":
        ref = lab.collect(src, "blocks.1.mlp.out")["blocks.1.mlp.out"]
        return sl.Mean("blocks.1.mlp.out", ref.float().mean((0, 1)), positions=[-1])
    elif kind == "noise":
        return sl.Noise(SITE, std=0.5, seed=3, positions=[0, -1])
    elif kind == "scale":
        return sl.Scale("blocks.0.attn.out", factor=1.7, dims=[0, 3, 5])
    elif kind == "collect":
        return sl.Collect("blocks.1.attn.z", heads=[0, 2], positions=[-1], name="z")
    else:
        raise AssertionError(kind)
    lab.facts.place(iv)
    train(lab, iv, x)
    return iv


def assert_same_state(a: sl.Intervention, b: sl.Intervention) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, (k, sa[k].dtype, sb[k].dtype)
        assert torch.equal(sa[k], sb[k]), k
    assert type(a) is type(b) and a.placement() == b.placement() and a.arguments() == b.arguments() and a.width == b.width


def _load_quietly(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no missing-key or unpickling warnings either
        return fn(*args)


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_reproduces_outputs_exactly(arch, dtype, kind, tmp_path):
    lab, x, src = setup(arch, DTYPES[dtype])
    iv = make(kind, lab, x, src)
    base = lab.run(x)
    steered = lab.run(x, [iv])
    if kind == "collect":
        assert torch.equal(out(steered), out(base)) and steered.cache["z"].shape[-2:] == (2, lab.d_model // 4)
    else:
        assert not torch.equal(out(steered), out(base)), "the intervention changes nothing: the round trip would prove nothing"

    # 1. the interventions file
    lab.save(tmp_path / "ivs", [iv])
    (iv2,) = _load_quietly(lab.load_interventions, tmp_path / "ivs")
    assert_same_state(iv, iv2)
    assert iv2.source is None  # sources are data of a call, not of the intervention
    if iv.sourced:
        iv2.source = src
    again = lab.run(x, [iv2])
    assert torch.equal(out(again), out(steered))
    if kind == "collect":
        assert torch.equal(again.cache["z"], steered.cache["z"])

    # 2. the run graph (with its inputs and the edge to the source run)
    g = sl.Graph()
    if iv.sourced:
        iv.source = g.run(src, name="source")
    b = g.run(x, [iv], name="base")
    first = lab.execute(g)[b]
    lab.save(tmp_path / "graph", g)
    g2 = _load_quietly(lab.load_graph, tmp_path / "graph")
    assert [r.name for r in g2.runs] == [r.name for r in g.runs]
    assert_same_state(iv, g2.runs[-1].interventions[0])
    second = lab.execute(g2)[g2.runs[-1]]
    assert torch.equal(out(second), out(first)) and torch.equal(out(first), out(steered))
    if kind == "collect":
        assert torch.equal(second.cache["z"], first.cache["z"])


def test_every_serialisable_type_of_the_base_layer_is_covered():
    base = {name for name, cls in sl.registered().items() if cls.__module__.startswith("steerlab.interventions.ops.")}
    assert base - {"lambda"} == set(TYPES)


def test_graph_with_a_source_value_and_path_patching_round_trips(tmp_path):
    lab, x, src = setup("llama", torch.float32)
    sv = lab.source_value(sl.Interchange("blocks.0.resid_post", positions=[-1], source=src))
    das = sl.SubspaceInterchange("blocks.0.resid_post", size=2, positions=[-1], source=sv)
    lab.facts.place(das)
    train(lab, das, x)
    g = sl.Graph()
    clean = g.run(src, name="clean")
    mid = g.run(x, [das, sl.Interchange("blocks.1.attn.z", heads=[2], positions=[-1], source=clean)], name="mid")
    end = g.run(x, [sl.Interchange("blocks.2.resid_post", positions=[-1], source=mid)], name="end")
    want = out(lab.execute(g)[end])
    assert not torch.equal(want, out(lab.run(x)))
    lab.save(tmp_path / "g", g)
    g2 = lab.load_graph(tmp_path / "g")
    assert torch.equal(out(lab.execute(g2)[g2.runs[-1]]), want)
    assert torch.equal(g2.runs[1].interventions[0].source.value, sv.value)


# --------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_saved_and_reloaded_dtypes_are_the_intended_ones(dtype, tmp_path):
    """Each parameter keeps its dtype; an orthonormal map's A is fp32 whatever the model's dtype,
    even after ``.to(dtype)`` on the intervention."""
    lab, x, src = setup("llama", dtype)
    d = lab.d_model
    g = torch.Generator().manual_seed(0)
    ivs = [
        sl.Add(SITE, torch.randn(d, generator=g).to(dtype), trainable=True, positions=[-1]),
        sl.Mean("blocks.1.mlp.out", torch.randn(d, generator=g).to(dtype), positions=[0]),
        sl.SigmoidMask(SITE, width=d, positions=[-1], source=src).to(dtype),
        sl.SubspaceInterchange("blocks.0.resid_post", size=2, width=d, positions=[-1], source=src).to(dtype),
        sl.BoundlessSubspaceInterchange("blocks.2.resid_post", width=d, positions=[-1], source=src),
    ]
    intended = [
        {"vector": dtype},
        {"mean": dtype},
        {"logits": dtype},
        {"rotation.weight": torch.float32},
        {"rotation.weight": torch.float32, "boundary": torch.float32},
    ]
    for iv, want in zip(ivs, intended):
        assert {k: v.dtype for k, v in iv.state_dict().items()} == want
    steered = out(lab.run(x, ivs))
    assert not torch.equal(steered, out(lab.run(x)))
    lab.save(tmp_path / "d", ivs)
    manifest = json.loads((tmp_path / "d" / "steerlab.json").read_text())["tensors"]
    assert manifest["0.vector"]["dtype"] == str(dtype).removeprefix("torch.")
    assert manifest["3.rotation.weight"]["dtype"] == "float32"
    loaded = lab.load_interventions(tmp_path / "d")
    for iv, want in zip(loaded, intended):
        assert {k: v.dtype for k, v in iv.state_dict().items()} == want
        if iv.sourced:
            iv.source = src
    assert torch.equal(out(lab.run(x, loaded)), steered)


# --------------------------------------------------------------------------- identity and removal
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("arch", ARCHS)
def test_null_interventions_reproduce_the_base_outputs_exactly(arch, dtype):
    lab, x, src = setup(arch, DTYPES[dtype])
    base = out(lab.run(x))
    plain = lab.model(**x)
    assert torch.equal(base, plain.logits if hasattr(plain, "logits") else plain.last_hidden_state)
    d = lab.d_model
    nulls = [
        sl.Scale(SITE, factor=1.0),
        sl.Add(SITE, torch.zeros(d), positions=[0, -1]),
        sl.Add("blocks.0.mlp.out", torch.zeros(d)),
        sl.Interchange(SITE, source=x),  # the base as its own source
        sl.SubspaceInterchange("blocks.1.attn.z", size=3, heads=[1], positions=[-1], source=x),
        sl.SigmoidMask("blocks.0.resid_pre", positions=[0], source=x),
        sl.Collect("blocks.1.mlp.post"),
    ]
    for iv in nulls:
        assert torch.equal(out(lab.run(x, [iv])), base), iv
    assert torch.equal(out(lab.run(x, nulls)), base)


@pytest.mark.parametrize("arch", ARCHS)
def test_detach_and_reattach(arch):
    """Detached: the base outputs exactly; attached again: the steered outputs exactly."""
    model = tiny_model(arch)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    lab = sl.wrap(model)
    x = tiny_inputs(arch, pad=1)
    steer = sl.Add(SITE, torch.randn(lab.d_model, generator=torch.Generator().manual_seed(1)) * 4, positions=[-1])
    fwd = lambda: out(sl.RunResult(model(**x)))  # noqa: E731
    with torch.no_grad():
        base = fwd()
        steered = out(lab.run(x, [steer]))
        assert not torch.equal(steered, base)
        att = lab.attach(steer)
        assert torch.equal(fwd(), steered)
        att.detach()
        assert torch.equal(fwd(), base)
        att.attach()
        assert torch.equal(fwd(), steered)
        att.detach()
        with lab.attach(steer):
            assert torch.equal(fwd(), steered)
        assert torch.equal(fwd(), base)
        lab.attach(steer)
        lab.unwrap()  # detaches everything and restores requires_grad
        assert torch.equal(fwd(), base)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


# --------------------------------------------------------------------------- what cannot be saved
def test_saving_a_lambda_raises_not_serialisable(tmp_path):
    lab, x, _ = setup("llama", torch.float32)

    def double(h):
        return 2 * h

    with pytest.raises(sl.NotSerialisable, match=r"Lambda at 'blocks.1.resid_post' wraps Python code \('double'\).*cannot be saved"):
        lab.save(tmp_path / "a", [sl.Scale(SITE, factor=2.0), sl.Lambda(SITE, double)])
    g = sl.Graph()
    g.run(x, [sl.Lambda(SITE, double)])
    with pytest.raises(sl.NotSerialisable, match="Lambda at 'blocks.1.resid_post'"):
        lab.save(tmp_path / "b", g)

    class Mine(sl.Intervention):
        def forward(self, base, source=None):
            return base

    with pytest.raises(sl.NotSerialisable, match="Mine is not registered"):
        lab.save(tmp_path / "c", [Mine(SITE)])
    g = sl.Graph()
    g.run(x, [sl.Interchange(SITE, source=x)])  # raw inputs as a source, not a run of the graph
    with pytest.raises(sl.NotSerialisable, match="reads from raw inputs"):
        lab.save(tmp_path / "d", g)
    assert sorted(os.listdir(tmp_path)) == []  # nothing half-written


# --------------------------------------------------------------------------- what a save owns, atomic writes
def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _user_files(d: Path) -> None:
    """A folder a researcher really saves into: notes, another checkpoint, a Trainer file, a hidden file."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "notes.md").write_text("layer 6 looks promising\n")
    (d / "checkpoint-100").mkdir()
    (d / "checkpoint-100" / "optimizer.pt").write_bytes(b"\x80\x04 not ours")
    (d / "training_args.bin").write_bytes(b"\x80\x04 the Trainer's")
    (d / "weights.safetensors.bak").write_bytes(b"a user's backup")
    (d / ".gitignore").write_text("*.pt\n")


def _ours(d: Path) -> list[str]:
    return sorted(n for n in os.listdir(d) if n == "steerlab.json" or n.startswith(("weights-", ".steerlab-")) or n == "weights.safetensors")


def test_a_save_touches_only_its_own_files(tmp_path):
    lab, x, _ = setup("llama", torch.float32)
    d = tmp_path / "exp"
    _user_files(d)
    theirs = _files(d)
    lab.save(d, [sl.Add(SITE, torch.ones(lab.d_model)), sl.Scale(SITE, factor=2.0)])
    first = fileformat.weights_path(d).name
    lab.save(d, [sl.Scale(SITE, factor=3.0)])  # a second save replaces the first, and only it
    (iv,) = lab.load_interventions(d)
    assert isinstance(iv, sl.Scale) and iv.factor == 3.0
    assert _ours(d) == ["steerlab.json", fileformat.weights_path(d).name] and fileformat.weights_path(d).name != first
    assert {k: v for k, v in _files(d).items() if k in theirs} == theirs and len(_files(d)) == len(theirs) + 2
    assert sorted(os.listdir(tmp_path)) == ["exp"]  # nothing beside the folder either


def test_saving_into_the_working_directory_keeps_it(tmp_path, monkeypatch):
    lab, x, _ = setup("llama", torch.float32)
    _user_files(tmp_path / "cwd")
    monkeypatch.chdir(tmp_path / "cwd")
    theirs = _files(Path.cwd())
    lab.save(os.getcwd(), [sl.Scale(SITE, factor=3.0)])
    assert Path.cwd().is_dir() and {k: v for k, v in _files(Path.cwd()).items() if k in theirs} == theirs
    assert lab.load_interventions(".")[0].factor == 3.0


def test_a_save_over_a_version_1_save_removes_only_that_save(tmp_path):
    lab, x, _ = setup("llama", torch.float32)
    d = tmp_path / "old"
    shutil.copytree(Path(__file__).resolve().parents[1] / "regression" / "v1" / "interventions", d)
    (d / "notes.md").write_text("keep me")
    assert [iv.type_name for iv in lab.load_interventions(d)][:2] == ["interchange", "subspace_interchange"]
    lab.save(d, [sl.Scale(SITE, factor=3.0)])
    assert sorted(os.listdir(d)) == sorted(["notes.md", "steerlab.json", fileformat.weights_path(d).name])
    assert json.loads((d / "steerlab.json").read_text())["version"] == fileformat.FORMAT_VERSION


@pytest.mark.parametrize("step", ["weights_write", "weights_rename", "commit_rename"])
@pytest.mark.parametrize("exc", [OSError(28, "injected: no space left on device"), KeyboardInterrupt()], ids=["oserror", "interrupt"])
def test_a_save_that_fails_midway_leaves_the_old_save(tmp_path, monkeypatch, exc, step):
    lab, x, _ = setup("llama", torch.float32)
    d = tmp_path / "ivs"
    _user_files(d)
    first = sl.Add(SITE, torch.ones(lab.d_model), positions=[-1])
    lab.save(d, [first])
    old = _files(d)
    calls = {"write": 0, "replace": 0}
    real_write, real_replace = os.write, os.replace

    def write(fd, data):
        calls["write"] += 1
        if step == "weights_write" and calls["write"] == 1:
            real_write(fd, bytes(data)[: len(data) // 2])  # half the weights are on disk ...
            raise exc  # ... when the write fails
        return real_write(fd, data)

    def replace(a, b):
        calls["replace"] += 1
        if (step, calls["replace"]) in (("weights_rename", 1), ("commit_rename", 2)):
            raise exc
        return real_replace(a, b)

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "replace", replace)
    want = sl.SaveError if isinstance(exc, OSError) else KeyboardInterrupt
    with pytest.raises(want):
        lab.save(d, [sl.Add(SITE, torch.full((lab.d_model,), 9.0))])
    monkeypatch.undo()
    assert _files(d) == old, "the old save or a user's file changed, or a temporary file was left behind"
    (loaded,) = lab.load_interventions(d)
    assert torch.equal(loaded.vector, first.vector)
    if isinstance(exc, OSError):
        calls.update(write=0, replace=0)
        monkeypatch.setattr(os, "write", write)
        monkeypatch.setattr(os, "replace", replace)
        with pytest.raises(sl.SaveError, match="the save that was there, if any, is unchanged"):
            lab.save(tmp_path / "new", [first])  # a first save into a new folder: it stays without a save
        monkeypatch.undo()
        assert os.listdir(tmp_path / "new") == []


@pytest.mark.parametrize("what", ["folder", "steerlab.json", "weights"])
def test_a_read_only_save_is_refused_not_replaced(tmp_path, what):
    lab, x, _ = setup("llama", torch.float32)
    d = tmp_path / "ro"
    lab.save(d, [sl.Scale(SITE, factor=2.0)])
    target = {"folder": d, "steerlab.json": d / "steerlab.json", "weights": fileformat.weights_path(d)}[what]
    mode = target.stat().st_mode
    target.chmod(mode & ~0o222)
    try:
        old = _files(d)
        with pytest.raises(sl.SaveError, match="read-only") as info:
            lab.save(d, [sl.Scale(SITE, factor=5.0)])
        assert isinstance(info.value, OSError) and str(target) in str(info.value)
        assert _files(d) == old
    finally:
        target.chmod(mode)
    assert lab.load_interventions(d)[0].factor == 2.0


def test_a_file_where_the_folder_should_be_is_refused(tmp_path):
    lab, x, _ = setup("llama", torch.float32)
    (tmp_path / "f").write_text("mine")
    with pytest.raises(sl.SaveError, match="is a file; a steerlab save is a folder"):
        lab.save(tmp_path / "f", [sl.Scale(SITE, factor=2.0)])
    assert (tmp_path / "f").read_text() == "mine"


def test_weights_that_are_not_finite_are_refused_at_save(tmp_path):
    lab, x, _ = setup("llama", torch.float32)
    v = torch.ones(lab.d_model)
    v[3] = float("nan")
    with pytest.raises(sl.FileFormatError, match=r"tensor\(s\) \['0.vector'\] hold NaN or infinite values"):
        lab.save(tmp_path / "nan", [sl.Add(SITE, v)])
    assert not (tmp_path / "nan").exists()


# --------------------------------------------------------------------------- Subspace
def test_subspace_round_trip(tmp_path):
    lab, x, src = setup("llama", torch.float32)
    basis = torch.linalg.qr(torch.randn(lab.d_model, 3, generator=torch.Generator().manual_seed(2)))[0].T
    sub = sl.Subspace(basis, SITE, positions=[-1], metadata={"variable": "sum", "iia": 0.93, "method": "das"})
    steered = out(lab.run(x, [sub.intervention(source=src)]))
    assert not torch.equal(steered, out(lab.run(x)))
    sub.save(tmp_path / "s", fingerprint=lab.fingerprint())
    back = sl.Subspace.load(tmp_path / "s", fingerprint=lab.fingerprint())
    assert torch.equal(back.basis, sub.basis) and back.basis.dtype == torch.float32
    assert (back.site, back.positions, back.heads, back.metadata) == (sub.site, sub.positions, sub.heads, sub.metadata)
    assert torch.equal(out(lab.run(x, [back.intervention(source=src)])), steered)
    other, _, _ = setup("gpt2", torch.float32)
    with pytest.raises(sl.FingerprintMismatch, match="model_type: file 'llama' vs model 'gpt2'"):
        sl.Subspace.load(tmp_path / "s", fingerprint=other.fingerprint())
    head = sl.Subspace(torch.eye(8)[:2], "blocks.1.attn.z", heads=[1, 3])
    head.save(tmp_path / "h")
    assert sl.Subspace.load(tmp_path / "h").heads == (1, 3)


# --------------------------------------------------------------------------- loading: side effects and races
def test_loading_leaves_the_callers_random_numbers_alone(tmp_path):
    lab, x, _ = setup("llama", torch.float32)
    lab.save(tmp_path / "d", [sl.SubspaceInterchange(SITE, size=3, width=lab.d_model), sl.BoundlessSubspaceInterchange(SITE, width=lab.d_model)])
    torch.manual_seed(11)
    want = torch.rand(4)
    torch.manual_seed(11)
    lab.load_interventions(tmp_path / "d")  # rebuilding draws a random R before the saved one is assigned
    assert torch.equal(torch.rand(4), want)


def test_a_load_racing_a_save_reads_the_save_that_won(tmp_path, monkeypatch):
    """A save committing between the load's reading of steerlab.json and of the weights it names
    removes those weights: the load reads steerlab.json again and returns the new save."""
    lab, x, _ = setup("llama", torch.float32)
    d = tmp_path / "d"
    lab.save(d, [sl.Scale(SITE, factor=2.0)])
    real = fileformat._read_meta
    calls = []

    def racing(directory):
        meta = real(directory)
        if not calls:
            lab.save(d, [sl.Add(SITE, torch.ones(lab.d_model))])  # another process commits just now
        calls.append(meta["config"]["interventions"][0]["type"])
        return meta

    monkeypatch.setattr(fileformat, "_read_meta", racing)
    (iv,) = lab.load_interventions(d)
    assert calls[:2] == ["scale", "add"] and isinstance(iv, sl.Add)
