"""``wrap(model, tokenizer)``: a model with its sites discovered, ready for interventions.

A :class:`Lab` is a thin facade, not a copy: it holds the model, its
tokenizer and the :class:`~steerlab.interventions.facts.ModelFacts` (sites,
shapes, device, fingerprint), and hands each call to the piece that does it:
a :class:`~steerlab.interventions.plan.Plan` and an engine (``run``,
``execute``), :mod:`~steerlab.interventions.caching` (``collect``,
``source_value``, ``prefix``, ``past``), an
:class:`~steerlab.interventions.attachment.Attachment` (``attach``),
:mod:`~steerlab.interventions.generation` (``generate``), the file format
(``save``, ``load_*``).

Wrapping freezes the base model's parameters (as ``peft.get_peft_model``
does) so that only interventions train; :meth:`Lab.unwrap` gives the model
back as it was handed over (see :mod:`~steerlab.interventions.wrapping`).
A model carries one wrapper at a time unless ``stack=True``. Every call
leaves the model's hook registries as it found them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

from torch import Tensor, nn

from steerlab.interventions import caching
from steerlab.interventions.activation_cache import ActivationCache
from steerlab.interventions.attachment import Attachment, attachments_of
from steerlab.interventions.engine import EngineSpec, PreparedRun, check_engine, engine_of
from steerlab.interventions.errors import NotAModel, NotWrapped, checked_first, flag
from steerlab.interventions.facts import ModelFacts
from steerlab.interventions.generation import Generation, check_generation, generate, prompts
from steerlab.interventions.inputs import ModelInputs, check_inputs
from steerlab.interventions.graph import Graph, GraphResult, RunResult, SourceValue
from steerlab.interventions.ops import Intervention, check_interventions
from steerlab.interventions.plan import Plan
from steerlab.interventions.prefix import Prefix
from steerlab.interventions.sites import ResolvedSite, SiteCatalog
from steerlab.interventions.units import PositionSpec
from steerlab.interventions.wrapping import acquire, release

__all__ = ["Lab", "wrap", "Generation"]


def _list(interventions: Iterable[Intervention] | Intervention) -> list[Intervention]:
    """As a list, checked (a one-shot iterator is checked here, once read: ``checked_first`` leaves it unread)."""
    return check_interventions(list(interventions) if isinstance(interventions, Iterator) else interventions)


def _check_model(model: object) -> None:
    if not isinstance(model, nn.Module) and _nnsight_model(model) is None:
        raise NotAModel(f"wrap() takes an nn.Module or an nnsight model; got {type(model).__name__}")


#: what ``wrap`` accepts besides an ``nn.Module``: an nnsight model (``NNsight``, ``LanguageModel``)
#: around one, recognised without importing nnsight (so checked as ``object``, then by ``wrap``)
NNsightModel = Annotated[object, "an nnsight model around an nn.Module"]


class Lab:
    """A wrapped model. Create with :func:`wrap`."""

    @checked_first(model=_check_model)
    def __init__(self, model: nn.Module | NNsightModel, tokenizer=None, *, freeze: bool = True, example_input=None, stack: bool = False):
        envoy = _nnsight_model(model)
        if envoy is not None:  # the user's nnsight model: steerlab works on its module; engine="nnsight" uses it
            model = envoy._module
            tokenizer = tokenizer if tokenizer is not None else envoy.__dict__.get("tokenizer")
        self.facts = ModelFacts(model, tokenizer, example_input=example_input)
        self.facts.nnsight_model = envoy
        self._record = acquire(model, self, freeze=freeze, stack=stack)

    # -- the model ------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        return self.facts.model

    @property
    def nnsight_model(self) -> Any:
        """The nnsight model this lab was made from (``wrap(lm)``), else ``None``."""
        return self.facts.nnsight_model

    @property
    def tokenizer(self):
        return self.facts.tokenizer

    @property
    def device(self):
        return self.facts.device

    @property
    def dtype(self):
        return self.facts.dtype

    @property
    def n_layers(self) -> int:
        return self.facts.n_layers

    @property
    def d_model(self) -> int | None:
        return self.facts.d_model

    @property
    def layers(self) -> nn.ModuleList:
        return self.facts.layers

    @property
    def is_lm(self) -> bool:
        """A causal language model (it generates), not an encoder."""
        return self.facts.is_lm

    def trained_parameters(self) -> list[str]:
        """Names of the parameters that required gradients in the model as given (``wrap``
        freezes them; this reads the flags it recorded), else as they are now."""
        flags = self._record.state.flags
        return [n for n, p in self.model.named_parameters() if flags.get(p, p.requires_grad)]

    def fingerprint(self) -> dict:
        return self.facts.fingerprint()

    @property
    def sites(self) -> SiteCatalog:
        """Every site with its shape and port, and the canonical sites the model lacks."""
        return self.facts.catalog()

    def resolve(self, name: str) -> ResolvedSite:
        return self.facts.resolve(name)

    @property
    def wrapped(self) -> bool:
        """Until :meth:`unwrap`."""
        return not self._record.released

    def check_wrapped(self, what: str = "this call") -> None:
        if self._record.released:
            raise NotWrapped(f"{what}: this Lab was unwrapped (lab.unwrap()); wrap the model again: sl.wrap(model)")

    # -- per-call execution ---------------------------------------------------------
    @checked_first(inputs=check_inputs, interventions=check_interventions, engine=check_engine)
    def run(
        self,
        inputs: ModelInputs,
        interventions: Iterable[Intervention] | Intervention = (),
        *,
        positions: PositionSpec | Mapping[Intervention, PositionSpec] = None,
        source_positions: PositionSpec = None,
        prefix: Prefix | None = None,
        validate: bool = True,
        engine: EngineSpec = "hooks",
        **model_kwargs,
    ) -> RunResult:
        """Run the model on ``inputs`` with ``interventions`` (hooks for this call only).

        ``positions`` / ``source_positions`` override every intervention's
        positions for this call (e.g. per-example tensors from a collator);
        ``prefix`` resumes from a cached :class:`Prefix`; ``engine`` as for
        :meth:`execute`. Extra keyword arguments go to the model's forward.
        """
        g = Graph()
        base = g.run(inputs, _list(interventions), name="base")
        return self.execute(g, positions=positions, source_positions=source_positions, prefix=prefix, validate=validate, engine=engine, **model_kwargs)[base]

    @checked_first(engine=check_engine)
    def execute(
        self,
        graph: Graph,
        *,
        positions: PositionSpec | Mapping[Intervention, PositionSpec] = None,
        source_positions: PositionSpec = None,
        prefix: Prefix | None = None,
        validate: bool = True,
        engine: EngineSpec = "hooks",
        **model_kwargs,
    ) -> GraphResult:
        """Execute a run graph (see :mod:`steerlab.interventions.graph`).

        ``engine``: ``"hooks"`` (PyTorch hooks, the default), ``"nnsight"``
        (nnsight traces, see :mod:`steerlab.interventions.nnsight_engine`) or
        an engine object such as ``NNsightEngine(lm, remote=True)``.
        """
        self.check_wrapped("execute()")
        eng = engine_of(engine)
        plan = Plan.build(self.facts, graph, positions=positions, source_positions=source_positions, validate=validate)
        return eng.execute(plan, prefix=prefix, model_kwargs=model_kwargs)

    @checked_first(interventions=lambda v: check_interventions(v, "prepare()"))
    def prepare(self, interventions: Iterable[Intervention] | Intervention, *, validate: bool = True) -> PreparedRun:
        """``interventions`` validated and compiled once, for a loop that runs them on many batches
        (see :class:`~steerlab.interventions.engine.PreparedRun`)."""
        self.check_wrapped("prepare()")
        return PreparedRun(self.facts, interventions, validate=validate)

    # -- activation caching -----------------------------------------------------------
    @checked_first(inputs=check_inputs)
    def collect(
        self, inputs: ModelInputs, sites: str | Sequence[str], *, positions: PositionSpec = None, heads: int | Sequence[int] | None = None, detach: bool = True
    ) -> ActivationCache:
        """Collect the values at ``sites`` (names or patterns like ``blocks.*.resid_post``)
        in one forward that stops after the last of them."""
        self.check_wrapped("collect()")
        return caching.collect(self.facts, inputs, sites, positions=positions, heads=heads, detach=detach)

    def source_value(self, iv: Intervention, inputs: ModelInputs | None = None) -> SourceValue:
        """The slice ``iv`` would read from ``inputs`` (default: its ``source``), as a reusable :class:`SourceValue`."""
        self.check_wrapped("source_value()")
        return caching.source_value(self.facts, iv, inputs)

    @checked_first(inputs=check_inputs)
    def prefix(self, inputs: ModelInputs, layer: int) -> Prefix:
        """The residual stream entering block ``layer`` for ``inputs``, computed once."""
        self.check_wrapped("prefix()")
        return caching.prefix(self.facts, inputs, layer)

    @checked_first(inputs=check_inputs)
    def prefixes(self, inputs: ModelInputs, layers: Sequence[int], *, sites: Sequence[str] = ()) -> tuple[dict[int, Prefix], ActivationCache]:
        """A :class:`Prefix` for each of ``layers`` and the values at ``sites``, from one forward."""
        self.check_wrapped("prefixes()")
        return caching.prefixes(self.facts, inputs, layers, sites=sites)

    @checked_first(inputs=check_inputs)
    def past(self, inputs: ModelInputs, start: int, *, prefix: Prefix | None = None) -> tuple[tuple[Tensor, Tensor], ...]:
        """Keys and values of the first ``start`` positions at every layer, for :meth:`Prefix.after`."""
        self.check_wrapped("past()")
        return caching.past(self.facts, inputs, start, prefix=prefix)

    # -- attached lifetime --------------------------------------------------------------
    @checked_first(interventions=lambda v: check_interventions(v, "attach()"), decode=flag("decode"))
    def attach(self, interventions: Iterable[Intervention] | Intervention, *, decode: bool = False, positions: PositionSpec = None) -> Attachment:
        """Install ``interventions`` until :meth:`Attachment.detach` (or the ``with`` block ends).

        Attached interventions act on every forward of the model, in every thread."""
        return Attachment(self, _list(interventions), decode=decode, positions=positions).attach()

    @property
    def attachments(self) -> tuple[Attachment, ...]:
        """The attachments currently attached through this lab."""
        return attachments_of(self)

    @checked_first(inputs=check_inputs, interventions=check_interventions)
    def generate(
        self, inputs: ModelInputs, interventions: Iterable[Intervention] | Intervention = (), *, decode: bool = False, positions: PositionSpec = None, **generate_kwargs
    ) -> Generation:
        """Generate with interventions at prompt positions (at prefill), and with
        ``decode=True`` also at each new token. Text prompts are left-padded.
        The interventions act on this call's forwards only (this thread)."""
        self.check_wrapped("generate()")
        ivs = _list(interventions)
        inp = prompts(self.facts, inputs)
        check_generation(self.facts, ivs, inp, positions)
        bound = {iv: self.source_value(iv) for iv in ivs if iv.sourced and not isinstance(iv.source, SourceValue)}
        att = Attachment(self, ivs, decode=decode, positions=positions, sources=bound, thread=threading.get_ident())
        with att:
            return generate(self.facts, inp, att.using(), **generate_kwargs)

    # -- saving -------------------------------------------------------------------------
    def save(self, directory, what) -> Path:
        """Save a :class:`Graph` or a list of interventions in the one file format."""
        from steerlab.interventions.serialize import save_graph, save_interventions

        if isinstance(what, Graph):
            return save_graph(directory, what, self.facts)
        return save_interventions(directory, _list(what), fingerprint=self.fingerprint())

    def load_interventions(self, directory) -> list[Intervention]:
        """Interventions saved with :meth:`save`, checked against this model, on its device."""
        from steerlab.interventions.serialize import load_interventions

        return load_interventions(directory, lab=self.facts, device=self.device)[0]

    def load_graph(self, directory) -> Graph:
        from steerlab.interventions.serialize import load_graph

        return load_graph(directory, self.facts)

    # -- housekeeping ---------------------------------------------------------------------
    def unwrap(self) -> nn.Module:
        """Detach every attachment and give the model back as it was handed over (``requires_grad``
        flags, train/eval mode, gradient checkpointing, input-grad hooks, gradients); return it."""
        for att in reversed(self.attachments):
            att.detach()
        release(self._record)
        return self.model

    def __repr__(self) -> str:
        m = self.facts.map
        return f"Lab({m.model_type or type(self.model).__name__}, layers={m.n_layers}, d_model={self.d_model})"


def _nnsight_model(model) -> Any:
    """``model`` if it is an nnsight model (``NNsight``, ``LanguageModel``, ...) around an
    ``nn.Module``, else ``None``; recognised without importing nnsight."""
    if type(model).__module__.partition(".")[0] == "nnsight" and isinstance(model.__dict__.get("_module"), nn.Module):
        return model
    return None


@checked_first(model=_check_model, freeze=flag("freeze"), stack=flag("stack"))
def wrap(model: nn.Module | NNsightModel, tokenizer=None, *, freeze: bool = True, example_input=None, stack: bool = False) -> Lab:
    """Wrap ``model`` (any ``nn.Module``; a Hugging Face model gets canonical sites).

    An nnsight model (``LanguageModel``, ``NNsight``) is accepted too: the lab
    wraps its module, and ``engine="nnsight"`` traces through that nnsight model.

    ``freeze`` sets ``requires_grad=False`` on the model's parameters, restored by
    :meth:`Lab.unwrap`. ``example_input`` lets a plain module list its site shapes.
    A model that a live Lab (or ReftModel) wraps is refused
    (:class:`~steerlab.interventions.errors.AlreadyWrapped`) unless ``stack=True``.
    """
    return Lab(model, tokenizer, freeze=freeze, example_input=example_input, stack=stack)
