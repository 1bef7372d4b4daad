"""The task bank wrapped around one linear layer: one LoRA subspace (A_t, B_t) per task.

Each task's ``A`` (r x in) and ``B`` (out x r) are separate ``nn.Parameter`` objects, so the optimizer of task ``t``
only ever sees task ``t``'s tensors: old subspaces stay bit-identical, weight decay included.

The layer applies either

* one task to every row: the task pinned by ``use_task`` (``active_task``; ``"__base__"`` is the plain base layer),
  or, in training mode, the task being trained (``trainable_task``; configuration, so gradient-checkpointing
  recomputation outside the forward call sees it too), or
* one task *per row* when the routing pass hands it ``asr_task_ids`` (B,) through a scoped forward pre-hook
  (class 0 = base route: no adapter; class t+1 = ``tasks[t]``). The per-row path gathers each row's A/B from the
  stacked task matrices (`gather_rows`) and runs two batched matmuls, the second one adding into the base output, with
  no Python loop over tasks and no device synchronisation. The stacks are kept while no task's parameters change (in
  eval the bank is frozen), so a routed forward does not copy T * r * (in + out) numbers per layer; that copy of the
  bank can be switched off (`ASRModel.set_task_stack_cache(False)`, cost in docs/performance.md). Inside one
  ``generate`` the rows' gathered A/B of the first forward serve every later step (the routing hook hands over a
  per-call dict), so a decode step runs two matmuls per adapted layer and gathers nothing. `grouped_delta` in
  ``benchmarks/kernels.py`` (one matmul per task present, which needs the host to know the tasks of the batch) is the
  exact reference it is tested and benchmarked against.

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

__all__ = ["ASRLayer", "Linear", "gather_rows", "gathered_delta"]


def gather_rows(task_ids: torch.Tensor, a_all: torch.Tensor, b_all: torch.Tensor,
                scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``A^T`` (B, in, r) and ``scaling * B^T`` (B, r, out), gathered from the stacks of every task.

    ``a_all`` (T, r, in) and ``b_all`` (T, out, r) stack every task; row ``i`` uses task ``task_ids[i] - 1``, and rows
    with ``task_ids[i] == 0`` (base route) get a zero ``B``, so their update is zero. No host synchronisation.
    """
    index = (task_ids - 1).clamp(min=0)  # (B,) row -> task position; base rows are zeroed below
    keep = (task_ids > 0).to(b_all.dtype).mul_(scaling).view(-1, 1, 1)  # (B, 1, 1): scaling, 0 for the base route
    a = a_all.index_select(0, index).transpose(1, 2)  # (T, r, in) -> (B, r, in) -> (B, in, r)
    b = (b_all.index_select(0, index) * keep).transpose(1, 2)  # (T, out, r) -> (B, out, r) -> (B, r, out)
    return a, b


def gathered_delta(x: torch.Tensor, task_ids: torch.Tensor, a_all: torch.Tensor, b_all: torch.Tensor,
                   scaling: float) -> torch.Tensor:
    """Per-row LoRA update without a loop over tasks: (B, L, in) -> (B, L, out) (rows as in :func:`gather_rows`)."""
    a, b = gather_rows(task_ids, a_all, b_all, scaling)
    return torch.bmm(torch.bmm(x.to(a.dtype), a), b)  # (B, L, in) @ (B, in, r) @ (B, r, out) -> (B, L, out)


def _add_rows(result: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``result + (x @ a) @ b`` per row, the second product written into the sum (one kernel, one output)."""
    h = torch.bmm(x.to(a.dtype), a)  # (B, L, in) @ (B, in, r) -> (B, L, r)
    if result.dtype == b.dtype:
        return torch.baddbmm(result, h, b)  # (B, L, out) + (B, L, r) @ (B, r, out)
    return result + torch.bmm(h, b).to(result.dtype)


_PACKAGE_KERNEL = gathered_delta  # `benchmarks/kernels.use_grouped` swaps the module's `gathered_delta` for a reference


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
        self.cache_stacks = True  # keep the task stacks between routed calls (`ASRModel.set_task_stack_cache`)
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

    def forward(self, x: torch.Tensor, *args: Any, asr_task_ids: Optional[torch.Tensor] = None,
                asr_gathered: Optional[dict] = None, **kwargs: Any):
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
        if asr_task_ids is not None:
            return self._routed(x, result, asr_task_ids, asr_gathered, adapter)
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
        a, b = self.asr_A[adapter][task], self.asr_B[adapter][task]
        h = nn.functional.linear(self.asr_dropout[adapter](x).to(a.dtype), a)  # (..., in) -> (..., r)
        return result + (nn.functional.linear(h, b) * self.asr_scaling[adapter]).to(result.dtype)  # -> (..., out)

    def _stacks(self, tasks_a: nn.ParameterDict, tasks_b: nn.ParameterDict) -> tuple[torch.Tensor, torch.Tensor]:
        """Every task's A (T, r, in) and B (T, out, r), stacked; kept while the parameters are unchanged, unless
        ``cache_stacks`` is off (``ASRModel.set_task_stack_cache``: then stacked afresh at every call, no copy kept).

        The cache key holds each parameter's storage and version counter, so an optimizer step, a reload, a new task
        or a move to another device rebuilds it. It is never used when gradients could flow into a subspace.
        """
        params = list(tasks_a.values()) + list(tasks_b.values())
        if not self.cache_stacks or (torch.is_grad_enabled() and any(p.requires_grad for p in params)):
            self._asr_stack_cache = None
            return torch.stack(list(tasks_a.values())), torch.stack(list(tasks_b.values()))
        key = tuple((p.data_ptr(), p._version, p.dtype) for p in params)
        cached = getattr(self, "_asr_stack_cache", None)
        if cached is None or cached[0] != key:
            self._asr_stack_cache = None  # the old copy goes before the new one is made
            with torch.no_grad():
                cached = (key, torch.stack(list(tasks_a.values())), torch.stack(list(tasks_b.values())))
            self._asr_stack_cache = cached  # a plain attribute: not a buffer, never saved
        return cached[1], cached[2]

    def _routed(self, x: torch.Tensor, result: torch.Tensor, task_ids: torch.Tensor, gathered: Optional[dict],
                adapter: str) -> torch.Tensor:
        """``result`` plus the per-row LoRA update: row i uses class ``task_ids[i]`` (0 = no adapter, t+1 = t-th task).

        ``gathered`` is one ``generate`` call's dict (handed over by the routing hook): the decisions and the bank are
        fixed for the call, so the rows' gathered A/B of its first forward serve every later step of it.
        """
        squeeze = x.dim() == 2
        if squeeze:
            x, result = x.unsqueeze(1), result.unsqueeze(1)  # (B, in) -> (B, 1, in)
        if x.shape[0] != task_ids.shape[0]:
            raise RuntimeError(
                f"the routed call has {task_ids.shape[0]} routing decisions but an adapted layer received "
                f"{x.shape[0]} rows; pass one `task_names` entry per row, or call the model on the batch that was routed."
            )
        x = self.asr_dropout[adapter](x)
        tasks_a, tasks_b, scaling = self.asr_A[adapter], self.asr_B[adapter], self.asr_scaling[adapter]
        if gathered_delta is not _PACKAGE_KERNEL:  # a reference kernel swapped in (benchmarks/kernels.use_grouped)
            out = result + gathered_delta(x, task_ids, *self._stacks(tasks_a, tasks_b), scaling).to(result.dtype)
            return out.squeeze(1) if squeeze else out
        kept = gathered.get(self) if gathered is not None else None
        if kept is not None and kept[0] is task_ids:
            a, b = kept[1], kept[2]  # a later step of the same `generate`: same rows, same decisions, same bank
        else:
            a, b = gather_rows(task_ids, *self._stacks(tasks_a, tasks_b), scaling)  # (B, in, r), (B, r, out)
            if gathered is not None:
                gathered[self] = (task_ids, a, b)
        out = _add_rows(result, x, a, b)
        return out.squeeze(1) if squeeze else out

    def __repr__(self) -> str:
        return "asr." + super().__repr__()
