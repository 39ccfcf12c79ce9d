"""``Subspace``: an orthonormal basis at a site — what DAS finds and ReFT can start from.

A subspace is ``k`` orthonormal rows ``R`` (``[k, d]``, fp32) of the space of
one site's value, with the units it lives at (positions, heads) and free
metadata (the causal variable, the IIA it reached, the method that found
it). It is the hand-off between the locating and steering layers: DAS
results export one, ``LoReFT.from_subspace`` accepts one, and it saves in the
one file format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from steerlab.interventions import fileformat
from steerlab.interventions.errors import FileFormatError, SubspaceSizeError
from steerlab.interventions.units import Positions

__all__ = ["Subspace"]


@dataclass
class Subspace:
    """An orthonormal basis ``basis`` (``[k, d]``, rows orthonormal) at ``site``.

    ``positions`` and ``heads`` say which units of the site it was found at;
    ``metadata`` holds JSON data (``variable``, ``iia``, ``method``, ...).
    """

    basis: Float[Tensor, "k d"]
    site: str
    positions: Any = None
    heads: tuple[int, ...] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        b = self.basis.detach().to(torch.float32)
        if b.dim() != 2 or b.shape[0] < 1 or b.shape[0] > b.shape[1]:
            raise SubspaceSizeError(f"a Subspace basis is [k, d] with 1 <= k <= d; got shape {tuple(b.shape)}")
        k, d = b.shape
        err = (b @ b.T - torch.eye(k)).abs().max().item()
        tol = 10 * d * torch.finfo(torch.float32).eps * max(1.0, k ** 0.5)
        if err > max(tol, 1e-4):
            raise SubspaceSizeError(f"the basis rows are not orthonormal (max |R Rᵀ - I| = {err:.2e}, tolerance {max(tol, 1e-4):.1e})")
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

    def project(self, h: Float[Tensor, "*b d"]) -> Float[Tensor, "*b k"]:
        """Coordinates of ``h`` in the subspace: ``h Rᵀ``."""
        return h.to(torch.float32) @ self.basis.to(h.device).T

    def projector(self) -> Float[Tensor, "d d"]:
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

    @classmethod
    def from_record(cls, record: dict[str, Any], basis: Tensor) -> Subspace:
        if tuple(basis.shape) != (record.get("size"), record.get("width")):
            raise FileFormatError(f"subspace basis has shape {tuple(basis.shape)} but the record says [{record.get('size')}, {record.get('width')}]")
        return cls(basis, record["site"], record.get("positions"), record.get("heads"), dict(record.get("metadata") or {}))

    def save(self, directory: str | Path, *, fingerprint: dict | None = None) -> Path:
        """Save (``steerlab.json`` + ``weights.safetensors``); ``fingerprint``: ``lab.fingerprint()``."""
        return fileformat.save(directory, kind="subspace", config=self.to_record(), tensors={"basis": self.basis}, fingerprint=fingerprint)

    @classmethod
    def load(cls, directory: str | Path, *, fingerprint: dict | None = None) -> Subspace:
        meta, tensors = fileformat.load(directory, kind="subspace", fingerprint=fingerprint)
        if "basis" not in tensors or not isinstance(meta["config"].get("site"), str):
            raise FileFormatError(f"{directory}: a subspace needs a 'basis' tensor and a 'site' in its record")
        try:
            return cls.from_record(meta["config"], tensors["basis"])
        except SubspaceSizeError as e:
            raise FileFormatError(f"{directory}: {e}") from None

    def __repr__(self) -> str:
        var = self.metadata.get("variable")
        return f"Subspace(site={self.site!r}, size={self.size}, width={self.width}" + (f", variable={var!r})" if var else ")")
