"""Hand computations of every canonical site, written in the test from each family's published maths.

Nothing here imports steerlab. The reference starts from Hugging Face's own
``output_hidden_states`` (the residual stream entering each block) and the
modules' weights, and computes each site with explicit matrix products
(``x @ W.T + b``; GPT-2's ``Conv1D`` is ``x @ W + b``). Norms and activation
functions are called as the model's own modules: they are the model's
definition, not steerlab's.

The per-head attention output ``z`` is the one value taken from the library
under test (``z_of(layer)``): pushed through the output projection it must
rebuild ``attn.out``, and the chain ``resid_pre -> ... -> resid_post`` must
land on Hugging Face's next hidden state, so a wrong ``z`` cannot pass.
:func:`attention_z` computes ``z`` itself, head by head, for the families
whose attention is plain enough to write in a few lines.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3", "gemma", "olmo"}
SANDWICH = {"gemma2", "gemma3_text"}
GEMMA_SCALED = {"gemma", "gemma2", "gemma3_text"}


def lin(x: Tensor, layer) -> Tensor:
    """``x Wᵀ + b`` for an ``nn.Linear``, written out."""
    y = x @ layer.weight.T
    return y if layer.bias is None else y + layer.bias


def conv1d(x: Tensor, layer) -> Tensor:
    """GPT-2's ``Conv1D`` stores ``W`` as ``[in, out]``: ``x W + b``."""
    return x @ layer.weight + layer.bias


def dims(model) -> tuple[int, int, int]:
    cfg = model.config
    H = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None) or cfg.num_heads
    KV = getattr(cfg, "num_key_value_heads", None) or H
    d = getattr(cfg, "hidden_size", None) or cfg.n_embd
    dh = getattr(cfg, "head_dim", None) or d // H
    return H, KV, dh


def layers_of(model, arch: str):
    if arch in ("gpt2", "gpt_neo"):
        return model.transformer.h
    if arch.startswith("gpt_neox"):
        return model.gpt_neox.layers
    if arch in ("bert", "roberta"):
        return model.encoder.layer
    return model.model.layers


def final_norm_of(model, arch: str):
    if arch in ("gpt2", "gpt_neo"):
        return model.transformer.ln_f
    if arch.startswith("gpt_neox"):
        return model.gpt_neox.final_layer_norm
    if arch in ("bert", "roberta"):
        return None
    return model.model.norm


def embed_of(model, arch: str, ids: Tensor) -> Tensor:
    """The token embedding lookup (Gemma scales it by ``sqrt(d)``)."""
    if arch in ("gpt2", "gpt_neo"):
        w = model.transformer.wte.weight
    elif arch.startswith("gpt_neox"):
        w = model.gpt_neox.embed_in.weight
    elif arch in ("bert", "roberta"):
        w = model.embeddings.word_embeddings.weight
    else:
        w = model.model.embed_tokens.weight
    e = w[ids]
    if arch in GEMMA_SCALED:
        e = e * torch.tensor(model.config.hidden_size**0.5, dtype=w.dtype)
    return e


def block_sites(arch: str, blk, x: Tensor, z: Tensor, model) -> dict[str, Tensor]:
    """Every block site of one block, by hand, from its input ``x`` and the flat ``z`` ([b, t, H*dh])."""
    H, KV, dh = dims(model)
    r: dict[str, Tensor] = {"resid_pre": x}
    if arch in LLAMA_LIKE | SANDWICH | {"olmo2", "phi3"}:
        a, m = blk.self_attn, blk.mlp
        n1 = x if arch == "olmo2" else blk.input_layernorm(x)
        if arch == "phi3":
            qkv = lin(n1, a.qkv_proj)
            r["attn.q"], r["attn.k"], r["attn.v"] = qkv.split([H * dh, KV * dh, KV * dh], -1)
        else:
            r["attn.q"], r["attn.k"], r["attn.v"] = lin(n1, a.q_proj), lin(n1, a.k_proj), lin(n1, a.v_proj)
        attn = lin(z, a.o_proj)
        if arch in SANDWICH or arch == "olmo2":
            attn = blk.post_attention_layernorm(attn)
        r["attn.out"] = attn
        mid = r["resid_mid"] = x + attn
        n2 = mid if arch == "olmo2" else (blk.pre_feedforward_layernorm(mid) if arch in SANDWICH else blk.post_attention_layernorm(mid))
        act = m.act_fn if hasattr(m, "act_fn") else m.activation_fn
        if arch == "phi3":
            gate, up = lin(n2, m.gate_up_proj).chunk(2, -1)
        else:
            gate, up = lin(n2, m.gate_proj), lin(n2, m.up_proj)
        r["mlp.pre"] = gate
        r["mlp.post"] = act(gate) * up
        out = lin(r["mlp.post"], m.down_proj)
        if arch in SANDWICH or arch == "olmo2":
            out = blk.post_feedforward_layernorm(out)
        r["mlp.out"] = out
        r["resid_post"] = mid + out
    elif arch == "gpt2":
        n1 = blk.ln_1(x)
        r["attn.q"], r["attn.k"], r["attn.v"] = conv1d(n1, blk.attn.c_attn).chunk(3, -1)
        r["attn.out"] = conv1d(z, blk.attn.c_proj)
        mid = r["resid_mid"] = x + r["attn.out"]
        r["mlp.pre"] = conv1d(blk.ln_2(mid), blk.mlp.c_fc)
        r["mlp.post"] = blk.mlp.act(r["mlp.pre"])
        r["mlp.out"] = conv1d(r["mlp.post"], blk.mlp.c_proj)
        r["resid_post"] = mid + r["mlp.out"]
    elif arch == "gpt_neo":
        a = blk.attn.attention
        n1 = blk.ln_1(x)
        r["attn.q"], r["attn.k"], r["attn.v"] = lin(n1, a.q_proj), lin(n1, a.k_proj), lin(n1, a.v_proj)
        r["attn.out"] = lin(z, a.out_proj)
        mid = r["resid_mid"] = x + r["attn.out"]
        r["mlp.pre"] = lin(blk.ln_2(mid), blk.mlp.c_fc)
        r["mlp.post"] = blk.mlp.act(r["mlp.pre"])
        r["mlp.out"] = lin(r["mlp.post"], blk.mlp.c_proj)
        r["resid_post"] = mid + r["mlp.out"]
    elif arch.startswith("gpt_neox"):
        a, m = blk.attention, blk.mlp
        qkv = lin(blk.input_layernorm(x), a.query_key_value)
        per_head = qkv.view(*qkv.shape[:2], H, 3 * dh)  # each head holds [q | k | v]
        for i, s in enumerate(("attn.q", "attn.k", "attn.v")):
            r[s] = per_head[..., i * dh : (i + 1) * dh].flatten(2)
        r["attn.out"] = lin(z, a.dense)
        parallel = model.config.use_parallel_residual
        mid = x if parallel else x + r["attn.out"]
        if not parallel:
            r["resid_mid"] = mid
        r["mlp.pre"] = lin(blk.post_attention_layernorm(mid), m.dense_h_to_4h)
        r["mlp.post"] = m.act(r["mlp.pre"])
        r["mlp.out"] = lin(r["mlp.post"], m.dense_4h_to_h)
        r["resid_post"] = x + r["attn.out"] + r["mlp.out"] if parallel else mid + r["mlp.out"]
    elif arch in ("bert", "roberta"):
        s, o = blk.attention.self, blk.attention.output
        r["attn.q"], r["attn.k"], r["attn.v"] = lin(x, s.query), lin(x, s.key), lin(x, s.value)
        r["attn.out"] = lin(z, o.dense)
        mid = r["resid_mid"] = o.LayerNorm(r["attn.out"] + x)  # post-LN: add, then norm
        r["mlp.pre"] = lin(mid, blk.intermediate.dense)
        r["mlp.post"] = blk.intermediate.intermediate_act_fn(r["mlp.pre"])
        r["mlp.out"] = lin(r["mlp.post"], blk.output.dense)
        r["resid_post"] = blk.output.LayerNorm(r["mlp.out"] + mid)
    else:  # pragma: no cover - a new arch in tests/archs.py needs its maths here
        raise AssertionError(f"no reference maths for {arch}")
    return r


def reference(model, arch: str, inputs: dict, z_of: Callable[[int], Tensor]) -> tuple[dict[str, Tensor], tuple[Tensor, ...]]:
    """Every canonical site by hand; also Hugging Face's hidden states for the caller's checks."""
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
        hs = out.hidden_states
        n = len(layers_of(model, arch))
        ref: dict[str, Tensor] = {"embed": embed_of(model, arch, inputs["input_ids"])}
        for L, blk in enumerate(layers_of(model, arch)):
            z = z_of(L).flatten(2)
            ref[f"blocks.{L}.attn.z"] = z  # checked through the chain (and by attention_z)
            for k, v in block_sites(arch, blk, hs[L], z, model).items():
                ref[f"blocks.{L}.{k}"] = v
        norm = final_norm_of(model, arch)
        if norm is not None:
            ref["final_norm"] = norm(ref[f"blocks.{n - 1}.resid_post"])
            head = model.get_output_embeddings()
            ref["logits"] = lin(ref["final_norm"], head)
    return ref, hs


# -- attention by hand -------------------------------------------------------------


def _rotate_half(x: Tensor) -> Tensor:
    a, b = x.chunk(2, -1)
    return torch.cat([-b, a], -1)


def attention_z(model, arch: str, layer: int, x: Tensor, mask: Tensor) -> Tensor:
    """``z[b, t, h] = softmax(q_h k_gᵀ / sqrt(dh) + mask) v_g`` with ``g = h // (H / KV)``, by hand.

    ``x`` is the block's input; ``mask`` the attention mask (1 = real token).
    Decoders are causal; LLaMA-likes rotate q and k (Qwen3 after its per-head
    QK-norm). Supported: llama, mistral, qwen2, qwen3, gpt2, bert, roberta.
    """
    H, KV, dh = dims(model)
    blk = layers_of(model, arch)[layer]
    b, t, _ = x.shape
    if arch == "gpt2":
        q, k, v = conv1d(blk.ln_1(x), blk.attn.c_attn).chunk(3, -1)
    elif arch in ("bert", "roberta"):
        s = blk.attention.self
        q, k, v = lin(x, s.query), lin(x, s.key), lin(x, s.value)
    else:
        a, n1 = blk.self_attn, blk.input_layernorm(x)
        q, k, v = lin(n1, a.q_proj), lin(n1, a.k_proj), lin(n1, a.v_proj)
    q, k, v = q.view(b, t, H, dh), k.view(b, t, KV, dh), v.view(b, t, KV, dh)
    if arch in ("llama", "mistral", "qwen2", "qwen3"):
        if arch == "qwen3":
            q, k = blk.self_attn.q_norm(q), blk.self_attn.k_norm(k)
        cos, sin = model.model.rotary_emb(x, torch.arange(t)[None].expand(b, -1))
        cos, sin = cos[:, :, None], sin[:, :, None]
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    allowed = mask[:, None, None, :].bool()  # [b, 1, 1, key]
    if arch not in ("bert", "roberta"):
        allowed = allowed & torch.ones(t, t, dtype=torch.bool).tril()[None, None]
    group = H // KV
    z = torch.empty(b, t, H, dh)
    for h in range(H):
        g = h // group
        scores = torch.einsum("bqd,bkd->bqk", q[:, :, h], k[:, :, g]) / math.sqrt(dh)
        scores = scores.masked_fill(~allowed[:, 0], float("-inf"))
        z[:, :, h] = torch.einsum("bqk,bkd->bqd", F.softmax(scores, -1), v[:, :, g])
    return z
