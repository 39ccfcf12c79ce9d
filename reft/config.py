"""``ReftConfig``: which interventions a :class:`~steerlab.reft.ReftModel` places, and where.

One intervention type at one site of each listed layer, at the same prompt
positions in every layer::

    ReftConfig(layers=[4, 8], rank=4, positions="f1+l1")         # 2 interventions
    ReftConfig(layers="all", rank=8, positions="f7+l7")          # the commonsense recipe (tied)
    ReftConfig(layers=[4], positions="f3+l3", tied=False)        # first 3 and last 3 get their own weights

``site`` names a block site (``"resid_post"``, the block output, by default;
``"attn.out"``, ``"mlp.out"``, ``"resid_mid"``, ...), placed at
``blocks.{layer}.{site}``. ``positions`` count the *prompt's* real tokens
(``"f7+l7"``: first 7 and last 7; ``"l1"``: the last; ``[0, -1]``): the data
collators turn them into per-example positions after tokenisation. With
``tied=False`` and a spec ``"fA+lB"``, the first ``A`` and the last ``B``
positions get separate interventions (pyreft's ``share_weights=False``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from steerlab.interventions.errors import ConfigError
from steerlab.interventions.units import Positions
from steerlab.reft.interventions import INTERVENTION_TYPES

__all__ = ["ReftConfig", "TaskType"]


class TaskType:
    """What the base model is trained for (pyreft/PEFT vocabulary)."""

    CAUSAL_LM = "CAUSAL_LM"
    SEQ_CLS = "SEQ_CLS"


@dataclass
class ReftConfig:
    """Where and what to intervene.

    Args:
        layers: layer indices (negative counts from the end), one int, or
            ``"all"``.
        rank: the rank ``r`` of each intervention.
        positions: prompt positions (``"f7+l7"``, ``"l1"``, ``3``, ``[0, -1]``).
        intervention: ``"loreft"`` (default), ``"direft"``, ``"noreft"``,
            ``"consreft"``, ``"lobireft"``.
        site: the block site (default ``"resid_post"``, the block output).
        tied: one intervention per layer for all positions (``True``), or,
            for ``"fA+lB"``, one for the first and one for the last positions.
        act_fn: passed to each intervention.
        dropout: passed to each intervention.
        dtype: of the learned projections (``None``: the model's).
        modules_to_save: base-model modules trained (and saved) along with
            the interventions, e.g. ``["classifier"]`` or ``["score"]`` heads.
        task_type: ``"CAUSAL_LM"`` or ``"SEQ_CLS"`` (informative).
        intervention_kwargs: extra constructor arguments of the type
            (``{"orthogonal": True}`` for DiReFT).
    """

    layers: list[int] | int | str = field(default_factory=lambda: [0])
    rank: int = 4
    positions: Any = "l1"
    intervention: str = "loreft"
    site: str = "resid_post"
    tied: bool = True
    act_fn: str | None = None
    dropout: float = 0.0
    dtype: str | None = None
    modules_to_save: list[str] = field(default_factory=list)
    task_type: str = TaskType.CAUSAL_LM
    intervention_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.dtype is not None:
            from steerlab.reft._base import parse_dtype

            self.dtype = str(parse_dtype(self.dtype)).removeprefix("torch.")
        if self.intervention not in INTERVENTION_TYPES:
            raise ConfigError(f"intervention={self.intervention!r}: expected one of {sorted(INTERVENTION_TYPES)}")
        if isinstance(self.layers, bool) or not (
            self.layers == "all"
            or isinstance(self.layers, int)
            or (isinstance(self.layers, (list, tuple)) and self.layers and all(isinstance(x, int) and not isinstance(x, bool) for x in self.layers))
        ):
            raise ConfigError(f"layers={self.layers!r}: expected a non-empty list of layer indices, an int, or 'all'")
        if isinstance(self.layers, tuple):
            self.layers = list(self.layers)
        if self.site.startswith("blocks.") or "{" in self.site:
            raise ConfigError(f"site={self.site!r}: give the site within a block ('resid_post', 'attn.out', 'mlp.out', ...)")
        spec = Positions(self.positions)
        if spec.kind in ("all", "call", "tensor"):
            raise ConfigError(
                f"positions={self.positions!r}: ReFT positions are prompt positions given as a spec "
                "('f7+l7', 'l1', 3, [0, -1]); per-example tensors come from the data collator"
            )
        if isinstance(self.positions, tuple):
            self.positions = list(self.positions)
        if not self.tied and (spec.kind != "firstlast" or not spec.first or not spec.last):
            raise ConfigError(f"tied=False needs a spec like 'f7+l7' (first and last positions); got positions={self.positions!r}")
        if not isinstance(self.modules_to_save, (list, tuple)) or not all(isinstance(m, str) for m in self.modules_to_save):
            raise ConfigError(f"modules_to_save={self.modules_to_save!r}: expected a list of module names")
        self.modules_to_save = list(self.modules_to_save)

    # -- derived ----------------------------------------------------------
    def layer_indices(self, n_layers: int) -> list[int]:
        """The layers as non-negative indices, checked against the model's ``n_layers``."""
        raw = list(range(n_layers)) if self.layers == "all" else [self.layers] if isinstance(self.layers, int) else list(self.layers)
        bad = [x for x in raw if not -n_layers <= x < n_layers]
        if bad:
            from steerlab.interventions.errors import SiteNotFound

            raise SiteNotFound(
                f"blocks.{bad[0]}.{self.site}", [],
                reason=f"layers={bad} are not in this model, which has {n_layers} layers (0..{n_layers - 1})",
            )
        out = [x % n_layers for x in raw]
        if len(set(out)) != len(out):
            raise ConfigError(f"layers={self.layers!r} lists a layer twice")
        return out

    def position_groups(self) -> list[Any]:
        """The position spec of each weight group: ``[spec]`` when tied, ``["fA", "lB"]`` when not."""
        spec = Positions(self.positions)
        if self.tied or spec.first == 0 or spec.last == 0:
            return [self.positions]
        return [f"f{spec.first}", f"l{spec.last}"]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReftConfig:
        known = set(cls.__dataclass_fields__)
        extra = sorted(set(d) - known)
        if extra:
            raise ConfigError(f"unknown ReftConfig fields {extra}; known: {sorted(known)}")
        return cls(**d)
