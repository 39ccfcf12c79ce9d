"""Architecture adapters: canonical site names -> modules, by structure and config.

An adapter is found from ``config.model_type`` (never from the Python class),
and, for a model type nobody registered, by trying each known block layout
against the model's own modules. The layer list, the input embedding and the
output head are found by structure, so subclasses and wrapped models (PEFT,
DDP, ``torch.compile``) resolve the same way as the plain model.

Adding an architecture takes a few lines::

    import steerlab as sl
    sl.register_architecture(sl.Architecture(
        model_types=("my_model",),
        block={"resid_pre": ":input", "attn.out": "mixer:output", ...,
               "resid_post": ":output"},
    ))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from steerlab.interventions.adapters._spec import (
    BLOCK_SITES,
    HEAD_SITES,
    ROOT_SITES,
    Architecture,
    Port,
    parse_port,
)
from steerlab.interventions.adapters.bert import BERT
from steerlab.interventions.adapters.gemma2 import GEMMA2
from steerlab.interventions.adapters.gpt2 import GPT2
from steerlab.interventions.adapters.gpt_neo import GPT_NEO
from steerlab.interventions.adapters.gpt_neox import GPT_NEOX_SEQUENTIAL, gpt_neox
from steerlab.interventions.adapters.llama import LLAMA
from steerlab.interventions.adapters.olmo2 import OLMO2
from steerlab.interventions.adapters.phi3 import PHI3
from steerlab.interventions.errors import ConfigError

__all__ = [
    "Architecture",
    "Port",
    "Dims",
    "ModelMap",
    "register_architecture",
    "map_model",
    "BLOCK_SITES",
    "ROOT_SITES",
    "HEAD_SITES",
]

_Resolver = Callable[[object], Architecture]
_REGISTRY: dict[str, _Resolver] = {}
# block layouts tried, in order, for a model type that nobody registered
_STRUCTURAL: list[Architecture] = [LLAMA, GEMMA2, OLMO2, PHI3, GPT2, GPT_NEO, GPT_NEOX_SEQUENTIAL, BERT]


def register_architecture(arch: Architecture | _Resolver, model_types: tuple[str, ...] | None = None) -> None:
    """Register an adapter for ``config.model_type`` values.

    ``arch`` is an :class:`Architecture` or a function ``config -> Architecture``
    (for families whose layout depends on the config); a function needs
    ``model_types``. A later registration for the same model type wins.
    """
    if isinstance(arch, Architecture):
        types = model_types or arch.model_types
        resolver: _Resolver = lambda config, _a=arch: _a  # noqa: E731
        for site in arch.block:
            if site not in BLOCK_SITES:
                raise ConfigError(f"architecture for {types} maps unknown site {site!r}; expected one of {BLOCK_SITES}")
            if arch.block[site] is not None:
                parse_port(arch.block[site])  # type: ignore[arg-type]
        _STRUCTURAL.insert(0, arch)
    else:
        if not model_types:
            raise ConfigError("register_architecture(fn) needs model_types=(...) naming the config.model_type values")
        types, resolver = model_types, arch
    for t in types:
        _REGISTRY[t] = resolver


for _arch in (LLAMA, PHI3, GEMMA2, OLMO2, GPT2, GPT_NEO, BERT):
    for _t in _arch.model_types:
        _REGISTRY[_t] = lambda config, _a=_arch: _a
_REGISTRY["gpt_neox"] = gpt_neox
del _arch, _t


@dataclass(frozen=True)
class Dims:
    """Sizes read from the config (with structural fallbacks)."""

    d_model: int
    n_layers: int
    n_heads: int | None
    n_kv_heads: int | None
    d_head: int | None
    vocab_size: int | None


def _config_of(model: nn.Module):
    for _, mod in model.named_modules():
        cfg = getattr(mod, "config", None)
        if cfg is not None and hasattr(cfg, "model_type") and hasattr(cfg, "to_dict"):
            return cfg
    return None


def _first_attr(cfg, *names):
    for n in names:
        v = getattr(cfg, n, None)
        if isinstance(v, int):
            return v
    return None


def _find_layers(model: nn.Module, n_layers: int | None) -> tuple[str, nn.ModuleList] | None:
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(m) for m in mod}) != 1 or not any(True for _ in mod[0].parameters()):
            continue
        if n_layers is not None and len(mod) != n_layers:
            continue
        if best is None or len(mod) > len(best[1]):
            best = (name, mod)
    return best


def _path_of(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    for name, mod in model.named_modules():
        if mod is target:
            return name
    return None


def _has(module: nn.Module, path: str) -> bool:
    if path == "":
        return True
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


def _fits(arch: Architecture, block: nn.Module) -> bool:
    return all(_has(block, parse_port(p).module) for p in arch.block.values() if p is not None)


@dataclass
class ModelMap:
    """An architecture bound to one model instance: module paths from the root."""

    model_type: str | None
    arch: Architecture | None
    layers_path: str | None
    n_layers: int
    embed_path: str | None
    final_norm_path: str | None
    logits_path: str | None
    dims: Dims | None
    structural: bool  # found by structure rather than by model_type

    def block_path(self, layer: int) -> str:
        assert self.layers_path is not None
        return f"{self.layers_path}.{layer}" if self.layers_path else str(layer)


def map_model(model: nn.Module) -> ModelMap:
    """Find the adapter and the structural paths for ``model``."""
    cfg = _config_of(model)
    model_type = getattr(cfg, "model_type", None)
    n_cfg = _first_attr(cfg, "num_hidden_layers", "n_layer", "num_layers") if cfg is not None else None
    found = _find_layers(model, n_cfg) if cfg is not None else None
    arch: Architecture | None = None
    structural = False
    if found is not None:
        block = found[1][0]
        if model_type in _REGISTRY:
            arch = _REGISTRY[model_type](cfg)
            if not _fits(arch, block):
                arch, structural = next((a for a in _STRUCTURAL if _fits(a, block)), None), True
        else:
            arch, structural = next((a for a in _STRUCTURAL if _fits(a, block)), None), True
    layers_path = found[0] if found else None
    n_layers = len(found[1]) if found else 0
    if arch is not None and arch.layers is not None and _has(model, arch.layers):
        layers_path = arch.layers
        n_layers = len(model.get_submodule(arch.layers))

    embed_path = logits_path = final_norm_path = None
    if cfg is not None:
        get_in = getattr(model, "get_input_embeddings", None)
        get_out = getattr(model, "get_output_embeddings", None)
        embed_path = _path_of(model, get_in() if callable(get_in) else None)
        logits_path = _path_of(model, get_out() if callable(get_out) else None)
        if logits_path is None:
            logits_path = next(
                (n for n, _ in model.named_modules() if n.split(".")[-1] in ("score", "classifier", "lm_head")), None
            )
        if arch is not None and layers_path is not None:
            # the layer list lives in e.g. model.layers / transformer.h / encoder.layer
            base = layers_path.rsplit(".", 1)[0] if "." in layers_path else ""
            for cand in arch.final_norm:
                path = f"{base}.{cand}" if base else cand
                if _has(model, path):
                    final_norm_path = path
                    break

    dims = None
    if cfg is not None:
        d_model = _first_attr(cfg, "hidden_size", "n_embd", "d_model")
        n_heads = _first_attr(cfg, "num_attention_heads", "n_head", "num_heads")
        n_kv = _first_attr(cfg, "num_key_value_heads") or n_heads
        d_head = _first_attr(cfg, "head_dim")
        if d_head is None and d_model and n_heads:
            d_head = d_model // n_heads
        vocab = _first_attr(cfg, "vocab_size")
        if d_model is not None:
            dims = Dims(d_model, n_layers, n_heads, n_kv, d_head, vocab)
    return ModelMap(model_type, arch, layers_path, n_layers, embed_path, final_norm_path, logits_path, dims, structural)


def channel_index(split: str, dims: Dims, fused_width: int) -> torch.Tensor:
    """Channel indices of one part of a fused projection's output."""
    layout, part = split.split(".")
    H, KV, dh = dims.n_heads, dims.n_kv_heads, dims.d_head
    if layout == "qkv":  # [q (H*dh) | k (KV*dh) | v (KV*dh)]
        assert H and KV and dh
        start = {"q": 0, "k": H * dh, "v": H * dh + KV * dh}[part]
        size = (H if part == "q" else KV) * dh
        return torch.arange(start, start + size)
    if layout == "neox":  # per head [q | k | v], d_head each
        assert H and dh
        k = "qkv".index(part)
        return (torch.arange(H)[:, None] * 3 * dh + k * dh + torch.arange(dh)).flatten()
    if layout == "halves":  # [first | second], equal halves
        half = fused_width // 2
        return torch.arange(int(part) * half, (int(part) + 1) * half)
    raise ConfigError(f"unknown fused layout {layout!r} in port split {split!r}; expected qkv, neox or halves")
