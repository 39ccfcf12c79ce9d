"""Unit selection: which positions, heads and dimensions of a site an intervention touches.

Positions count each example's **real** tokens, whatever the padding side:
``0`` is an example's first real token and ``-1`` its last, resolved to padded
indices through the attention mask (which must pad on one side only). Specs:

========================  =====================================================
``None`` / ``"all"``      every position (padding included)
``3``, ``-1``             one position
``[0, -1]``, ``slice``    several positions, the same for every example
``"f7+l7"``, ``"l1"``     the first 7 and last 7 real tokens; a prompt shorter
                          than the spec gets the distinct positions that exist
                          (a slot whose token would repeat another slot or does
                          not exist is left empty, never a padding token)
``"last"``, ``"first"``   the same as ``"l1"`` and ``"f1"``
``LongTensor[batch, k]``  per example, real-token indices, padded with ``-1``
``"per-call"``            given with each call (``positions=`` of ``run``, or
                          ``intervention_positions=`` while attached)
========================  =====================================================

This is the one position grammar: the base layer, sweeps, DAS (besides an
encoder's named positions) and ReFT all parse specs here, and validate them
against real lengths with :meth:`Positions.validate` / :func:`check_real_indices`.

Resolution gives ``LongTensor[batch, k]`` of padded indices (``-1`` = empty
slot). Gather and scatter are vectorised over the batch; nothing here calls
``.item()`` or ``.tolist()`` on a device tensor.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from steerlab.interventions.errors import PositionOutOfRange, UnitError

__all__ = [
    "Positions",
    "PositionSpec",
    "MaskInfo",
    "gather_positions",
    "scatter_positions",
    "position_index",
    "parse_heads",
    "parse_dims",
    "check_real_indices",
    "check_static_positions",
]

_FL_RE = re.compile(r"^(?:f(?P<f>\d+))?(?:\+)?(?:l(?P<l>\d+))?$")
_ALIASES = {"last": "l1", "first": "f1"}


def check_real_indices(idx: Int[Tensor, "batch *k"], lengths: Sequence[int], what: str = "positions") -> None:
    """Raise :class:`PositionOutOfRange` unless every slot of ``idx`` is ``-1`` (empty) or a
    real-token index below its example's length (``lengths``, on the host)."""
    n = torch.tensor(list(lengths), dtype=idx.dtype, device=idx.device).view(-1, *([1] * (idx.dim() - 1)))
    bad = ((idx < -1) | (idx >= n)).nonzero()
    if len(bad):
        at = tuple(int(v) for v in bad[0])
        i, m = at[0], int(lengths[at[0]])
        raise PositionOutOfRange(
            f"{what}[{', '.join(map(str, at))}] = {int(idx[at])} but example {i} has {m} real tokens "
            f"(valid: 0..{m - 1}, or -1 for an empty slot)"
        )


def check_static_positions(positions: Sequence[int], lengths: Sequence[int], what: str = "positions", *, subject: str = "example") -> None:
    """Raise :class:`PositionOutOfRange` for a position (negative: from the end) beyond an example's real tokens."""
    for i, n in enumerate(lengths):
        for p in positions:
            if not -n <= p < n:
                if subject == "example":
                    raise PositionOutOfRange(
                        f"{what}={p} is beyond example {i}, which has {n} real tokens "
                        f"(valid: {-n}..{n - 1}); positions count real tokens, not padding"
                    )
                raise PositionOutOfRange(f"{what} {p} is beyond {subject} {i}, which has {n} tokens (valid: {-n}..{n - 1})")


@dataclass(frozen=True)
class MaskInfo:
    """Where each example's real tokens are in the current forward.

    ``starts[i]`` is the padded index of example i's first real token,
    ``lengths[i]`` its count of real tokens, ``seq`` the padded length of this
    forward's hidden states and ``past`` the number of cached tokens before
    them (``> 0`` at a decode step).
    """

    starts: Int[Tensor, " batch"]
    lengths: Int[Tensor, " batch"]
    seq: int
    past: int = 0
    lengths_cpu: tuple[int, ...] | None = None  # for validation when known without a host sync

    @property
    def batch(self) -> int:
        return self.starts.shape[0]

    def host_lengths(self) -> list[int]:
        """Each example's count of real tokens as Python ints (a host sync only when not already known)."""
        return list(self.lengths_cpu) if self.lengths_cpu is not None else [int(x) for x in self.lengths.tolist()]

    @staticmethod
    def from_mask(mask: Tensor | None, batch: int, seq: int, device: torch.device, past: int = 0) -> MaskInfo:
        """``mask`` is ``[batch, past + seq]`` (1 = real token) or ``None`` (no padding)."""
        if mask is None:
            starts = torch.zeros(batch, dtype=torch.long, device=device)
            lengths = torch.full((batch,), seq, dtype=torch.long, device=device)
            return MaskInfo(starts, lengths, seq, past, (seq,) * batch)
        mask = mask[:, -seq:] if mask.shape[-1] != seq else mask
        m = mask.to(torch.long)
        lengths = m.sum(-1)
        starts = m.argmax(-1)  # the first real token (first maximum)
        cpu = tuple(lengths.tolist()) if lengths.device.type == "cpu" else None
        return MaskInfo(starts, lengths, seq, past, cpu)


class Positions:
    """A parsed position spec; :meth:`resolve` turns it into padded indices."""

    __slots__ = ("kind", "static", "first", "last", "tensor", "_on_device", "_hash")

    def __init__(self, spec):
        self.kind: str
        self.static: tuple[int, ...] = ()
        self.first = self.last = 0
        self.tensor: Tensor | None = None
        self._on_device: dict = {}  # the static positions as a tensor, per device (built once: no copy per forward)
        if isinstance(spec, Positions):
            self.kind, self.static, self.first, self.last, self.tensor = spec.kind, spec.static, spec.first, spec.last, spec.tensor
        elif spec is None or (isinstance(spec, str) and spec == "all"):
            self.kind = "all"
        elif isinstance(spec, str) and spec in ("per-call", "per-example"):
            self.kind = "call"
        elif isinstance(spec, str) and spec.strip().lower() in _ALIASES:
            self.kind, self.first, self.last = "firstlast", int(spec.strip().lower() == "first"), int(spec.strip().lower() == "last")
        elif isinstance(spec, bool):
            raise UnitError(f"positions={spec!r}: expected an int, a list of ints, a slice, a spec like 'f7+l7', a LongTensor or None")
        elif isinstance(spec, int):
            self.kind, self.static = "static", (spec,)
        elif isinstance(spec, slice):
            self.kind, self.static = "static", _slice_positions(spec)
        elif isinstance(spec, str):
            m = _FL_RE.match(spec.strip())
            if not spec.strip() or not m or (m["f"] is None and m["l"] is None):
                raise UnitError(f"positions={spec!r}: expected a spec like 'f7+l7', 'f1', 'l3', 'last', 'first' or 'all'")
            self.kind, self.first, self.last = "firstlast", int(m["f"] or 0), int(m["l"] or 0)
            if self.first + self.last == 0:
                raise UnitError(f"positions={spec!r} selects no position")
        elif isinstance(spec, Tensor):
            if spec.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
                raise UnitError(f"positions tensor has dtype {spec.dtype}; expected an integer tensor (LongTensor[batch, k])")
            if spec.dim() == 1:
                self.kind, self.static = "static", tuple(int(x) for x in spec.cpu())
            elif spec.dim() == 2:
                self.kind, self.tensor = "tensor", spec.long()
                if spec.device.type == "cpu" and spec.numel() and int(spec.min()) < -1:
                    raise UnitError(
                        f"per-example positions must be real-token indices >= 0, padded with -1; got {int(spec.min())}"
                    )
            else:
                raise UnitError(f"positions tensor has shape {tuple(spec.shape)}; expected [batch, k] or [k]")
        elif isinstance(spec, (list, tuple)):
            if not spec or not all(isinstance(p, int) and not isinstance(p, bool) for p in spec):
                raise UnitError(f"positions={spec!r}: expected a non-empty list of ints")
            self.kind, self.static = "static", tuple(spec)
        else:
            raise UnitError(
                f"positions={spec!r} ({type(spec).__name__}): expected an int, a list of ints, a slice, "
                "a spec like 'f7+l7', a LongTensor[batch, k] or None"
            )

    # -- description -----------------------------------------------------
    @property
    def count(self) -> int | None:
        """Slots per example (``None`` for all positions)."""
        if self.kind in ("all", "call"):
            return None
        if self.kind == "static":
            return len(self.static)
        if self.kind == "firstlast":
            return self.first + self.last
        assert self.tensor is not None
        return self.tensor.shape[1]

    @property
    def may_be_empty(self) -> bool:
        """Whether a slot can be empty (so scatter must guard it)."""
        return self.kind in ("firstlast", "tensor", "call")

    def to_json(self):
        if self.kind == "all":
            return None
        if self.kind == "static":
            return list(self.static)
        if self.kind == "firstlast":
            return ("f%d" % self.first if self.first else "") + ("+" if self.first and self.last else "") + ("l%d" % self.last if self.last else "")
        return "per-call"  # per-example tensors are data: they come with each call

    def __repr__(self) -> str:
        return f"Positions({self.to_json()!r})"

    def __eq__(self, other) -> bool:
        if not isinstance(other, Positions) or self.kind != other.kind:
            return False
        if self.kind == "tensor":
            return self.tensor is other.tensor
        return (self.static, self.first, self.last) == (other.static, other.first, other.last)

    def __hash__(self) -> int:
        # looked up several times per hooked site of every forward: computed once (a spec never changes)
        try:
            return self._hash
        except AttributeError:
            self._hash = hash((self.kind, self.static, self.first, self.last, id(self.tensor) if self.kind == "tensor" else 0))
            return self._hash

    # -- validation and resolution --------------------------------------
    def validate(self, info: MaskInfo, what: str = "positions") -> None:
        """Raise :class:`PositionOutOfRange` where it can be told without a host sync."""
        if self.kind == "call":
            raise UnitError(
                f"{what} are given per call, and this call gave none: pass positions= "
                "(or intervention_positions= while attached)"
            )
        lengths = info.lengths_cpu
        if self.kind == "tensor":
            assert self.tensor is not None
            if self.tensor.shape[0] != info.batch:
                raise UnitError(
                    f"{what} has {self.tensor.shape[0]} rows but the batch has {info.batch} examples; "
                    "expected LongTensor[batch, k]"
                )
            if self.tensor.device.type == "cpu" and lengths is not None:
                check_real_indices(self.tensor, lengths, what)  # device tensors are validated where they are built (the collator)
            return
        if self.kind == "static" and lengths is not None:
            check_static_positions(self.static, lengths, what)

    def filled(self, info: MaskInfo, idx: Tensor | None) -> bool:
        """Whether every slot of ``idx`` (this spec resolved for ``info``) is known to hold a
        position, decided without a host sync (``False`` when that cannot be told)."""
        if idx is None:
            return True
        if idx.device.type == "cpu":
            return bool((idx >= 0).all())
        n = min(info.lengths_cpu) if info.lengths_cpu else None
        if n is None:
            return False
        if self.kind == "firstlast":
            return n >= self.first + self.last
        if self.kind == "static":
            return all(-n <= p < n for p in self.static)
        return False

    def resolve(self, info: MaskInfo) -> Int[Tensor, "batch k"] | None:
        """Padded indices ``[batch, k]`` (``-1`` for an empty slot); ``None`` for all positions."""
        if self.kind == "all":
            return None
        if self.kind == "call":
            raise UnitError("these positions are given per call: pass positions= to the call (or intervention_positions= while attached)")
        n = info.lengths[:, None]
        dev = info.starts.device
        if self.kind == "static":
            p = self._on_device.get(dev)
            if p is None:  # a host-to-device copy waits for the device: do it once, not in every forward
                p = self._on_device[dev] = torch.tensor(self.static, device=dev)[None, :]
            r = torch.where(p < 0, p + n, p)
        elif self.kind == "firstlast":
            f = torch.arange(self.first, device=dev)[None, :].expand(info.batch, -1)
            last = torch.arange(self.last, device=dev)[None, :] - self.last + n
            # a last slot that repeats a first slot is left empty
            last = torch.where(last < self.first, torch.full_like(last, -1), last)
            r = torch.cat([f, last], 1)
        else:
            assert self.tensor is not None
            r = self.tensor.to(dev, non_blocking=True)
        valid = (r >= 0) & (r < n)
        return torch.where(valid, info.starts[:, None] + r, torch.full_like(r, -1))


#: a position spec as written (the module docstring's grammar): parsed and checked by :class:`Positions`
PositionSpec = int | Sequence[int] | slice | str | Int[Tensor, "batch k"] | Positions | None


def _slice_positions(s: slice) -> tuple[int, ...]:
    start, stop, step = s.start, s.stop, s.step or 1
    if step <= 0:
        raise UnitError(f"positions={s!r}: the step must be positive")
    if start is None:
        start = 0
    if stop is None:
        if start < 0:
            return tuple(range(start, 0, step))
        raise UnitError(f"positions={s!r}: an open-ended slice from a non-negative start depends on each length; give a stop")
    if (start < 0) != (stop < 0) and stop != 0:
        raise UnitError(f"positions={s!r}: mixing a negative and a non-negative bound depends on each length")
    out = tuple(range(start, stop, step))
    if not out:
        raise UnitError(f"positions={s!r} selects no position")
    return out


def position_index(idx: Int[Tensor, "batch k"], rest: tuple[int, ...], *, clamp: bool = True) -> Int[Tensor, "batch k *rest"]:
    """``idx`` broadcast over a value's trailing dims (``rest``), as gather and scatter take it;
    ``clamp`` sends empty slots (``-1``) to position 0."""
    i = idx.clamp_min(0) if clamp else idx
    return i.view(*idx.shape, *([1] * len(rest))).expand(-1, -1, *rest)


def gather_positions(
    x: Float[Tensor, "batch pos *rest"], idx: Int[Tensor, "batch k"], *, index: Tensor | None = None
) -> Float[Tensor, "batch k *rest"]:
    """``x[i, idx[i, j]]`` for every slot (an empty slot reads position 0). ``index``: the
    :func:`position_index` of ``idx`` for ``x``, when already built."""
    return x.gather(1, position_index(idx, tuple(x.shape[2:])) if index is None else index)


def scatter_positions(
    x: Float[Tensor, "batch pos *rest"],
    idx: Int[Tensor, "batch k"],
    values: Float[Tensor, "batch k *rest"],
    *,
    may_be_empty: bool,
    inplace: bool = False,
    original: Float[Tensor, "batch k *rest"] | None = None,
    index: Tensor | None = None,
) -> Float[Tensor, "batch pos *rest"]:
    """Write ``values`` into ``x`` at ``idx``; empty slots leave ``x`` unchanged.

    Empty slots are redirected to the example's first filled slot (same index,
    same value), so duplicate indices always carry identical values and the
    result does not depend on scatter order. ``original`` (the gathered
    values before editing) is needed only when a row has no filled slot.
    ``index``: the unclamped :func:`position_index` of ``idx`` for ``x``, when
    already built (used only without ``may_be_empty``).
    """
    if may_be_empty:
        valid: Bool[Tensor, "batch k"] = idx >= 0
        first = valid.to(torch.int8).argmax(1, keepdim=True)  # first filled slot, 0 if none
        if original is None:
            original = gather_positions(x, idx)
        shape = (*idx.shape, *([1] * (values.dim() - 2)))
        values = torch.where(valid.view(shape), values, original)
        tgt = idx.clamp_min(0).gather(1, first).expand_as(idx)
        fill = values.gather(1, first.view(-1, 1, *([1] * (values.dim() - 2))).expand(-1, 1, *values.shape[2:]))
        values = torch.where(valid.view(shape), values, fill.expand_as(values))
        idx = torch.where(valid, idx, tgt)
    if index is None or may_be_empty:
        index = position_index(idx, tuple(x.shape[2:]), clamp=False)
    values = values if values.dtype == x.dtype else values.to(x.dtype)
    if inplace:
        return x.scatter_(1, index, values)
    return x.scatter(1, index, values)


def parse_heads(heads) -> tuple[int, ...] | None:
    if heads is None:
        return None
    if isinstance(heads, int) and not isinstance(heads, bool):
        return (heads,)
    if isinstance(heads, Tensor) and heads.dim() <= 1:
        heads = [int(h) for h in heads.flatten()]
    if isinstance(heads, (list, tuple)) and heads and all(isinstance(h, int) and not isinstance(h, bool) for h in heads):
        if len(set(heads)) != len(heads):
            raise UnitError(f"heads={list(heads)!r} repeats a head")
        return tuple(heads)
    raise UnitError(f"heads={heads!r}: expected an int or a non-empty list of distinct ints")


def parse_dims(dims) -> tuple[int, ...] | None:
    if dims is None:
        return None
    if isinstance(dims, Tensor):
        dims = [int(d) for d in dims.flatten()]
    if isinstance(dims, range):
        dims = list(dims)
    if isinstance(dims, (list, tuple)) and dims and all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
        if len(set(dims)) != len(dims):
            raise UnitError(f"dims={list(dims)!r} repeats a dimension")
        return tuple(dims)
    raise UnitError(f"dims={dims!r}: expected a non-empty list of distinct ints")
