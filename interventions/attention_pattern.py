"""A layer's attention pattern, recomputed from its query and key sites: AtP*'s QK fix.

Attribution patching's linear estimate fails where a patched query or key
feeds a saturated softmax: the gradient there is near zero although the patch
moves the attention a lot. AtP* (Kramár et al. 2024) computes that step
exactly: for a patch of queries at positions ``P`` (head ``h``) or of keys at
``P`` (key-value head ``g``), the new attention pattern ``A'`` is the softmax of
the new scores, and only what follows the pattern is linearised::

    effect ≈ Σ_{t,s} ∂metric/∂A[h,t,s] · (A'[h,t,s] − A[h,t,s]),
    ∂metric/∂A[h,t,s] = ∂metric/∂z[t,h] · v[s,g(h)]          (z = A v, attn.z)

The canonical ``attn.q``/``attn.k`` sites are the projections *before* the
rotary embedding; patching one at base position ``t`` replaces the rotated
vector by the source's vector rotated at ``t``. Recomputing scores needs that
rotation, the score scale and the mask: :class:`AttentionGeometry` takes them
from the model (its rotary module, the attention module's ``scaling``, the
causal and padding masks) and :meth:`AttentionGeometry.check` verifies the
reconstruction against the layer's own output (``A v`` must equal the
collected ``attn.z``), so an architecture whose attention it does not model
(QK-norm, soft-capping, sliding windows, ALiBi, interleaved rotary) is refused
with a named error instead of giving silently wrong numbers.

Cost: per layer, a few ``[batch, head, pos, pos]`` products in float64 — no
forward pass. A group of several positions patched together recomputes the
softmax per group (``[batch, group, head, pos, pos]``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange, repeat
from jaxtyping import Bool, Float, Int
from torch import Tensor

from steerlab.interventions.errors import ConfigError
from steerlab.interventions.inputs import Inputs

__all__ = ["AttentionGeometry"]


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotary_module(model):
    """The model's shared rotary-embedding module (``…RotaryEmbedding``), or None."""
    found = [m for _, m in model.named_modules() if type(m).__name__.endswith("RotaryEmbedding")]
    return found[0] if found else None


@dataclass
class AttentionGeometry:
    """How a layer turns its ``attn.q``/``attn.k`` site values into attention scores.

    ``cos``/``sin``: ``[batch, pos, d_rot]`` (``None``: no rotary embedding);
    ``visible[b, t, s]``: query ``t`` attends to key ``s`` (causal, real tokens).
    """

    layer: int
    scale: float
    group: int  # query heads per key-value head
    cos: Float[Tensor, "batch pos d_rot"] | None
    sin: Float[Tensor, "batch pos d_rot"] | None
    visible: Bool[Tensor, "batch pos pos"]

    @classmethod
    def of(cls, lab, layer: int, inputs: Inputs) -> AttentionGeometry:
        """The geometry of block ``layer`` for ``inputs`` (the run's own position ids)."""
        q_site = lab.resolve(f"blocks.{layer}.attn.q")
        k_site = lab.resolve(f"blocks.{layer}.attn.k")
        parent = q_site.module_path.rsplit(".", 1)[0]
        attn = lab.model.get_submodule(parent)
        cfg = getattr(lab.model, "config", None)
        name = getattr(cfg, "model_type", type(lab.model).__name__)
        for attr in ("q_norm", "k_norm", "q_layernorm", "k_layernorm"):
            if isinstance(getattr(attn, attr, None), torch.nn.Module):
                raise ConfigError(f"qk_fix: {name}'s attention normalises queries and keys ({attr}), which the QK fix does not model")
        if getattr(cfg, "attn_logit_softcapping", None):
            raise ConfigError(f"qk_fix: {name} soft-caps its attention scores, which the QK fix does not model")
        info = inputs.mask_info()
        b, t, dev = info.batch, info.seq, lab.device
        window = getattr(cfg, "sliding_window", None)
        if isinstance(window, int) and window < t and getattr(cfg, "use_sliding_window", True) is not False:
            raise ConfigError(f"qk_fix: {name} uses a sliding attention window ({window} < {t} positions), which the QK fix does not model")
        mask = inputs.mask if inputs.mask is not None else torch.ones(b, t, dtype=torch.long, device=dev)
        real = mask[:, -t:].bool().to(dev)
        causal = torch.ones(t, t, dtype=torch.bool, device=dev).tril()
        visible = causal[None] & real[:, None, :] & real[:, :, None]
        cos = sin = None
        rotary = _rotary_module(lab.model)
        if rotary is not None:
            pos = inputs.kwargs.get("position_ids")
            pos = pos.to(dev) if isinstance(pos, Tensor) else torch.arange(t, device=dev)[None].expand(b, t)
            with torch.no_grad():
                cos, sin = rotary(torch.zeros(1, dtype=torch.float32, device=dev), pos)
            cos, sin = cos.double(), sin.double()
        d_head = q_site.d_head or 1
        scale = float(getattr(attn, "scaling", d_head**-0.5))
        group = (q_site.n_heads or 1) // (k_site.n_heads or 1)
        return cls(layer, scale, group, cos, sin, visible)

    # -- scores -----------------------------------------------------------------
    def rotate(
        self, x: Float[Tensor, "batch *pos head d_head"], rows: Int[Tensor, "batch *pos"] | None = None
    ) -> Float[Tensor, "batch *pos head d_head"]:
        """``x`` rotated as the model rotates it at its padded positions: ``x`` is ``[batch, pos, head, d_head]``,
        or a gather ``[batch, slot, k, head, d_head]`` with ``rows`` the padded position of each ``x[b, j, i]``."""
        x = x.double()
        if self.cos is None:
            return x
        cos, sin = self.cos, self.sin
        if rows is not None:
            flat = rows.reshape(rows.shape[0], -1)
            gather = lambda c: c.gather(1, flat[..., None].expand(-1, -1, c.shape[-1])).view(*rows.shape, c.shape[-1])  # noqa: E731
            cos, sin = gather(cos), gather(sin)
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # over heads
        r = cos.shape[-1]
        head, rest = x[..., :r], x[..., r:]
        return torch.cat((head * cos + _rotate_half(head) * sin, rest), dim=-1)

    def expand_kv(self, k: Float[Tensor, "batch pos kv_head d_head"]) -> Float[Tensor, "batch pos head d_head"]:
        """Key-value heads repeated for their query heads (head ``h`` reads kv head ``h // group``)."""
        return repeat(k, "b s g d -> b s (g r) d", r=self.group)

    def scores(self, q_rot: Tensor, k_rot: Tensor) -> Float[Tensor, "batch head pos pos"]:
        """Scaled, masked scores ``q·k`` (``-inf`` where a query does not see a key)."""
        s = torch.einsum("bthd,bshd->bhts", q_rot, self.expand_kv(k_rot)) * self.scale
        return s.masked_fill(~self.visible[:, None], -torch.inf)

    def pattern(self, scores: Tensor) -> Float[Tensor, "batch head pos pos"]:
        """Softmax over keys; rows of padding queries (no visible key) are zeros."""
        return torch.softmax(scores, dim=-1).nan_to_num(0.0)

    def check(self, pattern: Tensor, v: Tensor, z: Tensor, *, tolerance: float) -> None:
        """Refuse unless ``pattern · v`` reproduces the layer's ``attn.z`` at real queries."""
        rec = torch.einsum("bhts,bshd->bthd", pattern, self.expand_kv(v.double()))
        real = self.visible.any(-1)  # [b, t]: a real query sees at least itself
        err = (rec - z.double()).abs().amax(dim=(-1, -2))[real].max().item() if real.any() else 0.0
        size = z.double().abs().amax().item()
        if not err <= tolerance * max(size, 1e-6):
            raise ConfigError(
                f"qk_fix: the attention of block {self.layer} recomputed from its q and k sites differs from the "
                f"model's own (max |A v - z| = {err:.2e}, {err / max(size, 1e-6):.1e} of max |z|; tolerance "
                f"{tolerance:.0e}): this architecture's attention (rotary layout, masking, score scale) is one the "
                "QK fix does not model; run without qk_fix"
            )

    def pattern_gradient(self, grad_z: Tensor, v: Tensor) -> Float[Tensor, "batch head pos pos"]:
        """``∂metric/∂A[h, t, s] = ∂metric/∂z[t, h] · v[s, g(h)]`` (zero where not visible)."""
        ga = torch.einsum("bthd,bshd->bhts", grad_z.double(), self.expand_kv(v.double()))
        return ga.masked_fill(~self.visible[:, None], 0.0)

    # -- the fix ------------------------------------------------------------------
    def query_effects(
        self, pattern: Tensor, grad_a: Tensor, q_src_rot: Tensor, k_rot: Tensor, rows: Tensor, valid: Tensor
    ) -> Float[Tensor, "batch slot head"]:
        """Patching the queries of each slot's rows (``rows``/``valid``: ``[batch, slot, k]``;
        ``q_src_rot``: ``[batch, slot, k, head, d]``, the source's queries rotated at those rows).
        Rows are independent, so a slot's effect is the sum over its rows, exactly."""
        kx = self.expand_kv(k_rot)
        s_new = torch.einsum("bjkhd,bshd->bjkhs", q_src_rot, kx) * self.scale
        vis = _take_rows(self.visible[:, None], rows)  # [b, j, k, 1, s]
        a_new = torch.softmax(s_new.masked_fill(~vis, -torch.inf), dim=-1).nan_to_num(0.0)
        a_old = _take_rows(pattern, rows)  # [b, j, k, h, s]
        g = _take_rows(grad_a, rows)
        eff = ((a_new - a_old) * g).sum(-1)  # [b, j, k, h]
        return (eff * valid[..., None]).sum(2)

    def key_effects(
        self, scores: Tensor, pattern: Tensor, grad_a: Tensor, q_rot: Tensor, dk_rot: Tensor, rows: Tensor, valid: Tensor
    ) -> Float[Tensor, "batch slot kv_head"]:
        """Patching the keys of each slot's rows (``dk_rot``: ``[batch, slot, k, kv, d]``, the
        source's rotated keys minus the base's at those rows); the effect per key-value head,
        summed over the query heads that read it. One-row slots use the closed form of a softmax
        with one score changed; larger slots recompute the softmax."""
        b, j, k = rows.shape
        if k == 1:
            return self._one_key(pattern, grad_a, q_rot, dk_rot[:, :, 0], rows[:, :, 0], valid[:, :, 0])
        t, g, d = q_rot.shape[1], dk_rot.shape[-2], dk_rot.shape[-1]
        delta = torch.zeros(b, j, t, g, d, dtype=torch.float64, device=q_rot.device)
        delta.scatter_add_(2, rows[..., None, None].expand(-1, -1, -1, g, d), dk_rot * valid[..., None, None])
        ds = torch.einsum("bthd,bjshd->bjhts", q_rot, repeat(delta, "b j s g d -> b j s (g r) d", r=self.group)) * self.scale
        a_new = torch.softmax(scores[:, None] + ds, dim=-1).nan_to_num(0.0)  # -inf (unseen) stays -inf
        eff = ((a_new - pattern[:, None]) * grad_a[:, None]).sum((-1, -2))  # [b, j, h]
        return rearrange(eff, "b j (g r) -> b j g r", r=self.group).sum(-1)

    def _one_key(self, pattern, grad_a, q_rot, dk_rot, rows, valid) -> Tensor:
        """One key ``s`` per slot: its score in row ``t`` moves by ``δ = scale q_t·Δk_s``;
        ``Z = 1 − A_ts + A_ts e^δ``; the row becomes ``A/Z`` with ``A_ts e^δ/Z`` at ``s``, so the
        effect on row ``t`` is ``(1/Z − 1) Σ_s' gA_ts' A_ts' + gA_ts A_ts (e^δ − 1)/Z``."""
        delta = torch.einsum("bthd,bjhd->bjht", q_rot, self.expand_kv(dk_rot)) * self.scale
        a = _column(pattern, rows)  # [b, j, h, t]: A[t, s_j]
        ga = _column(grad_a, rows)
        seen = _column(self.visible[:, None].to(torch.float64), rows) > 0  # [b, j, 1, t]
        delta = delta.masked_fill(~seen, 0.0)
        log_a = torch.log(a.clamp_min(1e-300))
        log_z = torch.logaddexp(torch.log1p(-a.clamp(max=1.0 - 1e-16)), log_a + delta)
        z = torch.exp(log_z)
        g_row = (grad_a * pattern).sum(-1)[:, None]  # [b, 1, h, t]
        eff = (1.0 / z - 1.0) * g_row + ga * a * torch.expm1(delta) / z
        eff = (eff * seen).sum(-1) * valid[..., None]  # [b, j, h]
        return rearrange(eff, "b j (g r) -> b j g r", r=self.group).sum(-1)


def _take_rows(m: Tensor, rows: Tensor) -> Tensor:
    """``m[b, h, rows[b, j, k], :]`` as ``[b, j, k, h, s]`` (``m``: ``[b, h, t, s]``, ``h`` may be 1)."""
    b, j, k = rows.shape
    h, s = m.shape[1], m.shape[-1]
    idx = rows.reshape(b, 1, j * k, 1).expand(b, h, j * k, s)
    out = m.expand(b, h, *m.shape[2:]).gather(2, idx)  # [b, h, j*k, s]
    return rearrange(out, "b h (j k) s -> b j k h s", j=j)


def _column(m: Tensor, rows: Tensor) -> Tensor:
    """``m[b, h, :, rows[b, j]]`` as ``[b, j, h, t]`` (``m``: ``[b, h, t, s]``)."""
    b, j = rows.shape
    h, t = m.shape[1], m.shape[2]
    idx = rows.reshape(b, 1, 1, j).expand(b, h, t, j)
    out = m.gather(3, idx)  # [b, h, t, j]
    return rearrange(out, "b h t j -> b j h t")
