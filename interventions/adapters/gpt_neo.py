"""GPT-Neo: GPT-2's block shape with separate projections inside ``attn.attention``."""

from steerlab.interventions.adapters._spec import Architecture

GPT_NEO = Architecture(
    model_types=("gpt_neo",),
    block={
        "resid_pre": ":input",
        "attn.q": "attn.attention.q_proj:output",
        "attn.k": "attn.attention.k_proj:output",
        "attn.v": "attn.attention.v_proj:output",
        "attn.z": "attn.attention.out_proj:input",
        "attn.out": "attn:output",
        "resid_mid": "ln_2:input!",
        "mlp.pre": "mlp.c_fc:output",
        "mlp.post": "mlp.c_proj:input",
        "mlp.out": "mlp:output",
        "resid_post": ":output",
    },
)
