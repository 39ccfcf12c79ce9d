"""Reading a peer's save: pyvene's ``IntervenableModel.save`` (and pyreft's, which is the same).

A pyvene save is a folder with ``config.json`` (the representations: layer,
component, low-rank dimension; the intervention class names as strings) and
one ``intkey_<key>.bin`` per trainable intervention, written by
``torch.save`` — a pickle. This module (with :mod:`steerlab.reft.from_pyreft`,
built on it) is the only place steerlab reads a pickled file, and only when
asked explicitly (:func:`import_pyvene`, :func:`steerlab.reft.import_pyreft`);
no steerlab loader reaches it. It reads with ``torch.load(weights_only=True)``
and keeps only a flat ``{name: Tensor}`` dictionary: anything else (another
object, a class reference, a legacy non-zip file, a zip that would unpack to
far more than its size) is refused with :class:`FileFormatError`. Class names
are matched as strings against a fixed table, never imported.

Layout conventions (where the peers and steerlab differ): steerlab's ``R`` is
``k × d`` with orthonormal *rows*; pyvene's and pyreft's rotation layers hold
``d × k`` (orthonormal *columns*), so ``R = rotate_layer.weight.T``. A
full-rotation pyvene intervention (``RotatedSpaceIntervention``, ``d × d``)
swaps its first ``interchange_dim`` rotated coordinates: its subspace is the
first ``interchange_dim`` columns. Rotations stored under torch's orthogonal
parametrisation (``rotate_layer.parametrizations.weight.original`` and
``...weight.0.base``) are evaluated with torch's own parametrisation, so the
imported ``R`` is the one the peer used.
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from steerlab.interventions import fileformat
from steerlab.interventions.errors import FileFormatError, SteerlabError
from steerlab.interventions.ops import Intervention, Interchange, SubspaceInterchange

if TYPE_CHECKING:
    from steerlab.interventions.lab import Lab

__all__ = ["PeerIntervention", "read_pyvene", "read_pickled_tensors", "orthogonal_weight", "import_pyvene", "COMPONENTS"]

#: pyvene component -> steerlab site within a block
COMPONENTS = {"block_output": "resid_post", "block_input": "resid_pre", "mlp_output": "mlp.out", "attention_output": "attn.out"}
_CLASS_RE = re.compile(r"<class '([A-Za-z_][\w.]*)'>")
_KEY_RE = re.compile(r"[\w#.+-]+")
_FIELDS = ("layer", "component", "unit", "max_number_of_units", "low_rank_dimension")
_NO_WEIGHTS = {"VanillaIntervention"}  # pyvene saves a .bin only for trainable interventions


@dataclass
class PeerIntervention:
    """One intervention of a peer's save, as read: its class name (no module), placement and tensors."""

    key: str
    type_name: str
    layer: int
    site: str
    low_rank_dimension: int | None
    interchange_dim: int | None
    state: dict[str, Tensor]


def read_pickled_tensors(path: Path, *, limit: int = 2**34) -> dict[str, Tensor]:
    """``{name: Tensor}`` from a ``torch.save`` file, read with ``weights_only=True``; anything else refused."""
    raw = fileformat.read_file(path, limit)
    import io

    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as z:
            unpacked = sum(i.file_size for i in z.infolist())
    except (zipfile.BadZipFile, zipfile.LargeZipFile, UnicodeDecodeError, ValueError, EOFError, OSError) as e:
        raise FileFormatError(f"{path} is not a torch zip archive ({type(e).__name__}: {str(e)[:80]}); steerlab reads only "
                              "torch.save's zip format, not legacy or foreign pickles") from None
    if unpacked > 2 * len(raw) + 2**20:
        raise FileFormatError(f"{path} would unpack to {unpacked:,} bytes from {len(raw):,}; refused (a zip bomb)")
    try:
        obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - the unpickler's refusals come as many types
        raise FileFormatError(f"{path} is not a plain tensor file ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        raise FileFormatError(f"{path} holds {type(obj).__name__}, not a dictionary of named tensors")
    bad = [k for k, v in obj.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise FileFormatError(f"{path}: tensor(s) {bad[:5]} hold NaN or infinite values")
    return dict(obj)


def read_pyvene(directory: str | Path, known: dict[str, str]) -> list[PeerIntervention]:
    """The interventions of a pyvene/pyreft save; ``known`` maps the accepted class names (full
    dotted name -> short name). Every field is checked before any ``.bin`` is read."""
    directory = Path(directory)
    cfg = fileformat.parse_json(fileformat.read_file(directory / "config.json", 2**24), directory / "config.json")
    where = f"{directory}/config.json"
    types = fileformat.field_of(cfg, "intervention_types", list, where)
    reps = fileformat.field_of(cfg, "representations", list, where)
    keys = fileformat.field_of(cfg, "sorted_keys", list, where)
    dims = fileformat.field_of(cfg, "intervention_dimensions", list, where)
    if not (len(types) == len(reps) == len(keys) == len(dims)) or not types:
        raise FileFormatError(f"{where}: {len(types)} intervention types, {len(reps)} representations, {len(keys)} keys and "
                              f"{len(dims)} dimensions; expected as many of each (at least one)")
    plans = [_plan(t, r, k, d, known, f"{where}: intervention {i}") for i, (t, r, k, d) in enumerate(zip(types, reps, keys, dims))]
    out = []
    for key, name, rep, dim in plans:
        state = read_pickled_tensors(directory / f"intkey_{key}.bin") if name not in _NO_WEIGHTS else {}
        out.append(PeerIntervention(key, name, rep["layer"], f"blocks.{rep['layer']}.{COMPONENTS[rep['component']]}",
                                    rep["low_rank_dimension"], dim, state))
    return out


def _plan(type_str: Any, rep: Any, key: Any, dim: Any, known: dict[str, str], where: str) -> tuple[str, str, dict, int | None]:
    m = _CLASS_RE.fullmatch(type_str) if isinstance(type_str, str) else None
    if m is None or m[1] not in known:
        raise FileFormatError(f"{where}: intervention type {type_str!r:.80}; steerlab imports {sorted(known)}")
    if isinstance(rep, list):
        rep = dict(zip(_FIELDS, rep))
    if not isinstance(rep, dict):
        raise FileFormatError(f"{where}: representation {rep!r:.80}; expected a list or an object")
    layer = fileformat.field_of(rep, "layer", int, where)
    comp = fileformat.field_of(rep, "component", str, where)
    if comp not in COMPONENTS:
        raise FileFormatError(f"{where}: component {comp!r}; steerlab imports {sorted(COMPONENTS)}")
    if fileformat.field_of(rep, "unit", str, where) != "pos":
        raise FileFormatError(f"{where}: unit {rep['unit']!r}; steerlab imports interventions on positions ('pos')")
    units = rep.get("max_number_of_units", 1)
    if not isinstance(units, int) or isinstance(units, bool) or units < 1:
        raise FileFormatError(f"{where}: max_number_of_units {units!r:.40}; expected a positive integer")
    rank = rep.get("low_rank_dimension")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise FileFormatError(f"{where}: low_rank_dimension {rank!r}; expected a positive integer")
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
        raise FileFormatError(f"{where}: key {key!r:.80}; expected a pyvene key such as 'layer_0_comp_block_output_unit_pos_nunit_1#0'")
    if dim is not None and (not isinstance(dim, int) or isinstance(dim, bool) or dim < 1):
        raise FileFormatError(f"{where}: intervention dimension {dim!r}; expected a positive integer")
    if layer < 0:
        raise FileFormatError(f"{where}: layer {layer}; expected a layer index")
    return key, m[1].rsplit(".", 1)[1], {"layer": layer, "component": comp, "low_rank_dimension": rank}, dim


def orthogonal_weight(state: dict[str, Tensor], prefix: str, shape: tuple[int, int], where: str) -> Tensor:
    """The weight a module under torch's orthogonal parametrisation computes from its saved state
    (``<prefix>.parametrizations.weight.original`` and ``...weight.0.base``), or ``<prefix>``
    itself when the peer saved the weight directly."""
    used = [v for k, v in state.items() if k == prefix or k.startswith(prefix + ".")]
    if any(not v.is_floating_point() for v in used):
        raise FileFormatError(f"{where}: the saved rotation holds {sorted({str(v.dtype) for v in used})}; expected floating tensors")
    if prefix in state:
        w = state[prefix]
    else:
        m = torch.nn.Module()
        with torch.random.fork_rng(devices=[]):
            m.weight = torch.nn.Parameter(torch.nn.init.orthogonal_(torch.empty(shape)))
            torch.nn.utils.parametrizations.orthogonal(m)
        sub = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
        try:
            m.load_state_dict(sub, strict=True)
        except (RuntimeError, KeyError) as e:
            raise FileFormatError(f"{where}: the saved rotation does not fit a {list(shape)} orthogonal map: {str(e)[:200]}") from None
        with torch.no_grad():
            w = m.weight.detach().clone()
    if tuple(w.shape) != tuple(shape):
        raise FileFormatError(f"{where}: the rotation is {list(w.shape)}; expected {list(shape)}")
    return w.float()


# --------------------------------------------------------------------------- pyvene's DAS family
_PYVENE = {f"pyvene.models.interventions.{n}": n for n in ("VanillaIntervention", "RotatedSpaceIntervention", "LowRankRotatedSpaceIntervention")}


def import_pyvene(directory: str | Path, lab: Lab, *, positions=None) -> list[Intervention]:
    """A pyvene save as steerlab interventions on ``lab``'s model (``IntervenableModel.save``;
    ``VanillaIntervention`` -> :class:`Interchange`, ``RotatedSpaceIntervention`` and
    ``LowRankRotatedSpaceIntervention`` -> :class:`SubspaceInterchange`). pyvene gives positions
    with each call (``unit_locations``), so its save has none: ``positions`` (and a ``source``)
    are set on the returned interventions as on any other. Reads pickles, with
    ``weights_only=True``: only for a save you would run."""
    out = []
    for i, p in enumerate(read_pyvene(directory, _PYVENE)):
        where = f"{directory}: intervention {i} ({p.type_name} at {p.site})"
        try:
            width = lab.facts.site_shape(lab.resolve(p.site))[-1]
        except SteerlabError as e:
            raise FileFormatError(f"{where}: {e}") from e
        if p.low_rank_dimension is not None and p.low_rank_dimension > width:
            raise FileFormatError(f"{where}: low_rank_dimension {p.low_rank_dimension} for a site of width {width}")
        if p.type_name == "VanillaIntervention":
            iv: Intervention = Interchange(p.site, positions=positions)
        else:
            low = p.type_name == "LowRankRotatedSpaceIntervention"
            k = p.low_rank_dimension if low else p.interchange_dim
            if k is None or k > width:
                raise FileFormatError(f"{where}: subspace size {k!r} for a site of width {width}")
            full = orthogonal_weight(p.state, "rotate_layer", (width, k if low else width), where)
            iv = SubspaceInterchange(p.site, size=k, width=width, init=full[:, :k].T.contiguous(), positions=positions)
        out.append(iv)
    return out
