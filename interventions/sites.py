"""Site names, their resolution to modules, and the catalog of a model's sites.

Canonical names are the same on every supported architecture::

    embed
    blocks.{L}.resid_pre  blocks.{L}.resid_mid  blocks.{L}.resid_post
    blocks.{L}.attn.q|k|v|z   (per head: [batch, pos, head, d_head])
    blocks.{L}.attn.out
    blocks.{L}.mlp.pre|post|out
    final_norm   logits
    module:<dotted.module.path>:input|output      (any nn.Module)

``L`` may be negative (``blocks.-1.resid_post`` is the last block). A name
resolves through the model's adapter to a :class:`ResolvedSite`: the module,
the port (input or output, in place or not, fused channels) and the head
layout.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from steerlab.interventions.adapters import (
    BLOCK_SITES,
    HEAD_SITES,
    ROOT_SITES,
    ModelMap,
    Port,
    channel_index,
    parse_port,
)
from steerlab.interventions.errors import SiteNotFound

__all__ = ["ResolvedSite", "SiteCatalog", "SiteResolver", "canonical_names"]

_BLOCK_RE = re.compile(r"^blocks\.(-?\d+)\.(.+)$")
_MODULE_RE = re.compile(r"^module:(?P<path>[\w.]*):(?P<io>input|output)$")


@dataclass(frozen=True)
class ResolvedSite:
    """A site bound to one module of one model.

    ``n_heads``/``d_head`` are set for per-head sites, whose value the
    intervention sees as ``[batch, pos, head, d_head]``; ``channels`` selects
    this site's part of a fused projection's output.
    """

    name: str
    # None only in the nnsight engine's program, which names modules through envoys (it may travel to a remote server)
    module: nn.Module | None = field(repr=False, compare=False, hash=False)
    module_path: str
    port: Port
    layer: int | None
    n_heads: int | None = None
    d_head: int | None = None
    channels: torch.Tensor | None = field(default=None, repr=False, compare=False, hash=False)

    @property
    def key(self) -> tuple[str, str]:
        """Hooks are installed once per (module, side)."""
        return (self.module_path, self.port.io)


def canonical_names(n_layers: int) -> list[str]:
    names = ["embed"]
    for layer in range(n_layers):
        names += [f"blocks.{layer}.{s}" for s in BLOCK_SITES]
    return names + ["final_norm", "logits"]


class SiteResolver:
    """Resolves site names on one model (cached)."""

    def __init__(self, model: nn.Module, mm: ModelMap):
        self.model = model
        self.map = mm
        self._cache: dict[str, ResolvedSite] = {}

    # -- names ---------------------------------------------------------
    def known(self) -> list[str]:
        names = canonical_names(self.map.n_layers) if self.map.arch is not None else []
        return names + [f"module:{n}:output" for n, _ in self.model.named_modules() if n]

    def expand(self, pattern: str) -> list[str]:
        """``blocks.*.resid_post`` -> every layer's name, in layer order."""
        if not any(c in pattern for c in "*?["):
            return [pattern]
        names = [n for n in canonical_names(self.map.n_layers) if fnmatch.fnmatchcase(n, pattern)]
        if not names:
            raise SiteNotFound(pattern, self.known(), reason="the pattern matches no site")
        return names

    def missing(self) -> dict[str, str]:
        """Canonical sites this model lacks, with the reason."""
        out: dict[str, str] = {}
        if self.map.arch is None:
            why = "no transformer layer list was found (a plain module: use module:<path>:input|output sites)"
            return {s: why for s in ("blocks.*",) + ROOT_SITES}
        for s in BLOCK_SITES:
            if self.map.arch.block.get(s) is None:
                out[f"blocks.*.{s}"] = self.map.arch.missing.get(s, f"{self.map.model_type} has no {s}")
        if self.map.embed_path is None:
            out["embed"] = "the model has no input embedding module"
        if self.map.final_norm_path is None:
            out["final_norm"] = "the model applies no final norm (post-LN encoder)" if self.map.arch.final_norm == () else "no final norm module found"
        if self.map.logits_path is None:
            out["logits"] = "the model has no output head (a bare encoder or base model)"
        return out

    # -- resolution ----------------------------------------------------
    def resolve(self, name: str) -> ResolvedSite:
        hit = self._cache.get(name)
        if hit is None:
            hit = self._cache[name] = self._resolve(name)
        return hit

    def _module(self, name: str, path: str) -> nn.Module:
        try:
            return self.model.get_submodule(path) if path else self.model
        except AttributeError:
            raise SiteNotFound(name, self.known(), reason=f"module path {path!r} does not exist") from None

    def _resolve(self, name: str) -> ResolvedSite:
        if not isinstance(name, str):
            raise SiteNotFound(repr(name), [], reason=f"a site name is a string, got {type(name).__name__}")
        m = _MODULE_RE.match(name)
        if m:
            port = Port(m["path"], m["io"])  # type: ignore[arg-type]
            return ResolvedSite(name, self._module(name, m["path"]), m["path"], port, None)
        missing = self.missing()
        if name in ROOT_SITES:
            path = {"embed": self.map.embed_path, "final_norm": self.map.final_norm_path, "logits": self.map.logits_path}[name]
            if path is None:
                raise SiteNotFound(name, self.known(), reason=missing.get(name, "not found on this model"))
            return ResolvedSite(name, self._module(name, path), path, Port(path, "output"), None)
        b = _BLOCK_RE.match(name)
        if not b or b[2] not in BLOCK_SITES:
            raise SiteNotFound(name, self.known())
        if self.map.arch is None:
            raise SiteNotFound(name, self.known(), reason=missing["blocks.*"])
        layer, site = int(b[1]), b[2]
        n = self.map.n_layers
        if not -n <= layer < n:
            raise SiteNotFound(name, self.known(), reason=f"layer {layer} is out of range: the model has {n} layers (0..{n - 1})")
        layer %= n
        text = self.map.arch.block.get(site)
        if text is None:
            raise SiteNotFound(name, self.known(), reason=missing.get(f"blocks.*.{site}", f"{self.map.model_type} lacks it"))
        rel = parse_port(text)
        block = self.map.block_path(layer)
        path = f"{block}.{rel.module}" if rel.module else block
        module = self._module(name, path)
        port = Port(path, rel.io, rel.inplace, rel.split)
        canonical = f"blocks.{layer}.{site}"
        n_heads = d_head = channels = None
        dims = self.map.dims
        if rel.split is not None and dims is not None:
            fused = getattr(module, "out_features", None) or getattr(module, "nf", None) or 0
            channels = channel_index(rel.split, dims, fused)
        if site in HEAD_SITES and dims is not None and dims.n_heads:
            n_heads = dims.n_heads if HEAD_SITES[site] == "q" else dims.n_kv_heads
            d_head = dims.d_head
        return ResolvedSite(canonical, module, path, port, layer, n_heads, d_head, channels)


@dataclass
class SiteCatalog:
    """Every site of a model, with its shape, module and port; what it lacks.

    ``rows`` holds one dict per site (``name``, ``shape``, ``module``,
    ``port``); ``missing`` maps absent canonical sites to the reason.
    Printing it (or showing it in a notebook) gives a table.
    """

    model_type: str | None
    rows: list[dict]
    missing: dict[str, str]
    modules: list[str]

    def names(self) -> list[str]:
        return [r["name"] for r in self.rows]

    def __contains__(self, name: object) -> bool:
        return any(r["name"] == name for r in self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def __getitem__(self, name: str) -> dict:
        for r in self.rows:
            if r["name"] == name:
                return r
        raise SiteNotFound(name, self.names())

    def table(self) -> str:
        shape = lambda s: "[" + ", ".join(str(x) for x in s) + "]" if s is not None else "?"  # noqa: E731
        w = max([len(r["name"]) for r in self.rows] + [4])
        lines = [f"{'site':<{w}}  {'shape':<28}  port"]
        lines += [f"{r['name']:<{w}}  {shape(r['shape']):<28}  {r['port']}" for r in self.rows]
        if self.missing:
            lines.append("")
            lines += [f"missing {k}: {v}" for k, v in self.missing.items()]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"SiteCatalog({self.model_type}, {len(self.rows)} sites)\n" + self.table()

    def _repr_html_(self) -> str:
        import html

        head = "<tr><th>site</th><th>shape</th><th>port</th></tr>"
        body = "".join(
            f"<tr><td>{html.escape(r['name'])}</td><td>{html.escape(str(r['shape']))}</td><td>{html.escape(r['port'])}</td></tr>"
            for r in self.rows
        )
        miss = "".join(f"<li>{html.escape(k)}: {html.escape(v)}</li>" for k, v in self.missing.items())
        return f"<table>{head}{body}</table>" + (f"<p>missing:</p><ul>{miss}</ul>" if miss else "")
