"""``ReftModel``: a base model with ReFT interventions attached, trainable, savable.

::

    rm = get_reft_model(model, ReftConfig(layers=[8], rank=4, positions="l1"), tokenizer=tok)
    rm.print_trainable_parameters()
    out = rm(**batch)                    # batch from a steerlab.reft collator
    rm.generate(["Hello"], max_new_tokens=20)
    rm.save_pretrained("out/")
    rm2 = ReftModel.from_pretrained("out/", model)

A ``ReftModel`` is an ``nn.Module`` whose only trainable parameters are its
interventions' (and the base modules named in ``modules_to_save``, such as a
classification head): the base model is frozen by :func:`steerlab.wrap`, and
the interventions stay attached (the base layer's attached lifetime) until
:meth:`ReftModel.unwrap`, so the Hugging Face ``Trainer``, DDP, mixed
precision, gradient accumulation and gradient checkpointing all see one
ordinary module. ``train()`` / ``eval()`` reach the interventions (their
dropout). Attributes it does not define (``config``, ``device``, ...) are the
base model's, as with PEFT.

Per-example positions arrive with each forward as
``intervention_positions`` (``LongTensor[batch, groups, k]`` from the
collators, real-token indices, ``-1`` = empty slot); without them each
intervention resolves its own spec against the attention mask.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor, nn

from steerlab.interventions import Attachment, Lab, Prefix, wrap
from steerlab.interventions.engine import EngineSpec, check_engine
from steerlab.interventions.prefix import resume_from
from steerlab.interventions.errors import ConfigError, LifetimeError, NotWrapped, UnitError, Unsupported, checked_first, flag
from steerlab.interventions.ops import check_interventions
from steerlab.reft._base import ReftIntervention
from steerlab.reft.config import ReftConfig
from steerlab.reft.interventions import INTERVENTION_TYPES
from steerlab.reft.serialize import KIND, load_reft_model, load_weights, save_reft_model

__all__ = ["ReftModel", "get_reft_model", "KIND"]


def _check_reft_interventions(value: object) -> None:
    for iv in check_interventions(value, "a ReftModel's interventions"):
        if not isinstance(iv, ReftIntervention):
            raise ConfigError(f"ReftModel takes ReFT interventions (LoReFT, DiReFT, ...); got {type(iv).__name__}")


def _check_config(config: object) -> None:
    if not isinstance(config, ReftConfig):
        _check_reft_interventions(config)


class ReftModel(nn.Module):
    """A model with ReFT interventions attached. Build with :func:`get_reft_model`.

    Args:
        model: the base model (any Hugging Face model steerlab can wrap).
        interventions: the interventions, in weight groups (see ``groups``).
        tokenizer: used by :meth:`generate` for text prompts.
        config: the :class:`ReftConfig` they came from, if any.
        groups: indices into ``interventions``, one list per position group
            (default: one group holding all of them). Group ``j`` takes
            ``intervention_positions[:, j]``.
        modules_to_save: base modules to train with the interventions.
    """

    @checked_first(interventions=_check_reft_interventions)
    def __init__(
        self,
        model: nn.Module,
        interventions: Sequence[ReftIntervention],
        *,
        tokenizer=None,
        config: ReftConfig | None = None,
        groups: Sequence[Sequence[int]] | None = None,
        modules_to_save: Sequence[str] = (),
        _lab: Lab | None = None,
    ):
        super().__init__()
        lab = _lab if _lab is not None else wrap(model, tokenizer)
        try:
            self._setup(model, lab, list(interventions), tokenizer, config, groups, list(modules_to_save))
        except BaseException:
            self._teardown(lab)
            raise

    def _setup(self, model, lab, ivs, tokenizer, config, groups, modules_to_save) -> None:
        if not ivs:
            raise ConfigError("a ReftModel needs at least one intervention")
        groups = [list(range(len(ivs)))] if groups is None else [list(g) for g in groups]
        if sorted(i for g in groups for i in g) != list(range(len(ivs))):
            raise ConfigError(f"groups={groups} must partition the {len(ivs)} interventions")
        self.model = model
        self.interventions = nn.ModuleList(ivs)
        self.lab = lab
        self.tokenizer = tokenizer
        self.reft_config = config
        self.groups = groups
        self.modules_to_save = modules_to_save
        self._originals: dict[str, dict[str, Tensor]] = {}
        for name in modules_to_save:
            module = self._base_module(name)
            self._originals[name] = {k: v.detach().clone() for k, v in module.state_dict().items()}
            for p in module.parameters():
                p.requires_grad_(True)
        self._attachments = [Attachment(lab, [ivs[i] for i in g]) for g in groups]
        self._enabled = False
        self.enable()

    def _teardown(self, lab: Lab) -> None:
        for att in getattr(self, "_attachments", []):
            if att.attached:
                att.detach()
        for name, state in getattr(self, "_originals", {}).items():
            module = self._base_module(name)
            with torch.no_grad():
                for k, v in module.state_dict().items():
                    v.copy_(state[k])
        lab.unwrap()

    def _base_module(self, name: str) -> nn.Module:
        try:
            return self.model.get_submodule(name)
        except AttributeError:
            children = [n for n, _ in self.model.named_children()]
            raise ConfigError(f"modules_to_save names {name!r}, which this model lacks; its top-level modules: {children}") from None

    # -- facts ---------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("model", "interventions") or name.startswith("_"):
                raise
            return getattr(self.model, name)

    @property
    def positions(self) -> Any:
        """The prompt-position spec the collators and :meth:`generate` use (``None``: each intervention's own)."""
        if self.reft_config is not None:
            return self.reft_config.positions
        first = self.interventions[0].positions
        if first.kind in ("static", "firstlast") and all(iv.positions == first for iv in self.interventions):
            return first.to_json()
        return None

    @property
    def tied(self) -> bool:
        return self.reft_config.tied if self.reft_config is not None else True

    @property
    def n_groups(self) -> int:
        return len(self.groups)

    @property
    def lowest_layer(self) -> int | None:
        """The lowest block an intervention sits in (``None`` if one sits outside the blocks)."""
        layers = []
        for iv in self.interventions:
            parts = iv.site.split(".")
            if parts[0] != "blocks" or len(parts) < 2 or not parts[1].lstrip("-").isdigit():
                return None
            layers.append(int(parts[1]) % self.lab.n_layers)
        return min(layers)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, base)``: trainable parameters (interventions and saved modules) and the base model's size."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        base = sum(p.numel() for p in self.model.parameters())
        return trainable, base

    def print_trainable_parameters(self) -> None:
        """Print, as PEFT does: ``trainable params: … || all params: … || trainable%: …`` (% of the base model)."""
        trainable, base = self.get_nb_trainable_parameters()
        total = base + sum(p.numel() for p in self.interventions.parameters())
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / base:.4f} (of the base model's {base:,d})")

    # -- attachment ------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self._enabled

    def enable(self) -> None:
        """Attach the interventions (done at construction)."""
        self.check_usable("enable()")
        if self._enabled:
            return
        for att in self._attachments:
            att.attach()
        self._enabled = True

    def disable(self) -> None:
        """Detach the interventions: the model computes exactly its base outputs until :meth:`enable`."""
        if not self._enabled:
            return
        for att in self._attachments:
            att.detach()
        self._enabled = False

    @contextmanager
    def disabled(self) -> Iterator[ReftModel]:
        """``with rm.disabled():`` the base model, exactly; the interventions come back after."""
        was = self._enabled
        self.disable()
        try:
            yield self
        finally:
            if was:
                self.enable()

    def unwrap(self) -> nn.Module:
        """Detach everything, restore saved modules and give the model back as it was handed over
        (``requires_grad`` flags, train/eval mode, gradient checkpointing, input-grad hooks, gradients).
        The ReftModel is unusable afterwards (:class:`~steerlab.interventions.errors.NotWrapped`)."""
        if self.lab.wrapped:
            self.disable()
            self._teardown(self.lab)
        self._attachments = []
        return self.model

    def push_to_hub(self, *args, **kwargs):
        """Not offered: the base model's ``push_to_hub`` would upload the whole base model, not the interventions."""
        raise Unsupported(
            "ReftModel.push_to_hub is not supported (the base model's method would upload the whole base model); "
            "save the interventions with rm.save_pretrained(folder) and upload that folder with huggingface_hub"
        )

    # -- gradient checkpointing: the base model's -----------------------------------
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs) -> None:
        """The base model's checkpointing (non-reentrant by default); the interventions' hooks
        stay in place, so the backward's recomputation edits exactly as the forward did."""
        kw = {"use_reentrant": False} if gradient_checkpointing_kwargs is None else gradient_checkpointing_kwargs
        if hasattr(self.model, "activation_checkpointing_enable"):
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw, **kwargs)
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw, **kwargs)
        if not kw.get("use_reentrant", True) and hasattr(self.model, "_require_grads_hook"):
            # transformers makes the embeddings require grad for reentrant checkpointing; the
            # non-reentrant kind does not need it, and it would run the backward below the lowest edit
            self.model.disable_input_require_grads()

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **kwargs) -> None:
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self) -> None:
        fn = getattr(self.model, "activation_checkpointing_disable", None) or self.model.gradient_checkpointing_disable
        fn()

    # -- forward ------------------------------------------------------------------------
    def check_usable(self, what: str) -> None:
        """Raise :class:`NotWrapped` once this model (or its lab) was unwrapped."""
        if not self.lab.wrapped:
            raise NotWrapped(
                f"{what}: this ReftModel was unwrapped (rm.unwrap() or rm.lab.unwrap()), so its interventions are gone "
                "from the model; build it again (get_reft_model / from_pretrained), or use rm.model for the base model"
            )

    @contextmanager
    @checked_first(decode=flag("decode"))
    def using(self, positions: Int[Tensor, "batch group k"] | Tensor | None = None, *, decode: bool = False) -> Iterator[ReftModel]:
        """``with rm.using(positions):`` the forwards of this call, on this thread, intervene at
        ``positions`` (``[batch, groups, k]``, or ``[batch, k]`` with one group; ``None``: each
        intervention's own spec); with ``decode=True`` also at generated tokens. Other threads'
        forwards keep the model's attached behaviour; nothing of the call outlives the block."""
        self.check_usable("using()")
        per_group = self._split_positions(positions)
        with ExitStack() as stack:
            if not self._enabled:
                yield self
                return
            if not decode:
                for att, p in zip(self._attachments, per_group):
                    stack.enter_context(att.using(p))
            else:  # this call's own decode-time attachments; the model's prompt-only ones stand aside on this thread
                ident = threading.get_ident()
                for att in self._attachments:
                    stack.enter_context(att.using(off=True))
                for group, p in zip(self.groups, per_group):
                    ivs = [self.interventions[i] for i in group]
                    stack.enter_context(Attachment(self.lab, ivs, decode=True, positions=p, thread=ident))
            yield self

    @checked_first(engine=lambda engine: engine is None or check_engine(engine))
    def forward(
        self,
        input_ids: Int[Tensor, "batch pos"] | None = None,
        attention_mask: Int[Tensor, "batch pos"] | None = None,
        labels: Tensor | None = None,
        intervention_positions: Int[Tensor, "batch group k"] | Int[Tensor, "batch k"] | None = None,
        prefix: Prefix | None = None,
        engine: EngineSpec | None = None,
        **kwargs,
    ):
        """The base model's forward with the interventions at ``intervention_positions``
        (``[batch, groups, k]``, or ``[batch, k]`` with one group).

        ``prefix`` (from :meth:`prefix`) resumes from the residual stream
        cached below the lowest intervened layer, for the same inputs: blocks
        below it are skipped (they are frozen and not edited, so their output
        is the same every step). ``engine`` (e.g. ``sl.NNsightEngine()``) runs
        the same forward through that engine as one run (the attached hooks
        stand aside for the call).
        """
        self.check_usable("forward")
        if not self._enabled:
            raise LifetimeError("this ReftModel is disabled or unwrapped; call enable() (or use rm.model for the base model)")
        if labels is not None:
            kwargs["labels"] = labels
        if engine is not None:
            return self._run_with(engine, input_ids, attention_mask, intervention_positions, kwargs)
        with self.using(intervention_positions), resume_from(self.lab.layers, prefix) if prefix is not None else nullcontext():
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def _run_with(self, engine, input_ids, attention_mask, positions, kwargs):
        """This forward as one run of ``engine``: the interventions, each group at its positions."""
        ivs = list(self.interventions)
        overrides = {ivs[i]: p for group, p in zip(self.groups, self._split_positions(positions)) if p is not None for i in group}
        inputs = {"input_ids": input_ids} | ({} if attention_mask is None else {"attention_mask": attention_mask})
        with self.disabled():
            return self.lab.run(inputs, ivs, positions=overrides or None, engine=engine, **kwargs)

    def prefix(self, input_ids: Int[Tensor, "batch pos"], attention_mask: Int[Tensor, "batch pos"] | None = None) -> Prefix:
        """The residual stream entering :attr:`lowest_layer` for these inputs, for ``forward(prefix=...)``.

        Exact as long as the base model has no active dropout below that
        layer (decoders like LLaMA have none; call it in the mode you train in).
        """
        layer = self.lowest_layer
        if layer is None:
            raise ConfigError("a prefix needs every intervention inside the blocks (sites 'blocks.L....')")
        inputs = {"input_ids": input_ids} if attention_mask is None else {"input_ids": input_ids, "attention_mask": attention_mask}
        with self.disabled(), torch.no_grad():
            return self.lab.prefix(inputs, layer)

    def _split_positions(self, pos: Tensor | None) -> list[Tensor | None]:
        if pos is None:
            return [None] * self.n_groups
        if not isinstance(pos, Tensor) or pos.dtype not in (torch.int64, torch.int32):
            raise UnitError(f"intervention_positions must be a LongTensor[batch, groups, k]; got {type(pos).__name__}")
        if pos.dim() == 2 and self.n_groups == 1:
            return [pos]
        if pos.dim() != 3 or pos.shape[1] != self.n_groups:
            raise UnitError(
                f"intervention_positions has shape {tuple(pos.shape)}; expected [batch, {self.n_groups}, k] "
                f"({self.n_groups} position group{'s' if self.n_groups > 1 else ''})"
            )
        return list(pos.unbind(1))

    @checked_first(decode=flag("decode"), chat_template=flag("chat_template"))
    def generate(self, inputs, *, decode: bool = False, positions=None, chat_template: bool = False, **generate_kwargs):
        """Batched generation; see :func:`steerlab.reft.generation.generate`."""
        from steerlab.reft.generation import generate

        return generate(self, inputs, decode=decode, positions=positions, chat_template=chat_template, **generate_kwargs)

    # -- saving (the file format's code lives in steerlab.reft.serialize) ---------------------
    def save_pretrained(
        self, save_directory: str | Path, *, is_main_process: bool = True, state_dict: dict[str, Tensor] | None = None,
        safe_serialization: bool = True,
    ) -> Path | None:
        """Write the ReFT model into ``save_directory`` (the one file format, atomically).

        The save owns ``steerlab.json`` and the ``weights-<hash>.safetensors``
        file it names; every other file in the folder is left alone
        (:mod:`steerlab.interventions.fileformat`). Holds every intervention's
        type, placement and constructor arguments, the weight groups, the
        config, the trained base modules, and the base model's fingerprint.
        Only the main process writes (``is_main_process``). ``state_dict``:
        this model's full state dict as a sharding wrapper gathered it (FSDP's
        ``FULL_STATE_DICT``). Unknown keywords are an error (``TypeError``);
        ``safe_serialization`` exists for the Trainer's sake and must be true.
        """
        if safe_serialization is not True:
            raise ConfigError(f"safe_serialization={safe_serialization!r}: steerlab saves only safetensors (never pickles)")
        return save_reft_model(self, save_directory, is_main_process=is_main_process, state_dict=state_dict)

    @classmethod
    @checked_first(is_trainable=flag("is_trainable"))
    def from_pretrained(
        cls,
        directory: str | Path,
        model: nn.Module,
        tokenizer=None,
        *,
        is_trainable: bool = False,
        device: str | torch.device | None = None,
    ) -> ReftModel:
        """Load a saved ReFT model onto ``model`` (on ``device``, default the model's).

        The whole file is checked against ``model`` before anything is built
        (:mod:`steerlab.reft.serialize`); a file made for another model, a
        corrupt, edited or foreign file, or one whose config contradicts its
        interventions is refused with a named error and the model left as
        found. ``is_trainable=False`` (as in PEFT) freezes the loaded interventions.
        """
        return load_reft_model(directory, model, tokenizer, is_trainable=is_trainable, device=device, factory=cls)

    def load_weights(self, directory: str | Path) -> None:
        """Load a checkpoint of *this* ReFT model's interventions in place (the Trainer's resume path).

        The parameters keep their identity (an optimiser holding them stays
        valid), device and dtype; the file must hold the same interventions.
        """
        load_weights(self, directory)

    def __repr__(self) -> str:
        types = sorted({type(iv).__name__ for iv in self.interventions})
        return f"ReftModel({self.lab!r}, {len(self.interventions)} interventions: {', '.join(types)}, groups={len(self.groups)}, enabled={self._enabled})"


def build_interventions(config: ReftConfig, lab: Lab) -> tuple[list[ReftIntervention], list[list[int]]]:
    """The interventions a config asks for on ``lab``'s model, and their weight groups."""
    layers = config.layer_indices(lab.n_layers)
    cls = INTERVENTION_TYPES[config.intervention]
    dtype = config.dtype or lab.dtype
    kwargs: dict[str, Any] = {"rank": config.rank, "dropout": config.dropout, "dtype": dtype, **config.intervention_kwargs}
    if config.act_fn is not None:
        if "act_fn" not in cls._arguments:
            raise ConfigError(f"act_fn={config.act_fn!r} is not an argument of {cls.__name__} (it has no W h term)")
        kwargs["act_fn"] = config.act_fn
    ivs, groups = [], []
    for spec in config.position_groups():
        groups.append(list(range(len(ivs), len(ivs) + len(layers))))
        for layer in layers:
            try:
                ivs.append(cls(f"blocks.{layer}.{config.site}", positions=spec, **kwargs))
            except TypeError as e:
                raise ConfigError(f"cannot build {cls.__name__} from intervention_kwargs={config.intervention_kwargs}: {e}") from None
    return ivs, groups


@checked_first(config=_check_config)
def get_reft_model(
    model: nn.Module,
    config: ReftConfig | Sequence[ReftIntervention] | ReftIntervention,
    tokenizer=None,
    *,
    stack: bool = False,
    set_device: bool = True,
    disable_model_grads: bool = True,
) -> ReftModel:
    """Wrap ``model`` (freezing it) and attach the interventions ``config`` describes.

    ``config`` is a :class:`ReftConfig` or ready-made interventions (for
    example ``LoReFT.from_subspace(subspace)``). A model that already carries
    a ReftModel (or a Lab) is refused with
    :class:`~steerlab.interventions.errors.AlreadyWrapped` unless ``stack=True``
    (a notebook cell run twice would otherwise stack two edits silently).
    ``set_device`` and ``disable_model_grads`` are pyreft's: interventions
    always live on their site's device, and ``disable_model_grads=False``
    leaves the base model's ``requires_grad`` flags as they are.
    """
    if not set_device:
        raise ConfigError("set_device=False is not supported: each intervention is placed on the device its site computes on")
    if isinstance(config, ReftIntervention):
        config = [config]
    lab = wrap(model, tokenizer, freeze=disable_model_grads, stack=stack)
    try:
        if isinstance(config, ReftConfig):
            ivs, groups = build_interventions(config, lab)
            saved = config.modules_to_save
            cfg: ReftConfig | None = config
        else:
            ivs, groups, saved, cfg = list(config), None, [], None
    except BaseException:
        lab.unwrap()
        raise
    return ReftModel(model, ivs, tokenizer=tokenizer, config=cfg, groups=groups, modules_to_save=saved, _lab=lab)
