"""Phi-3: a LLaMA-like block with fused ``qkv_proj`` ([q | k | v]) and a fused
``gate_up_proj`` whose first half is the gate."""

from steerlab.interventions.adapters._spec import Architecture

PHI3 = Architecture(
    model_types=("phi3",),
    block={
        "resid_pre": ":input",
        "attn.q": "self_attn.qkv_proj:output@qkv.q",
        "attn.k": "self_attn.qkv_proj:output@qkv.k",
        "attn.v": "self_attn.qkv_proj:output@qkv.v",
        "attn.z": "self_attn.o_proj:input",
        "attn.out": "self_attn:output",
        "resid_mid": "post_attention_layernorm:input!",
        "mlp.pre": "mlp.gate_up_proj:output@halves.0",
        "mlp.post": "mlp.down_proj:input",
        "mlp.out": "mlp:output",
        "resid_post": ":output",
    },
)
