"""GPT-NeoX (Pythia): fused ``query_key_value`` laid out per head as
[q | k | v] of ``d_head`` each; a parallel residual unless
``config.use_parallel_residual`` is false."""

from steerlab.interventions.adapters._spec import Architecture

_COMMON = {
    "resid_pre": ":input",
    "attn.q": "attention.query_key_value:output@neox.q",
    "attn.k": "attention.query_key_value:output@neox.k",
    "attn.v": "attention.query_key_value:output@neox.v",
    "attn.z": "attention.dense:input",
    "attn.out": "attention:output",
    "mlp.pre": "mlp.dense_h_to_4h:output",
    "mlp.post": "mlp.dense_4h_to_h:input",
    "mlp.out": "mlp:output",
    "resid_post": ":output",
}

GPT_NEOX_PARALLEL = Architecture(
    model_types=("gpt_neox",),
    block={**_COMMON, "resid_mid": None},
    missing={"resid_mid": "parallel residual: attention and MLP both read resid_pre"},
    parallel_residual=True,
)
GPT_NEOX_SEQUENTIAL = Architecture(
    model_types=("gpt_neox",),
    block={**_COMMON, "resid_mid": "post_attention_layernorm:input!"},
)


def gpt_neox(config) -> Architecture:
    parallel = getattr(config, "use_parallel_residual", True)
    return GPT_NEOX_PARALLEL if parallel else GPT_NEOX_SEQUENTIAL
