"""``wrap(model, tokenizer)``: a model with its sites discovered, ready for interventions.

A :class:`Lab` is a thin handle, not a copy: it holds the model, its
tokenizer, the site resolver and the list of attachments. Wrapping freezes
the base model's parameters (as ``peft.get_peft_model`` does) so that only
interventions train; :meth:`Lab.unwrap` restores each parameter's
``requires_grad``. Nothing else about the model changes, and every call
leaves the model's hook registries as it found them.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor, nn

from steerlab.interventions.activation_cache import ActivationCache
from steerlab.interventions.adapters import ROOT_SITES, map_model
from steerlab.interventions.attachment import Attachment
from steerlab.interventions.engine import execute
from steerlab.interventions.errors import (
    BatchMismatch,
    ConfigError,
    DataError,
    LifetimeError,
    ShapeMismatch,
    SiteNotFound,
    SourceError,
    UnitError,
)
from steerlab.interventions.graph import Graph, GraphResult, Run, RunResult, SourceValue
from steerlab.interventions.hooks import EarlyExit, _input_tensor, _output_tensor
from steerlab.interventions.inputs import Inputs
from steerlab.interventions.ops import Collect, Intervention
from steerlab.interventions.prefix import Prefix, resume_from, tuple_len_of
from steerlab.interventions.sites import ResolvedSite, SiteCatalog, SiteResolver, canonical_names

__all__ = ["Lab", "wrap", "Generation"]


@dataclass
class Generation:
    """Output of :meth:`Lab.generate`: ``sequences`` (prompt + new tokens, the
    prompt left-padded to ``prompt_length``) and the decoded new ``texts``."""

    sequences: Int[Tensor, "batch total"]
    prompt_length: int
    texts: list[str] | None

    @property
    def new_tokens(self) -> Int[Tensor, "batch new"]:
        return self.sequences[:, self.prompt_length :]


class Lab:
    """A wrapped model. Create with :func:`wrap`."""

    def __init__(self, model: nn.Module, tokenizer=None, *, freeze: bool = True, example_input=None):
        envoy = _nnsight_model(model)
        if envoy is not None:  # the user's nnsight model: steerlab works on its module; engine="nnsight" uses it
            model = envoy._module
            tokenizer = tokenizer if tokenizer is not None else envoy.__dict__.get("tokenizer")
        if not isinstance(model, nn.Module):
            raise TypeError(f"wrap() takes an nn.Module or an nnsight model; got {type(model).__name__}")
        self.nnsight_model = envoy
        self.model = model
        self.tokenizer = tokenizer
        self.map = map_model(model)
        self.resolver = SiteResolver(model, self.map)
        self.example_input = example_input
        self._shapes: dict[str, tuple | None] = {}
        self._tuple_len: int | None = None
        self._attachments: list[Attachment] = []
        self._takes_use_cache = self.is_hf and _accepts(model.forward, "use_cache")
        self._grad_flags: dict[nn.Parameter, bool] | None = None
        if freeze:
            self._grad_flags = {p: p.requires_grad for p in model.parameters()}
            for p in model.parameters():
                p.requires_grad_(False)

    # -- facts ----------------------------------------------------------------
    @property
    def is_hf(self) -> bool:
        return self.map.model_type is not None

    @property
    def is_lm(self) -> bool:
        return self.is_hf

    @property
    def device(self) -> torch.device:
        """Where the model takes its inputs: its first parameter's device, or where accelerate
        computes it when that parameter is offloaded (on ``meta`` until each forward)."""
        return execution_device(self.model)

    @property
    def dtype(self) -> torch.dtype:
        p = next(self.model.parameters(), None)
        return p.dtype if p is not None else torch.float32

    @property
    def n_layers(self) -> int:
        return self.map.n_layers

    @property
    def d_model(self) -> int | None:
        return self.map.dims.d_model if self.map.dims else None

    @property
    def layers(self) -> nn.ModuleList:
        if self.map.layers_path is None:
            raise SiteNotFound("blocks", [], reason="this model has no layer list")
        return self.model.get_submodule(self.map.layers_path)  # type: ignore[return-value]

    @property
    def no_cache(self) -> dict:
        """Keyword arguments for a forward that needs no KV cache (source runs, collects,
        probes): ``{"use_cache": False}`` where the model's forward takes it, else none."""
        return {"use_cache": False} if self._takes_use_cache else {}

    def has_trainable_base(self) -> bool:
        return any(p.requires_grad for p in self.model.parameters())

    def trained_parameters(self) -> list[str]:
        """Names of the parameters that required gradients in the model as given (``wrap``
        freezes them; this reads the flags it recorded), else as they are now."""
        flags = self._grad_flags
        return [n for n, p in self.model.named_parameters() if (flags.get(p, False) if flags is not None else p.requires_grad)]

    def fingerprint(self) -> dict:
        """What a saved file records about the model it was made for."""
        d = self.map.dims
        return {
            "model_type": self.map.model_type,
            "width": d.d_model if d else None,
            "n_layers": self.map.n_layers,
            "vocab_size": d.vocab_size if d else None,
        }

    # -- sites ------------------------------------------------------------------
    def resolve(self, name: str) -> ResolvedSite:
        return self.resolver.resolve(name)

    def expand(self, pattern: str) -> list[str]:
        return self.resolver.expand(pattern)

    def _probe_inputs(self) -> Inputs:
        if self.example_input is not None:
            return Inputs.of(self.example_input, tokenizer=self.tokenizer, device=self.device, is_lm=self.is_lm)
        if not self.is_hf:
            raise UnitError("this plain module's site shapes need an example: wrap(model, example_input=tensor)")
        return Inputs((), {"input_ids": torch.tensor([[1, 2]], device=self.device)})

    def _probe(self, sites: Sequence[ResolvedSite]) -> None:
        """One tiny forward recording the raw shape at each site's port."""
        todo = [s for s in sites if s.name not in self._shapes]
        if not todo and (self._tuple_len is not None or self.map.layers_path is None):
            return
        seen: dict[str, tuple] = {}
        handles = []

        def rec(name, io):
            if io == "input":
                def pre(module, args, kwargs):
                    seen.setdefault(name, tuple(_input_tensor(args, kwargs)[0].shape))
                return pre
            def post(module, args, out):
                seen.setdefault(name, tuple(_output_tensor(out).shape))
            return post

        def block_out(module, args, out):
            self._tuple_len = tuple_len_of(out)

        try:
            for s in todo:
                f = rec(s.name, s.port.io)
                handles.append(s.module.register_forward_pre_hook(f, with_kwargs=True) if s.port.io == "input" else s.module.register_forward_hook(f))
            if self.map.layers_path is not None and self._tuple_len is None:
                handles.append(self.layers[0].register_forward_hook(block_out))
            with torch.no_grad():
                inp = self._probe_inputs()
                kwargs = self.no_cache
                self.model(*inp.args, **inp.kwargs, **kwargs)
        finally:
            for h in handles:
                h.remove()
        for s in todo:
            self._shapes[s.name] = seen.get(s.name)

    def raw_shape(self, site: ResolvedSite) -> tuple:
        """The shape at the site's port in the probe forward (before heads/channels)."""
        self._probe([site])
        shape = self._shapes.get(site.name)
        if shape is None:
            raise SiteNotFound(site.name, self.resolver.known(), reason=f"its module {site.module_path!r} did not run in a forward")
        return shape

    def site_shape(self, site: ResolvedSite) -> tuple[int, ...]:
        """Feature shape of the site's value (after batch and position): ``(d,)`` or ``(head, d_head)``."""
        raw = self.raw_shape(site)
        width = len(site.channels) if site.channels is not None else raw[-1]
        if site.n_heads and site.d_head:
            return (site.n_heads, width // site.n_heads)
        return (width,)

    def has_positions(self, site: ResolvedSite) -> bool:
        return len(self.raw_shape(site)) >= 3

    @property
    def sites(self) -> SiteCatalog:
        """Every site with its shape and port, and the canonical sites the model lacks."""
        missing = self.resolver.missing()
        resolved = []
        names = canonical_names(self.map.n_layers) if self.map.arch is not None else []
        for name in names:
            try:
                resolved.append(self.resolve(name))
            except SiteNotFound:
                continue
        if not self.is_hf and self.example_input is None:
            modules = [n for n, _ in self.model.named_modules() if n]
            rows = [{"name": f"module:{m}:{io}", "shape": None, "module": m, "port": io} for m in modules for io in ("input", "output")]
            return SiteCatalog(None, rows, missing, modules)
        if not self.is_hf:
            resolved = [self.resolve(f"module:{n}:{io}") for n, _ in self.model.named_modules() if n for io in ("input", "output")]
        self._probe(resolved)
        rows = []
        for s in resolved:
            raw = self._shapes.get(s.name)
            if raw is None:
                if s.name in ROOT_SITES or s.name.startswith("blocks."):
                    key = s.name if s.name in ROOT_SITES else "blocks.*." + s.name.split(".", 2)[2]
                    missing.setdefault(key, f"its module {s.module_path!r} did not run in a forward")
                continue
            feat = self.site_shape(s)
            shape = ("batch",) + (("pos",) if len(raw) >= 3 else ()) + feat
            rows.append({"name": s.name, "shape": shape, "module": s.module_path, "port": str(s.port)})
        return SiteCatalog(self.map.model_type, rows, missing, [n for n, _ in self.model.named_modules() if n])

    def prepare(self, iv: Intervention) -> ResolvedSite:
        """Resolve ``iv``'s site, check its units, build it for the site's width and device."""
        if not isinstance(iv, Intervention):
            raise TypeError(f"expected an Intervention; got {type(iv).__name__}")
        site = self.resolve(iv.site)
        shape = self.site_shape(site)
        if iv.heads is not None:
            if not site.n_heads:
                raise UnitError(f"heads={list(iv.heads)} given at {site.name!r}, which is not a per-head site (attn.q|k|v|z are)")
            bad = [h for h in iv.heads if not 0 <= h < site.n_heads]
            if bad:
                raise UnitError(f"heads={bad} out of range at {site.name!r}, which has {site.n_heads} heads (0..{site.n_heads - 1})")
        width = shape[-1]
        if iv.dims is not None:
            bad = [d for d in iv.dims if not 0 <= d < width]
            if bad:
                raise UnitError(f"dims={bad[:5]} out of range at {site.name!r}, whose width is {width} (0..{width - 1})")
            width = len(iv.dims)
        if not iv.built:
            iv.build(width)
        elif iv.width != width:
            raise ShapeMismatch(f"{type(iv).__name__} was built for width {iv.width} but its slice of {site.name!r} has width {width}")
        device = execution_device(site.module, self.device)
        if any(t.device != device for t in [*iv.parameters(), *iv.buffers()]):
            iv.to(device)  # each intervention lives on its site's device (models split with device_map)
        if not self.has_positions(site):
            spec = iv.positions
            if spec.kind != "all" and not (spec.kind == "static" and spec.static in ((0,), (-1,))):
                raise UnitError(f"{site.name!r} has no position axis (its value is [batch, width]); positions must be None")
        return site

    # -- per-call execution ---------------------------------------------------------
    def run(
        self,
        inputs: Any,
        interventions: Sequence[Intervention] | Intervention = (),
        *,
        positions=None,
        source_positions=None,
        prefix: Prefix | None = None,
        validate: bool = True,
        engine: Any = "hooks",
        **model_kwargs,
    ) -> RunResult:
        """Run the model on ``inputs`` with ``interventions`` (hooks for this call only).

        ``positions`` / ``source_positions`` override every intervention's
        positions for this call (e.g. per-example tensors from a collator);
        ``prefix`` resumes from a cached :class:`Prefix`; ``engine`` as for
        :meth:`execute`. Extra keyword arguments go to the model's forward.
        """
        g = Graph()
        base = g.run(inputs, [interventions] if isinstance(interventions, Intervention) else interventions, name="base")
        return self.execute(g, positions=positions, source_positions=source_positions, prefix=prefix, validate=validate, engine=engine, **model_kwargs)[base]

    def execute(
        self,
        graph: Graph,
        *,
        positions=None,
        source_positions=None,
        prefix: Prefix | None = None,
        validate: bool = True,
        engine: Any = "hooks",
        **model_kwargs,
    ) -> GraphResult:
        """Execute a run graph (see :mod:`steerlab.interventions.graph`).

        ``engine``: ``"hooks"`` (PyTorch hooks, the default), ``"nnsight"``
        (nnsight traces, see :mod:`steerlab.interventions.nnsight_engine`) or
        an engine object such as ``NNsightEngine(lm, remote=True)``.
        """
        if isinstance(engine, str) and engine == "hooks":
            return execute(self, graph, positions=positions, source_positions=source_positions, prefix=prefix, validate=validate, model_kwargs=model_kwargs)
        return _engine(engine).execute(self, graph, positions=positions, source_positions=source_positions, prefix=prefix, validate=validate, model_kwargs=model_kwargs)

    def collect(self, inputs: Any, sites: str | Sequence[str], *, positions=None, heads=None, detach: bool = True) -> ActivationCache:
        """Collect the values at ``sites`` (names or patterns like ``blocks.*.resid_post``)
        in one forward that stops after the last of them."""
        names = [n for s in ([sites] if isinstance(sites, str) else sites) for n in self.expand(s)]
        ivs = [Collect(n, positions=positions, heads=heads, detach=detach) for n in names]
        g = Graph()
        node = g.run(inputs, ivs, name="collect")
        node.output = True
        from steerlab.interventions.engine import collect_only

        return collect_only(self, g, node)

    def source_value(self, iv: Intervention, inputs: Any = None) -> SourceValue:
        """The slice ``iv`` would read from ``inputs`` (default: its ``source``), as a reusable :class:`SourceValue`."""
        inputs = iv.source if inputs is None else inputs
        site = iv.source_site or iv.site
        cache = self.collect(inputs, site, positions=iv.effective_source_positions(), heads=iv.heads)
        value = cache[self.resolve(site).name]
        if iv.dims is not None:
            value = value[..., list(iv.dims)]
        spec = iv.effective_source_positions()
        valid = None
        if spec.may_be_empty:
            info = Inputs.of(inputs, tokenizer=self.tokenizer, device=self.device, is_lm=self.is_lm).mask_info()
            valid = spec.resolve(info) >= 0
        return SourceValue(value, valid)

    def prefix(self, inputs: Any, layer: int) -> Prefix:
        """The residual stream entering block ``layer`` for ``inputs``, computed once."""
        site = f"blocks.{layer}.resid_pre"
        cache = self.collect(inputs, site)
        self._probe([])
        return Prefix(layer % self.n_layers, cache[self.resolve(site).name], self._tuple_len or 0)

    def prefixes(self, inputs: Any, layers: Sequence[int], *, sites: Sequence[str] = ()) -> tuple[dict[int, Prefix], ActivationCache]:
        """A :class:`Prefix` for each of ``layers`` and the values at ``sites``,
        all from one forward that stops after the last of them (every position)."""
        names = list(dict.fromkeys([f"blocks.{layer}.resid_pre" for layer in layers] + list(sites)))
        cache = self.collect(inputs, names)
        self._probe([])
        out = {}
        for layer in layers:
            key = layer % self.n_layers
            out[key] = Prefix(key, cache[self.resolve(f"blocks.{layer}.resid_pre").name], self._tuple_len or 0)
        return out, cache

    def past(self, inputs: Any, start: int, *, prefix: Prefix | None = None) -> tuple[tuple[Tensor, Tensor], ...]:
        """Keys and values of the first ``start`` positions at every layer (one forward
        of ``inputs`` cut to ``start`` tokens), for :meth:`Prefix.after`.

        With ``prefix`` (of the full ``inputs``), the forward starts at its layer and
        the blocks below it get empty placeholders: a forward resumed from that
        layer or above never reads them.
        """
        inp = Inputs.of(inputs, tokenizer=self.tokenizer, device=self.device, is_lm=self.is_lm)
        if not self.is_hf or "input_ids" not in inp.kwargs:
            raise ConfigError("a KV-cache prefix needs a Hugging Face model run on input_ids")
        if not 0 < start < inp.seq:
            raise UnitError(f"start={start}: expected 0 < start < {inp.seq} (the inputs' length)")
        cut = {k: v[:, :start] if isinstance(v, Tensor) and v.dim() == 2 else v for k, v in inp.kwargs.items()}
        below = None if prefix is None else Prefix(prefix.layer, prefix.hidden[:, :start], prefix.tuple_len)
        with torch.no_grad(), resume_from(self.layers, below, root=self.model) if below is not None else nullcontext():
            out = self.model(**cut, use_cache=True)
        cache = out.get("cache") if hasattr(out, "get") and out.get("cache") is not None else getattr(out, "past_key_values", None)
        layers = getattr(cache, "layers", None)
        if layers is None or not all(hasattr(layer, "keys") for layer in layers):
            raise ConfigError(f"{type(self.model).__name__} keeps a {type(cache).__name__}; a KV-cache prefix needs a DynamicCache of keys and values")
        if any(getattr(layer, "is_sliding", False) for layer in layers):
            raise ConfigError(f"{type(self.model).__name__}'s cache has sliding-window layers; a KV-cache prefix supports full-attention caches only")
        filled = [(layer.keys, layer.values) for layer in layers if getattr(layer, "keys", None) is not None and layer.keys.numel()]
        k0, v0 = filled[0]
        empty = (torch.zeros(()).expand_as(k0), torch.zeros(()).expand_as(v0))  # placeholders: never read
        return tuple((layer.keys, layer.values) if getattr(layer, "keys", None) is not None and layer.keys.numel() else empty for layer in layers)

    # -- attached lifetime --------------------------------------------------------------
    def attach(self, interventions: Sequence[Intervention] | Intervention, *, decode: bool = False, positions=None) -> Attachment:
        """Install ``interventions`` until :meth:`Attachment.detach` (or the ``with`` block ends)."""
        ivs = [interventions] if isinstance(interventions, Intervention) else list(interventions)
        return Attachment(self, ivs, decode=decode, positions=positions).attach()

    def generate(
        self,
        inputs: Any,
        interventions: Sequence[Intervention] | Intervention = (),
        *,
        decode: bool = False,
        positions=None,
        **generate_kwargs,
    ) -> Generation:
        """Generate with interventions at prompt positions (at prefill), and with
        ``decode=True`` also at each new token. Text prompts are left-padded."""
        ivs = [interventions] if isinstance(interventions, Intervention) else list(interventions)
        if isinstance(inputs, str):
            inputs = [inputs]
        texts_in = isinstance(inputs, (list, tuple)) and inputs and all(isinstance(s, str) for s in inputs)
        if texts_in:
            if self.tokenizer is None:
                raise DataError("text prompts need a tokenizer: wrap(model, tokenizer) or pass token ids")
            if self.tokenizer.pad_token is None and len(inputs) > 1:
                raise DataError(
                    f"the tokenizer has no pad token, so a batch of {len(inputs)} prompts cannot be padded; "
                    "set tokenizer.pad_token (e.g. to tokenizer.eos_token)"
                )
            inp = Inputs((), dict(self.tokenizer(list(inputs), return_tensors="pt", padding=True, padding_side="left"))).to(self.device)
        else:
            inp = Inputs.of(inputs, tokenizer=self.tokenizer, device=self.device, is_lm=self.is_lm)
        self._check_generation(ivs, inp, positions)
        resolved = []
        for iv in ivs:
            if iv.sourced and not isinstance(iv.source, SourceValue):
                iv = _with_source(iv, self.source_value(iv))
            resolved.append(iv)
        if self.tokenizer is not None and "pad_token_id" not in generate_kwargs and self.tokenizer.pad_token_id is not None:
            generate_kwargs["pad_token_id"] = self.tokenizer.pad_token_id
        with Attachment(self, resolved, decode=decode, positions=positions):
            seqs = self.model.generate(**inp.kwargs, **generate_kwargs)
        T = inp.seq
        texts = self.tokenizer.batch_decode(seqs[:, T:], skip_special_tokens=True) if self.tokenizer is not None else None
        return Generation(seqs, T, texts)

    def _check_generation(self, ivs: list[Intervention], inp: Inputs, positions) -> None:
        """Everything :meth:`generate` can check before its first forward (source runs included)."""
        info = inp.mask_info()
        for iv in ivs:
            self.prepare(iv)
            (iv.positions if positions is None else _positions(positions)).validate(info)
            if not iv.sourced:
                continue
            if iv.source is None or isinstance(iv.source, Run):
                got = "a run of a graph" if iv.source is not None else "none"
                raise SourceError(f"{type(iv).__name__} at {iv.site!r} needs a source (inputs or a SourceValue); got {got}")
            if isinstance(iv.source, SourceValue):
                batch = iv.source.value.shape[0]
            else:
                src = Inputs.of(iv.source, tokenizer=self.tokenizer, device=self.device, is_lm=self.is_lm).mask_info()
                iv.effective_source_positions().validate(src, "source_positions")
                batch = src.batch
            if batch not in (1, info.batch):
                raise BatchMismatch(
                    f"the source of {type(iv).__name__} at {iv.site!r} has batch {batch} but the prompts have "
                    f"{info.batch}; expected equal batches (or a source batch of 1, broadcast)"
                )

    # -- saving -------------------------------------------------------------------------
    def save(self, directory, what) -> Path:
        """Save a :class:`Graph` or a list of interventions in the one file format."""
        from steerlab.interventions.serialize import save_graph, save_interventions

        if isinstance(what, Graph):
            return save_graph(directory, what, self)
        ivs = [what] if isinstance(what, Intervention) else list(what)
        return save_interventions(directory, ivs, fingerprint=self.fingerprint())

    def load_interventions(self, directory) -> list[Intervention]:
        """Interventions saved with :meth:`save`, checked against this model, on its device."""
        from steerlab.interventions.serialize import load_interventions

        return load_interventions(directory, lab=self, device=self.device)[0]

    def load_graph(self, directory) -> Graph:
        from steerlab.interventions.serialize import load_graph

        return load_graph(directory, self)

    # -- housekeeping ---------------------------------------------------------------------
    def unwrap(self) -> nn.Module:
        """Detach every attachment and restore the parameters' ``requires_grad``; return the model."""
        for att in list(self._attachments):
            att.detach()
        if self._grad_flags is not None:
            for p, flag in self._grad_flags.items():
                p.requires_grad_(flag)
            self._grad_flags = None
        return self.model

    def __repr__(self) -> str:
        return f"Lab({self.map.model_type or type(self.model).__name__}, layers={self.map.n_layers}, d_model={self.d_model})"


def _accepts(fn, name: str) -> bool:
    """Whether ``fn`` takes a keyword argument ``name`` (by name or through ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _engine(engine):
    if isinstance(engine, str) and engine == "nnsight":
        from steerlab.interventions.nnsight_engine import NNsightEngine

        return NNsightEngine()
    if not isinstance(engine, str) and callable(getattr(engine, "execute", None)):
        return engine
    raise ConfigError(f"engine={engine!r}: expected 'hooks', 'nnsight' or an engine object such as NNsightEngine(model, remote=True)")


def _positions(spec):
    from steerlab.interventions.units import Positions

    return Positions(spec)


def _with_source(iv: Intervention, value: SourceValue) -> Intervention:
    """A shallow copy of ``iv`` reading from ``value`` (parameters shared)."""
    import copy

    clone = copy.copy(iv)
    clone.source = value
    return clone


def execution_device(module: nn.Module, default: torch.device | None = None) -> torch.device:
    """The device ``module`` computes on: its first parameter's, unless accelerate offloaded
    it (CPU/disk offload leaves ``meta`` parameters and an ``AlignDevicesHook`` that loads them
    onto its ``execution_device`` for each forward)."""
    p = next(module.parameters(), None)
    if p is not None and p.device.type != "meta":
        return p.device
    for m in module.modules():
        hook = getattr(m, "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
            dev = getattr(h, "execution_device", None)
            if dev is not None:
                return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
    return default if default is not None else torch.device("cpu")


def _nnsight_model(model) -> Any:
    """``model`` if it is an nnsight model (``NNsight``, ``LanguageModel``, ...) around an
    ``nn.Module``, else ``None``; recognised without importing nnsight."""
    if type(model).__module__.partition(".")[0] == "nnsight" and isinstance(model.__dict__.get("_module"), nn.Module):
        return model
    return None


def wrap(model: nn.Module, tokenizer=None, *, freeze: bool = True, example_input=None) -> Lab:
    """Wrap ``model`` (any ``nn.Module``; a Hugging Face model gets canonical sites).

    An nnsight model (``LanguageModel``, ``NNsight``) is accepted too: the lab
    wraps its module, and ``engine="nnsight"`` traces through that nnsight model.

    ``freeze`` sets ``requires_grad=False`` on the model's parameters, restored by
    :meth:`Lab.unwrap`. ``example_input`` lets a plain module list its site shapes.
    """
    return Lab(model, tokenizer, freeze=freeze, example_input=example_input)


_ = (LifetimeError, EarlyExit)
