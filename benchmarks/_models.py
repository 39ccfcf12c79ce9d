"""The narrow, deep random model the base-layer benchmarks share (nothing to download)."""

from __future__ import annotations

import torch


def deep_llama(device: torch.device | str, dtype: torch.dtype):
    """A random LLaMA, width 64 and 30 layers (seed 0): little compute per hook, many hooks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64, num_hidden_layers=30, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=512, max_position_embeddings=256, pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()
