"""The mutation classes of the malformed-file battery (``tests/test_fuzz_files.py``).

Each function returns :class:`Mutation` objects: a class (one of ``CLASSES``), a
name, the loader and format it applies to, and ``apply(save)`` that damages a
copy of a valid save in place. Every mutation yields an invalid file (one no
correct save could be): edits that merely produce another valid save (a
different but well-formed value in a file without a checksum) are not
generated, except byte flips, which the battery counts apart where there is no
checksum to catch them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from steerlab.interventions import fileformat

__all__ = ["Mutation", "Save", "mutations", "CLASSES"]

SITE = "blocks.1.resid_post"
CLASSES = ("byte flips", "truncation", "header edits", "JSON deletions", "JSON type changes", "huge values", "NaN",
           "dtype and shape lies", "config vs record", "fingerprint", "symlinks", "pickles")

# --------------------------------------------------------------------------- editing a save
class Save:
    """A copy of a valid save being mutated."""

    def __init__(self, path: Path, fmt: str):
        self.path, self.fmt = path, fmt
        self.wpath = fileformat.weights_path(path) if fmt != "peer" else sorted(path.glob("intkey_*.bin"))[-1]  # pyvene: the low-rank one

    def meta(self) -> dict:
        return json.loads((self.path / "steerlab.json").read_text())

    def set_meta(self, meta: dict | str | bytes) -> None:
        data = meta if isinstance(meta, (str, bytes)) else json.dumps(meta)
        (self.path / "steerlab.json").write_bytes(data.encode() if isinstance(data, str) else data)

    def edit(self, fn: Callable[[dict], Any]) -> None:
        m = self.meta()
        fn(m)
        self.set_meta(m)

    def weights(self) -> bytes:
        return self.wpath.read_bytes()

    def set_weights(self, data: bytes, *, reseal: bool = True) -> None:
        """New weight bytes; ``reseal`` records their size and checksum (a crafted file whose
        checksum agrees, so the checks behind it are what refuses it)."""
        if not reseal or self.fmt == "v1":
            self.wpath.write_bytes(data)
            return
        self.wpath.unlink()
        sha = hashlib.sha256(data).hexdigest()
        self.wpath = self.path / f"weights-{sha[:16]}.safetensors"
        self.wpath.write_bytes(data)
        self.edit(lambda m: m.update(weights={"file": self.wpath.name, "sha256": sha, "bytes": len(data)}))

    def header(self) -> tuple[dict, bytes]:
        raw = self.weights()
        (n,) = struct.unpack("<Q", raw[:8])
        return json.loads(raw[8:8 + n]), raw[8 + n:]

    def set_header(self, header: dict, body: bytes, *, reseal: bool = True) -> None:
        h = json.dumps(header).encode()
        self.set_weights(struct.pack("<Q", len(h)) + h + body, reseal=reseal)

    def tensors(self) -> dict[str, torch.Tensor]:
        return st_load(self.weights())

    def set_tensors(self, tensors: dict[str, torch.Tensor], *, manifest: bool = True, records: bool = False) -> None:
        """Rewrite the weights (resealed); ``manifest`` makes the manifest agree, ``records`` the
        records' dtypes too (a consistent lie)."""
        self.set_weights(st_save({k: v.contiguous() for k, v in tensors.items()}, metadata={"format": "steerlab"}))
        if manifest or records:
            def fix(m):
                m["tensors"] = {k: {"dtype": fileformat.dtype_name(v.dtype), "shape": list(v.shape)} for k, v in tensors.items()}
                if records:
                    for rec in _records(m):
                        for name in rec.get("dtypes", {}):
                            full = rec["_prefix"] + name
                            if full in tensors:
                                rec["dtypes"][name] = fileformat.dtype_name(tensors[full].dtype)
                    _strip_prefixes(m)
            self.edit(fix)


def _records(meta: dict) -> list[dict]:
    """The intervention records of a save, each tagged with its tensor prefix (``_prefix``)."""
    c = meta["config"]
    out = []
    for i, rec in enumerate(c.get("interventions") or []):
        rec["_prefix"] = f"{i}."
        out.append(rec)
    for run in c.get("runs") or []:
        for j, rec in enumerate(run["interventions"]):
            rec["_prefix"] = f"runs.{run['index']}.iv.{j}."
            out.append(rec)
    return out


def _strip_prefixes(meta: dict) -> None:
    for rec in _records(meta):
        rec.pop("_prefix", None)


def _record_dtypes_say_float16(s: Save) -> None:
    def fn(m):
        for rec in _records(m):
            rec["dtypes"] = {k: "float16" for k in rec["dtypes"]}
        _strip_prefixes(m)
    s.edit(fn)


def _get(obj: Any, path: tuple) -> Any:
    for k in path:
        obj = obj[k]
    return obj


def _float_tensor(s: Save) -> str:
    """The first floating tensor of the save (by name)."""
    return sorted(k for k, v in s.tensors().items() if v.is_floating_point())[0]


# --------------------------------------------------------------------------- mutations
@dataclass
class Mutation:
    cls: str
    name: str
    loader: str
    fmt: str
    apply: Callable[[Save], Any]

    @property
    def id(self) -> str:
        return f"{self.loader}/{self.fmt}/{self.cls}/{self.name}"


_RECORD_KEYS = ("type", "site", "positions", "heads", "dims", "source_positions", "source_site", "arguments", "width", "dtypes")


def schema_paths(loader: str, meta: dict) -> list[tuple]:
    """The JSON fields a loader reads (not free data such as metadata or timings entries)."""
    top = [("format",), ("version",), ("kind",), ("fingerprint",), ("config",), ("tensors",)]
    if meta["version"] >= 2:
        top += [("weights",), ("weights", "file"), ("weights", "sha256"), ("weights", "bytes")]
    c = ("config",)
    if loader == "interventions":
        paths = [c + ("interventions",)]
        for i in (4, 5, 8):
            paths += [c + ("interventions", i, k) for k in _RECORD_KEYS]
        paths += [c + ("interventions", 4, "arguments", k) for k in ("alpha", "trainable")]
        paths += [c + ("interventions", 8, "arguments", k) for k in ("std", "seed")] + [c + ("interventions", 1, "arguments", "size")]
    elif loader == "graph":
        paths = [c + ("runs",)] + [c + ("runs", 2, k) for k in ("index", "name", "output", "inputs", "interventions")]
        paths += [c + ("runs", 2, "interventions", 0, k) for k in (*_RECORD_KEYS, "source")]
        paths += [c + ("runs", 2, "interventions", 0, "source", "run"), c + ("runs", 2, "interventions", 0, "arguments", "size")]
    elif loader == "subspace":
        paths = [c + (k,) for k in ("site", "positions", "heads", "size", "width", "metadata")]
    elif loader == "reft":
        paths = [c + (k,) for k in ("reft_config", "groups", "interventions", "modules_to_save", "extra_tensors")]
        paths += [c + ("reft_config", k) for k in meta["config"]["reft_config"]]
        paths += [c + ("interventions", 0, k) for k in _RECORD_KEYS]
        paths += [c + ("interventions", 0, "arguments", k) for k in meta["config"]["interventions"][0]["arguments"]]
    elif loader == "das_result":
        paths = [c + (k,) for k in meta["config"]] + [c + ("subspaces", "X", k) for k in meta["config"]["subspaces"]["X"]]
        paths += [c + ("iia", "all", k) for k in ("value", "n", "chance")] + [c + ("curve", k) for k in meta["config"]["curve"]]
    else:
        paths = [c + (k,) for k in meta["config"]] + [c + ("results", 0, k) for k in ("site", "sizes", "subspaces", "iia", "curve", "method")]
    return top + paths


def _wrong(value: Any, path: tuple) -> list[Any]:
    """Values of another JSON type than ``value`` that no field of that type accepts."""
    if isinstance(value, bool):
        return ["false", 1]
    if isinstance(value, int):
        return ["7", True]
    if isinstance(value, float):
        return ["0.5", [0.5]]
    if isinstance(value, str):
        return [7, ["x"]]
    if isinstance(value, list):
        return [{"a": 1}, 1.5]  # not "x": a string is a valid position name for a DAS result
    if isinstance(value, dict):
        return [[1], "x"]
    return [5, ["x"]]  # null


def _delete(path: tuple) -> Callable[[Save], None]:
    def apply(s: Save) -> None:
        def fn(m):
            parent = _get(m, path[:-1])
            del parent[path[-1]]
        s.edit(fn)
    return apply


def _set(path: tuple, value: Any) -> Callable[[Save], None]:
    def apply(s: Save) -> None:
        s.edit(lambda m: _get(m, path[:-1]).__setitem__(path[-1], value))
    return apply


def _json_mutations(loader: str, fmt: str, meta: dict) -> list[Mutation]:
    out = []
    for i, path in enumerate(schema_paths(loader, meta)):
        label = ".".join(map(str, path))
        out.append(Mutation("JSON deletions", f"del {label}", loader, fmt, _delete(path)))
        wrong = _wrong(_get(meta, path), path)[i % 2]
        out.append(Mutation("JSON type changes", f"{label}={json.dumps(wrong)}", loader, fmt, _set(path, wrong)))
    return out


def _flip(seed: int, count: int) -> Callable[[Save], None]:
    def apply(s: Save) -> None:
        raw = bytearray(s.weights())
        (n,) = struct.unpack("<Q", raw[:8])
        g = torch.Generator().manual_seed(seed)
        for _ in range(count):
            i = 8 + n + int(torch.randint(0, len(raw) - 8 - n, (1,), generator=g))
            raw[i] ^= 1 << int(torch.randint(0, 8, (1,), generator=g))
        s.set_weights(bytes(raw), reseal=False)
    return apply


def _truncations(loader: str, fmt: str) -> list[Mutation]:
    M = lambda name, fn: Mutation("truncation", name, loader, fmt, fn)  # noqa: E731
    out = [
        M("weights to 0 bytes", lambda s: s.set_weights(b"")),
        M("weights to 7 bytes", lambda s: s.set_weights(s.weights()[:7])),
        M("weights inside the header", lambda s: s.set_weights(s.weights()[:40])),
        M("weights by half", lambda s: s.set_weights(s.weights()[: len(s.weights()) // 2])),
        M("weights by 1 byte", lambda s: s.set_weights(s.weights()[:-1])),
        M("weights by 1 byte, unsealed", lambda s: s.set_weights(s.weights()[:-1], reseal=False)),
        M("steerlab.json by half", lambda s: s.set_meta((s.path / "steerlab.json").read_bytes()[: len((s.path / "steerlab.json").read_bytes()) // 2])),
        M("steerlab.json to 0 bytes", lambda s: s.set_meta(b"")),
    ]
    lists = {"interventions": ("config", "interventions"), "graph": ("config", "runs"), "reft": ("config", "groups"),
             "das_search": ("config", "results"), "das_result": ("config", "variables"), "subspace": ("config", "heads")}
    path = lists[loader]
    if loader == "subspace":
        out.append(M("basis rows cut to 1", lambda s: s.set_tensors({"basis": s.tensors()["basis"][:1]})))
    else:  # an entry with tensors and entries after it: what follows then lies in the wrong place
        at = 1 if loader == "interventions" else -2
        out.append(M(f"{'.'.join(path)} without entry {at}", lambda s: s.edit(lambda m: _get(m, path).pop(at))))
    if loader in ("graph", "das_search"):  # its tensors stay behind
        out.append(M(f"{'.'.join(path)} without its last entry", lambda s: s.edit(lambda m: _get(m, path).pop())))
    return out


# header edits: each takes (header, sorted tensor names, data) and returns the new data
def _edit_header(fn: Callable[[dict, list[str], bytes], bytes], reseal: bool = True) -> Callable[[Save], None]:
    def apply(s: Save) -> None:
        h, body = s.header()
        names = sorted(k for k in h if k != "__metadata__")
        s.set_header(h, fn(h, names, body), reseal=reseal)
    return apply


def _offsets_out(h, names, body):
    h[names[0]]["data_offsets"] = [0, len(body) + 4096]
    return body


def _overlap(h, names, body):
    h[names[-1]]["data_offsets"] = h[names[0]]["data_offsets"]
    return body


def _shifted(h, names, body):
    a, b = h[names[0]]["data_offsets"]
    h[names[0]]["data_offsets"] = [a + 4, b + 4]
    return body


def _dtype_code(code: str):
    def fn(h, names, body):
        h[names[0]]["dtype"] = code
        return body
    return fn


def _shape(h, names, body):
    old = h[names[0]]["shape"]
    h[names[0]]["shape"] = old + [1] if len(old) < 2 else [old[1], old[0]]
    return body


def _gap(h, names, body):
    last = max(names, key=lambda k: h[k]["data_offsets"][1])
    a, b = h[last]["data_offsets"]
    h[last]["data_offsets"] = [a + 8, b + 8]
    return body[:a] + b"\0" * 8 + body[a:]


def _unlisted(h, names, body):
    h["smuggled"] = {"dtype": "U8", "shape": [4], "data_offsets": [len(body), len(body) + 4]}
    return body + b"evil"


def _metadata(value):
    def fn(h, names, body):
        if value is None:
            h.pop("__metadata__", None)
        else:
            h["__metadata__"] = value
        return body
    return fn


def _swap_same_size(h, names, body):
    sizes: dict[int, list[str]] = {}
    for k in names:
        a, b = h[k]["data_offsets"]
        sizes.setdefault(b - a, []).append(k)
    pair = next((ks for ks in sizes.values() if len(ks) > 1), names[:1] * 2)
    h[pair[0]]["data_offsets"], h[pair[1]]["data_offsets"] = h[pair[1]]["data_offsets"], h[pair[0]]["data_offsets"]
    return body


def _header_edits(loader: str, fmt: str) -> list[Mutation]:
    M = lambda name, fn: Mutation("header edits", name, loader, fmt, fn)  # noqa: E731
    E = _edit_header
    out = [
        M("offsets beyond the data", E(_offsets_out)),
        M("overlapping offsets", E(_overlap)) if loader != "subspace" else M("offsets shifted past the end", E(_shifted)),
        M("dtype F64 over F32 bytes", E(_dtype_code("F64"))), M("unknown dtype code", E(_dtype_code("F99"))),
        M("shape changed", E(_shape)), M("a gap between tensors", E(_gap)), M("an unlisted tensor", E(_unlisted)),
        M("metadata removed", E(_metadata(None))), M("metadata of another tool", E(_metadata({"format": "pt"}))),
        M("header length 2**63", lambda s: s.set_weights(struct.pack("<Q", 2**63) + s.weights()[8:])),
        M("header length 3", lambda s: s.set_weights(struct.pack("<Q", 3) + s.weights()[8:])),
        M("header not JSON", lambda s: s.set_weights(struct.pack("<Q", 12) + b"{not json!!}" + s.weights()[20:])),
    ]
    if fmt == "v2":  # a well-formed edit that changes values: only the checksum can tell
        out.append(M("two tensors' bytes swapped, unsealed", E(_swap_same_size, reseal=False)))
    return out


def _huge(loader: str, fmt: str, meta: dict) -> list[Mutation]:
    M = lambda name, fn: Mutation("huge values", name, loader, fmt, fn)  # noqa: E731
    first = sorted(meta["tensors"])[0]
    out = [
        M("version 10**30", lambda s: s.set_meta((s.path / "steerlab.json").read_text().replace(f'"version": {s.meta()["version"]}', '"version": ' + "1" * 31))),
        M("a 5000-digit integer", lambda s: s.set_meta((s.path / "steerlab.json").read_text().replace('"format"', '"n": ' + "9" * 5000 + ', "format"', 1))),
        M("manifest shape [10**12]", lambda s: s.edit(lambda m: m["tensors"][first].update(shape=[10**12]))),
        M("header shape [2**40]", lambda s: _header_shape(s, first, [2**40])),
        M("fingerprint width 250000000", lambda s: s.edit(lambda m: m["fingerprint"].update(width=250_000_000))),
        M("steerlab.json of 1 GB (sparse)", lambda s: os.truncate(s.path / "steerlab.json", 2**30)),
    ]
    if fmt == "v2":
        out.append(M("weights bytes 10**15", lambda s: s.edit(lambda m: m["weights"].update(bytes=10**15))))
    per = {
        "interventions": [("config", "interventions", 1, "width", 250_000_000), ("config", "interventions", 1, "arguments", "size", 10**9),
                          ("config", "interventions", 5, "heads", [10**9]), ("config", "interventions", 7, "dims", [0, 10**9]),
                          ("config", "interventions", 2, "width", 10**11)],
        "graph": [("config", "runs", 2, "interventions", 0, "width", 250_000_000), ("config", "runs", 2, "index", 10**9),
                  ("config", "runs", 2, "interventions", 0, "source", "run", 10**9)],
        "subspace": [("config", "width", 250_000_000), ("config", "size", 10**9)],
        "reft": [("config", "interventions", 0, "arguments", "rank", 10**9), ("config", "reft_config", "rank", 10**9),
                 ("config", "interventions", 0, "width", 250_000_000), ("config", "groups", 0, 0, 10**9)],
        "das_result": [("config", "sizes", "X", 10**9), ("config", "subspaces", "X", "width", 250_000_000), ("config", "iia", "all", "value", 1e300)],
        "das_search": [("config", "results", 0, "sizes", "X", 10**9), ("config", "results", 1, "subspaces", "Y", "size", 10**9)],
    }[loader]
    for *path, value in per:
        out.append(M(f"{'.'.join(map(str, path))}={value:.3g}" if isinstance(value, float) else f"{'.'.join(map(str, path))}={value}",
                     _set(tuple(path), value)))
    if loader == "graph":
        out.append(M("input_ids of 10**9", lambda s: s.set_tensors({**s.tensors(), "runs.0.inputs.input_ids": torch.full((2, 7), 10**9)})))
    return out


def _header_shape(s: Save, name: str, shape: list[int]) -> None:
    h, body = s.header()
    h[name]["shape"] = shape
    s.set_header(h, body)


def _nans(loader: str, fmt: str, meta: dict) -> list[Mutation]:
    M = lambda name, fn: Mutation("NaN", name, loader, fmt, fn)  # noqa: E731

    def poison(value):
        def apply(s: Save):
            t = s.tensors()
            k = _float_tensor(s)
            t[k] = t[k].clone()
            t[k].view(-1)[0] = value
            s.set_tensors(t)
        return apply

    num = {"interventions": '"alpha": 2.0', "graph": '"size": 2', "subspace": '"width": 32', "reft": '"rank": 2',
           "das_result": '"value": 0.81', "das_search": '"value": 0.81'}[loader]
    key, _, val = num.partition(": ")
    text = lambda s: (s.path / "steerlab.json").read_text()  # noqa: E731
    return [
        M("a NaN in a tensor", poison(float("nan"))), M("an infinity in a tensor", poison(float("inf"))),
        M(f"{key}: NaN", lambda s: s.set_meta(text(s).replace(num, f"{key}: NaN", 1))),
        M(f"{key}: -Infinity", lambda s: s.set_meta(text(s).replace(num, f"{key}: -Infinity", 1))),
        M(f"{key}: 1e999", lambda s: s.set_meta(text(s).replace(num, f"{key}: 1e999", 1))),
    ]


def _lies(loader: str, fmt: str, meta: dict) -> list[Mutation]:
    M = lambda name, fn: Mutation("dtype and shape lies", name, loader, fmt, fn)  # noqa: E731

    def retype(dtype, *, records=False, manifest=True):
        def apply(s: Save):
            t = s.tensors()
            k = _float_tensor(s)
            t[k] = t[k].to(dtype)
            s.set_tensors(t, manifest=manifest, records=records)
        return apply

    def reshape(s: Save):
        t = s.tensors()
        k = _float_tensor(s)
        t[k] = t[k].reshape(1, -1)
        s.set_tensors(t)

    out = [
        M("a tensor as float16, manifest agreeing", retype(torch.float16)),
        M("a tensor as float64, unrecorded", retype(torch.float64, manifest=False)),
        M("a floating tensor as int32", retype(torch.int32)),
        M("a tensor reshaped, manifest agreeing", reshape),
        M("manifest dtype only", lambda s: s.edit(lambda m: m["tensors"][sorted(m["tensors"])[0]].update(dtype="bfloat16"))),
        M("manifest shape only", lambda s: s.edit(lambda m: m["tensors"][sorted(m["tensors"])[0]].update(shape=[3, 3]))),
    ]
    if loader in ("interventions", "graph", "reft"):
        out.append(M("a record's dtypes only", _record_dtypes_say_float16))
        out.append(M("an orthonormal map in bfloat16 everywhere", _rotation_bf16))
    if loader == "graph":
        out.append(M("input_ids as float32", lambda s: s.set_tensors({**s.tensors(), "runs.0.inputs.input_ids": s.tensors()["runs.0.inputs.input_ids"].float()})))
    return out


def _rotation_bf16(s: Save) -> None:
    t = s.tensors()
    k = sorted(n for n in t if n.endswith("rotation.weight"))[0]
    t[k] = t[k].to(torch.bfloat16)
    s.set_tensors(t, records=True)


def _contradictions(loader: str, fmt: str, meta: dict) -> list[Mutation]:
    M = lambda name, fn: Mutation("config vs record", name, loader, fmt, fn)  # noqa: E731
    c = ("config",)
    per: dict[str, list[tuple[str, Callable[[Save], Any]]]] = {
        "interventions": [
            ("width vs the site", _set(c + ("interventions", 4, "width"), 16)),
            ("dims vs width", _set(c + ("interventions", 7, "dims"), [0, 1, 2])),
            ("heads on a site without heads", _set(c + ("interventions", 4, "heads"), [0])),
            ("site of another model", _set(c + ("interventions", 4, "site"), "blocks.7.resid_post")),
            ("source_site of another width", _set(c + ("interventions", 1, "source_site"), "blocks.1.attn.z")),
            ("an extra tensor under extra_tensors", lambda s: (s.edit(lambda m: m["config"].update(extra_tensors=True)),
                                                               s.set_tensors({**s.tensors(), "9.smuggled": torch.zeros(3)}))),
        ],
        "graph": [
            ("a duplicated run index", _set(c + ("runs", 2, "index"), 1)),
            ("a source run that comes later", _set(c + ("runs", 1, "interventions", 0, "source", "run"), 2)),
            ("a run reading itself", _set(c + ("runs", 1, "interventions", 0, "source", "run"), 1)),
            ("a sourceless type with a source", lambda s: s.edit(lambda m: m["config"]["runs"][2]["interventions"][0].update(
                type="add", arguments={"alpha": 1.0, "trainable": False}))),
            ("a sourced type without its source", _delete(c + ("runs", 2, "interventions", 0, "source"))),
            ("attention_mask shaped unlike input_ids", lambda s: s.set_tensors({**s.tensors(), "runs.0.inputs.attention_mask": torch.ones(2, 5, dtype=torch.long)})),
            ("an attention mask of 2s", lambda s: s.set_tensors({**s.tensors(), "runs.0.inputs.attention_mask": torch.full((2, 7), 2)})),
        ],
        "subspace": [
            ("size vs the basis", _set(c + ("size",), 3)),
            ("width vs the basis", _set(c + ("width",), 16)),
            ("a basis that is not orthonormal", lambda s: s.set_tensors({"basis": s.tensors()["basis"] * 2})),
        ],
        "reft": [(f"reft_config.{k}={v!r}", _set(c + ("reft_config", k), v)) for k, v in (
            ("rank", 3), ("positions", "l2"), ("layers", [0, 2]), ("intervention", "direft"), ("tied", True),
            ("modules_to_save", ["lm_head"]), ("dropout", 0.1), ("act_fn", "relu"), ("site", "mlp.out"))] + [
            ("groups that do not partition", _set(c + ("groups",), [[0, 1], [1, 2]])),
            ("groups swapped", _set(c + ("groups",), [[2, 3], [0, 1]])),
            ("extra_tensors without modules", _set(c + ("extra_tensors",), True)),
        ],
        "das_result": [
            ("sizes vs the subspace", _set(c + ("sizes", "X"), 3)),
            ("a subspace at another site", _set(c + ("subspaces", "X", "site"), "blocks.2.resid_post")),
            ("a subspace for no variable", lambda s: s.edit(lambda m: m["config"].update(variables=["X"]))),
            ("a record size vs its basis", _set(c + ("subspaces", "Y", "size"), 2)),
        ],
        "das_search": [
            ("a candidate's sizes vs its subspace", _set(c + ("results", 1, "sizes", "Y"), 2)),
            ("a candidate's subspace at another site", _set(c + ("results", 0, "subspaces", "X", "site"), "blocks.0.resid_post")),
            ("layers of another kind", _set(c + ("layers",), {SITE: "one"})),
        ],
    }
    return [M(name, fn) for name, fn in per[loader]]


def _fingerprints(loader: str, fmt: str, meta: dict) -> list[Mutation]:
    M = lambda name, fn: Mutation("fingerprint", name, loader, fmt, fn)  # noqa: E731
    out = [M("set to null", _set(("fingerprint",), None)), M("removed", _delete(("fingerprint",))),
           M("an empty object", _set(("fingerprint",), {}))]
    for i, (k, v) in enumerate(meta["fingerprint"].items()):
        other = "gpt2" if isinstance(v, str) else v + 1
        out += [M(f"{k}={other!r}", _set(("fingerprint", k), other)),
                [M(f"{k} removed", _delete(("fingerprint", k))), M(f"{k} null", _set(("fingerprint", k), None)),
                 M(f"{k} as a string", _set(("fingerprint", k), str(v) if not isinstance(v, str) else [v]))][i % 3]]
    return out


def _symlinks(loader: str, fmt: str) -> list[Mutation]:
    M = lambda name, fn: Mutation("symlinks", name, loader, fmt, fn)  # noqa: E731

    def link_weights(target: Callable[[Save], str]):
        def apply(s: Save):
            t = target(s)
            s.wpath.unlink()
            os.symlink(t, s.wpath)
        return apply

    def copy_elsewhere(s: Save) -> str:
        other = s.path.parent / (s.path.name + ".elsewhere")
        other.write_bytes(s.wpath.read_bytes())
        return str(other)

    def json_link(s: Save):
        other = s.path.parent / (s.path.name + ".json")
        other.write_bytes((s.path / "steerlab.json").read_bytes())
        (s.path / "steerlab.json").unlink()
        os.symlink(other, s.path / "steerlab.json")

    def fifo(s: Save):
        s.wpath.unlink()
        os.mkfifo(s.wpath)

    def directory(s: Save):
        s.wpath.unlink()
        s.wpath.mkdir()

    return [M("weights linked to a valid copy", link_weights(copy_elsewhere)), M("weights linked to /dev/zero", link_weights(lambda s: "/dev/zero")),
            M("weights linked to /etc/passwd", link_weights(lambda s: "/etc/passwd")), M("steerlab.json linked to a valid copy", json_link),
            M("weights a named pipe", fifo), M("weights a folder", directory)]


def _pickles(loader: str, fmt: str) -> list[Mutation]:
    M = lambda name, fn: Mutation("pickles", name, loader, fmt, fn)  # noqa: E731

    def pickled(s: Save) -> bytes:
        buf = io.BytesIO()
        pickle.dump({k: v.numpy() for k, v in s.tensors().items()}, buf)
        return buf.getvalue()

    def only_bin(s: Save):
        for p in list(s.path.iterdir()):
            p.unlink()
        torch.save({"w": torch.zeros(2)}, s.path / "adapter_model.bin")

    def as_tensor(s: Save):
        name = {"interventions": "9.payload", "reft": "modules.payload", "graph": "runs.0.payload"}.get(loader, "payload")
        s.set_tensors({**s.tensors(), name: torch.frombuffer(bytearray(pickle.dumps(os.system)), dtype=torch.uint8)})
        if loader == "interventions":
            s.edit(lambda m: m["config"].update(extra_tensors=True))

    def in_metadata(s: Save):
        h, body = s.header()
        h["__metadata__"] = {"format": "steerlab", "payload": pickle.dumps(os.system).hex()}
        s.set_header(h, body)

    return [M("a pickle as the weights, unsealed", lambda s: s.set_weights(pickled(s), reseal=False)),
            M("a pickle as the weights, resealed", lambda s: s.set_weights(pickled(s))),
            M("a pickle as steerlab.json", lambda s: s.set_meta(pickle.dumps(s.meta()))),
            M("only a pickle .bin", only_bin), M("a pickle as an extra tensor", as_tensor), M("a pickle in the header metadata", in_metadata)]


# --------------------------------------------------------------------------- a peer's save
def _config(fn: Callable[[dict], Any]) -> Callable[[Save], None]:
    """Edit a peer save's ``config.json``."""
    def apply(s: Save) -> None:
        c = json.loads((s.path / "config.json").read_text())
        fn(c)
        (s.path / "config.json").write_text(json.dumps(c))
    return apply


def _rewrite(fn: Callable[[dict], Any]) -> Callable[[Save], None]:
    """Rewrite a peer's ``.bin`` (a valid torch zip of ``fn(tensors)``)."""
    def apply(s: Save) -> None:
        s.wpath.write_bytes(_torch_zip(fn(dict(torch.load(s.wpath, weights_only=True)))))
    return apply


def _matrix(t: dict) -> str:
    """A floating matrix that is not square (transposing it changes its shape)."""
    return sorted(k for k, v in t.items() if v.is_floating_point() and v.dim() == 2 and v.shape[0] != v.shape[1])[0]


def _poison(t: dict) -> dict:
    k = _matrix(t)
    t[k] = t[k].clone()
    t[k].view(-1)[0] = float("nan")
    return t


def _link_bin(s: Save) -> None:
    shutil.copy(s.wpath, s.path.parent / (s.path.name + ".elsewhere"))
    s.wpath.unlink()
    os.symlink(s.path.parent / (s.path.name + ".elsewhere"), s.wpath)


def _peer_file_mutations(loader: str) -> list[Mutation]:
    """Damage to a peer's pickled ``.bin`` files."""
    M = lambda cls, name, fn: Mutation(cls, name, loader, "peer", fn)  # noqa: E731
    out = [M("byte flips", f"{n} bit(s), seed {seed}", lambda s, seed=seed, n=n: _flip_raw(s, seed, n)) for seed, n in ((0, 1), (1, 3))]
    return out + [
        M("truncation", "a .bin by half", lambda s: s.wpath.write_bytes(s.wpath.read_bytes()[: s.wpath.stat().st_size // 2])),
        M("truncation", "a .bin to 0 bytes", lambda s: s.wpath.write_bytes(b"")),
        M("header edits", "the zip's end record broken", lambda s: s.wpath.write_bytes(s.wpath.read_bytes()[:-22] + b"\0" * 22)),
        M("header edits", "not a zip (magic changed)", lambda s: s.wpath.write_bytes(b"XX" + s.wpath.read_bytes()[2:])),
        M("huge values", "a zip of 64 MB in a few KB", lambda s: s.wpath.write_bytes(_zip_bomb())),
        M("NaN", "a NaN in a tensor", _rewrite(_poison)),
        M("dtype and shape lies", "a tensor transposed", _rewrite(lambda t: {**t, _matrix(t): t[_matrix(t)].T.contiguous()})),
        M("dtype and shape lies", "a tensor as int64", _rewrite(lambda t: {**t, _matrix(t): t[_matrix(t)].long()})),
        M("symlinks", "a .bin linked to a valid copy", _link_bin),
        M("symlinks", "a .bin linked to /dev/zero", lambda s: (s.wpath.unlink(), os.symlink("/dev/zero", s.wpath))),
        M("pickles", "a class reference", lambda s: s.wpath.write_bytes(_torch_zip({"weight": os.system}))),
        M("pickles", "a legacy pickle", lambda s: s.wpath.write_bytes(pickle.dumps({"weight": torch.zeros(2, 32).numpy()}))),
        M("pickles", "a list of tensors", lambda s: s.wpath.write_bytes(_torch_zip([torch.zeros(2)]))),
    ]


def _peer_config_mutations(loader: str) -> list[Mutation]:
    """Damage to a peer save's ``config.json``."""
    M = lambda cls, name, fn: Mutation(cls, name, loader, "peer", fn)  # noqa: E731
    C, rep = _config, lambda i, v: _config(lambda c: c["representations"][0].__setitem__(i, v))  # noqa: E731
    text = lambda s: (s.path / "config.json").read_text()  # noqa: E731
    out = [M("truncation", "config.json by half", lambda s: (s.path / "config.json").write_text(text(s)[:200])),
           M("truncation", "sorted_keys without its last entry", C(lambda c: c["sorted_keys"].pop()))]
    for key in ("intervention_types", "representations", "sorted_keys", "intervention_dimensions"):
        out += [M("JSON deletions", f"del {key}", C(lambda c, key=key: c.pop(key))),
                M("JSON type changes", f"{key}={{}}", C(lambda c, key=key: c.__setitem__(key, {"a": 1})))]
    for i, name in ((0, "layer"), (1, "component"), (2, "unit"), (3, "max_number_of_units"), (4, "low_rank_dimension")):
        out.append(M("JSON type changes", f"representations.0.{name}=[1]", rep(i, [1])))
    out += [M("JSON deletions", "representations.0 cut to 2 fields", C(lambda c: c["representations"].__setitem__(0, c["representations"][0][:2]))),
            M("huge values", "low_rank_dimension 10**9", rep(4, 10**9)), M("huge values", "layer 10**9", rep(0, 10**9)),
            M("huge values", "intervention_dimensions 10**9", C(lambda c: c["intervention_dimensions"].__setitem__(0, 10**9))),
            M("NaN", "config.json with NaN", lambda s: (s.path / "config.json").write_text(text(s).replace('"mode"', '"x": NaN, "mode"', 1))),
            M("pickles", "an unknown class name", C(lambda c: c["intervention_types"].__setitem__(0, "<class 'os.system'>")))]
    if loader == "import_pyreft":
        out += [M("config vs record", "low_rank_dimension 3 for rank-2 tensors", rep(4, 3)),
                M("config vs record", "another class for the same tensors",
                  C(lambda c: c["intervention_types"].__setitem__(0, "<class 'pyreft.interventions.NoreftIntervention'>")))]
    else:
        out += [M("config vs record", "interchange_dim beyond the width", C(lambda c: c["intervention_dimensions"].__setitem__(0, 40))),
                M("config vs record", "a component steerlab does not import", rep(1, "head_query_output"))]
    return out


def _torch_zip(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _zip_bomb() -> bytes:
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", b"\0" * (64 * 2**20))  # 64 MB of zeros in a few KB
    return buf.getvalue()


def _flip_raw(s: Save, seed: int, count: int) -> None:
    raw = bytearray(s.wpath.read_bytes())
    g = torch.Generator().manual_seed(seed)
    for _ in range(count):
        i = int(torch.randint(0, len(raw), (1,), generator=g))
        raw[i] ^= 1 << int(torch.randint(0, 8, (1,), generator=g))
    s.wpath.write_bytes(bytes(raw))


# Version 1 shares every check behind the weights file with version 2, so it gets a sample of each
# class (the names below, every 6th JSON deletion and the retyped constructor arguments); version 2
# gets them all (JSON edits: each field deleted, every fourth retyped).
_V1_SAMPLE = ("weights by half", "steerlab.json by half", "without its last entry", "offsets beyond the data", "dtype F64 over F32 bytes",
              "metadata of another tool", "metadata removed", "version 10**30", "manifest shape [10**12]", "a NaN in a tensor",
              "an infinity in a tensor", ": 1e999", "a tensor as float16, manifest agreeing", "manifest dtype only", "a record's dtypes only",
              "set to null", "removed", "an empty object", "weights linked to a valid copy", "weights linked to /dev/zero",
              "steerlab.json linked to a valid copy", "only a pickle .bin", "a pickle as an extra tensor", "a pickle in the header metadata")


def _in_v1_sample(m: Mutation, i: int) -> bool:
    if m.cls in ("byte flips", "config vs record") or (m.cls == "huge values" and m.name.startswith("config.")):
        return True
    if m.cls == "JSON deletions":
        return i % 6 == 0
    if m.cls == "JSON type changes":
        return ".arguments." in m.name
    return any(m.name == n or (n.startswith((": ", "without")) and m.name.endswith(n.removeprefix(": "))) for n in _V1_SAMPLE)


def mutations(bases: dict[tuple[str, str], Path]) -> list[Mutation]:
    out: list[Mutation] = []
    for (loader, fmt), base in bases.items():
        if fmt == "peer":
            out += _peer_file_mutations(loader) + _peer_config_mutations(loader)
            continue
        meta = json.loads((base / "steerlab.json").read_text())
        flips = [Mutation("byte flips", f"{n} bit(s), seed {seed}", loader, fmt, _flip(seed, n)) for seed, n in ((0, 1), (1, 1), (2, 3))]
        every = flips + _truncations(loader, fmt) + _header_edits(loader, fmt) + _huge(loader, fmt, meta) + _nans(loader, fmt, meta) \
            + _lies(loader, fmt, meta) + _contradictions(loader, fmt, meta) + _fingerprints(loader, fmt, meta) + _symlinks(loader, fmt) \
            + _pickles(loader, fmt)
        json_muts = _json_mutations(loader, fmt, meta)
        if fmt == "v1":
            out += [m for i, m in enumerate(every + json_muts) if _in_v1_sample(m, i)]
        else:
            out += flips[::2] + every[3:] + [m for i, m in enumerate(json_muts) if m.cls == "JSON deletions" or i % 4 == 1]
    return out
