"""`ASRConfig`: the configuration of an Analytic Subspace Routing (Any-SSR) bank."""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field, fields
from typing import Literal, Optional, Union

from peft.config import PeftConfig
from peft.utils import CONFIG_NAME, PeftType

from .errors import ASRConfigError, ASRConfigTypeError
from .features import POOLINGS
from .paths import adapter_folder, hub_download_kwargs

__all__ = ["ASRConfig", "BASE_ROUTE", "ASR_TYPE", "is_task_name", "validate_task_name", "FORMAT_VERSION", "read_config_json", "check_config_dict"]

BASE_ROUTE = "__base__"  # reserved name of the general route (rows answered by the plain base model)
FORMAT_VERSION = 1  # version of the bank layout on disk; a bank with a newer version is refused with a clear error
ASR_TYPE = "ASR"  # the PEFT type of an ASR bank (``PeftType.ASR``, added to PEFT's enum by ``peft_asr._registry``)
# the one task-name rule (the config, add_task and the data loaders all use it): names become state-dict keys
TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,63}")


def is_task_name(name: object) -> bool:
    """Whether ``name`` is a valid task name: 1-64 letters, digits, '_' or '-', starting with a letter or digit."""
    return isinstance(name, str) and TASK_NAME.fullmatch(name) is not None


def validate_task_name(name: object, existing: list[str]) -> str:
    """Check a new task name; returns it. Names become state-dict keys, hence the restricted alphabet."""
    if not isinstance(name, str):
        raise TypeError(f"task name must be a str, got {type(name).__name__} ({name!r}).")
    if name == BASE_ROUTE:
        raise ValueError(f"task name {BASE_ROUTE!r} is reserved for the base route (general data).")
    if not is_task_name(name):
        raise ValueError(
            f"task name {name!r} is not valid: use 1-64 letters, digits, '_' or '-', starting with a letter or digit "
            "(names become keys in the saved bank)."
        )
    if name in existing:
        raise ValueError(f"task {name!r} is already in the bank (tasks: {existing}); task names must be unique.")
    return name


@dataclass
class ASRConfig(PeftConfig):
    """Configuration of an Analytic Subspace Routing (Any-SSR, arXiv 2503.13575) bank.

    A frozen model is split at ``router_layer``. Every task gets its own LoRA subspace in the layers *at and above*
    ``router_layer``; a ridge-regression router, trained in closed form on frozen features from the layers *below*
    it, picks the subspace for every input sequence. Old subspaces are never trained again and no old data is kept,
    so earlier tasks are not forgotten.

    Args:
        r (`int`, *optional*, defaults to `8`):
            LoRA rank of each task's subspace. Memory and bank size grow linearly with `r` and with the number of
            tasks; 4-16 is typical.
        lora_alpha (`int`, *optional*, defaults to `16`):
            LoRA scaling numerator: the update is `(alpha / r) * B @ A`.
        lora_dropout (`float`, *optional*, defaults to `0.0`):
            Dropout on the LoRA input during training.
        target_modules (`list[str]` or `str`, *optional*):
            Names (or a regex) of the linear / Conv1D layers to adapt, as in `LoraConfig`. Defaults to PEFT's LoRA
            defaults for the architecture. Only matches inside blocks at or above `router_layer` are adapted.
        router_layer (`int`, *optional*, defaults to `4`):
            Index of the first adapted transformer block; the router reads the hidden state entering this block.
            Lower is cheaper (fewer shallow layers to run for routing) and leaves more layers to adapt; too low and
            the features do not separate tasks. The paper uses 4 on 32-layer models.
        feature_dim (`int`, *optional*, defaults to `None`):
            Width `E` of the router's fixed random expansion. `None` routes on the pooled hidden state itself
            (`E` = hidden size). Larger `E` can separate more tasks but the router statistics cost `E*E*8` bytes
            (E=8192: 512 MiB) and fitting costs O(E^3) once per solve.
        activation (`str`, *optional*, defaults to `"none"`):
            `"relu"` or `"none"`, applied after the expansion.
        ridge (`float`, *optional*, defaults to `1.0`):
            Ridge (L2) regularisation of the router. Too small overfits and makes the system ill conditioned; too large
            blurs similar tasks. The right value depends on the feature scale; see docs/router_defaults.md.
        router_pooling (`str`, *optional*, defaults to `"mean_last"`):
            How the hidden states of a prompt become one router feature: `"mean_last"`, the mean over the prompt's
            tokens next to the state of its last token (which has read the whole prompt; features of width
            2 x hidden size), or `"mean"`, the mean alone, as in the paper. Both come from the same pass.
        router_head (`str`, *optional*, defaults to `"lda"`):
            How the router turns features into a task: `"lda"`, a linear discriminant with one covariance shared by
            all tasks, shrunk by `router_shrinkage` (measured best: docs/router_defaults.md), or `"ridge"`, ridge
            regression onto one-hot task ids as in the paper. Both are solved from the same statistics, so both stay
            exact under any chunking, task order, merging and task removal.
        router_shrinkage (`float`, *optional*, defaults to `0.1`):
            Shrinkage of the `"lda"` covariance towards a multiple of the identity, in (0, 1]; scale-free, unlike
            `ridge`, which the `"ridge"` head uses instead.
        router_seed (`int`, *optional*, defaults to `0`):
            Seed of the random expansion; banks merged together must share it.
        confidence_threshold (`float`, *optional*, defaults to `None`):
            Rows whose best task score is below this are answered by the plain base model: with the `"lda"` head the
            score is the task's posterior probability, with `"ridge"` the raw score (about 1 for a prompt like the
            training prompts, near 0 for unrelated ones); 0.5 is a reasonable start. For prompts unlike every task,
            `model.calibrate_base_route(held_out_batches, false_positive_rate)` is the calibrated alternative.
        tasks (`list[str]`, *optional*):
            The tasks in the bank, in the order they were added. Filled by `add_task`; saved so that a reload creates
            every subspace before its weights are read. Do not edit by hand.
        layers_pattern (`str`, *optional*):
            Name of the `nn.ModuleList` holding the transformer blocks (e.g. `"layers"`, `"h"`, `"block"`). Found
            automatically for common architectures.
        layers_to_transform (`list[int]`, *optional*):
            Derived from `router_layer` when the model is wrapped (the blocks that get subspaces); do not set.
        base_hidden_size (`int`, *optional*):
            Recorded when the model is wrapped; a bank is refused on a base model of another hidden size.
        base_num_layers (`int`, *optional*):
            Recorded when the model is wrapped; a bank is refused on a base model of another depth.
        per_task_statistics (`bool`, *optional*, defaults to `True`):
            Keep the router's Gram matrix per task (`(T+1)*E*E*8` bytes instead of `E*E*8`) so that `remove_task`
            takes a task out of the router exactly. Turn it off for a large `feature_dim` with many tasks.
        save_router_statistics (`bool`, *optional*, defaults to `True`):
            Also save the router's sufficient statistics (`router_statistics.safetensors`, `E*E*8` bytes) so that the
            reloaded bank can keep learning tasks exactly. Without them the bank can route but not learn.
        format_version (`int`, *optional*, defaults to `1`):
            Version of the bank layout; written by the library.
    """

    r: int = field(default=8, metadata={"help": "LoRA rank of each task's subspace."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator: update = alpha / r * B @ A."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input while training."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Layer names or regex to adapt (inside blocks >= router_layer only)."}
    )
    router_layer: int = field(
        default=4, metadata={"help": "First adapted block; the router reads the hidden state entering it."}
    )
    feature_dim: Optional[int] = field(
        default=None, metadata={"help": "Width E of the random expansion; None routes on the pooled hidden state."}
    )
    activation: Literal["none", "relu"] = field(default="none", metadata={"help": "'relu' or 'none' after expansion."})
    ridge: float = field(default=1.0, metadata={"help": "Ridge regularisation of the router (> 0)."})
    router_pooling: Literal["mean_last", "mean"] = field(
        default="mean_last", metadata={"help": "'mean_last' (prompt mean and last prompt token) or 'mean' (the paper's)."}
    )
    router_head: Literal["lda", "ridge"] = field(
        default="lda", metadata={"help": "'lda' (shared-covariance discriminant) or 'ridge' (the paper's router)."}
    )
    router_shrinkage: float = field(default=0.1, metadata={"help": "Covariance shrinkage of the 'lda' head, in (0, 1]."})
    router_seed: int = field(default=0, metadata={"help": "Seed of the random expansion (must match to merge banks)."})
    confidence_threshold: Optional[float] = field(
        default=None, metadata={"help": "Rows whose best task score is below this use the plain base model."}
    )
    tasks: list[str] = field(default_factory=list, metadata={"help": "Tasks in the bank, in order (filled by add_task)."})
    layers_pattern: Optional[str] = field(
        default=None, metadata={"help": "Name of the ModuleList of transformer blocks; found automatically."}
    )
    layers_to_transform: Optional[list[int]] = field(
        default=None, metadata={"help": "Derived from router_layer when the model is wrapped; do not set."}
    )
    base_hidden_size: Optional[int] = field(default=None, metadata={"help": "Recorded hidden size of the base model."})
    base_num_layers: Optional[int] = field(default=None, metadata={"help": "Recorded block count of the base model."})
    per_task_statistics: bool = field(
        default=True, metadata={"help": "Keep one router Gram matrix per task so remove_task is exact."}
    )
    save_router_statistics: bool = field(
        default=True, metadata={"help": "Save the E x E router statistics so a reloaded bank can keep learning."}
    )
    format_version: int = field(default=FORMAT_VERSION, metadata={"help": "Bank layout version (written by the library)."})

    def __post_init__(self):
        self._check_base_fields()
        super().__post_init__()
        self.peft_type = PeftType(ASR_TYPE)
        self._check_int("r", self.r, minimum=1)
        self._check_number("lora_alpha", self.lora_alpha, "a positive number", lambda v: v > 0)
        self._check_number("lora_dropout", self.lora_dropout, "in [0, 1)", lambda v: 0.0 <= v < 1.0)
        if self.target_modules is not None:
            modules = self.target_modules
            if isinstance(modules, (list, tuple, set)):
                if not modules or not all(isinstance(m, str) and m for m in modules):
                    raise ASRConfigTypeError(
                        f"`target_modules` must be a regex or a non-empty list of module names (str), got {modules!r}; "
                        "e.g. ['q_proj', 'v_proj']."
                    )
            elif not isinstance(modules, str) or not modules:
                raise ASRConfigTypeError(
                    f"`target_modules` must be a regex or a non-empty list of module names (str), got {modules!r}; "
                    "e.g. ['q_proj', 'v_proj']."
                )
        self._check_int("router_layer", self.router_layer, minimum=0)
        if self.feature_dim is not None:
            self._check_int("feature_dim", self.feature_dim, minimum=1)
        if self.activation not in ("none", "relu"):
            raise ASRConfigError(f"`activation` must be 'none' or 'relu', got {self.activation!r}.")
        self._check_number("ridge", self.ridge, "a number > 0", lambda v: v > 0, hint=" try 1.0.")
        if self.router_pooling not in POOLINGS:
            raise ASRConfigError(f"`router_pooling` must be one of {sorted(POOLINGS)}, got {self.router_pooling!r}.")
        if self.router_head not in ("lda", "ridge"):
            raise ASRConfigError(f"`router_head` must be 'lda' or 'ridge', got {self.router_head!r}.")
        self._check_number("router_shrinkage", self.router_shrinkage, "in (0, 1]", lambda v: 0 < v <= 1,
                           hint=" try 0.1.")
        self._check_int("router_seed", self.router_seed, minimum=0)
        if self.router_seed >= 2**63:
            raise ASRConfigError(f"`router_seed` must be below 2**63, got {self.router_seed!r}.")
        if self.confidence_threshold is not None:
            self._check_number("confidence_threshold", self.confidence_threshold, "a number or None", lambda v: True)
        if not isinstance(self.tasks, list):
            raise ASRConfigTypeError(f"`tasks` must be a list of task names, got {type(self.tasks).__name__}.")
        seen: list[str] = []
        for name in self.tasks:
            try:
                seen.append(validate_task_name(name, seen))
            except TypeError as err:
                raise ASRConfigTypeError(f"`tasks`: {err}") from None
            except ValueError as err:
                raise ASRConfigError(f"`tasks`: {err}") from None
        if self.layers_pattern is not None and (not isinstance(self.layers_pattern, str) or not self.layers_pattern):
            raise ASRConfigTypeError(
                f"`layers_pattern` must be the name of the block list (a str such as 'layers'), got {self.layers_pattern!r}."
            )
        if self.layers_to_transform is not None and (
            not isinstance(self.layers_to_transform, list)
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers_to_transform)
        ):
            raise ASRConfigTypeError(
                f"`layers_to_transform` must be a list of block indices (int >= 0), got {self.layers_to_transform!r}; "
                "it is derived from `router_layer`, leave it unset."
            )
        for name in ("base_hidden_size", "base_num_layers"):
            if getattr(self, name) is not None:
                self._check_int(name, getattr(self, name), minimum=1)
        if self.base_num_layers is not None and self.router_layer >= self.base_num_layers:
            raise ASRConfigError(
                f"`router_layer` must be in [0, {self.base_num_layers - 1}] for a base model with {self.base_num_layers} "
                f"blocks, got {self.router_layer}."
            )
        for name in ("per_task_statistics", "save_router_statistics"):
            if not isinstance(getattr(self, name), bool):
                raise ASRConfigTypeError(f"`{name}` must be True or False, got {getattr(self, name)!r}.")
        self._check_int("format_version", self.format_version, minimum=1)
        if self.format_version > FORMAT_VERSION:
            raise ASRConfigError(
                f"this bank uses format version {self.format_version}, but this peft-asr reads up to version "
                f"{FORMAT_VERSION}; upgrade peft-asr (`pip install -U peft-asr`)."
            )
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)

    def _check_base_fields(self) -> None:
        """PEFT's own fields, checked here so that a bad value gets our error class (PEFT's checks are partial)."""
        from peft.utils import TaskType

        if self.task_type is not None and self.task_type not in [t.value for t in TaskType]:
            raise ASRConfigError(
                f"`task_type` must be one of {[t.value for t in TaskType]} or None, got {self.task_type!r}; "
                "use 'CAUSAL_LM' for decoder models."
            )
        if self.peft_type is not None and self.peft_type != ASR_TYPE:
            raise ASRConfigError(f"`peft_type` of an ASRConfig must be 'ASR', got {self.peft_type!r}.")
        for name in ("base_model_name_or_path", "revision", "peft_version"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ASRConfigTypeError(f"`{name}` must be a str or None, got {getattr(self, name)!r}.")
        if self.auto_mapping is not None and not isinstance(self.auto_mapping, dict):
            raise ASRConfigTypeError(f"`auto_mapping` must be a dict or None, got {self.auto_mapping!r}.")
        if not isinstance(self.inference_mode, bool):
            raise ASRConfigTypeError(f"`inference_mode` must be True or False, got {self.inference_mode!r}.")

    @staticmethod
    def _check_int(name: str, value: object, minimum: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ASRConfigError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")

    @staticmethod
    def _check_number(name: str, value: object, expected: str, ok, hint: str = "") -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
            raise ASRConfigError(f"`{name}` must be {expected}, got {value!r}.{hint}")

    # ------------------------------------------------------------------ loading a saved config
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: Optional[str] = None, **kwargs) -> "ASRConfig":
        """Load the `ASRConfig` of a saved bank (a folder or a Hub repo), strictly.

        Unlike PEFT's loader, which drops unknown keys with a warning, a bank's ``adapter_config.json`` must hold
        every ASR field and nothing else; any problem raises :class:`~peft_asr.ASRConfigError`.
        """
        path = adapter_folder(pretrained_model_name_or_path, subfolder=subfolder)
        file = os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(file):
            if os.path.isdir(path):
                raise ASRConfigError(f"{path} has no {CONFIG_NAME}; it is not a saved bank.")
            from huggingface_hub import hf_hub_download

            try:
                file = hf_hub_download(str(pretrained_model_name_or_path), CONFIG_NAME, subfolder=subfolder,
                                       **hub_download_kwargs(kwargs))
            except Exception as err:  # the Hub client raises many types (offline, 404, bad repo id); one clear error
                raise ASRConfigError(
                    f"cannot find {CONFIG_NAME} at {pretrained_model_name_or_path!r} (not a local folder, and the "
                    f"Hub download failed: {type(err).__name__})."
                ) from err
        return cls.from_json_dict(read_config_json(file), source=file)

    @classmethod
    def from_json_dict(cls, data: object, source: str = "adapter_config.json") -> "ASRConfig":
        """Build a config from the parsed JSON of a bank, refusing unknown and missing keys."""
        ignored = check_config_dict(data, source)
        values = {**ADDED_FIELDS, **{k: v for k, v in data.items() if k not in ignored}}  # earlier banks: as before
        try:
            return cls(**values)
        except ASRConfigError:
            raise
        except (TypeError, ValueError) as err:  # a check PEFT adds in a later version: still our error class
            raise ASRConfigError(f"{source}: {err}") from err

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def router_in_features(self) -> Optional[int]:
        """Width of the pooled router input (hidden size x the pooling's width); ``None`` before wrapping."""
        return None if self.base_hidden_size is None else self.base_hidden_size * POOLINGS[self.router_pooling]

    @property
    def router_dim(self) -> Optional[int]:
        """``E``: width of the router feature (``feature_dim``, or the pooled input without an expansion)."""
        return self.feature_dim or self.router_in_features


# fields of PEFT's base config: optional in a saved bank (their set varies with the PEFT version that wrote it)
_PEFT_FIELDS = frozenset(f.name for f in fields(PeftConfig))
# fields of ASRConfig itself: the library always writes all of them, so a bank missing one was not written by it
_ASR_FIELDS = frozenset(f.name for f in fields(ASRConfig)) - _PEFT_FIELDS
# fields added after the first release, with the value that reproduces how earlier banks (which lack them) route
ADDED_FIELDS = {"router_pooling": "mean", "router_head": "ridge", "router_shrinkage": 0.1}


def read_config_json(path: str) -> dict:
    """Parse a bank's ``adapter_config.json``; unreadable or non-JSON content raises :class:`ASRConfigError`."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ASRConfigError(f"{path} is not valid JSON ({err}); the file is truncated or corrupt, re-save the bank.") from None


def _written_by_newer_peft(data: dict) -> Optional[str]:
    """The ``peft_version`` that wrote a config when it is newer than the installed ``peft`` (else None)."""
    import peft
    from packaging.version import InvalidVersion, Version

    saved = data.get("peft_version")
    if not isinstance(saved, str):
        return None
    try:
        newer = Version(saved.split("@")[0]) > Version(peft.__version__.split("@")[0])
    except InvalidVersion:
        return None
    return saved if newer else None


def check_config_dict(data: object, source: str = "adapter_config.json") -> frozenset:
    """Check the keys of a saved ASR config: a JSON object with ``peft_type`` "ASR", every ASR field, no unknown key.

    One exception: a config written by a newer ``peft`` (its ``peft_version``) may carry keys of that PEFT's base
    config that the installed one lacks; they are ignored with a warning, as PEFT itself does. Returns the keys to
    ignore. Values are checked by ``ASRConfig.__post_init__``. Raises :class:`ASRConfigError`.
    """
    if not isinstance(data, dict):
        raise ASRConfigError(f"{source} must hold a JSON object, got {type(data).__name__}.")
    if data.get("peft_type") != ASR_TYPE:
        raise ASRConfigError(
            f"{source} has peft_type {data.get('peft_type')!r}, not 'ASR': it is not an Analytic Subspace Routing bank."
        )
    unknown = sorted(str(k) for k in set(data) - _ASR_FIELDS - _PEFT_FIELDS)
    newer = _written_by_newer_peft(data) if unknown else None
    if newer is not None:
        import peft

        warnings.warn(f"{source} was written by peft {newer} (installed: {peft.__version__}); ignoring the keys "
                      f"{unknown}, which this peft does not know. If they are settings of a newer peft-asr instead, "
                      "upgrade: `pip install -U peft-asr`.", UserWarning, stacklevel=3)
    elif unknown:
        raise ASRConfigError(
            f"{source} has unknown keys {unknown}: it was written by a newer peft-asr/peft (upgrade: "
            "`pip install -U peft-asr`) or edited by hand (remove them)."
        )
    missing = sorted(_ASR_FIELDS - set(data) - set(ADDED_FIELDS))
    if missing:
        raise ASRConfigError(
            f"{source} lacks the keys {missing}; peft-asr writes every field, so the file is incomplete or was not "
            "written by peft-asr. Re-save the bank with `save_pretrained`."
        )
    return frozenset(unknown) if newer is not None else frozenset()
