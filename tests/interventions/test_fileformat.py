"""RELIABILITY row 11: malformed files.

Each crafted directory must fail to load with a named steerlab error
(``FileFormatError`` or its subclasses ``FingerprintMismatch`` /
``UnknownInterventionType``) whose message names the problem. While these
tests run, every unpickling entry point raises, so a load that tried to
unpickle anything would fail differently. A static check finds no
``pickle`` / ``torch.load`` on any steerlab load path.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import pickle
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import steerlab as sl
from steerlab.interventions import fileformat
from tests.archs import tiny_inputs, tiny_model
from tests.reliability import one_thread_fixture

_one_thread = one_thread_fixture()
ROOT = Path(__file__).resolve().parents[2]


class Unpickled(BaseException):
    """Raised by every unpickling entry point during these tests (a BaseException: nothing swallows it)."""


@pytest.fixture(autouse=True)
def _no_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise Unpickled("a steerlab load path tried to unpickle")

    for mod, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(mod, name, refuse)


@pytest.fixture(scope="module")
def lab():
    return sl.wrap(tiny_model("llama"))


@pytest.fixture(scope="module")
def other_labs():
    return {
        "width": sl.wrap(_llama(hidden_size=48)),
        "layers": sl.wrap(_llama(num_hidden_layers=4)),
        "vocab": sl.wrap(_llama(vocab_size=120)),
        "model_type": sl.wrap(tiny_model("mistral")),
    }


def _llama(**over):
    import transformers as T

    from tests.archs import _DEC

    return T.LlamaForCausalLM(T.LlamaConfig(**{**_DEC, **over})).eval()


@pytest.fixture
def good(lab, tmp_path) -> Path:
    """A valid interventions directory: a trained-looking Add and a SubspaceInterchange."""
    d = tmp_path / "good"
    ivs = [
        sl.Add("blocks.1.resid_post", torch.arange(32.0), positions=[-1]),
        sl.SubspaceInterchange("blocks.0.resid_post", size=2, width=32, positions=[-1]),
    ]
    lab.save(d, ivs)
    return d


@pytest.fixture
def good_graph(lab, tmp_path) -> Path:
    x = tiny_inputs("llama")
    g = sl.Graph()
    s = g.run(tiny_inputs("llama", seed=3), name="src")
    g.run(x, [sl.Interchange("blocks.1.resid_post", positions=[-1], source=s)], name="base")
    d = tmp_path / "graph"
    lab.save(d, g)
    return d


# --------------------------------------------------------------------------- crafting helpers
def _meta(d: Path) -> dict:
    return json.loads((d / "steerlab.json").read_text())


def _set_meta(d: Path, meta) -> None:
    (d / "steerlab.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))


def _edit_meta(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def craft(d: Path) -> None:
        m = _meta(d)
        fn(m)
        _set_meta(d, m)

    return craft


def _weights(d: Path) -> bytes:
    return fileformat.weights_path(d).read_bytes()


def _set_weights(d: Path, data: bytes, *, reseal: bool = True) -> None:
    """Replace the weights with ``data``; ``reseal`` also records their new name, size and SHA-256
    in steerlab.json (a hand-crafted file whose checksum agrees, so the deeper checks are reached)."""
    path = fileformat.weights_path(d)
    if not reseal:
        path.write_bytes(data)
        return
    path.unlink()
    sha = hashlib.sha256(data).hexdigest()
    name = f"weights-{sha[:16]}.safetensors"
    (d / name).write_bytes(data)
    m = _meta(d)
    m["weights"] = {"file": name, "sha256": sha, "bytes": len(data)}
    _set_meta(d, m)


def _header(d: Path) -> tuple[dict, bytes]:
    raw = _weights(d)
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _with_header(d: Path, header: dict, body: bytes) -> None:
    h = json.dumps(header).encode()
    _set_weights(d, struct.pack("<Q", len(h)) + h + body)


def _rewrite_weights(d: Path, fn: Callable[[dict], dict]) -> None:
    """Re-save the weights file with ``fn(tensors)`` (a valid safetensors file, resealed)."""
    from safetensors.torch import load, save

    _set_weights(d, save(fn(load(_weights(d))), metadata={"format": "steerlab"}))


def _record(i: int, fn: Callable[[dict], None]):
    return _edit_meta(lambda m: fn(m["config"]["interventions"][i]))


def _offsets_out_of_range(d: Path) -> None:
    header, body = _header(d)
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"] = [0, len(body) + 4096]
    _with_header(d, header, body)


def _overlapping_offsets(d: Path) -> None:
    header, body = _header(d)
    names = [k for k in header if k != "__metadata__"]
    header[names[1]]["data_offsets"] = header[names[0]]["data_offsets"]
    _with_header(d, header, body)


def _header_says_another_dtype(d: Path) -> None:
    header, body = _header(d)
    name = next(k for k in header if k != "__metadata__")
    header[name]["dtype"] = "F64"  # twice the bytes its offsets cover
    _with_header(d, header, body)


def _pickle_weights(d: Path) -> None:
    buf = io.BytesIO()
    pickle.dump({"0.vector": torch.zeros(32).numpy()}, buf)
    _set_weights(d, buf.getvalue())


def _only_a_pickle_bin(d: Path) -> None:
    shutil.rmtree(d)
    d.mkdir()
    torch.save({"0.vector": torch.zeros(32)}, d / "adapter_model.bin")


def _deep_json(d: Path) -> None:
    _set_meta(d, "[" * 100_000 + "]" * 100_000)


# (name, craft(directory), expected error, a phrase the message must contain)
CASES = [
    ("truncated_weights", lambda d: _set_weights(d, _weights(d)[: len(_weights(d)) // 2]), sl.FileFormatError, "corrupt or truncated"),
    ("empty_weights", lambda d: _set_weights(d, b""), sl.FileFormatError, "corrupt or truncated"),
    ("garbage_weights", lambda d: _set_weights(d, bytes(range(256)) * 8), sl.FileFormatError, "corrupt or truncated"),
    ("header_length_too_large", lambda d: _set_weights(d, struct.pack("<Q", 2**40) + _weights(d)[8:]), sl.FileFormatError, "corrupt or truncated"),
    ("header_length_too_small", lambda d: _set_weights(d, struct.pack("<Q", 5) + _weights(d)[8:]), sl.FileFormatError, "corrupt or truncated"),
    ("header_not_json", lambda d: _set_weights(d, struct.pack("<Q", 12) + b"{not json!!}" + b"\0" * 64), sl.FileFormatError, "corrupt or truncated"),
    ("offsets_out_of_range", _offsets_out_of_range, sl.FileFormatError, "corrupt or truncated"),
    ("overlapping_offsets", _overlapping_offsets, sl.FileFormatError, "corrupt or truncated"),
    ("header_dtype_lies", _header_says_another_dtype, sl.FileFormatError, "corrupt or truncated"),
    ("pickle_as_weights", _pickle_weights, sl.FileFormatError, "corrupt or truncated"),
    ("only_a_pickle_bin", _only_a_pickle_bin, sl.FileFormatError, "adapter_model.bin'], which steerlab never loads"),
    ("manifest_dtype_wrong", _edit_meta(lambda m: m["tensors"]["0.vector"].update(dtype="float16")), sl.FileFormatError, "tensor '0.vector'"),
    ("manifest_shape_wrong", _edit_meta(lambda m: m["tensors"]["0.vector"].update(shape=[33])), sl.FileFormatError, "tensor '0.vector'"),
    ("weights_dtype_wrong", lambda d: _rewrite_weights(d, lambda t: {**t, "0.vector": t["0.vector"].double()}), sl.FileFormatError, "float64[32]"),
    ("shape_vs_intervention", lambda d: (_rewrite_weights(d, lambda t: {**t, "0.vector": torch.zeros(33)}),
                                         _edit_meta(lambda m: m["tensors"]["0.vector"].update(shape=[33]))(d)), sl.FileFormatError, "at width 32 has [32]"),
    ("missing_tensor", lambda d: _rewrite_weights(d, lambda t: {k: v for k, v in t.items() if k != "0.vector"}), sl.FileFormatError, "missing tensors ['0.vector']"),
    ("extra_tensor_in_file", lambda d: _rewrite_weights(d, lambda t: {**t, "evil": torch.zeros(1)}), sl.FileFormatError, "extra tensors ['evil']"),
    ("extra_tensor_everywhere", lambda d: (_rewrite_weights(d, lambda t: {**t, "7.w": torch.zeros(1)}),
                                           _edit_meta(lambda m: m["tensors"].update({"7.w": {"dtype": "float32", "shape": [1]}}))(d)),
     sl.FileFormatError, "no intervention owns: ['7.w']"),
    ("no_version", _edit_meta(lambda m: m.pop("version")), sl.FileFormatError, "no format version"),
    ("version_is_a_bool", _edit_meta(lambda m: m.update(version=True)), sl.FileFormatError, "format version"),
    ("version_from_the_future", _edit_meta(lambda m: m.update(version=99)), sl.FileFormatError, "format version 99, made by a newer steerlab"),
    ("version_zero", _edit_meta(lambda m: m.update(version=0)), sl.FileFormatError, "invalid format version 0"),
    ("no_kind", _edit_meta(lambda m: m.pop("kind")), sl.FileFormatError, 'no "kind"'),
    ("another_kind", _edit_meta(lambda m: m.update(kind="graph")), sl.FileFormatError, "holds a 'graph'; expected 'interventions'"),
    ("no_format", _edit_meta(lambda m: m.pop("format")), sl.FileFormatError, "not a steerlab file"),
    ("foreign_format", _edit_meta(lambda m: m.update(format="peft")), sl.FileFormatError, "not a steerlab file"),
    ("config_is_a_list", lambda d: _set_meta(d, "[1, 2, 3]"), sl.FileFormatError, "not a steerlab file"),
    ("no_config_section", _edit_meta(lambda m: m.pop("config")), sl.FileFormatError, 'lacks its "config"'),
    ("non_json_config", lambda d: (d / "steerlab.json").write_bytes(b"\x80\x04\x95 not json"), sl.FileFormatError, "is not valid JSON"),
    ("json_with_nan", lambda d: _set_meta(d, json.dumps(_meta(d)).replace('"alpha": 1.0', '"alpha": NaN')), sl.FileFormatError, "NaN"),
    ("json_with_infinity", lambda d: _set_meta(d, json.dumps(_meta(d)).replace('"version": 2', '"version": Infinity')), sl.FileFormatError, "Infinity"),
    ("deeply_nested_json", _deep_json, sl.FileFormatError, "is not valid JSON"),
    ("no_steerlab_json", lambda d: (d / "steerlab.json").unlink(), sl.FileFormatError, "has no steerlab.json"),
    ("steerlab_json_is_a_dir", lambda d: ((d / "steerlab.json").unlink(), (d / "steerlab.json").mkdir()), sl.FileFormatError, "has no steerlab.json"),
    ("no_weights", lambda d: fileformat.weights_path(d).unlink(), sl.FileFormatError, "the weights file its steerlab.json names"),
    ("unknown_type", _record(0, lambda r: r.update(type="loreft_v9")), sl.UnknownInterventionType, "unknown intervention type 'loreft_v9'"),
    ("python_path_as_type", _record(0, lambda r: r.update(type="os.system")), sl.UnknownInterventionType, "unknown intervention type 'os.system'"),
    ("remote_code", _record(0, lambda r: r.update(type="transformers.AutoModel", trust_remote_code=True,
                                                  auto_map={"AutoModel": "evil.Model"})), sl.UnknownInterventionType, "'transformers.AutoModel'"),
    ("record_without_site", _record(0, lambda r: r.pop("site")), sl.FileFormatError, "intervention 0 lacks the field 'site'"),
    ("record_not_a_dict", _edit_meta(lambda m: m["config"]["interventions"].__setitem__(0, "add")), sl.FileFormatError, "intervention 0 is 'add'; expected an object"),
    ("interventions_not_a_list", _edit_meta(lambda m: m["config"].update(interventions={"0": 1})), sl.FileFormatError, "lists no interventions"),
    ("argument_of_wrong_type", _record(0, lambda r: r["arguments"].update(alpha="strong")), sl.FileFormatError, "cannot rebuild 'add'"),
    ("unknown_argument", _record(0, lambda r: r["arguments"].update(exec="rm -rf /")), sl.FileFormatError, "cannot rebuild 'add'"),
    ("width_not_a_number", _record(1, lambda r: r.update(width="wide")), sl.FileFormatError, "'width' is 'wide'; expected an integer or null"),
    ("size_beyond_width", _record(1, lambda r: r["arguments"].update(size=40)), sl.FileFormatError, "cannot rebuild 'subspace_interchange'"),
    ("bad_positions", _record(0, lambda r: r.update(positions="f7+zz")), sl.FileFormatError, "cannot rebuild 'add'"),
    # checks added with format version 2
    ("fingerprint_null", _edit_meta(lambda m: m.update(fingerprint=None)), sl.FingerprintMismatch, "records no model fingerprint"),
    ("fingerprint_key_missing", _edit_meta(lambda m: m["fingerprint"].pop("width")), sl.FingerprintMismatch, "the fingerprint lacks ['width']"),
    ("nan_in_weights", lambda d: _rewrite_weights(d, lambda t: {**t, "0.vector": t["0.vector"].index_fill(0, torch.tensor([3]), float("nan"))}),
     sl.FileFormatError, "holds 1 NaN or infinite value(s) of 32"),
    ("flipped_byte", lambda d: _set_weights(d, _weights(d)[:-5] + bytes([_weights(d)[-5] ^ 4]) + _weights(d)[-4:], reseal=False),
     sl.FileFormatError, "its bytes changed after it was saved"),
    ("weights_symlinked", lambda d: (shutil.copy(fileformat.weights_path(d), d.parent / "copy"), fileformat.weights_path(d).unlink(),
                                     fileformat.weights_path(d).symlink_to(d.parent / "copy")), sl.FileFormatError, "is a symbolic link"),
    ("weights_a_pipe", lambda d: (fileformat.weights_path(d).unlink(), os.mkfifo(fileformat.weights_path(d))), sl.FileFormatError,
     "is not a regular file"),
    ("record_dtypes_lie", _record(0, lambda r: r.update(dtypes={"vector": "float16"})), sl.FileFormatError, "the record's dtypes"),
    ("argument_retyped", _record(0, lambda r: r["arguments"].update(trainable="false")), sl.FileFormatError,
     "arguments {'alpha': 1.0, 'trainable': 'false'} and width 32: trainable='false': expected True or False"),
    ("argument_retyped_alike", _record(0, lambda r: r["arguments"].update(alpha=1)), sl.FileFormatError,
     "'arguments' is {'alpha': 1, 'trainable': False}, which 'add' reads as"),
    ("heads_on_a_site_without_heads", _record(1, lambda r: r.update(heads=[0])), sl.FileFormatError, "which is not a per-head site"),
    ("huge_width", _record(1, lambda r: r.update(width=250_000_000)), sl.FileFormatError, "width 250000000, but its slice of 'blocks.0.resid_post'"),
    ("unknown_site", _record(0, lambda r: r.update(site="blocks.9.resid_post")), sl.FileFormatError, "unknown site 'blocks.9.resid_post'"),
    ("foreign_header_metadata", lambda d: _with_header(d, {**_header(d)[0], "__metadata__": {"format": "pt"}}, _header(d)[1]),
     sl.FileFormatError, "a foreign or edited file"),
    ("integer_beyond_64_bits", _edit_meta(lambda m: m["config"]["interventions"][1].update(width=2**70)), sl.FileFormatError,
     "outside the 64-bit range"),
    ("path_is_a_file", lambda d: (shutil.rmtree(d), d.write_bytes(b"PK\x03\x04")), sl.FileFormatError, "is not a steerlab directory"),
    ("empty_directory", lambda d: (shutil.rmtree(d), d.mkdir()), sl.FileFormatError, "has no steerlab.json"),
    ("missing_directory", lambda d: shutil.rmtree(d), sl.FileFormatError, "is not a steerlab directory"),
]


@pytest.mark.parametrize("name,craft,error,phrase", CASES, ids=[c[0] for c in CASES])
def test_malformed_directory_is_refused(lab, good, name, craft, error, phrase):
    assert len(lab.load_interventions(good)) == 2  # the untouched directory loads
    craft(good)
    with pytest.raises(error) as info:
        lab.load_interventions(good)
    assert phrase in str(info.value), str(info.value)


def test_a_missing_device_is_named_as_such(lab, good):
    with pytest.raises(sl.ConfigError, match="device='cuda:99' is not available on this machine"):
        fileformat.load(good, device="cuda:99")


def test_at_least_twenty_crafted_files():
    assert len(CASES) >= 20


@pytest.mark.parametrize("what", ["width", "layers", "vocab", "model_type"])
def test_a_file_for_another_model_is_refused(lab, other_labs, good, what):
    phrase = {"width": "width: file 32 vs model 48", "layers": "n_layers: file 3 vs model 4",
              "vocab": "vocab_size: file 96 vs model 120", "model_type": "model_type: file 'llama' vs model 'mistral'"}[what]
    with pytest.raises(sl.FingerprintMismatch, match=phrase):
        other_labs[what].load_interventions(good)


GRAPH_CASES = [
    ("input_tensor_missing", _edit_meta(lambda m: m["config"]["runs"][1]["inputs"].append("token_type_ids")), "token_type_ids"),
    ("run_without_index", _edit_meta(lambda m: m["config"]["runs"][0].pop("index")), "run record"),
    ("source_run_later", _edit_meta(lambda m: m["config"]["runs"][1]["interventions"][0].update(source={"run": 5})), "comes later or does not exist"),
    ("source_value_missing", _edit_meta(lambda m: m["config"]["runs"][1]["interventions"][0].update(source={"value": True})), "source_value"),
    ("runs_not_a_list", _edit_meta(lambda m: m["config"].update(runs="all")), "run record"),
]


@pytest.mark.parametrize("name,craft,phrase", GRAPH_CASES, ids=[c[0] for c in GRAPH_CASES])
def test_malformed_graph_is_refused(lab, good_graph, name, craft, phrase):
    assert len(lab.load_graph(good_graph).runs) == 2
    craft(good_graph)
    with pytest.raises(sl.FileFormatError) as info:
        lab.load_graph(good_graph)
    assert phrase in str(info.value), str(info.value)


SUBSPACE_CASES = [
    ("not_orthonormal", lambda d: _rewrite_weights(d, lambda t: {"basis": t["basis"] * 2}), "not orthonormal"),
    ("record_without_site", _edit_meta(lambda m: m["config"].pop("site")), "site"),
    ("basis_shape_vs_record", _edit_meta(lambda m: m["config"].update(size=3)), "the record says float32[3, 32]"),
    ("interventions_file_as_subspace", None, "holds a 'interventions'; expected 'subspace'"),
]


@pytest.mark.parametrize("name,craft,phrase", SUBSPACE_CASES, ids=[c[0] for c in SUBSPACE_CASES])
def test_malformed_subspace_is_refused(good, tmp_path, name, craft, phrase):
    d = tmp_path / "sub"
    sl.Subspace(torch.eye(32)[:2], "blocks.1.resid_post").save(d)
    assert sl.Subspace.load(d).size == 2
    if craft is None:
        d = good
    else:
        craft(d)
    with pytest.raises(sl.FileFormatError) as info:
        sl.Subspace.load(d)
    assert phrase in str(info.value), str(info.value)


def test_unpickling_is_refused_while_these_tests_run(tmp_path):
    """The guard itself works: torch.load and pickle raise Unpickled."""
    with pytest.raises(Unpickled):
        torch.load(tmp_path / "x.bin")
    with pytest.raises(Unpickled):
        pickle.loads(b"\x80\x04K\x01.")


# --------------------------------------------------------------------------- static: no unpickling on any load path
_PACKAGES = ["interventions", "alignment", "reft", "viz", "steerlab"]
_PICKLE_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _unpickling_calls(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in _PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in _PICKLE_MODULES:
            found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Call):
            f = node.func
            name = ast.unparse(f)
            kw = {k.arg: k.value for k in node.keywords}
            if name.endswith("torch.load"):
                # the Trainer's own files, and the explicit peer importer (import_pyvene / import_pyreft), tensors only
                ok = path.name in ("trainer.py", "from_pyvene.py") and isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                if not ok:
                    found.append(f"{name}(...) at line {node.lineno}")
            elif name.split(".")[0] in _PICKLE_MODULES or name.endswith(("Unpickler", "pickle.load", "pickle.loads")):
                found.append(f"{name}(...) at line {node.lineno}")
            elif name.endswith("np.load") or name.endswith("numpy.load"):
                if isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value:
                    found.append(f"{name}(allow_pickle=True) at line {node.lineno}")
            elif name.endswith("from_pretrained") and isinstance(kw.get("trust_remote_code"), ast.Constant) and kw["trust_remote_code"].value:
                found.append(f"{name}(trust_remote_code=True) at line {node.lineno}")
    return found


def test_no_unpickling_anywhere_in_the_package():
    files = [p for pkg in _PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    assert len(files) > 20
    offenders = {str(p.relative_to(ROOT)): calls for p in files if (calls := _unpickling_calls(p))}
    assert offenders == {}, offenders


def test_the_static_scan_finds_what_it_looks_for(tmp_path):
    bad = tmp_path / "loader.py"
    bad.write_text(
        "import pickle\nimport torch\nimport numpy as np\n"
        "def f(p):\n    torch.load(p)\n    pickle.loads(b'')\n    np.load(p, allow_pickle=True)\n"
        "    AutoModel.from_pretrained(p, trust_remote_code=True)\n"
    )
    found = _unpickling_calls(bad)
    assert len(found) == 5, found
    fine = tmp_path / "trainer.py"
    fine.write_text("import torch\ndef f(p):\n    return torch.load(p, weights_only=True)\n")
    assert _unpickling_calls(fine) == []
