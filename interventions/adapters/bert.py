"""BERT and RoBERTa: post-LN encoders.

``attn.out`` is the attention output projection before add & norm;
``resid_mid`` the attention sub-layer's output after its add & norm;
``mlp.out`` the second MLP projection before the final add & norm. There is
no final norm and (for the bare encoder) no logits.
"""

from steerlab.interventions.adapters._spec import Architecture

BERT = Architecture(
    model_types=("bert", "roberta", "xlm-roberta", "camembert", "electra"),
    block={
        "resid_pre": ":input",
        "attn.q": "attention.self.query:output",
        "attn.k": "attention.self.key:output",
        "attn.v": "attention.self.value:output",
        "attn.z": "attention.output.dense:input",
        "attn.out": "attention.output.dense:output",
        "resid_mid": "attention:output",
        "mlp.pre": "intermediate.dense:output",
        "mlp.post": "output.dense:input",
        "mlp.out": "output.dense:output",
        "resid_post": ":output",
    },
    final_norm=(),
)
