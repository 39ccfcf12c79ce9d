"""RELIABILITY rows 3-6: save -> load round trips, dtypes, identity and removal, atomic writes.

Every round trip first shows the (trained) intervention changes the outputs,
then requires ``torch.equal`` outputs after loading, identical state-dict keys
and tensors, and the saved dtypes; through ``lab.save``/``lab.load_interventions``
and through a saved run graph (``lab.save(dir, graph)`` / ``lab.load_graph``).
"""

from __future__ import annotations

import json
import os
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


# --------------------------------------------------------------------------- atomic writes
def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.mark.parametrize("exc", [OSError("injected: disk full"), KeyboardInterrupt()], ids=["oserror", "interrupt"])
def test_a_save_that_fails_midway_leaves_the_old_directory(tmp_path, monkeypatch, exc):
    lab, x, _ = setup("llama", torch.float32)
    first = sl.Add(SITE, torch.ones(lab.d_model), positions=[-1])
    lab.save(tmp_path / "ivs", [first])
    old = _files(tmp_path / "ivs")
    real = fileformat.save_file

    def failing(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)  # the weights are half there ...
        Path(filename).write_bytes(Path(filename).read_bytes()[:50])
        raise exc  # ... when the write fails

    monkeypatch.setattr(fileformat, "save_file", failing)
    with pytest.raises(type(exc)):
        lab.save(tmp_path / "ivs", [sl.Add(SITE, torch.full((lab.d_model,), 9.0))])
    with pytest.raises(type(exc)):
        lab.save(tmp_path / "new", [first])
    assert sorted(os.listdir(tmp_path)) == ["ivs"], "a temporary directory was left behind"
    assert _files(tmp_path / "ivs") == old
    monkeypatch.undo()
    (loaded,) = lab.load_interventions(tmp_path / "ivs")
    assert torch.equal(loaded.vector, first.vector)


def test_a_save_over_an_existing_directory_replaces_it_whole(tmp_path):
    lab, x, _ = setup("llama", torch.float32)
    lab.save(tmp_path / "ivs", [sl.Add(SITE, torch.ones(lab.d_model)), sl.Scale(SITE, factor=2.0)])
    lab.save(tmp_path / "ivs", [sl.Scale(SITE, factor=3.0)])
    (iv,) = lab.load_interventions(tmp_path / "ivs")
    assert isinstance(iv, sl.Scale) and iv.factor == 3.0
    assert sorted(os.listdir(tmp_path)) == ["ivs"] and sorted(os.listdir(tmp_path / "ivs")) == ["steerlab.json", "weights.safetensors"]


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
