"""`ShallowRouter`: a bank's router with only the part of the base model that routing reads.

A serving engine that loads each task as a plain LoRA adapter still has to pick the adapter of a request. The router
reads the hidden state entering block ``router_layer``, so it needs the embeddings, blocks ``0 .. router_layer - 1``
and the final norm; ``ShallowRouter.from_pretrained(bank, base_model)`` loads those and nothing else:

* of the bank: ``adapter_config.json`` and the router's two tensors (``weight``, ``class_counts``), read by key from
  the safetensors file; never the task subspaces, never ``router_statistics.safetensors``;
* of a checkpoint (a folder or a Hub id): ``AutoModel`` built with ``num_hidden_layers=router_layer``, so the deep
  blocks and the LM head are never allocated (the checkpoint's other tensors are skipped on load);
* of a model already loaded: its modules as they are (no copy).

Where the router reads: the full model's pass stops at a pre-hook on block ``router_layer``. A model cut after block
``router_layer - 1`` has no such block; the hidden state entering it is what the final norm receives (the last
block's output), so the pre-hook sits on the final norm instead. The pass itself is the tuner's own
(:func:`peft_asr.tuner.shallow.feature_pass`: the prompt rule, positions from the mask, packed rows, the final norm
and the pooling), so ``route`` and ``route_scores`` give what ``PeftModel.from_pretrained(base, bank)`` gives.

A **router-only folder** (written by ``peft-asr export`` as ``OUT/router/``, and by :func:`save_router`) holds the
bank's ``adapter_config.json`` and ``router.safetensors`` with the two router tensors under the bank's key names. It
has no ``adapter_model.safetensors``, so PEFT refuses it as an adapter instead of loading tasks without weights.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..bank import preflight, recover_bank
from ..bank.files import (CONFIG_FILE, PICKLE_WEIGHTS_FILE, ROUTER_COUNTS_KEY, ROUTER_PREFIX, ROUTER_WEIGHT_KEY,
                          WEIGHTS_FILE, adapter_folder)
from ..tuner.blocks import find_blocks, find_final_norm
from ..tuner.config import BASE_ROUTE, ASRConfig
from ..tuner.errors import BankError
from ..tuner.router import AnalyticRouter
from ..tuner.shallow import derives_positions, feature_pass
from ..tuner.validation import check_features

__all__ = ["ShallowRouter", "ROUTER_FILE", "save_router"]

ROUTER_FILE = "router.safetensors"  # the router tensors of a router-only folder, under the bank's key names


def _router_file(folder: str) -> str:
    for name in (ROUTER_FILE, WEIGHTS_FILE):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    if os.path.isfile(os.path.join(folder, PICKLE_WEIGHTS_FILE)):
        raise BankError(f"{folder} holds only {PICKLE_WEIGHTS_FILE} (a pickle file, which can run code when read); "
                        "the router loads from safetensors only. Re-save the bank with `save_pretrained`.")
    raise BankError(f"{folder} has neither {WEIGHTS_FILE} (a bank) nor {ROUTER_FILE} (a router-only folder).")


def _read_router(folder: str) -> tuple[ASRConfig, dict[str, torch.Tensor]]:
    """The config and the router's saved tensors (``weight``, ``class_counts``, and whatever else its head saves) of
    a bank or router-only folder, checked; the task subspaces and the statistics are never read."""
    if not os.path.isfile(os.path.join(folder, CONFIG_FILE)):
        raise BankError(f"{folder} has no {CONFIG_FILE}; it is not a bank nor a router-only folder.")
    config = ASRConfig.from_pretrained(folder)
    path = _router_file(folder)
    try:
        with safe_open(path, framework="pt") as handle:
            keys = [k for k in handle.keys() if k.startswith(ROUTER_PREFIX)]
            if not {ROUTER_WEIGHT_KEY, ROUTER_COUNTS_KEY} <= set(keys):
                raise BankError(f"{path} has no router ({ROUTER_WEIGHT_KEY}, {ROUTER_COUNTS_KEY}); it is not an ASR "
                                "bank's weights file.")
            state = {k[len(ROUTER_PREFIX):]: handle.get_tensor(k) for k in keys}  # by key: nothing else is read
    except (SafetensorError, OSError) as err:
        raise BankError(f"{path} is not a readable safetensors file (truncated or corrupt): {err}") from None
    weight, counts = state["weight"], state["class_counts"]
    dim, classes = config.router_dim, config.num_tasks + 1
    if dim is None or config.base_num_layers is None:
        raise BankError(f"{folder}: the config records no base model shape (`base_hidden_size`, `base_num_layers`); "
                        "it was never saved from a wrapped model.")
    if (tuple(weight.shape), tuple(counts.shape)) != ((dim, classes), (classes,)) or weight.dtype != torch.float64:
        raise BankError(f"{path}: the router weight is {tuple(weight.shape)} {weight.dtype}, but the config's "
                        f"{config.num_tasks} tasks and feature size {dim} need ({dim}, {classes}) float64: the files "
                        "come from different banks.")
    if not (bool(torch.isfinite(weight).all()) and bool(torch.isfinite(counts).all())):  # the others: the head's
        raise BankError(f"{path}: the router holds NaN or inf values; the file is corrupt.")
    if not bool((counts > 0).any()):
        raise BankError(f"{folder}: the bank's router was never fitted (no class has samples); fit it with "
                        "`fit_router` (or `ASRCallback`) and save the bank again.")
    return config, state


def _bank_folder(bank: Union[str, os.PathLike], bank_kwargs: dict) -> str:
    """The local folder of a bank or router-only folder; a Hub id goes through the bank layer's download."""
    if not isinstance(bank, (str, os.PathLike)):
        raise TypeError(f"`bank` must be a folder or a Hub repo id (str), got {type(bank).__name__}.")
    local = adapter_folder(os.fspath(bank), subfolder=bank_kwargs.get("subfolder"))
    recover_bank(local)  # finish a save that was interrupted between its two renames
    if os.path.isdir(local):
        return local
    if os.path.exists(local):
        raise BankError(f"{local} is a file; a bank is a folder.")
    folder = preflight(os.fspath(bank), dict(bank_kwargs))  # the Hub: the bank's files from one revision, checked
    if folder is None:
        raise BankError(f"{bank!r} is neither a folder here nor an ASR bank on the Hub.")
    return folder


def _generates(config: ASRConfig, model_config: Any, model: Optional[nn.Module]) -> bool:
    """Whether the bank's full model generates (then routing takes positions from the mask): its task type says;
    without one, the model given, or the architectures its checkpoint was saved from."""
    if config.task_type is not None:
        return config.task_type == "CAUSAL_LM"
    can_generate = getattr(model, "can_generate", None)
    if callable(can_generate) and can_generate():
        return True
    import transformers

    classes = [getattr(transformers, name, None) for name in getattr(model_config, "architectures", None) or []]
    return any(cls is not None and cls.can_generate() for cls in classes)


def _check_shape(config: ASRConfig, model_config: Any, name: str) -> None:
    hidden = getattr(model_config, "hidden_size", None)
    if hidden != config.base_hidden_size:
        raise ValueError(f"the bank was built for a base model with hidden size {config.base_hidden_size}, but {name} "
                         f"has hidden size {hidden}: pass the base model it was trained with "
                         f"({config.base_model_name_or_path!r}).")


def _block_list(model: nn.Module, pattern: Optional[str], expected: int) -> tuple[str, nn.ModuleList]:
    """The block list (``find_blocks``); a model cut at ``router_layer=0`` has an empty one, found by its name."""
    if expected == 0:
        empty = [(n, m) for n, m in model.named_modules()
                 if isinstance(m, nn.ModuleList) and len(m) == 0 and n.rsplit(".", 1)[-1] == pattern]
        if len(empty) == 1:
            return empty[0]
    return find_blocks(model, pattern)


class _LoadReport(logging.Filter):
    """Holds back transformers' load report, which lists every deep-block tensor the cut model skips by design."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in record.getMessage():
            self.records.append(record)
            return False
        return True


def _load_cut(base_model: str, config: ASRConfig, kwargs: dict) -> tuple[nn.Module, Any]:
    """``AutoModel`` of ``base_model`` with the blocks below ``router_layer`` only; checked against the bank first."""
    from transformers import AutoConfig, AutoModel

    hub = {k: kwargs[k] for k in ("cache_dir", "force_download", "local_files_only", "proxies", "revision",
                                  "subfolder", "token", "trust_remote_code") if k in kwargs}
    model_config = AutoConfig.from_pretrained(base_model, **hub)
    if getattr(model_config, "is_encoder_decoder", False):
        raise ValueError(f"{base_model!r} is an encoder-decoder model; ShallowRouter cuts decoder-only and encoder "
                         "models. Load the model yourself and pass it: `ShallowRouter.from_pretrained(bank, model)`.")
    _check_shape(config, model_config, repr(base_model))
    depth = getattr(model_config, "num_hidden_layers", None)
    if depth != config.base_num_layers:
        raise ValueError(f"the bank was built for a base model with {config.base_num_layers} blocks, but "
                         f"{base_model!r} has {depth}: pass the base model it was trained with "
                         f"({config.base_model_name_or_path!r}).")
    report = _LoadReport()
    logger = logging.getLogger("transformers.modeling_utils")
    logger.addFilter(report)
    try:
        model, info = AutoModel.from_pretrained(base_model, num_hidden_layers=config.router_layer,
                                                output_loading_info=True, **kwargs)
    except BaseException:
        logger.removeFilter(report)
        for record in report.records:  # the report explains transformers' own error: show it after all
            logger.handle(record)
        raise
    finally:
        logger.removeFilter(report)
    if info["missing_keys"]:
        raise ValueError(f"{base_model!r} lacks weights the router's blocks need: {sorted(info['missing_keys'])[:8]}; "
                         "it is not the checkpoint the bank was trained on.")
    return model, model_config


def save_router(folder: Union[str, os.PathLike], config: ASRConfig, router: AnalyticRouter) -> None:
    """Write a router-only folder: ``adapter_config.json`` (``config``) and ``router.safetensors`` (the saved
    tensors of ``router``: the solved ``weight`` and ``class_counts``, under the bank's key names). ``folder`` must
    be new or empty."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} is not empty; write the router into a new folder.")
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    state = router.state_dict()  # the saved tensors (the router solves first), as PEFT names them in a bank
    save_file({ROUTER_PREFIX + k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()},
              str(folder / ROUTER_FILE), metadata={"format": "pt"})


class ShallowRouter(nn.Module):
    """The router of a bank on the blocks below ``router_layer``: ``route`` / ``route_scores`` as the full model's.

    Build it with :meth:`from_pretrained`. Attributes: ``model`` (the base model, cut below ``router_layer`` when it
    was loaded from a checkpoint), ``router`` (the :class:`~peft_asr.AnalyticRouter`, routing only), ``bank_config``
    (the bank's `ASRConfig`), :attr:`tasks`.
    """

    def __init__(self, model: nn.Module, config: ASRConfig, router: AnalyticRouter, generates: bool) -> None:
        super().__init__()
        self.model = model
        self.router = router
        self.bank_config = config
        encoder = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
        feature = model.get_encoder() if encoder else model
        # module *names* are kept, not modules: an attribute would register a module twice in the state dict
        root = "model" + ("." + next(n for n, m in model.named_modules() if m is feature) if encoder else "")
        blocks_name, blocks = _block_list(feature, config.layers_pattern, config.router_layer)
        norm = find_final_norm(feature, blocks_name)
        norm_name = next((n for n, m in feature.named_modules() if m is norm), None)
        if len(blocks) not in (config.base_num_layers, config.router_layer):
            raise ValueError(f"the model has {len(blocks)} blocks in `{blocks_name}`; the bank needs "
                             f"{config.base_num_layers} (the full model) or {config.router_layer} (cut below "
                             "`router_layer`).")
        full = len(blocks) > config.router_layer
        if not full and norm_name is None:
            raise ValueError(f"{type(feature).__name__} has no final norm after its blocks, where a model cut below "
                             "`router_layer` hands the router its hidden state; pass the full model instead.")
        self._feature_name = root
        self._norm_name = f"{root}.{norm_name}" if norm_name is not None else None
        self._block_name = f"{root}.{blocks_name}.{config.router_layer}" if full else f"{root}.{norm_name}"
        self._derive_positions = derives_positions(getattr(model, "config", None), generates, feature)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, bank: Union[str, os.PathLike], base_model: Union[str, os.PathLike, nn.Module, None] = None,
                        *, bank_kwargs: Optional[dict] = None, **model_kwargs) -> "ShallowRouter":
        """Load the router of ``bank`` on the shallow part of ``base_model``.

        Args:
            bank: a bank folder, a router-only folder (``peft-asr export``'s ``OUT/router``), or a bank's Hub id.
            base_model: a checkpoint (folder or Hub id; default: the bank's ``base_model_name_or_path``), loaded with
                ``AutoModel`` and ``num_hidden_layers=router_layer``: embeddings, shallow blocks, final norm; or a
                model already loaded (its modules are used, not copied).
            bank_kwargs: keywords of the bank's Hub download (``revision``, ``subfolder``, ``token``, ...).
            model_kwargs: keywords of ``AutoModel.from_pretrained`` (``dtype``, ``device_map``,
                ``attn_implementation``, ``revision``, ...); route with the dtype and attention of the full model
                to get its scores to the bit.

        Everything is checked before the model's weights are read: the bank's config and router tensors, the
        checkpoint's hidden size and depth against the bank's.
        """
        folder = _bank_folder(bank, dict(bank_kwargs or {}))
        config, state = _read_router(folder)
        if isinstance(base_model, nn.Module):
            if model_kwargs:
                raise TypeError(f"`model_kwargs` {sorted(model_kwargs)} apply to loading a checkpoint; `base_model` "
                                "is a model already loaded.")
            model = base_model.get_base_model() if hasattr(base_model, "get_base_model") else base_model
            model_config = getattr(model, "config", None)
            _check_shape(config, model_config, type(model).__name__)
        else:
            base_model = base_model if base_model is not None else config.base_model_name_or_path
            if not isinstance(base_model, (str, os.PathLike)):
                raise ValueError("the bank records no base model (`base_model_name_or_path`); pass `base_model`.")
            model, model_config = _load_cut(os.fspath(base_model), config, model_kwargs)
        # the router `ASRModel` builds for this config, with one summed Gram matrix instead of one per task: those
        # statistics stay empty (routing needs none), and T + 1 of them would be (T + 1) x E x E x 8 bytes of zeros
        routing_only = copy.copy(config)
        routing_only.per_task_statistics = False
        router = AnalyticRouter.from_config(routing_only)
        try:
            router.load_state_dict(state)  # strict: a tensor this router does not have is another kind of router
        except RuntimeError as err:
            raise BankError(f"{folder}: the saved router does not fit the router of its config: {err}") from None
        router.mark_loaded_without_statistics()
        device = next(model.parameters()).device
        return cls(model, config, router.to(device), _generates(config, model_config, model))

    # ------------------------------------------------------------------ routing
    @property
    def tasks(self) -> list[str]:
        """Names of the bank's tasks, in the router's class order."""
        return list(self.bank_config.tasks)

    def router_features(self, batch: Any) -> torch.Tensor:
        """Pooled router inputs (B, d) of a batch (``PeftModel.router_features``'s rules: the prompt, positions from
        the mask, packed rows split)."""
        embeddings = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        norm = self.get_submodule(self._norm_name) if self._norm_name is not None else nn.Identity()
        return feature_pass(self.get_submodule(self._feature_name), self.get_submodule(self._block_name),
                            norm, getattr(self.model, "config", None), batch, derive_positions=self._derive_positions,
                            vocab_size=getattr(embeddings, "num_embeddings", None),
                            pooling=self.bank_config.router_pooling)

    def route_scores(self, input_ids=None, attention_mask=None, *, include_base: bool = False, **batch) -> torch.Tensor:
        """Router scores (B, T), float64, columns in :attr:`tasks` order (``include_base``: base route first)."""
        pooled = self.router_features(dict(batch, input_ids=input_ids, attention_mask=attention_mask))
        check_features(pooled)
        scores = self.router.scores(pooled)  # (B, T + 1)
        return scores if include_base else scores[:, 1:]

    def route(self, input_ids=None, attention_mask=None, **batch) -> list[str]:
        """The task chosen for every row (``"__base__"`` for rows sent to the plain base model)."""
        pooled = self.router_features(dict(batch, input_ids=input_ids, attention_mask=attention_mask))
        check_features(pooled)
        names = [BASE_ROUTE] + self.tasks
        return [names[c] for c in self.router.predict(pooled).tolist()]

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}, router_layer={self.bank_config.router_layer}"
