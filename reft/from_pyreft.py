"""``import_pyreft``: a pyreft save (``reft_model.save(dir)``) as a steerlab :class:`ReftModel`.

pyreft saves through pyvene: ``config.json`` and one pickled ``intkey_<key>.bin``
per intervention. This is, with :mod:`steerlab.interventions.from_pyvene`, the
only code in steerlab that reads a pickle, with ``torch.load(weights_only=True)``
and only flat dictionaries of tensors; ``ReftModel.from_pretrained`` never
reaches it. Which stored parameter is which (steerlab's ``R`` is ``r × d``,
pyreft's rotation ``d × r``):

| pyreft | its tensors | steerlab |
|---|---|---|
| ``LoreftIntervention`` | ``rotate_layer`` (``d × r``, the orthogonal weight itself), ``weight``/``bias`` (``W``, ``b``) | ``LoReFT``: ``R = rotate_layer.T``, ``W``, ``b`` |
| ``NoreftIntervention`` | ``proj_layer.weight`` (``W₂``, ``r × d``), ``learned_source.weight/bias`` | ``NoReFT``: ``proj_weight = W₂`` (``proj_layer.bias`` must be absent or zero: steerlab's edit has none) |
| ``DireftIntervention`` | ``rotate_layer`` under torch's orthogonal parametrisation, ``learned_source`` | ``DiReFT(orthogonal=True)`` |
| ``NodireftIntervention`` | ``proj_layer.weight`` (``W₂``), ``learned_source`` | ``DiReFT``: ``out_weight = W₂`` (``proj_layer.bias`` is unused by pyreft's forward) |
| ``ConsreftIntervention`` | ``rotate_layer`` (parametrised), ``learned_source`` (``b``) | ``ConsReFT``: ``R``, ``bias = b`` |
| ``LobireftIntervention`` | ``rotate_layer`` (parametrised), ``learned_source`` (``b``) | ``LobiReFT``: ``R``, ``bias = b`` |

pyreft's save records neither the activation, the dropout nor the prompt
positions (they are constructor and data-collator arguments there): give them
here (``act_fn=``, ``dropout=``, ``positions=``) as you gave them to pyreft.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from steerlab.interventions import wrap
from steerlab.interventions.errors import FileFormatError, SteerlabError
from steerlab.interventions.from_pyvene import PeerIntervention, orthogonal_weight, read_pyvene
from steerlab.reft._base import ReftIntervention
from steerlab.reft.interventions import ConsReFT, DiReFT, LobiReFT, LoReFT, NoReFT
from steerlab.reft.model import ReftModel, get_reft_model

__all__ = ["import_pyreft"]

_TYPES = ("LoreftIntervention", "NoreftIntervention", "DireftIntervention", "NodireftIntervention", "ConsreftIntervention",
          "LobireftIntervention")
_KNOWN = {f"pyreft.interventions.{n}": n for n in _TYPES}


def import_pyreft(directory: str | Path, model: nn.Module, tokenizer=None, *, positions: Any, act_fn: str | None = None,
                  dropout: float = 0.0, dtype: torch.dtype | str | None = None) -> ReftModel:
    """pyreft's save in ``directory`` as a :class:`ReftModel` on ``model`` (see the module docstring).

    ``positions``: the prompt positions pyreft's data module used (``"f1+l1"``, ``"l1"``, or
    ``"per-call"`` to pass ``intervention_positions`` to each forward); all interventions form one
    weight group. Reads pickles (``weights_only=True``): only for a save you would run.
    """
    peers = read_pyvene(directory, _KNOWN)
    lab = wrap(model, tokenizer)
    try:
        ivs = [_build(p, lab, positions=positions, act_fn=act_fn, dropout=dropout, dtype=dtype, where=f"{directory}: {p.key}")
               for p in peers]
    finally:
        lab.unwrap()
    return get_reft_model(model, ivs, tokenizer)


def _tensor(p: PeerIntervention, name: str, shape: tuple[int, ...], where: str) -> Tensor:
    t = p.state.get(name)
    if t is None or tuple(t.shape) != shape or not t.is_floating_point():
        got = "missing" if t is None else f"{t.dtype} {list(t.shape)}"
        raise FileFormatError(f"{where}: {p.type_name} tensor {name!r} is {got}; expected a float tensor {list(shape)}")
    return t


def _build(p: PeerIntervention, lab, *, positions, act_fn, dropout, dtype, where: str) -> ReftIntervention:
    try:
        d = lab.facts.site_shape(lab.resolve(p.site))[-1]
    except SteerlabError as e:
        raise FileFormatError(f"{where}: {e}") from e
    r = p.low_rank_dimension
    if r is None or not 1 <= r <= d:
        raise FileFormatError(f"{where}: low_rank_dimension {r!r} for a site of width {d}")
    if p.interchange_dim is not None and p.interchange_dim != d:
        raise FileFormatError(f"{where}: intervention dimension {p.interchange_dim} for a site of width {d} (a ReFT edits the whole vector)")
    kw = {"rank": r, "width": d, "positions": positions, "dropout": dropout, "dtype": dtype}
    lin = ("learned_source.weight", "learned_source.bias") if "learned_source.weight" in p.state else ("weight", "bias")
    t = p.type_name
    if t in ("ConsreftIntervention", "LobireftIntervention"):
        rot = orthogonal_weight(p.state, "rotate_layer", (d, r), where)
        iv: ReftIntervention = (ConsReFT if t == "ConsreftIntervention" else LobiReFT)(p.site, **kw)
        values = {"rotation.weight": rot, "bias": _tensor(p, "learned_source", (r,), where)}
    else:
        values = {"weight": _tensor(p, lin[0], (r, d), where), "bias": _tensor(p, lin[1], (r,), where)}
        if t == "LoreftIntervention":
            iv = LoReFT(p.site, act_fn=act_fn, **kw)
            values["rotation.weight"] = orthogonal_weight(p.state, "rotate_layer", (d, r), where)
        elif t == "DireftIntervention":
            iv = DiReFT(p.site, act_fn=act_fn, orthogonal=True, **kw)
            values["rotation.weight"] = orthogonal_weight(p.state, "rotate_layer", (d, r), where)
        else:
            w2 = _tensor(p, "proj_layer.weight", (r, d), where)
            b2 = p.state.get("proj_layer.bias")
            if t == "NoreftIntervention" and b2 is not None and bool(b2.abs().max() > 0):
                raise FileFormatError(f"{where}: NoreftIntervention with a nonzero proj_layer bias (add_bias=True) has no steerlab equivalent")
            iv = (NoReFT if t == "NoreftIntervention" else DiReFT)(p.site, act_fn=act_fn, **kw)
            values["proj_weight" if t == "NoreftIntervention" else "out_weight"] = w2
    _assign(iv, values)
    return iv


def _assign(iv: ReftIntervention, values: dict[str, Tensor]) -> None:
    """Each tensor into place; a rotation ``A`` (``d × r``) is stored as steerlab keeps it (``Rᵀ``)."""
    with torch.no_grad():
        for name, value in values.items():
            target = iv.get_parameter(name)
            target.copy_(value.to(target.dtype))
    for m in iv.modules():
        if hasattr(m, "_cached"):
            m._cached = None
