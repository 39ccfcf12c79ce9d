"""``Subspace``: an orthonormal basis at a site — what DAS finds and ReFT can start from.

A subspace is ``rank`` orthonormal rows ``R`` (``[rank, width]``, fp32) of the space of
one site's value, with the units it lives at (positions, heads) and free
metadata (the causal variable, the IIA it reached, the method that found
it). It is the hand-off between the locating and steering layers: DAS
results export one, ``LoReFT.from_subspace`` accepts one, and it saves in the
one file format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from steerlab.interventions import fileformat
from steerlab.interventions.errors import FileFormatError, SteerlabError, SubspaceSizeError
from steerlab.interventions.fileformat import TensorSpec, field_of
from steerlab.interventions.units import PositionSpec, Positions

__all__ = ["Subspace"]


@dataclass
class Subspace:
    """An orthonormal basis ``basis`` (``[rank, width]``, rows orthonormal) at ``site``.

    ``positions`` and ``heads`` say which units of the site it was found at;
    ``metadata`` holds JSON data (``variable``, ``iia``, ``method``, ...).
    """

    basis: Float[Tensor, "rank width"]
    site: str
    positions: PositionSpec = None  # kept as its JSON form
    heads: Sequence[int] | None = None  # kept as a tuple
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.basis, Tensor):
            raise SubspaceSizeError(f"a Subspace basis is a [rank, width] tensor; got {type(self.basis).__name__}")
        b = self.basis.detach().to(torch.float32)
        if b.dim() != 2 or b.shape[0] < 1 or b.shape[0] > b.shape[1]:
            raise SubspaceSizeError(f"a Subspace basis is [rank, width] with 1 <= rank <= width; got shape {tuple(b.shape)}")
        bad = int((~torch.isfinite(b)).sum())
        if bad:
            raise SubspaceSizeError(f"the basis holds {bad} NaN or infinite value(s); expected finite orthonormal rows "
                                    "(a fit on NaN activations, or a diverged one, produces this)")
        k, d = b.shape
        err = (b @ b.T - torch.eye(k)).abs().max().item()
        tol = max(10 * d * torch.finfo(torch.float32).eps * max(1.0, k ** 0.5), 1e-4)
        if not err <= tol:  # written so that a NaN error fails too
            raise SubspaceSizeError(f"the basis rows are not orthonormal (max |R Rᵀ - I| = {err:.2e}, tolerance {tol:.1e})")
        self.basis = b.cpu()
        self.positions = Positions(self.positions).to_json()
        if self.heads is not None:
            self.heads = tuple(int(h) for h in self.heads)

    @property
    def size(self) -> int:
        return self.basis.shape[0]

    @property
    def width(self) -> int:
        return self.basis.shape[1]

    def project(self, h: Float[Tensor, "*batch width"]) -> Float[Tensor, "*batch rank"]:
        """Coordinates of ``h`` in the subspace: ``h Rᵀ``."""
        return h.to(torch.float32) @ self.basis.to(h.device).T

    def projector(self) -> Float[Tensor, "width width"]:
        """``Rᵀ R``, the orthogonal projection onto the subspace."""
        return self.basis.T @ self.basis

    def intervention(self, **kwargs):
        """A :class:`SubspaceInterchange` over this subspace at its site and units
        (``source=``, ``positions=`` ... as for any intervention)."""
        from steerlab.interventions.ops import SubspaceInterchange

        kwargs.setdefault("positions", self.positions)
        if self.heads is not None:
            kwargs.setdefault("heads", list(self.heads))
        return SubspaceInterchange(self.site, size=self.size, width=self.width, init=self.basis, **kwargs)

    # -- the file format ---------------------------------------------------------
    def to_record(self) -> dict[str, Any]:
        return {"site": self.site, "positions": self.positions, "heads": list(self.heads) if self.heads else None,
                "size": self.size, "width": self.width, "metadata": self.metadata}

    @staticmethod
    def check_record(record: Any, spec: TensorSpec | None, where: str) -> None:
        """A subspace record's fields and types, and its basis as the weights header declares it
        (``[size, width]`` float32), checked before anything is built."""
        field_of(record, "site", str, where)
        field_of(record, "positions", (str, list, type(None)), where)
        heads = field_of(record, "heads", (list, type(None)), where)
        size, width = field_of(record, "size", int, where), field_of(record, "width", int, where)
        field_of(record, "metadata", dict, where)
        if heads is not None and not all(isinstance(h, int) and not isinstance(h, bool) and h >= 0 for h in heads):
            raise FileFormatError(f"{where}: heads {heads!r:.80}; expected a list of head indices")
        try:
            Positions(record["positions"])
        except SteerlabError as e:
            raise FileFormatError(f"{where}: {e}") from None
        if not 1 <= size <= width:
            raise FileFormatError(f"{where}: size {size} and width {width}; expected 1 <= size <= width")
        if spec is None or spec.shape != (size, width) or spec.dtype != torch.float32:
            raise FileFormatError(f"{where}: the basis is {spec}; the record says float32[{size}, {width}]")

    @classmethod
    def from_record(cls, record: dict[str, Any], basis: Tensor) -> Subspace:
        if tuple(basis.shape) != (record.get("size"), record.get("width")):
            raise FileFormatError(f"subspace basis has shape {tuple(basis.shape)} but the record says [{record.get('size')}, {record.get('width')}]")
        try:
            return cls(basis, record["site"], record.get("positions"), record.get("heads"), dict(record.get("metadata") or {}))
        except SubspaceSizeError as e:
            raise FileFormatError(f"the saved subspace at {record['site']!r}: {e}") from None

    def save(self, directory: str | Path, *, fingerprint: dict | None = None) -> Path:
        """Save (``steerlab.json`` + the weights file it names, atomically; see
        :mod:`~steerlab.interventions.fileformat` for the files a save owns);
        ``fingerprint``: ``lab.fingerprint()``."""
        return fileformat.save(directory, kind="subspace", config=self.to_record(), tensors={"basis": self.basis}, fingerprint=fingerprint)

    @classmethod
    def load(cls, directory: str | Path, *, fingerprint: dict | None = None, lab=None) -> Subspace:
        """Load a saved subspace. ``fingerprint`` (``lab.fingerprint()``) checks the model it was saved
        for; ``lab`` checks that and also that the site exists there with the subspace's width."""
        if lab is not None:
            fingerprint = lab.fingerprint()
        saved = fileformat.read(directory, kind="subspace", fingerprint=fingerprint)
        if set(saved.specs) != {"basis"}:
            raise FileFormatError(f"{directory}: a subspace holds one tensor, 'basis'; the file holds {sorted(saved.specs)[:5]}")
        cls.check_record(saved.config, saved.specs["basis"], f"{directory}")
        if lab is not None:
            _check_site(saved.config, lab, f"{directory}")
        return cls.from_record(saved.config, saved.tensors()["basis"])

    def __repr__(self) -> str:
        var = self.metadata.get("variable")
        return f"Subspace(site={self.site!r}, size={self.size}, width={self.width}" + (f", variable={var!r})" if var else ")")


def _check_site(record: dict, lab, where: str) -> None:
    """The subspace's site exists on ``lab``'s model, its heads are in range, and its width is the site's."""
    facts = getattr(lab, "facts", lab)  # a Lab or its ModelFacts
    try:
        site = facts.resolve(record["site"])
        shape = facts.site_shape(site)
    except SteerlabError as e:
        raise FileFormatError(f"{where}: {e}") from e
    heads = record["heads"]
    if heads is not None and (not site.n_heads or any(h >= site.n_heads for h in heads)):
        raise FileFormatError(f"{where}: heads {heads} at {site.name!r}, which has {site.n_heads or 'no'} heads")
    if record["width"] != shape[-1]:
        raise FileFormatError(f"{where}: width {record['width']}, but {site.name!r} on this model has width {shape[-1]}")
