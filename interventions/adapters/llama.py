"""LLaMA and the families that share its block: Mistral, Qwen2, Qwen3, Gemma, OLMo.

Sequential pre-LN: ``h += attn(norm(h)); h += mlp(norm(h))``. The attention
module takes ``hidden_states`` as a keyword; q/k/v are separate projections
(Qwen3 and OLMo apply QK-norm afterwards, which the q/k sites precede).
"""

from steerlab.interventions.adapters._spec import Architecture

LLAMA = Architecture(
    model_types=("llama", "mistral", "qwen2", "qwen3", "gemma", "olmo", "mixtral", "qwen2_moe"),
    block={
        "resid_pre": ":input",
        "attn.q": "self_attn.q_proj:output",
        "attn.k": "self_attn.k_proj:output",
        "attn.v": "self_attn.v_proj:output",
        "attn.z": "self_attn.o_proj:input",
        "attn.out": "self_attn:output",
        "resid_mid": "post_attention_layernorm:input!",
        "mlp.pre": "mlp.gate_proj:output",
        "mlp.post": "mlp.down_proj:input",
        "mlp.out": "mlp:output",
        "resid_post": ":output",
    },
)
