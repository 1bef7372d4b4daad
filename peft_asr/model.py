"""`ASRModel`: the PEFT tuner of Analytic Subspace Routing (Any-SSR).

Flow of one routed forward (eval mode, no task pinned)::

    input_ids -> blocks 0..L_f-1 (no adapters)
              -> pre-hook on block L_f: final norm + masked mean over prompt tokens -> router -> class per row
              -> blocks L_f..L-1: every ASR layer applies its row's task (class 0: plain base model) -> logits

One pass: the shallow blocks run once, and the decision reaches the deep layers through forward pre-hooks installed
for the duration of one ``forward`` or one whole ``generate`` call and removed in ``finally``. Which calls route,
which follow an explicit choice (``task_names``, ``use_task``, the task being trained) and which refuse is the
routing contract of :mod:`peft_asr.routing`.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from typing import Any, Iterable, Iterator, Mapping, Optional, Union

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_target_module_exists
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from .config import BASE_ROUTE, ASRConfig, validate_task_name
from .features import is_packed, masked_mean, positions_from_mask, prompt_mask, unpack_rows
from .layer import ASRLayer, Linear
from .router import BASE_CLASS, AnalyticRouter
from .routing import hidden_from_call, plan_call, routing_hooks
from .validation import check_batch, check_batches, check_features

__all__ = ["ASRModel"]

LAYERS_PATTERNS = ("layers", "h", "block", "blocks", "layer")


class _StopForward(Exception):
    """Raised by the feature hook to end a forward pass after the shallow blocks (the deep ones never run)."""


def find_blocks(model: nn.Module, layers_pattern: Optional[str] = None) -> tuple[str, nn.ModuleList]:
    """Find the transformer block list (PEFT's ``layers_pattern`` conventions); the encoder's for seq2seq models."""
    patterns = (layers_pattern,) if layers_pattern else LAYERS_PATTERNS
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and name.rsplit(".", 1)[-1] in patterns
    ]
    # a block may hold its own ModuleList named like a block list (T5Block.layer): keep the outermost lists only
    found = [(n, m) for n, m in found if not any(n.startswith(other + ".") for other, _ in found)]
    if len(found) > 1:
        encoder = [(n, m) for n, m in found if "encoder" in n.split(".")]
        found = encoder or found
    if len(found) != 1:
        listed = [n for n, _ in found]
        raise ValueError(
            f"could not find a unique list of transformer blocks named {list(patterns)} in "
            f"{type(model).__name__} (candidates: {listed}); set `layers_pattern` in the ASRConfig to the name of the "
            "`nn.ModuleList` holding the blocks."
        )
    return found[0]


def find_final_norm(model: nn.Module, blocks_name: str) -> nn.Module:
    """The normalisation applied after the block list by its parent (``norm``, ``ln_f``, ``final_layer_norm``...).

    Post-norm encoders such as BERT have none; the hidden states are then used as they are.
    """
    parent_name, _, child = blocks_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    after = False
    for name, module in parent.named_children():
        if name == child:
            after = True
        elif after and "norm" in type(module).__name__.lower():
            return module
    return nn.Identity()


class ASRModel(BaseTuner):
    """Analytic Subspace Routing (Any-SSR) tuner: per-task LoRA subspaces in the deep blocks and an analytic router.

    Created by ``get_peft_model(model, ASRConfig(...))`` (after ``import peft_asr``); its public methods are reachable
    on the returned ``PeftModel``: :meth:`add_task`, :attr:`tasks`, :meth:`fit_router`, :meth:`route`,
    :meth:`route_scores`, :meth:`use_task`, :meth:`remove_task`.

    The routing contract (details in :mod:`peft_asr.routing` and docs/concepts.md): a call

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
        router = AnalyticRouter(
            in_features=config.base_hidden_size,
            num_classes=config.num_tasks + 1,
            feature_dim=config.feature_dim,
            activation=config.activation,
            ridge=config.ridge,
            seed=config.router_seed,
            confidence_threshold=config.confidence_threshold,
            per_class_statistics=config.per_task_statistics,
        )
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
                f"target module `{current_key}` is a {type(base).__name__}; ASR adapts `torch.nn.Linear` and "
                "`Conv1D` layers only. Choose other `target_modules`."
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
        """The :class:`~peft_asr.router.AnalyticRouter` of the bank."""
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

    # ------------------------------------------------------------------ router features
    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)

    def _pool(self, hidden: torch.Tensor, inputs: Mapping[str, Any], strict: bool = True) -> torch.Tensor:
        """Router input from the hidden state entering the router block: (B, L, d) -> (B, d) float64.

        ``strict=False`` (the routed forward path): no host sync; a row with no prompt token pools to NaN and is
        routed to the base model. The prompt rule is :func:`peft_asr.features.prompt_mask`'s.
        """
        mask = prompt_mask(
            inputs.get("attention_mask"),
            inputs.get("labels"),
            inputs.get("prompt_mask"),
            shape=tuple(hidden.shape[:2]),
        )
        with torch.no_grad():
            normed = self._final_norm()(hidden)  # (B, L, d)
        return masked_mean(normed, mask.to(hidden.device), strict=strict)  # (B, L, d) -> (B, d)

    def _absolute_positions(self) -> bool:
        """Whether the model adds learned absolute position embeddings (GPT-2 ``wpe``, BERT ``position_embeddings``):
        then a row's features depend on where its tokens start, and positions must come from the attention mask."""
        if not hasattr(self, "_absolute_positions_found"):
            inputs = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
            self._absolute_positions_found = any(
                isinstance(m, nn.Embedding) and m is not inputs
                and (name.rsplit(".", 1)[-1] == "wpe" or "position" in name.rsplit(".", 1)[-1])
                for name, m in self.model.named_modules()
            )
        return self._absolute_positions_found

    def _positions_from_mask(self) -> bool:
        """Whether routing derives ``position_ids`` from the attention mask: decoder-only models that generate
        (``generate`` derives them so); encoders (BERT, RoBERTa's padding-aware positions, T5's encoder) keep their
        own defaults, which is what their routed forward runs with too."""
        if not hasattr(self, "_positions_from_mask_found"):
            config = getattr(self.model, "config", None)
            can_generate = getattr(self.model, "can_generate", None)
            self._positions_from_mask_found = (
                not getattr(config, "is_encoder_decoder", False)
                and callable(can_generate) and can_generate()
                and "position_ids" in inspect.signature(self._feature_module().forward).parameters
            )
        return self._positions_from_mask_found

    def router_features(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Pooled router inputs (B, d) of a batch, running only the blocks below ``router_layer``.

        ``batch`` holds ``input_ids`` (or ``inputs_embeds``), optionally ``attention_mask``, ``labels`` (real tokens
        labelled -100 are the prompt; a row that marks none is prompt as a whole), ``prompt_mask`` (an explicit
        prompt mask, used instead of ``labels``) and ``position_ids`` (otherwise derived from the attention mask,
        as ``generate`` does). Packed rows (``position_ids`` restarting inside a row) are split into one row per
        example first, so the result has one row per example.
        """
        embeddings = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        check_batch(batch, getattr(embeddings, "num_embeddings", None))
        device = self._device()
        tensors = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        if is_packed(tensors):
            pad = getattr(getattr(self.model, "config", None), "pad_token_id", None)
            tensors = unpack_rows(tensors, pad)  # (B, L) packed -> (examples, max length), one prompt per row
        if getattr(getattr(self.model, "config", None), "is_encoder_decoder", False):
            tensors.pop("labels", None)  # decoder targets: they say nothing about which encoder tokens are the prompt
        captured: dict[str, torch.Tensor] = {}

        def hook(_module, args, kwargs):
            captured["pooled"] = self._pool(hidden_from_call(args, kwargs), tensors)
            raise _StopForward

        call = {k: tensors[k] for k in ("input_ids", "inputs_embeds", "attention_mask", "position_ids", "token_type_ids")
                if tensors.get(k) is not None}
        if "position_ids" not in call and "attention_mask" in call and self._positions_from_mask():
            call["position_ids"] = positions_from_mask(call["attention_mask"])  # as `generate` derives them
        handle = self._router_block().register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad(), self._eval_mode():
                self._feature_module()(**call)
        except _StopForward:
            pass
        finally:
            handle.remove()
        if "pooled" not in captured:
            raise RuntimeError("the router block was never reached; is `layers_pattern` pointing at the right blocks?")
        return captured["pooled"]

    def fit_router(
        self,
        batches: Iterable[Mapping[str, Any]],
        task: Optional[str],
        *,
        progress: bool = True,
        reduce_sum=None,
    ) -> "ASRModel":
        """Add the prompts of ``batches`` to the router statistics of ``task`` and mark the router for re-solving.

        Args:
            batches: iterable of collated batches (dicts with ``input_ids``, ``attention_mask`` and ``labels`` where
                -100 marks prompt tokens, or ``prompt_mask``; without either, every real token counts as prompt).
            task: a task of the bank, or ``None`` / ``"__base__"`` for the general route (rows routed there are
                answered by the plain base model).
            progress: show a progress bar.
            reduce_sum: in distributed runs, a function summing a tensor over processes; the statistics added by
                this call are summed so every process holds the same router.

        Only the blocks below ``router_layer`` run (no gradients). Returns ``self``.
        """
        if task is not None and not isinstance(task, str):
            raise TypeError(f"`task` must be a task name (str) or None for the base route, got {type(task).__name__}.")
        check_batches(batches)
        label = BASE_CLASS if task in (None, BASE_ROUTE) else self.bank_config.tasks.index(self._check_task(task)) + 1
        router = self.router
        before = router.snapshot()  # all or nothing: a bad batch halfway leaves the router as it was
        seen = 0
        try:
            for batch in tqdm(batches, desc=f"router fit [{task or BASE_ROUTE}]", disable=not progress, leave=False):
                pooled = self.router_features(batch)
                check_features(pooled)
                router.partial_fit(pooled, label)
                seen += pooled.shape[0]
            if reduce_sum is not None:
                router.all_reduce_statistics(reduce_sum, before)
            elif seen == 0:
                raise ValueError(f"`fit_router` got no batches for task {task!r}; pass the task's (prompt) batches.")
        except BaseException:
            router.restore(before)
            raise
        return self

    # ------------------------------------------------------------------ routing
    def route_scores(self, input_ids=None, attention_mask=None, *, include_base: bool = False, **batch) -> torch.Tensor:
        """Router scores (B, T), float64, columns in :attr:`tasks` order (``include_base``: base route first)."""
        batch = dict(batch, input_ids=input_ids, attention_mask=attention_mask)
        pooled = self.router_features(batch)
        check_features(pooled)
        scores = self.router.scores(pooled)  # (B, T + 1)
        return scores if include_base else scores[:, 1:]

    def route(self, input_ids=None, attention_mask=None, **batch) -> list[str]:
        """The task chosen for every row (``"__base__"`` for rows sent to the plain base model)."""
        batch = dict(batch, input_ids=input_ids, attention_mask=attention_mask)
        pooled = self.router_features(batch)
        check_features(pooled)
        classes = self.router.predict(pooled).tolist()
        names = [BASE_ROUTE] + self.tasks
        return [names[c] for c in classes]

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
        if call is None:
            yield  # the layers' configuration applies: a pinned task, or the task being trained
            return
        with routing_hooks(self, call):
            yield

    # ------------------------------------------------------------------ merging / unloading
    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names=None,
                         task: Optional[str] = None) -> nn.Module:
        """Merge one task's subspace into the base weights and return the plain model.

        The task is ``task`` or the one pinned by ``use_task``; a bank as a whole cannot be merged (it routes).
        """
        if task is not None:
            self._check_task(task)
            with self.use_task(task):
                return self.merge_and_unload(progressbar, safe_merge, adapter_names)
        pinned = self._pinned[-1] if self._pinned else None
        if pinned is None or pinned == BASE_ROUTE:
            raise ValueError(
                "an ASR bank routes each input to its own task, so it cannot be merged as a whole; pin one task: "
                "`model.merge_and_unload(task='name')` or `with model.use_task('name'): model.merge_and_unload()`."
            )
        return super().merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)
