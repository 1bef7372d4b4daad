"""`ASRModel`: the PEFT tuner of Analytic Subspace Routing (Any-SSR).

Flow of one routed forward (eval mode, no task pinned)::

    input_ids -> blocks 0..L_f-1 (no adapters)
              -> pre-hook on block L_f: final norm + masked mean over prompt tokens -> router -> class per row
              -> blocks L_f..L-1: every ASR layer applies its row's task (class 0: plain base model) -> logits

One pass: the shallow blocks run once, and the decision reaches the deep layers through forward pre-hooks installed
for the duration of one ``forward`` or one whole ``generate`` call and removed in ``finally``. Which calls route,
which follow an explicit choice (``task_names``, ``use_task``, the task being trained) and which refuse is the
routing contract of :mod:`peft_asr.tuner.routing`.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Iterator, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_target_module_exists
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import BASE_ROUTE, ASRConfig, validate_task_name
from .blocks import find_blocks, find_final_norm
from .layer import ASRLayer, Linear
from .merging import check_mergeable
from .router import AnalyticRouter
from .hooks import routing_hooks
from .routing import plan_call
from .shallow import RouterFeaturesMixin
from .export import ExportMixin
from .harvest import HarvestMixin

__all__ = ["ASRModel"]

class ASRModel(RouterFeaturesMixin, HarvestMixin, ExportMixin, BaseTuner):
    """Analytic Subspace Routing (Any-SSR) tuner: per-task LoRA subspaces in the deep blocks and an analytic router.

    Created by ``get_peft_model(model, ASRConfig(...))`` (after ``import peft_asr``); its public methods are reachable
    on the returned ``PeftModel``: :meth:`add_task`, :attr:`tasks`, :meth:`fit_router`, :meth:`route`,
    :meth:`route_scores`, :meth:`use_task`, :meth:`remove_task`.

    The routing contract (details in :mod:`peft_asr.tuner.routing` and docs/concepts.md): a call

    1. follows an explicit choice when there is one: ``task_names=[...]`` on ``forward``/``generate`` (one entry
       per row, ``None`` for the base model), a task pinned by :meth:`use_task`, or, for a training-mode
       ``forward``, the task being trained;
    2. otherwise routes on the whole prompt, once per sequence: ``generate`` decides from the prompt it was given,
       before any draft, chunk or decode token, and keeps the decision for every step and beam, in training mode
       too; a ``forward`` that continues a routed cache reuses its decision;
    3. or refuses, before any work, with an error that says what to do.

    The prompt is the same everywhere (``route``, ``route_scores``, ``fit_router``, the callback, a routed call):
    real tokens, minus the answer where token labels mark the prompt with -100 (a row whose labels mark none is
    prompt as a whole); for decoder-only models, positions come from the attention mask as ``generate`` derives
    them.
    """

    prefix: str = "asr_"
    tuner_layer_cls = ASRLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    uses_shared_state = True  # the router is shared by all layers

    # ------------------------------------------------------------------ PEFT tuner plumbing
    def _pre_injection_hook(self, model: nn.Module, config: ASRConfig, adapter_name: str) -> None:
        if len(self.peft_config) > 1:
            raise ValueError(
                "an ASR model holds one bank (one PEFT adapter) whose tasks are routed per input; add tasks with "
                "`add_task`, or combine banks trained apart with `peft_asr.merge_banks`."
            )
        blocks_name, blocks = find_blocks(model, config.layers_pattern)
        num_layers = len(blocks)
        hidden_size = getattr(getattr(model, "config", None), "hidden_size", None)
        if hidden_size is None:
            raise ValueError(f"cannot read `hidden_size` from the config of {type(model).__name__}.")
        for field_name, recorded, actual, what in (
            ("base_hidden_size", config.base_hidden_size, hidden_size, "hidden size"),
            ("base_num_layers", config.base_num_layers, num_layers, "number of blocks"),
        ):
            if recorded is not None and recorded != actual:
                raise ValueError(
                    f"this bank was built for a base model with {what} {recorded}, but the model it is loaded onto "
                    f"has {what} {actual}: load it onto the base model it was trained with "
                    f"({config.base_model_name_or_path!r})."
                )
        if not 0 <= config.router_layer < num_layers:
            raise ValueError(
                f"`router_layer` must be in [0, {num_layers - 1}] for this model ({num_layers} blocks in "
                f"`{blocks_name}`), got {config.router_layer}."
            )
        config.layers_pattern = blocks_name.rsplit(".", 1)[-1]
        config.layers_to_transform = list(range(config.router_layer, num_layers))
        config.base_hidden_size = hidden_size
        config.base_num_layers = num_layers
        self._blocks_name = blocks_name

    def _post_injection_hook(self, model: nn.Module, config: ASRConfig, adapter_name: str) -> None:
        router = AnalyticRouter.from_config(config)
        device = next(model.parameters()).device
        self.asr_router = nn.ModuleDict({adapter_name: router.to(device)})
        self._training_task: Optional[str] = None
        self._pinned: list[str] = []  # stack of tasks pinned by `use_task` (BASE_ROUTE pins the base model)
        self._pin_tokens: list[object] = []  # one per entry of `_pinned`, so each pin removes its own entry
        self._held_pin: Optional[object] = None  # the token of the pin of `hold_task`
        self._generating = 0  # > 0 inside a `generate` call of the PeftModel (set by `generate_scope`)
        # cache object returned by a routed forward -> that call's decisions (B,), so a forward continuing the cache
        # reuses them instead of routing on its new tokens; weak keys: an entry goes with its cache
        self._cache_routes: "weakref.WeakKeyDictionary[Any, torch.Tensor]" = weakref.WeakKeyDictionary()

    def _prepare_adapter_config(self, peft_config: ASRConfig, model_config: dict) -> ASRConfig:
        if peft_config.target_modules is None:
            targets = self.target_module_mapping.get(model_config.get("model_type"))
            if targets is None:
                raise ValueError(
                    f"no default `target_modules` for model type {model_config.get('model_type')!r}; set "
                    "`target_modules` in the ASRConfig (e.g. ['q_proj', 'v_proj'])."
                )
            peft_config.target_modules = set(targets)
        return peft_config

    @staticmethod
    def _check_target_module_exists(peft_config: ASRConfig, key: str):
        found = check_target_module_exists(peft_config, key)
        if found and isinstance(peft_config.target_modules, str) and peft_config.layers_to_transform:
            # PEFT applies `layers_to_transform` to list targets only; a regex target must stay in the deep blocks too
            marker = f"{peft_config.layers_pattern}."
            parts = key.split(".")
            indices = [int(parts[i + 1]) for i, p in enumerate(parts[:-1]) if p + "." == marker and parts[i + 1].isdigit()]
            return bool(indices) and indices[0] in peft_config.layers_to_transform
        return found

    def _create_and_replace(self, config: ASRConfig, adapter_name, target, target_name, parent, current_key=None, **_):
        if isinstance(target, ASRLayer):
            target.update_layer(adapter_name, config.r, config.lora_alpha, config.lora_dropout, config.tasks)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, (nn.Linear, Conv1D)):
            raise TypeError(
                f"target module `{current_key}` is a {type(base).__name__}; ASR adapts `torch.nn.Linear` (bitsandbytes "
                "4-bit / 8-bit layers included) and `Conv1D` layers only. Choose other `target_modules`."
            )
        new = Linear(target, adapter_name, config.r, config.lora_alpha, config.lora_dropout, config.tasks)
        self._replace_module(parent, target_name, new, target)

    def _check_new_adapter_config(self, config) -> None:
        if len(self.peft_config) > 1:
            raise ValueError(
                "an ASR model holds one bank (one PEFT adapter); add tasks with `add_task`, or combine banks trained "
                "apart with `peft_asr.merge_banks`."
            )

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        for layer in self._asr_layers(model):
            layer._freeze_other_tasks()

    # ------------------------------------------------------------------ small accessors
    @property
    def _adapter(self) -> str:
        return next(iter(self.peft_config))

    @property
    def bank_config(self) -> ASRConfig:
        """The `ASRConfig` of the bank."""
        return self.peft_config[self._adapter]

    @property
    def router(self) -> AnalyticRouter:
        """The :class:`~peft_asr.tuner.router.AnalyticRouter` of the bank."""
        return self.asr_router[self._adapter]

    @property
    def tasks(self) -> list[str]:
        """Names of the tasks in the bank, in the order they were added (the router's class order)."""
        return list(self.bank_config.tasks)

    @property
    def training_task(self) -> Optional[str]:
        """The task whose subspace is trainable (the last one added), or ``None``."""
        return self._training_task

    def _asr_layers(self, model: Optional[nn.Module] = None) -> Iterator[ASRLayer]:
        for module in (model or self.model).modules():
            if isinstance(module, ASRLayer):
                yield module

    def _router_block(self) -> nn.Module:
        # module *names* are cached, not modules: a module stored as an attribute would become a submodule of the
        # tuner and leak into its state dict
        return self.model.get_submodule(f"{self._blocks_name}.{self.bank_config.router_layer}")

    def _final_norm(self) -> nn.Module:
        if not hasattr(self, "_final_norm_name"):
            norm = find_final_norm(self.model, self._blocks_name)
            self._final_norm_name = next((n for n, m in self.model.named_modules() if m is norm), None)
        return self.model.get_submodule(self._final_norm_name) if self._final_norm_name else nn.Identity()

    def _feature_module(self) -> nn.Module:
        """The module whose forward receives the 2-D attention mask and runs the router block (encoder for seq2seq)."""
        if getattr(getattr(self.model, "config", None), "is_encoder_decoder", False):
            return self.model.get_encoder()
        return self.model

    def _check_task(self, task: str) -> str:
        if task not in self.bank_config.tasks:
            raise ValueError(
                f"task {task!r} is not in the bank (tasks: {self.tasks}); call `add_task({task!r})` first."
            )
        return task

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def merged_task(self) -> Optional[str]:
        """The task merged into the base weights (``merge_adapter`` inside ``use_task``), or ``None``.

        Read on every routed call: ``merge_adapter`` merges every layer together, so the first adapted layer tells
        (the walk stops there instead of visiting the whole model)."""
        layer = next(self._asr_layers(), None)
        return layer._merged_task if layer is not None and layer.merged else None

    def _sync_layers(self) -> None:
        """Push the pinned and the training task to every layer (configuration, like PEFT's active adapter).

        A layer applies the pinned task (``BASE_ROUTE``: none) to every row; with nothing pinned it applies the
        training task in training mode only, and otherwise needs a per-row decision from a routed call.
        """
        active = self._pinned[-1] if self._pinned else None
        for layer in self._asr_layers():
            layer.active_task = active
            layer.trainable_task = self._training_task
            layer._freeze_other_tasks()

    # ------------------------------------------------------------------ tasks
    def add_task(self, name: str) -> None:
        """Add a LoRA subspace for task ``name`` in every adapted layer; it becomes the only trainable one.

        The router learns the task when :meth:`fit_router` (or ``ASRCallback`` at the end of training) feeds it the
        task's prompts. Earlier subspaces are frozen and never change again.
        """
        config = self.bank_config
        validate_task_name(name, config.tasks)
        adapter = self._adapter
        self._training_task = name
        for layer in self._asr_layers():
            layer.trainable_task = name
            layer.add_task(adapter, name)
        config.tasks.append(name)
        self.router.add_class()
        config.inference_mode = False
        self._sync_layers()

    def remove_task(self, name: str) -> None:
        """Remove task ``name``: its subspace, and its samples from the router, which then equals a router that never
        saw the task (needs ``per_task_statistics=True``, the default, and the router statistics)."""
        self._check_task(name)
        if name in self._pinned:
            raise RuntimeError(f"task {name!r} is pinned by `use_task`; leave the `with` block first.")
        self.router.remove_class(self.bank_config.tasks.index(name) + 1)  # checks first: nothing changes on error
        adapter = self._adapter
        for layer in self._asr_layers():
            layer.remove_task(adapter, name)
        self.bank_config.tasks.remove(name)
        if self._training_task == name:
            self._training_task = None
        self._sync_layers()

    def _push_pin(self, name: Optional[str]) -> object:
        name = BASE_ROUTE if name is None else name
        if name != BASE_ROUTE:
            self._check_task(name)
        token = object()  # this pin's own entry: pins may be released out of order (`hold_task`)
        self._pinned.append(name)
        self._pin_tokens.append(token)
        self._sync_layers()
        return token

    def _pop_pin(self, token: object) -> None:
        index = next((i for i, t in enumerate(self._pin_tokens) if t is token), None)
        if index is not None:
            del self._pinned[index], self._pin_tokens[index]
            self._sync_layers()

    @contextlib.contextmanager
    def use_task(self, name: Optional[str]) -> Iterator[None]:
        """Pin every row to task ``name`` (no routing) inside a ``with`` block; ``None`` pins the plain base model."""
        token = self._push_pin(name)
        try:
            yield
        finally:
            self._pop_pin(token)

    def set_task_stack_cache(self, enabled: bool) -> None:
        """Keep (default) or drop the stacked copy of every task's A and B that routed calls gather from: off saves
        one copy of the bank's adapters and stacks them at every routed call instead (docs/performance.md)."""
        if not isinstance(enabled, bool):
            raise TypeError(f"`enabled` must be True or False, got {enabled!r}.")
        for layer in self._asr_layers():
            layer.cache_stacks = enabled
            if not enabled:
                layer._asr_stack_cache = None

    def hold_task(self, name: Optional[str]) -> None:
        """Pin ``name`` until :meth:`release_task` (``use_task`` without a ``with`` block; one held pin at a time).

        ``ASRCallback`` holds the task being trained for the evaluations inside ``Trainer.train()`` only; holding a
        new pin, or ``release_task``, drops the one before, so a run that died inside an evaluation leaves no pin
        behind once the next run starts.
        """
        self.release_task()
        self._held_pin = self._push_pin(name)

    def release_task(self) -> None:
        """Drop the pin of :meth:`hold_task`, if any."""
        token, self._held_pin = getattr(self, "_held_pin", None), None
        if token is not None:
            self._pop_pin(token)

    def __getstate__(self) -> dict:
        # the cache map holds weak references (not picklable) to caches of this process only
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state.pop("_cache_routes", None)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._cache_routes = weakref.WeakKeyDictionary()

    @contextlib.contextmanager
    def generate_scope(self) -> Iterator[None]:
        """Mark the calls inside as one ``generate`` (entered by the PeftModel's ``generate``, see ``_registry``)."""
        self._generating += 1
        try:
            yield
        finally:
            self._generating -= 1

    def generate_batch(self, *args, **kwargs):
        """Continuous batching, only inside ``use_task``: its worker thread runs outside any routed call, so rows
        cannot be routed; the pin holds for the whole call."""
        if not self._pinned:
            raise RuntimeError(
                "`generate_batch` (continuous batching) runs the model in a worker thread, outside any routed call, "
                "so rows could not be routed. Use `generate` (per-row routing, or `task_names=[...]`), or pin one "
                "task for the whole batch: `with model.use_task(name): model.generate_batch(...)`."
            )
        return self.model.generate_batch(*args, **kwargs)

    def _refuse_continuous_batching_manager(self, what: str):
        raise RuntimeError(
            f"`{what}` returns a continuous-batching manager whose worker thread runs the model outside any routed "
            "call, possibly after a `use_task` block has ended, so its rows could be answered by no task or a wrong "
            "one. Use `with model.use_task(name): model.generate_batch(...)`, or `generate` with per-row routing."
        )

    def init_continuous_batching(self, *args, **kwargs):
        """Refused: see :meth:`generate_batch`."""
        self._refuse_continuous_batching_manager("init_continuous_batching")

    def continuous_batching_context_manager(self, *args, **kwargs):
        """Refused: see :meth:`generate_batch`."""
        self._refuse_continuous_batching_manager("continuous_batching_context_manager")

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """Scope of one forward / generate call: plan it by the routing contract (which may refuse before any work),
        install the routing hooks, remove them in ``finally``."""
        call = plan_call(self, args, kwargs, generating=self._generating > 0)
        if call is None:  # the layers' configuration applies: a pinned task, or the task being trained
            with self._harvest_scope():  # a training forward may give the router its features (tuner.harvest)
                yield
            return
        with routing_hooks(self, call):
            yield

    # ------------------------------------------------------------------ merging / unloading
    def _check_merge_allowed(self) -> None:
        """Before ``merge_adapter`` / ``merge_and_unload`` change any layer: PEFT's checks, then ours (``merging``)."""
        super()._check_merge_allowed()
        layers = ((name, m) for name, m in self.model.named_modules() if isinstance(m, ASRLayer))
        check_mergeable(layers, self._pinned[-1] if self._pinned else None)

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names=None,
                         task: Optional[str] = None) -> nn.Module:
        """Merge one task's subspace into the base weights and return the plain model.

        The task is ``task`` or the one pinned by ``use_task``; a bank as a whole cannot be merged (it routes).
        Float bases, and bitsandbytes 4-bit / 8-bit ones (merged and quantized again, see ``tuner.merging``).
        """
        if task is not None:
            self._check_task(task)
            with self.use_task(task):
                return self.merge_and_unload(progressbar, safe_merge, adapter_names)
        return super().merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)
