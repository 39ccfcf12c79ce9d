"""OLMo-2: post-norms inside the residual branch, no pre-norms.

``h += post_attn_norm(attn(h)); h += post_ff_norm(mlp(h))``: the MLP reads the
residual directly, so ``resid_mid`` is the MLP's input (edited in place, as the
residual shares it).
"""

from steerlab.interventions.adapters._spec import Architecture

OLMO2 = Architecture(
    model_types=("olmo2", "olmo3"),
    block={
        "resid_pre": ":input",
        "attn.q": "self_attn.q_proj:output",
        "attn.k": "self_attn.k_proj:output",
        "attn.v": "self_attn.v_proj:output",
        "attn.z": "self_attn.o_proj:input",
        "attn.out": "post_attention_layernorm:output",
        "resid_mid": "mlp:input!",
        "mlp.pre": "mlp.gate_proj:output",
        "mlp.post": "mlp.down_proj:input",
        "mlp.out": "post_feedforward_layernorm:output",
        "resid_post": ":output",
    },
)
