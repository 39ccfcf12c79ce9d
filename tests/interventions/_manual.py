"""Manual PyTorch hooks that intervene at a canonical site, written in the test from each family's code.

``PORTS[family][site] = (module path relative to the block, "in" | "out", view)``
where ``view(x, model)`` returns the site's part of the port tensor as a
*view* (so writing into it writes the port): channels of a fused projection,
split into heads. ``resid_mid`` is written without touching the residual
tensor in place: the difference ``new - old`` is added to what the attention
sub-layer adds to the residual (pre-LN decoders), or the attention module's
output is replaced (post-LN BERT, where that output *is* the residual).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from tests.interventions._helpers import hidden_arg, real_index
from tests.interventions._reference import dims, layers_of


def _heads(kind: str):
    def view(x: Tensor, model) -> Tensor:
        H, KV, dh = dims(model)
        return x.view(*x.shape[:2], H if kind == "q" else KV, dh)

    return view


def _fused(layout: str, part: int):
    """Part (1 = k, 2 = v) of a fused q/k/v output, split into heads."""

    def view(x: Tensor, model) -> Tensor:
        H, KV, dh = dims(model)
        b, t = x.shape[:2]
        if layout == "qkv":  # [q (H*dh) | k (KV*dh) | v (KV*dh)]
            start = H * dh + (part - 1) * KV * dh
            return x[..., start : start + KV * dh].view(b, t, KV, dh)
        return x.view(b, t, H, 3 * dh)[..., part * dh : (part + 1) * dh]  # neox: each head [q | k | v]

    return view


_flat = None
_LLAMA = {
    "resid_pre": ("", "in", _flat),
    "attn.k": ("self_attn.k_proj", "out", _heads("kv")),
    "attn.v": ("self_attn.v_proj", "out", _heads("kv")),
    "attn.z": ("self_attn.o_proj", "in", _heads("q")),
    "attn.out": ("self_attn", "out", _flat),
    "resid_mid": ("post_attention_layernorm", "in", _flat),
    "mlp.post": ("mlp.down_proj", "in", _flat),
    "resid_post": ("", "out", _flat),
}
PORTS: dict[str, dict] = {
    "llama": _LLAMA,
    "qwen3": _LLAMA,
    "mistral": _LLAMA,
    "gemma": _LLAMA,
    "phi3": {**_LLAMA, "attn.k": ("self_attn.qkv_proj", "out", _fused("qkv", 1)), "attn.v": ("self_attn.qkv_proj", "out", _fused("qkv", 2))},
    "gemma2": {**_LLAMA, "attn.out": ("post_attention_layernorm", "out", _flat), "resid_mid": ("pre_feedforward_layernorm", "in", _flat)},
    "olmo2": {**_LLAMA, "attn.out": ("post_attention_layernorm", "out", _flat), "resid_mid": ("mlp", "in", _flat)},
    "gpt2": {
        "resid_pre": ("", "in", _flat),
        "attn.k": ("attn.c_attn", "out", _fused("qkv", 1)),
        "attn.v": ("attn.c_attn", "out", _fused("qkv", 2)),
        "attn.z": ("attn.c_proj", "in", _heads("q")),
        "attn.out": ("attn", "out", _flat),
        "resid_mid": ("ln_2", "in", _flat),
        "mlp.post": ("mlp.c_proj", "in", _flat),
        "resid_post": ("", "out", _flat),
    },
    "gpt_neo": {
        "resid_pre": ("", "in", _flat),
        "attn.k": ("attn.attention.k_proj", "out", _heads("kv")),
        "attn.v": ("attn.attention.v_proj", "out", _heads("kv")),
        "attn.z": ("attn.attention.out_proj", "in", _heads("q")),
        "attn.out": ("attn", "out", _flat),
        "resid_mid": ("ln_2", "in", _flat),
        "mlp.post": ("mlp.c_proj", "in", _flat),
        "resid_post": ("", "out", _flat),
    },
    "gpt_neox_seq": {
        "resid_pre": ("", "in", _flat),
        "attn.k": ("attention.query_key_value", "out", _fused("neox", 1)),
        "attn.v": ("attention.query_key_value", "out", _fused("neox", 2)),
        "attn.z": ("attention.dense", "in", _heads("q")),
        "attn.out": ("attention", "out", _flat),
        "resid_mid": ("post_attention_layernorm", "in", _flat),
        "mlp.post": ("mlp.dense_4h_to_h", "in", _flat),
        "resid_post": ("", "out", _flat),
    },
    "bert": {
        "resid_pre": ("", "in", _flat),
        "attn.k": ("attention.self.key", "out", _heads("kv")),
        "attn.v": ("attention.self.value", "out", _heads("kv")),
        "attn.z": ("attention.output.dense", "in", _heads("q")),
        "attn.out": ("attention.output.dense", "out", _flat),
        "resid_mid": ("attention", "out", _flat),
        "mlp.post": ("output.dense", "in", _flat),
        "resid_post": ("", "out", _flat),
    },
}
PORTS["roberta"] = PORTS["bert"]
PORTS["gpt_neox"] = {k: v for k, v in PORTS["gpt_neox_seq"].items() if k != "resid_mid"}
PORTS["qwen2"] = PORTS["olmo"] = PORTS["llama"]
PORTS["gemma3_text"] = PORTS["gemma2"]


def _module(model, arch: str, layer: int, rel: str):
    blk = layers_of(model, arch)[layer]
    return blk.get_submodule(rel) if rel else blk


def _part(x: Tensor, view, model) -> Tensor:
    return x if view is None else view(x, model)


def read_site(model, arch: str, layer: int, site: str, inputs: dict) -> Tensor:
    """The site's value ([b, t, ...], heads split) from a plain forward, read by a manual hook."""
    rel, io, view = PORTS[arch][site]
    mod = _module(model, arch, layer, rel)
    store: dict = {}

    def keep(x: Tensor) -> None:  # a hook returning None changes nothing
        store["x"] = x.detach().clone()

    if io == "in":
        h = mod.register_forward_pre_hook(lambda m, a, k: keep(hidden_arg(a, k)), with_kwargs=True)
    else:
        h = mod.register_forward_hook(lambda m, a, o: keep(o if isinstance(o, Tensor) else o[0]))
    try:
        with torch.no_grad():
            out = model(**inputs)
    finally:
        h.remove()
    return _part(store["x"], view, model), out


def run_edited(model, arch: str, layer: int, site: str, inputs: dict, edit: Callable[[Tensor], None], grad: bool = False):
    """Forward with ``edit(part)`` applied (in place, on a copy of the port tensor) at the site."""
    rel, io, view = PORTS[arch][site]
    if site == "resid_mid" and arch not in ("bert", "roberta"):
        # pre-LN: resid_mid = resid_pre + attn.out, so add (new - old) to attn.out
        old, _ = read_site(model, arch, layer, "resid_mid", inputs)
        new = old.clone()
        edit(new)
        delta = new - old
        rel, io, view = PORTS[arch]["attn.out"]

        def edit(part: Tensor, _d=delta) -> None:  # noqa: F811 - the edit becomes an addition
            part += _d

    mod = _module(model, arch, layer, rel)

    def apply(x: Tensor) -> Tensor:
        y = x.clone()
        edit(_part(y, view, model))
        return y

    if io == "in":

        def pre(m, args, kwargs):
            if args and isinstance(args[0], Tensor):
                return (apply(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": apply(kwargs["hidden_states"])}

        h = mod.register_forward_pre_hook(pre, with_kwargs=True)
    else:
        h = mod.register_forward_hook(lambda m, a, o: apply(o) if isinstance(o, Tensor) else (apply(o[0]), *o[1:]))
    try:
        with torch.set_grad_enabled(grad):
            return model(**inputs)
    finally:
        h.remove()


def run_edits(model, arch: str, inputs: dict, edits: list, read: tuple | None = None, grad: bool = False):
    """Forward with several ``(layer, site, edit)`` applied at once (no ``resid_mid``); optionally
    also return the value at ``read = (layer, site)`` as this forward computed it."""
    handles, store = [], {}
    for layer, site, edit in edits:
        assert site != "resid_mid"
        rel, io, view = PORTS[arch][site]
        mod = _module(model, arch, layer, rel)

        def apply(x: Tensor, edit=edit, view=view) -> Tensor:
            y = x.clone()
            edit(_part(y, view, model))
            return y

        if io == "in":

            def pre(m, args, kwargs, apply=apply):
                if args and isinstance(args[0], Tensor):
                    return (apply(args[0]), *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": apply(kwargs["hidden_states"])}

            handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        else:
            handles.append(mod.register_forward_hook(lambda m, a, o, apply=apply: apply(o) if isinstance(o, Tensor) else (apply(o[0]), *o[1:])))
    if read is not None:
        rel, io, view = PORTS[arch][read[1]]
        mod = _module(model, arch, read[0], rel)

        def keep(x: Tensor) -> None:
            store["x"] = _part(x.detach().clone(), view, model)

        if io == "in":
            handles.append(mod.register_forward_pre_hook(lambda m, a, k: keep(hidden_arg(a, k)), with_kwargs=True))
        else:
            handles.append(mod.register_forward_hook(lambda m, a, o: keep(o if isinstance(o, Tensor) else o[0])))
    try:
        with torch.set_grad_enabled(grad):
            out = model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return (out, store.get("x")) if read is not None else out


def resolve(spec, mask: Tensor) -> list[list[int | None]] | None:
    """Padded index of each slot per example, by plain Python over the mask (None: all positions).

    A slot is empty (``None``) where its real token does not exist or, for the
    last-``B`` slots of ``"fA+lB"``, where it would repeat one of the first ``A``.
    """
    b = mask.shape[0]
    if spec is None:
        return None
    out = []
    for i in range(b):
        n = int(mask[i].sum())
        if isinstance(spec, int):
            real = [spec]
        elif isinstance(spec, list):
            real = list(spec)
        elif isinstance(spec, str):  # "fA+lB"
            f, l = (int(p[1:]) for p in spec.split("+"))
            real = [p if p < n else None for p in range(f)]
            real += [q if q >= f and q >= 0 else None for q in range(n - l, n)]
        else:  # per-example tensor, -1 = empty slot
            real = [int(p) if p >= 0 else None for p in spec[i]]
        out.append([None if p is None else real_index(mask, i, p) for p in real])
    return out


def pairs(spec, base_mask: Tensor, src_mask: Tensor, src_spec=None):
    """(example, base index, source index) for every slot filled on both sides."""
    b = resolve(spec, base_mask)
    s = resolve(spec if src_spec is None else src_spec, src_mask)
    if b is None:
        return [(i, j, j) for i in range(base_mask.shape[0]) for j in range(base_mask.shape[1])]
    return [(i, bj, sj) for i in range(len(b)) for bj, sj in zip(b[i], s[i]) if bj is not None and sj is not None]
