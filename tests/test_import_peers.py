"""``import_pyreft`` and ``import_pyvene``: a peer's save as steerlab objects, with equal outputs.

Each peer builds, randomises and saves its interventions with its own code
(pyreft 0.1.0: all six ReFT types; pyvene 0.1.8: full-rotation and low-rank
DAS and the vanilla interchange); steerlab imports the folder onto a fresh
copy of the same model and must produce the peer's outputs on the same
inputs and positions. These are the only steerlab functions that read a
pickle (``weights_only=True``, flat tensor dictionaries only); the last tests
show what they refuse and that no steerlab loader reaches them.
"""

from __future__ import annotations

import ast
import io
import os
import pickle
import shutil
from pathlib import Path

import pyreft  # the test environment installs the peers with --no-deps (README)
import pyvene as pv
import pytest
import torch

import steerlab as sl
from steerlab import reft
from tests.archs import tiny_model
from tests.reliability import one_thread_fixture

_one_thread = one_thread_fixture()
ROOT = Path(__file__).resolve().parents[1]
D, R = 32, 4
POS = [[1, 4], [2, 5]]
PYREFT_TYPES = [pyreft.LoreftIntervention, pyreft.NoreftIntervention, pyreft.DireftIntervention, pyreft.NodireftIntervention,
                pyreft.ConsreftIntervention, pyreft.LobireftIntervention]


def _inputs(seed: int) -> dict:
    ids = torch.randint(3, 90, (2, 7), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _pyreft_save(folder: Path, act_fn=None):
    """A pyreft model with one intervention of every type (weights moved off their initial values), saved by pyreft."""
    torch.manual_seed(0)
    reps = [{"layer": i % 3, "component": "block_output", "low_rank_dimension": R,
             "intervention": K(embed_dim=D, low_rank_dimension=R, dtype=torch.float32, add_bias=False, act_fn=act_fn)}
            for i, K in enumerate(PYREFT_TYPES)]
    prm = pyreft.get_reft_model(tiny_model("llama"), pyreft.ReftConfig(representations=reps), set_device=False)
    with torch.no_grad():
        for v in prm.interventions.values():
            for n, p in (v[0] if isinstance(v, tuple) else v).named_parameters():
                if "rotate" not in n:
                    p.add_(0.3 * torch.randn_like(p))
    prm.save(str(folder))
    return prm


@pytest.mark.parametrize("act_fn", [None, "gelu"])
def test_import_pyreft_equals_pyreft_for_every_type(tmp_path, act_fn):
    prm = _pyreft_save(tmp_path / "peer", act_fn)
    inputs = _inputs(5)
    with torch.no_grad():
        theirs = prm(inputs, unit_locations={"sources->base": (None, [POS] * len(PYREFT_TYPES))})[1].logits
    rm = reft.import_pyreft(tmp_path / "peer", tiny_model("llama"), positions="per-call", act_fn=act_fn)
    assert [type(iv).__name__ for iv in rm.interventions] == ["LoReFT", "NoReFT", "DiReFT", "DiReFT", "ConsReFT", "LobiReFT"]
    assert [iv.orthogonal for iv in rm.interventions if isinstance(iv, reft.DiReFT)] == [True, False]
    with torch.no_grad():
        ours = rm(**inputs, intervention_positions=torch.tensor(POS)).logits
        with rm.disabled():
            plain = rm.model(**inputs).logits
    assert (ours - plain).abs().max() > 1e-2  # the imported edits act
    torch.testing.assert_close(ours, theirs, atol=2e-6, rtol=1e-5)
    # and they save in steerlab's own format like any ReftModel
    rm.save_pretrained(tmp_path / "ours")
    rm.unwrap()
    again = reft.ReftModel.from_pretrained(tmp_path / "ours", tiny_model("llama"))
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs, intervention_positions=torch.tensor(POS)).logits, ours, atol=0, rtol=0)


def test_import_pyvene_equals_pyvene(tmp_path):
    torch.manual_seed(0)
    cfg = pv.IntervenableConfig([
        {"layer": 0, "component": "block_output", "intervention_type": pv.RotatedSpaceIntervention},
        {"layer": 1, "component": "block_output", "low_rank_dimension": 3, "intervention_type": pv.LowRankRotatedSpaceIntervention},
        {"layer": 2, "component": "mlp_output", "intervention_type": pv.VanillaIntervention},
    ])
    ivm = pv.IntervenableModel(cfg, tiny_model("llama"))
    for v in ivm.interventions.values():
        v = v[0] if isinstance(v, tuple) else v
        if isinstance(v, pv.RotatedSpaceIntervention):
            v.set_interchange_dim(5)  # the full rotation swaps its first 5 coordinates
    ivm.save(str(tmp_path / "peer"))
    base, source = _inputs(1), _inputs(2)
    bp, sp = [[3], [5]], [[4], [2]]
    with torch.no_grad():
        _, theirs = ivm(base, [source], unit_locations={"sources->base": ([sp] * 3, [bp] * 3)})
    lab = sl.wrap(tiny_model("llama"))
    ivs = sl.import_pyvene(tmp_path / "peer", lab)
    assert [(type(iv).__name__, iv.site, getattr(iv, "size", None)) for iv in ivs] == [
        ("SubspaceInterchange", "blocks.0.resid_post", 5), ("SubspaceInterchange", "blocks.1.resid_post", 3), ("Interchange", "blocks.2.mlp.out", None)]
    for iv in ivs:
        iv.source = source
    with torch.no_grad():
        ours = lab.run(base, ivs, positions=torch.tensor(bp), source_positions=torch.tensor(sp)).logits
        assert (ours - lab.run(base).logits).abs().max() > 1e-2
    torch.testing.assert_close(ours, theirs.logits, atol=2e-6, rtol=1e-5)


# --------------------------------------------------------------------------- what the importers refuse
def _bin(folder: Path) -> Path:
    return sorted(folder.glob("intkey_*.bin"))[0]


def _zip_of(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


CASES = [
    ("a class reference in the pickle", lambda d: _bin(d).write_bytes(_zip_of({"weight": os.system})), "is not a plain tensor file"),
    ("a list, not named tensors", lambda d: _bin(d).write_bytes(_zip_of([torch.zeros(2)])), "not a dictionary of named tensors"),
    ("a legacy pickle", lambda d: _bin(d).write_bytes(pickle.dumps({"weight": torch.zeros(4, 32).numpy()})), "not a torch zip archive"),
    ("a NaN tensor", lambda d: _bin(d).write_bytes(_zip_of({**torch.load(_bin(d), weights_only=True), "bias": torch.full((4,), float("nan"))})),
     "NaN or infinite"),
    ("a tensor of another shape", lambda d: _bin(d).write_bytes(_zip_of({**torch.load(_bin(d), weights_only=True), "weight": torch.zeros(4, 31)})),
     "expected a float tensor [4, 32]"),
    ("a truncated file", lambda d: _bin(d).write_bytes(_bin(d).read_bytes()[:300]), "not a torch zip archive"),
    ("a linked file", lambda d: _link_first_bin(d), "symbolic link"),
    ("an unknown class", lambda d: _edit_config(d, lambda c: c["intervention_types"].__setitem__(0, "<class 'evil.Module'>")),
     "intervention type \"<class 'evil.Module'>\""),
    ("a key that leaves the folder", lambda d: _edit_config(d, lambda c: c["sorted_keys"].__setitem__(0, "../../etc/passwd")), "expected a pyvene key"),
    ("a huge rank", lambda d: _edit_config(d, lambda c: c["representations"][0].__setitem__(4, 10**9)), "low_rank_dimension 1000000000"),
    ("a layer the model lacks", lambda d: _edit_config(d, lambda c: c["representations"][0].__setitem__(0, 40)), "unknown site 'blocks.40.resid_post'"),
    ("an unknown component", lambda d: _edit_config(d, lambda c: c["representations"][0].__setitem__(1, "model.layers[0].output")), "component"),
    ("lists of other lengths", lambda d: _edit_config(d, lambda c: c["sorted_keys"].pop()), "expected as many of each"),
    ("no config.json", lambda d: (d / "config.json").unlink(), "config.json does not exist"),
]


def _link_first_bin(d: Path) -> None:
    first = _bin(d)
    shutil.copy(first, d.parent / "elsewhere.bin")
    first.unlink()
    os.symlink(d.parent / "elsewhere.bin", first)


def _edit_config(d: Path, fn) -> None:
    import json

    c = json.loads((d / "config.json").read_text())
    fn(c)
    (d / "config.json").write_text(json.dumps(c))


@pytest.fixture(scope="module")
def peer_save(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("peer") / "save"
    _pyreft_save(folder)
    return folder


@pytest.mark.parametrize("name,craft,phrase", CASES, ids=[c[0] for c in CASES])
def test_a_damaged_or_hostile_peer_save_is_refused(peer_save, tmp_path, name, craft, phrase):
    d = tmp_path / "save"
    shutil.copytree(peer_save, d)
    craft(d)
    model = tiny_model("llama")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(sl.FileFormatError) as info:
        reft.import_pyreft(d, model, positions="l1")
    assert phrase in str(info.value), str(info.value)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags and not model._forward_hooks


def test_steerlab_loaders_never_reach_the_peer_readers(peer_save):
    """``from_pretrained`` on a peer's folder names the pickles it will not load; statically, no loader
    module imports the two importers (they alone call ``torch.load``)."""
    with pytest.raises(sl.FileFormatError, match=r"has no steerlab.json; found \['intkey_.*\.bin'.*which steerlab never loads"):
        reft.ReftModel.from_pretrained(peer_save, tiny_model("llama"))
    loaders = ["interventions/fileformat.py", "interventions/serialize.py", "interventions/subspace.py", "interventions/sweep_result.py",
               "interventions/lab.py", "reft/serialize.py", "reft/model.py", "alignment/results.py", "alignment/search.py", "steerlab/cli.py",
               "steerlab/training.py"]
    for rel in loaders:
        tree = ast.parse((ROOT / rel).read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not any(m.endswith(("from_pyvene", "from_pyreft")) for m in names), rel
    def calls_torch_load(p: Path) -> bool:
        return any(isinstance(n, ast.Call) and ast.unparse(n.func).endswith("torch.load") for n in ast.walk(ast.parse(p.read_text())))

    callers = {p.relative_to(ROOT).as_posix() for pkg in ("interventions", "alignment", "reft", "viz", "steerlab")
               for p in (ROOT / pkg).rglob("*.py") if calls_torch_load(p)}
    assert callers == {"interventions/from_pyvene.py"}


def test_the_layout_conventions_are_stated():
    text = (ROOT / "docs" / "reft.md").read_text()
    assert "r × d" in text and "d × r" in text and "import_pyreft" in text and "rotate_layer" in text
