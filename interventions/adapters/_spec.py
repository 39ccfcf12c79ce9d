"""The declarative form of an architecture adapter.

An :class:`Architecture` maps each canonical block-level site name to a
*port*: a module path relative to the block, which side of it (``input`` or
``output``) and, for fused projections, which channels. Ports are written as
short strings so an adapter reads like a table::

    "self_attn.o_proj:input"          # the input of o_proj
    "post_attention_layernorm:input!" # ... edited in place (see below)
    "attn.c_attn:output@qkv.q"        # the q third of a fused qkv output

The trailing ``!`` marks an input that the block also keeps as its residual
(``residual = h; h = norm(h)``): replacing the argument would change only what
the norm sees, so an edit there is written into the tensor itself, which the
residual path shares. ``None`` instead of a port says the architecture lacks
the site; the reason is given in ``missing``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from steerlab.interventions.errors import ConfigError

__all__ = ["Architecture", "Port", "parse_port"]

# block-level canonical sites, in forward order
BLOCK_SITES: tuple[str, ...] = (
    "resid_pre",
    "attn.q",
    "attn.k",
    "attn.v",
    "attn.z",
    "attn.out",
    "resid_mid",
    "mlp.pre",
    "mlp.post",
    "mlp.out",
    "resid_post",
)
ROOT_SITES: tuple[str, ...] = ("embed", "final_norm", "logits")
# per-head sites and whose head count they use
HEAD_SITES: dict[str, str] = {"attn.q": "q", "attn.k": "kv", "attn.v": "kv", "attn.z": "q"}

_PORT_RE = re.compile(r"^(?P<path>[\w.]*):(?P<io>input|output)(?P<inplace>!)?(?:@(?P<split>[\w]+\.[\w]+))?$")


@dataclass(frozen=True)
class Port:
    """Where a site's value is read and written: ``module`` (dotted path), its
    ``io`` side, whether edits are written in place, and an optional channel
    ``split`` of a fused projection (``"qkv.k"``, ``"neox.v"``, ``"halves.0"``)."""

    module: str
    io: Literal["input", "output"]
    inplace: bool = False
    split: str | None = None

    def __str__(self) -> str:
        s = f"{self.module}:{self.io}" + ("!" if self.inplace else "")
        return s + (f"@{self.split}" if self.split else "")


def parse_port(text: str) -> Port:
    m = _PORT_RE.match(text)
    if not m:
        raise ConfigError(
            f"malformed port {text!r}: expected 'module.path:input' or 'module.path:output', "
            "optionally followed by '!' (edit in place) and '@layout.part' (fused channels)"
        )
    return Port(m["path"], m["io"], bool(m["inplace"]), m["split"])  # type: ignore[arg-type]


@dataclass(frozen=True)
class Architecture:
    """How canonical sites map onto one family of models.

    ``model_types`` are the ``config.model_type`` values this adapter serves.
    ``block`` maps block-level site names to port strings (relative to one
    block) or ``None`` where the family lacks the site; ``missing`` says why.
    ``layers``, ``embed``, ``final_norm`` and ``logits`` are optional module
    paths from the model root; when left out they are found by structure
    (the layer list by length and shape, the embedding and head through
    ``get_input_embeddings`` / ``get_output_embeddings``).
    """

    model_types: tuple[str, ...]
    block: dict[str, str | None]
    missing: dict[str, str] = field(default_factory=dict)
    layers: str | None = None
    final_norm: tuple[str, ...] = ("norm", "ln_f", "final_layer_norm", "final_layernorm")
    parallel_residual: bool = False

    def port(self, site: str) -> Port | None:
        text = self.block.get(site)
        return None if text is None else parse_port(text)
