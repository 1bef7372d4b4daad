"""`ASRConfig`: the configuration of an Analytic Subspace Routing (Any-SSR) bank."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig

from ._registry import ASR_PEFT_TYPE

__all__ = ["ASRConfig", "BASE_ROUTE", "validate_task_name", "FORMAT_VERSION"]

BASE_ROUTE = "__base__"  # reserved name of the general route (rows answered by the plain base model)
FORMAT_VERSION = 1  # version of the bank layout on disk; a bank with a newer version is refused with a clear error
_TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$")


def validate_task_name(name: object, existing: list[str]) -> str:
    """Check a new task name; returns it. Names become state-dict keys, hence the restricted alphabet."""
    if not isinstance(name, str):
        raise TypeError(f"task name must be a str, got {type(name).__name__} ({name!r}).")
    if name == BASE_ROUTE:
        raise ValueError(f"task name {BASE_ROUTE!r} is reserved for the base route (general data).")
    if not _TASK_NAME.match(name):
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
        router_seed (`int`, *optional*, defaults to `0`):
            Seed of the random expansion; banks merged together must share it.
        confidence_threshold (`float`, *optional*, defaults to `None`):
            Rows whose best task score is below this are answered by the plain base model. Ridge scores are about 1
            for a prompt like the training prompts and near 0 for unrelated ones; 0.5 is a reasonable start.
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
        super().__post_init__()
        self.peft_type = ASR_PEFT_TYPE
        self._check_int("r", self.r, minimum=1)
        if not isinstance(self.lora_alpha, (int, float)) or isinstance(self.lora_alpha, bool) or self.lora_alpha <= 0:
            raise ValueError(f"`lora_alpha` must be a positive number, got {self.lora_alpha!r}.")
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"`lora_dropout` must be in [0, 1), got {self.lora_dropout!r}.")
        self._check_int("router_layer", self.router_layer, minimum=0)
        if self.feature_dim is not None:
            self._check_int("feature_dim", self.feature_dim, minimum=1)
        if self.activation not in ("none", "relu"):
            raise ValueError(f"`activation` must be 'none' or 'relu', got {self.activation!r}.")
        if isinstance(self.ridge, bool) or not isinstance(self.ridge, (int, float)) or not self.ridge > 0:
            raise ValueError(f"`ridge` must be a number > 0, got {self.ridge!r}; try 1.0.")
        self._check_int("router_seed", self.router_seed, minimum=0)
        if self.confidence_threshold is not None and (
            isinstance(self.confidence_threshold, bool) or not isinstance(self.confidence_threshold, (int, float))
        ):
            raise ValueError(f"`confidence_threshold` must be a number or None, got {self.confidence_threshold!r}.")
        if not isinstance(self.tasks, list):
            raise TypeError(f"`tasks` must be a list of task names, got {type(self.tasks).__name__}.")
        seen: list[str] = []
        for name in self.tasks:
            seen.append(validate_task_name(name, seen))
        self._check_int("format_version", self.format_version, minimum=1)
        if self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"this bank uses format version {self.format_version}, but this peft-asr reads up to version "
                f"{FORMAT_VERSION}; upgrade peft-asr (`pip install -U peft-asr`)."
            )
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)

    @staticmethod
    def _check_int(name: str, value: object, minimum: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)
