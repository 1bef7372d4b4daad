"""The task bank wrapped around one linear layer: one LoRA subspace (A_t, B_t) per task.

Each task's ``A`` (r x in) and ``B`` (out x r) are separate ``nn.Parameter`` objects, so the optimizer of task ``t``
only ever sees task ``t``'s tensors: old subspaces stay bit-identical, weight decay included.

The layer applies either

* one task to every row: the task pinned by ``use_task`` (``active_task``; ``"__base__"`` is the plain base layer),
  or, in training mode, the task being trained (``trainable_task``; configuration, so gradient-checkpointing
  recomputation outside the forward call sees it too), or
* one task *per row* when the routing pass hands it ``asr_task_ids`` (B,) through a scoped forward pre-hook
  (class 0 = base route: no adapter; class t+1 = ``tasks[t]``). The per-row path (`gathered_delta`) gathers each
  row's A/B from the stacked task matrices and runs two batched matmuls, with no Python loop over tasks and no device
  synchronisation. The stacks are cached while no task's parameters change (in eval the bank is frozen), so a
  routed forward does not copy T * r * (in + out) numbers per layer. `grouped_delta` in ``benchmarks/kernels.py`` (one matmul per
  task present, which needs the host to know the tasks of the batch) is the exact reference it is tested and
  benchmarked against.

A layer that gets none of these (an eval-mode call that bypassed the routing context, e.g. the inner model called
directly) raises instead of silently answering with some task, and a row count it cannot map to the decisions
raises too: the decisions are expanded for beams by the tuner's hand-over hook, never guessed here.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import BASE_ROUTE
from .merging import NOT_PINNED, merge_delta, unmerge_delta

__all__ = ["ASRLayer", "Linear", "gathered_delta"]


def gathered_delta(x: torch.Tensor, task_ids: torch.Tensor, a_all: torch.Tensor, b_all: torch.Tensor,
                   scaling: float) -> torch.Tensor:
    """Per-row LoRA update without a loop over tasks: (B, L, in) -> (B, L, out).

    ``a_all`` (T, r, in) and ``b_all`` (T, out, r) stack every task; row ``i`` uses task ``task_ids[i] - 1``, and rows
    with ``task_ids[i] == 0`` (base route) get a zero update. No host synchronisation.
    """
    index = (task_ids - 1).clamp(min=0)  # (B,) row -> task position; base rows are zeroed below
    a = a_all.index_select(0, index)  # (B, r, in)
    b = b_all.index_select(0, index)  # (B, out, r)
    h = torch.bmm(x.to(a.dtype), a.transpose(1, 2))  # (B, L, in) @ (B, in, r) -> (B, L, r)
    delta = torch.bmm(h, b.transpose(1, 2)) * scaling  # (B, L, r) @ (B, r, out) -> (B, L, out)
    keep = (task_ids > 0).to(delta.dtype).view(-1, 1, 1)  # (B, 1, 1): 0 for the base route
    return delta * keep


class ASRLayer(BaseTunerLayer):
    adapter_layer_names = ("asr_A", "asr_B")
    other_param_names = ("asr_r", "asr_scaling", "asr_dropout")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.asr_A = nn.ModuleDict()  # adapter -> ParameterDict(task -> (r, in))
        self.asr_B = nn.ModuleDict()  # adapter -> ParameterDict(task -> (out, r))
        self.asr_dropout = nn.ModuleDict()
        self.asr_r: dict[str, int] = {}
        self.asr_scaling: dict[str, float] = {}
        # Which task a layer applies when no per-row routing is handed in: configuration set by ASRModel (the task
        # pinned by `use_task`, BASE_ROUTE for the base model; in training mode the task being trained), like PEFT's
        # active adapter. Never per-call state.
        self.active_task: Optional[str] = None
        self.trainable_task: Optional[str] = None
        self._merged_task: Optional[str] = None
        self._kept_weight = None  # a quantized base weight as it was before the merge (`merging.KeptWeight`)
        self.merged_adapters: list[str] = []
        self._disable_adapters = False
        self.kwargs = kwargs

        base = self.get_base_layer()
        if isinstance(base, nn.Linear):
            self.in_features, self.out_features = base.in_features, base.out_features
            self.fan_in_fan_out = False
        elif isinstance(base, Conv1D):
            # GPT-2 style projection: weight is (in, out) and forward is x @ W + b
            self.in_features, self.out_features = base.weight.shape
            self.fan_in_fan_out = True
        else:
            raise TypeError(
                f"ASR adapts `torch.nn.Linear` (bitsandbytes 4-bit / 8-bit included) and `transformers` `Conv1D` "
                f"layers only, got {type(base).__name__}; choose other `target_modules`."
            )

    # ------------------------------------------------------------------ creation
    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float, tasks: list[str]) -> None:
        self.asr_r[adapter_name] = r
        self.asr_scaling[adapter_name] = lora_alpha / r
        self.asr_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.asr_A[adapter_name] = nn.ParameterDict()
        self.asr_B[adapter_name] = nn.ParameterDict()
        for task in tasks:
            self.add_task(adapter_name, task)
        self.set_adapter(self.active_adapters)

    def add_task(self, adapter_name: str, task: str) -> None:
        """Create task ``task``'s subspace: A Kaiming-uniform, B zero (the new task starts as the base model)."""
        r = self.asr_r[adapter_name]
        weight = self.get_base_layer().weight
        # float32 adapters on fp16/bf16 bases, as PEFT's autocast_adapter_dtype does
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        if not dtype.is_floating_point:
            dtype = torch.float32
        device = weight.device if weight.device.type != "meta" else torch.device("cpu")
        a = torch.empty(r, self.in_features, dtype=dtype, device=device)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        b = torch.zeros(self.out_features, r, dtype=dtype, device=device)
        self.asr_A[adapter_name][task] = nn.Parameter(a, requires_grad=task == self.trainable_task)
        self.asr_B[adapter_name][task] = nn.Parameter(b, requires_grad=task == self.trainable_task)

    def remove_task(self, adapter_name: str, task: str) -> None:
        del self.asr_A[adapter_name][task]
        del self.asr_B[adapter_name][task]

    # ------------------------------------------------------------------ trainability
    def _freeze_other_tasks(self) -> None:
        for name in self.adapter_layer_names:
            for tasks in getattr(self, name).values():
                for task, param in tasks.items():
                    if task != self.trainable_task:
                        param.requires_grad_(False)

    def set_adapter(self, adapter_names, inference_mode: bool = False) -> None:
        # PEFT marks every parameter of an active adapter trainable; only the task being trained may be.
        super().set_adapter(adapter_names, inference_mode=inference_mode)
        self._freeze_other_tasks()

    def _freeze_non_trainable_peft_weights(self, adapter_names=None) -> None:
        super()._freeze_non_trainable_peft_weights(adapter_names)
        self._freeze_other_tasks()

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        super().set_requires_grad(adapter_names, requires_grad)
        self._freeze_other_tasks()

    # ------------------------------------------------------------------ merging
    def get_delta_weight(self, adapter_name: str, task: str) -> torch.Tensor:
        """``scaling * B @ A`` in the base weight's layout: (out, in), or (in, out) for Conv1D."""
        a = self.asr_A[adapter_name][task]
        b = self.asr_B[adapter_name][task]
        delta = (b @ a) * self.asr_scaling[adapter_name]  # (out, r) @ (r, in) -> (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Merge the pinned task into the base weight (float, or bitsandbytes 4-bit / 8-bit: see ``merging``)."""
        if self.merged:
            return
        task = self.active_task
        if task is None or task == BASE_ROUTE:
            raise ValueError(NOT_PINNED)
        adapter = self.active_adapters[0]
        delta = self.get_delta_weight(adapter, task)
        self._kept_weight = merge_delta(self.get_base_layer(), delta, safe_merge=safe_merge, task=task)
        self._merged_task = task
        self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            return
        adapter = self.merged_adapters.pop()
        delta = self.get_delta_weight(adapter, self._merged_task)
        unmerge_delta(self.get_base_layer(), delta, self._kept_weight)
        self._merged_task = self._kept_weight = None


class Linear(nn.Module, ASRLayer):
    """An ``nn.Linear`` or ``Conv1D`` with one LoRA subspace per task."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float,
                 tasks: list[str], **kwargs: Any) -> None:
        super().__init__()
        ASRLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, tasks)

    def forward(self, x: torch.Tensor, *args: Any, asr_task_ids: Optional[torch.Tensor] = None, **kwargs: Any):
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
                result = self.base_layer(x, *args, **kwargs)
            return result
        if self.merged:
            return result
        adapter = self.active_adapters[0] if self.active_adapters else None
        if adapter is None or adapter not in self.asr_A:
            return result
        tasks_a, tasks_b = self.asr_A[adapter], self.asr_B[adapter]
        dropout, scaling = self.asr_dropout[adapter], self.asr_scaling[adapter]
        if asr_task_ids is not None:
            return result + self._routed_delta(x, asr_task_ids, tasks_a, tasks_b, dropout, scaling).to(result.dtype)
        task = self.active_task
        if task is None:
            if not (self.training and self.trainable_task is not None):
                raise RuntimeError(
                    "an ASR layer ran without a routing decision: call the model through its PeftModel "
                    "(`model(...)` / `model.generate(...)`, which route every row), pass `task_names=[...]`, or pin a "
                    "task with `model.use_task(name)`."
                )
            task = self.trainable_task  # a training forward (or its gradient-checkpointing recomputation)
        if task == BASE_ROUTE:
            return result  # base route: the plain base layer
        a, b = tasks_a[task], tasks_b[task]
        h = nn.functional.linear(dropout(x).to(a.dtype), a)  # (..., in) -> (..., r)
        return result + (nn.functional.linear(h, b) * scaling).to(result.dtype)  # (..., r) -> (..., out)

    def _stacks(self, tasks_a: nn.ParameterDict, tasks_b: nn.ParameterDict) -> tuple[torch.Tensor, torch.Tensor]:
        """Every task's A (T, r, in) and B (T, out, r), stacked; cached while the parameters are unchanged.

        The cache key holds each parameter's storage and version counter, so an optimizer step, a reload, a new task
        or a move to another device rebuilds it. It is never used when gradients could flow into a subspace.
        """
        params = list(tasks_a.values()) + list(tasks_b.values())
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return torch.stack(list(tasks_a.values())), torch.stack(list(tasks_b.values()))
        key = tuple((p.data_ptr(), p._version, p.dtype) for p in params)
        cached = getattr(self, "_asr_stack_cache", None)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, torch.stack(list(tasks_a.values())), torch.stack(list(tasks_b.values())))
            self._asr_stack_cache = cached  # a plain attribute: not a buffer, never saved
        return cached[1], cached[2]

    def _routed_delta(self, x, task_ids, tasks_a, tasks_b, dropout, scaling) -> torch.Tensor:
        """Per-row LoRA update: row i uses class ``task_ids[i]`` (0 = no adapter, t+1 = t-th task)."""
        squeeze = x.dim() == 2
        if squeeze:
            x = x.unsqueeze(1)  # (B, in) -> (B, 1, in)
        if x.shape[0] != task_ids.shape[0]:
            raise RuntimeError(
                f"the routed call has {task_ids.shape[0]} routing decisions but an adapted layer received "
                f"{x.shape[0]} rows; pass one `task_names` entry per row, or call the model on the batch that was routed."
            )
        a_all, b_all = self._stacks(tasks_a, tasks_b)
        delta = gathered_delta(dropout(x), task_ids, a_all, b_all, scaling)
        return delta.squeeze(1) if squeeze else delta

    def __repr__(self) -> str:
        return "asr." + super().__repr__()
