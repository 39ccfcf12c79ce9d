"""GPT-2: fused ``c_attn`` (a ``Conv1D`` with [q | k | v] outputs), ``c_proj``
as the attention output projection, ``ln_2`` reading the residual."""

from steerlab.interventions.adapters._spec import Architecture

GPT2 = Architecture(
    model_types=("gpt2",),
    block={
        "resid_pre": ":input",
        "attn.q": "attn.c_attn:output@qkv.q",
        "attn.k": "attn.c_attn:output@qkv.k",
        "attn.v": "attn.c_attn:output@qkv.v",
        "attn.z": "attn.c_proj:input",
        "attn.out": "attn:output",
        "resid_mid": "ln_2:input!",
        "mlp.pre": "mlp.c_fc:output",
        "mlp.post": "mlp.c_proj:input",
        "mlp.out": "mlp:output",
        "resid_post": ":output",
    },
)
