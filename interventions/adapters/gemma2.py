"""Gemma 2 and Gemma 3 (text): sandwich norms.

``h += post_attn_norm(attn(pre_norm(h))); h += post_ff_norm(mlp(pre_ff_norm(h)))``:
what attention and MLP add to the residual are the *post*-norms' outputs, so
``attn.out`` and ``mlp.out`` are read there.
"""

from steerlab.interventions.adapters._spec import Architecture

GEMMA2 = Architecture(
    model_types=("gemma2", "gemma3_text", "gemma3"),
    block={
        "resid_pre": ":input",
        "attn.q": "self_attn.q_proj:output",
        "attn.k": "self_attn.k_proj:output",
        "attn.v": "self_attn.v_proj:output",
        "attn.z": "self_attn.o_proj:input",
        "attn.out": "post_attention_layernorm:output",
        "resid_mid": "pre_feedforward_layernorm:input!",
        "mlp.pre": "mlp.gate_proj:output",
        "mlp.post": "mlp.down_proj:input",
        "mlp.out": "post_feedforward_layernorm:output",
        "resid_post": ":output",
    },
)
