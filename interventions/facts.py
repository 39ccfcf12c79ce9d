"""What steerlab knows about one model: where it computes, its layers, its sites' shapes, its fingerprint.

:class:`ModelFacts` is what the engines, the attached lifetime, activation
caching and the file format need to know about a model, and nothing else:
no execution, no attachments. A :class:`~steerlab.interventions.lab.Lab` has
one (``lab.facts``) and answers through it.

Site shapes come from one tiny probe forward per site, recorded once
(:meth:`ModelFacts.raw_shape`). :meth:`ModelFacts.place` readies an
intervention for its site: checks its units against the site, builds its
parameters for the site's width on first use (like ``torch.nn.LazyLinear``)
and puts them on the site's device (a model split with ``device_map`` keeps
each intervention beside its site). That is the one place steerlab touches
an intervention module, and only its parameters.
"""

from __future__ import annotations

import inspect
import re
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from steerlab.interventions.adapters import ROOT_SITES, map_model
from steerlab.interventions.errors import ShapeMismatch, SiteNotFound, UnitError, checked_first
from steerlab.interventions.handlers import input_tensor, output_tensor
from steerlab.interventions.inputs import Inputs
from steerlab.interventions.ops import Intervention, check_intervention
from steerlab.interventions.orthonormal import Orthonormal
from steerlab.interventions.sites import ResolvedSite, SiteCatalog, SiteResolver, canonical_names

__all__ = ["ModelFacts", "execution_device", "check_intervention"]

_BUILD_LOCK = threading.Lock()


@dataclass(eq=False)
class _Placement:
    """An intervention placed at its site: what was checked, and the tensors it was put on ``device`` with."""

    key: tuple
    site: ResolvedSite
    device: torch.device
    tensors: list
    maps: list  # two threads building one intervention at once would make two sets of parameters


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


def _forward_parameters(model: nn.Module) -> tuple[set[str], bool]:
    """The keyword names the model's forward takes, and whether it takes ``**kwargs``."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return set(), False
    return set(params), any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


class ModelFacts:
    """Facts about ``model`` (any ``nn.Module``; a Hugging Face model gets canonical sites).

    ``example_input`` lets a plain module's sites be probed for their shapes.
    """

    def __init__(self, model: nn.Module, tokenizer=None, *, example_input=None):
        self.model = model
        self.tokenizer = tokenizer
        self.example_input = example_input
        self.nnsight_model = None  # the user's nnsight model around ``model``, when the lab was made from one
        self.map = map_model(model)
        self.resolver = SiteResolver(model, self.map)
        self._shapes: dict[str, tuple | None] = {}
        self._tuple_len: int | None = None
        self._params, self._var_kw = _forward_parameters(model)  # read once: a forward's keywords never change
        self._first = next(model.parameters(), None)  # its device is the model's (moved with it)
        self._placed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # intervention -> _Placement
        self._site_devices: dict[tuple, torch.device] = {}

    # -- the model ------------------------------------------------------------
    @property
    def is_hf(self) -> bool:
        """A Hugging Face model (canonical sites, ``input_ids``, a config)."""
        return self.map.model_type is not None

    @property
    def is_lm(self) -> bool:
        """A language model that generates text (a causal LM head), not an encoder or a bare base model."""
        can = getattr(self.model, "can_generate", None)
        return bool(self.is_hf and callable(can) and can())

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
    def has_layers(self) -> bool:
        return self.map.layers_path is not None

    def takes(self, name: str, *, through_kwargs: bool = False) -> bool:
        """Whether the model's forward takes keyword ``name`` by name (or, with ``through_kwargs``, through ``**kwargs``)."""
        return name in self._params or (through_kwargs and self._var_kw)

    @property
    def no_cache(self) -> dict:
        """Keyword arguments for a forward that needs no KV cache (source runs, collects,
        probes): ``{"use_cache": False}`` where the model's forward takes it, else none."""
        return {"use_cache": False} if self.is_hf and self.takes("use_cache", through_kwargs=True) else {}

    def trainable_base(self) -> bool:
        """Whether any base parameter requires a gradient (a scan: called only where it decides something)."""
        return any(p.requires_grad for p in self.model.parameters())

    def fingerprint(self) -> dict:
        """What a saved file records about the model it was made for."""
        d = self.map.dims
        return {
            "model_type": self.map.model_type,
            "width": d.d_model if d else None,
            "n_layers": self.map.n_layers,
            "vocab_size": d.vocab_size if d else None,
        }

    def inputs(self, x: Any, *, device: bool = True) -> Inputs:
        """``x`` as model inputs (text tokenised with the model's tokenizer), on the model's device."""
        return Inputs.of(x, tokenizer=self.tokenizer, device=self.device if device else None, token_ids=self.is_hf)

    # -- sites --------------------------------------------------------------------
    def resolve(self, name: str) -> ResolvedSite:
        return self.resolver.resolve(name)

    def expand(self, pattern: str) -> list[str]:
        return self.resolver.expand(pattern)

    def site_layer(self, site: str | ResolvedSite) -> int | None:
        """The block a site lives in (its prefix layer), or ``None`` (embeddings, a plain module)."""
        path = self.map.layers_path
        if path is None:
            return None
        module = (site if isinstance(site, ResolvedSite) else self.resolve(site)).module_path
        m = re.match(re.escape(path) + r"\.(\d+)(?:\.|$)", module)
        return int(m[1]) if m else None

    def probe_inputs(self) -> Inputs:
        if self.example_input is not None:
            return self.inputs(self.example_input)
        if not self.is_hf:
            raise UnitError("this plain module's site shapes need an example: wrap(model, example_input=tensor)")
        return Inputs((), {"input_ids": torch.tensor([[1, 2]], device=self.device)})

    def probe(self, sites: Sequence[ResolvedSite] = ()) -> None:
        """One tiny forward recording the raw shape at each site's port (and the blocks' output layout)."""
        todo = [s for s in sites if s.name not in self._shapes]
        if not todo and (self._tuple_len is not None or self.map.layers_path is None):
            return
        seen: dict[str, tuple] = {}
        handles = []
        try:
            for s in todo:
                handles.append(_recorder(s, seen))
            if self.map.layers_path is not None and self._tuple_len is None:
                handles.append(self.layers[0].register_forward_hook(self._block_out))
            with torch.no_grad():
                inp = self.probe_inputs()
                self.model(*inp.args, **inp.kwargs, **self.no_cache)
        finally:
            for h in handles:
                h.remove()
        for s in todo:
            self._shapes[s.name] = seen.get(s.name)

    def _block_out(self, module, args, out) -> None:
        self._tuple_len = len(out) if isinstance(out, tuple) else 0

    @property
    def tuple_len(self) -> int:
        """What a block returns: 0 for a tensor, ``n`` for a tuple of ``n`` (a :class:`Prefix` needs it)."""
        self.probe()
        return self._tuple_len or 0

    def raw_shape(self, site: ResolvedSite) -> tuple:
        """The shape at the site's port in the probe forward (before heads/channels)."""
        self.probe([site])
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

    def catalog(self) -> SiteCatalog:
        """Every site with its shape and port, and the canonical sites the model lacks."""
        missing = self.resolver.missing()
        modules = [n for n, _ in self.model.named_modules() if n]
        if not self.is_hf and self.example_input is None:
            rows = [{"name": f"module:{m}:{io}", "shape": None, "module": m, "port": io} for m in modules for io in ("input", "output")]
            return SiteCatalog(None, rows, missing, modules)
        if self.is_hf:
            resolved = []
            for name in canonical_names(self.map.n_layers) if self.map.arch is not None else []:
                try:
                    resolved.append(self.resolve(name))
                except SiteNotFound:
                    continue
        else:
            resolved = [self.resolve(f"module:{n}:{io}") for n in modules for io in ("input", "output")]
        self.probe(resolved)
        rows = []
        for s in resolved:
            raw = self._shapes.get(s.name)
            if raw is None:
                if s.name in ROOT_SITES or s.name.startswith("blocks."):
                    key = s.name if s.name in ROOT_SITES else "blocks.*." + s.name.split(".", 2)[2]
                    missing.setdefault(key, f"its module {s.module_path!r} did not run in a forward")
                continue
            shape = ("batch",) + (("pos",) if len(raw) >= 3 else ()) + self.site_shape(s)
            rows.append({"name": s.name, "shape": shape, "module": s.module_path, "port": str(s.port)})
        return SiteCatalog(self.map.model_type, rows, missing, modules)

    def has_positions(self, site: ResolvedSite) -> bool:
        return len(self.raw_shape(site)) >= 3

    def slice_shape(self, iv: Intervention, site: ResolvedSite) -> tuple[int, ...]:
        """The feature shape of the slice ``iv`` sees at ``site`` (its heads and dims taken)."""
        feat = self.site_shape(site)
        if iv.heads is not None:
            feat = (len(iv.heads), *feat[1:])
        if iv.dims is not None:
            feat = (*feat[:-1], len(iv.dims))
        return feat

    # -- interventions ---------------------------------------------------------------
    @checked_first(iv=check_intervention)
    def place(self, iv: Intervention) -> ResolvedSite:
        """Resolve ``iv``'s site, check its units, build it for the site's width and device.

        Done in full the first time; afterwards, while the intervention's placement (site, units,
        width) and the device of its tensors and of the model are unchanged, the checks that passed
        are not repeated (a call with one intervention per layer would otherwise spend a good part of
        a small model's forward re-checking them)."""
        check_intervention(iv)
        hit = self._placed.get(iv)
        key = (iv.site, iv.positions, iv.heads, iv.dims, iv.width, self._model_device())
        if hit is not None and hit.key == key and all(t.device == hit.device for t in hit.tensors):
            return hit.site
        site = self._place(iv)
        device = self._site_device(site)
        tensors = [*iv.parameters(), *iv.buffers()]
        maps = [m for m in iv.modules() if isinstance(m, Orthonormal)]
        self._placed[iv] = _Placement((iv.site, iv.positions, iv.heads, iv.dims, iv.width, self._model_device()), site, device, tensors, maps)
        return site

    def maps(self, iv: Intervention) -> list[Orthonormal]:
        """The orthonormal maps ``iv`` uses (known once it is placed)."""
        hit = self._placed.get(iv)
        return hit.maps if hit is not None else [m for m in iv.modules() if isinstance(m, Orthonormal)]

    def _model_device(self) -> torch.device:
        first = self._first
        if first is None or first.device.type == "meta":
            return self.device
        return first.device

    def _site_device(self, site: ResolvedSite) -> torch.device:
        key = (site.name, self._model_device())
        dev = self._site_devices.get(key)
        if dev is None:
            dev = self._site_devices[key] = execution_device(site.module, self.device)
        return dev

    def _place(self, iv: Intervention) -> ResolvedSite:
        site = self.resolve(iv.site)
        shape = self.site_shape(site)
        _check_heads(iv, site)
        width = shape[-1]
        if iv.dims is not None:
            bad = [d for d in iv.dims if not 0 <= d < width]
            if bad:
                raise UnitError(f"dims={bad[:5]} out of range at {site.name!r}, whose width is {width} (0..{width - 1})")
            width = len(iv.dims)
        with _BUILD_LOCK:
            if not iv.built:
                iv.build(width)
        if iv.width != width:
            raise ShapeMismatch(f"{type(iv).__name__} was built for width {iv.width} but its slice of {site.name!r} has width {width}")
        device = self._site_device(site)
        if any(t.device != device for t in [*iv.parameters(), *iv.buffers()]):
            iv.to(device)  # each intervention lives on its site's device (models split with device_map)
        if not self.has_positions(site):
            spec = iv.positions
            if spec.kind != "all" and not (spec.kind == "static" and spec.static in ((0,), (-1,))):
                raise UnitError(f"{site.name!r} has no position axis (its value is [batch, width]); positions must be None")
        return site

    def __repr__(self) -> str:
        return f"ModelFacts({self.map.model_type or type(self.model).__name__}, layers={self.map.n_layers}, d_model={self.d_model})"


def _check_heads(iv: Intervention, site: ResolvedSite) -> None:
    if iv.heads is None:
        return
    if not site.n_heads:
        raise UnitError(f"heads={list(iv.heads)} given at {site.name!r}, which is not a per-head site (attn.q|k|v|z are)")
    bad = [h for h in iv.heads if not 0 <= h < site.n_heads]
    if bad:
        raise UnitError(f"heads={bad} out of range at {site.name!r}, which has {site.n_heads} heads (0..{site.n_heads - 1})")


def _recorder(site: ResolvedSite, seen: dict):
    name = site.name
    if site.port.io == "input":
        def pre(module, args, kwargs=None):
            seen.setdefault(name, tuple(input_tensor(args, kwargs or {})[0].shape))

        return site.module.register_forward_pre_hook(pre, with_kwargs=True)

    def post(module, args, out):
        seen.setdefault(name, tuple(output_tensor(out).shape))

    return site.module.register_forward_hook(post)

