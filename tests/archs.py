"""Tiny random-weight configs of every architecture steerlab supports."""

from __future__ import annotations

import torch
import transformers as T

_COMMON = dict(vocab_size=96, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_DEC = dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, **_COMMON)

ARCHS = {
    "gpt2": lambda: T.GPT2Config(n_layer=3, n_embd=32, n_head=4, n_positions=64, **_COMMON),
    "gpt_neo": lambda: T.GPTNeoConfig(
        num_layers=3, hidden_size=32, num_heads=4, max_position_embeddings=64,
        attention_types=[[["global", "local"], 1], [["global"], 1]], window_size=8, **_COMMON
    ),
    "gpt_neox": lambda: T.GPTNeoXConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, intermediate_size=64, **_COMMON),
    "gpt_neox_seq": lambda: T.GPTNeoXConfig(
        num_hidden_layers=3, hidden_size=32, num_attention_heads=4, intermediate_size=64, use_parallel_residual=False, **_COMMON
    ),
    "llama": lambda: T.LlamaConfig(**_DEC),
    "mistral": lambda: T.MistralConfig(**_DEC),
    "qwen2": lambda: T.Qwen2Config(**_DEC),
    "qwen3": lambda: T.Qwen3Config(head_dim=8, **_DEC),
    "gemma": lambda: T.GemmaConfig(head_dim=8, **_DEC),
    "gemma2": lambda: T.Gemma2Config(head_dim=8, **_DEC),
    "gemma3_text": lambda: T.Gemma3TextConfig(head_dim=8, **_DEC),
    "phi3": lambda: T.Phi3Config(**_DEC),
    "olmo": lambda: T.OlmoConfig(**_DEC),
    "olmo2": lambda: T.Olmo2Config(**_DEC),
    "bert": lambda: T.BertConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=96, pad_token_id=0),
    "roberta": lambda: T.RobertaConfig(
        num_hidden_layers=3, hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=96, pad_token_id=1,
        max_position_embeddings=70,
    ),
}
ENCODERS = {"bert", "roberta"}


def tiny_model(arch: str, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    torch.manual_seed(seed)
    cfg = ARCHS[arch]()
    cls = T.AutoModel if arch in ENCODERS else T.AutoModelForCausalLM
    model = cls.from_config(cfg, dtype=dtype)
    return model.eval()


def tiny_inputs(arch: str, batch: int = 2, seq: int = 6, *, seed: int = 1, pad: int = 0, side: str = "right"):
    """Token ids avoiding special ids, with ``pad`` padding tokens on ``side`` of the last example."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 90, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad:
        if side == "right":
            mask[-1, seq - pad :] = 0
        else:
            mask[-1, :pad] = 0
        ids[mask == 0] = 0 if arch != "roberta" else 1
    return {"input_ids": ids, "attention_mask": mask}
