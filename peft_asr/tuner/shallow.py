"""The router's side of `ASRModel`: the pass over the blocks below ``router_layer`` that gives a row's pooled
features (``router_features``), folding them into the router (``fit_router``) and the decisions on a batch
(``route``, ``route_scores``).

Flow of ``fit_router``: for every batch, check it; split packed rows into examples; derive ``position_ids`` from
the mask (decoder-only models, as ``generate`` does); run the model with a pre-hook on block ``router_layer`` that
takes the hidden state, applies the final norm, pools over the prompt (:func:`peft_asr.tuner.features.prompt_mask`)
and stops the forward (the deep blocks never run); add the pooled rows to the router's statistics. All or nothing:
a failure halfway restores the router.
"""

from __future__ import annotations

import contextlib
import inspect
from collections import Counter
from typing import Any, Iterable, Iterator, Mapping, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .call_inputs import hidden_from_call
from .config import BASE_ROUTE
from .features import is_packed, pool, positions_from_mask, prompt_mask, unpack_rows
from .harvest import HarvestMismatch, row_keys
from .router import BASE_CLASS
from .validation import check_batch, check_batches, check_features

__all__ = ["RouterFeaturesMixin", "feature_pass", "pool_prompt", "derives_positions"]


class _StopForward(Exception):
    """Raised by the feature hook to end a forward pass after the shallow blocks (the deep ones never run)."""


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def pool_prompt(hidden: torch.Tensor, inputs: Mapping[str, Any], final_norm: nn.Module,
                strict: bool = True, pooling: str = "mean") -> torch.Tensor:
    """Router input from the hidden state entering the router block: (B, L, d) -> (B, d) float64, or (B, 2d) with
    ``pooling="mean_last"`` (:func:`peft_asr.tuner.features.pool`).

    ``final_norm`` is applied slice by slice inside the pooling (no normed copy of the whole state). ``strict=False``
    (the routed forward path): no host sync; a row with no prompt token pools to NaN and is routed to the base model.
    The prompt rule is :func:`peft_asr.tuner.features.prompt_mask`'s.
    """
    mask = prompt_mask(
        inputs.get("attention_mask"),
        inputs.get("labels"),
        inputs.get("prompt_mask"),
        shape=tuple(hidden.shape[:2]),
    )
    with torch.no_grad():
        return pool(hidden, mask.to(hidden.device), pooling, strict=strict, transform=final_norm)


def derives_positions(model_config: Any, generates: bool, feature_module: nn.Module) -> bool:
    """Whether routing derives ``position_ids`` from the attention mask: decoder-only models that generate
    (``generate`` derives them so); encoders (BERT, RoBERTa's padding-aware positions, T5's encoder) keep their own
    defaults, which is what their routed forward runs with too."""
    return (not getattr(model_config, "is_encoder_decoder", False) and generates
            and "position_ids" in inspect.signature(feature_module.forward).parameters)


def feature_pass(feature_module: nn.Module, router_block: nn.Module, final_norm: nn.Module, model_config: Any,
                 batch: Mapping[str, Any], *, derive_positions: bool,
                 vocab_size: Optional[int] = None, pooling: str = "mean") -> torch.Tensor:
    """Pooled router inputs (B, d) of a batch: one no-grad, eval-mode call of ``feature_module`` that a pre-hook on
    ``router_block`` ends, so only the blocks before it run (the pass of :meth:`RouterFeaturesMixin.router_features`,
    for any modules: ``peft_asr.ShallowRouter`` runs it on a model cut below ``router_layer``).

    Args:
        feature_module: the module whose forward takes the batch (the model; the encoder of a seq2seq model).
        router_block: the module that receives the hidden state the router reads (block ``router_layer``, or the
            final norm of a model that ends below it).
        final_norm: the model's final norm, applied to that state before pooling (``nn.Identity()`` for none).
        model_config: the model's HF config (``pad_token_id`` for packed rows, ``is_encoder_decoder``).
        batch: as :meth:`RouterFeaturesMixin.router_features` takes it.
        derive_positions: derive ``position_ids`` from the attention mask (:func:`derives_positions`).
        vocab_size: checks ``input_ids`` against it.
        pooling: the config's ``router_pooling``.
    """
    check_batch(batch, vocab_size)
    device = next(feature_module.parameters()).device
    tensors = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if is_packed(tensors):
        tensors = unpack_rows(tensors, getattr(model_config, "pad_token_id", None))  # (B, L) -> (examples, length)
    if getattr(model_config, "is_encoder_decoder", False):
        tensors.pop("labels", None)  # decoder targets: they say nothing about which encoder tokens are the prompt
    captured: dict[str, torch.Tensor] = {}

    def hook(_module, args, kwargs):
        handle.remove()  # once: the router block may be the final norm itself, which the pooling calls
        captured["pooled"] = pool_prompt(hidden_from_call(args, kwargs), tensors, final_norm, pooling=pooling)
        raise _StopForward

    call = {k: tensors[k] for k in ("input_ids", "inputs_embeds", "attention_mask", "position_ids", "token_type_ids")
            if tensors.get(k) is not None}
    if "position_ids" not in call and "attention_mask" in call and derive_positions:
        call["position_ids"] = positions_from_mask(call["attention_mask"])  # as `generate` derives them
    handle = router_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad(), _eval_mode(feature_module):
            feature_module(**call)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if "pooled" not in captured:
        raise RuntimeError("the router block was never reached; is `layers_pattern` pointing at the right blocks?")
    return captured["pooled"]


def _check_harvest(harvest, task: Optional[str], tuner) -> None:
    if harvest.task != task:
        raise ValueError(f"the harvest is of task {harvest.task!r}, not of {task!r}; pass the harvest of this task.")
    harvest.check_router(tuner.router, tuner.bank_config.router_pooling)


def _rows_not_harvested(batch: Mapping[str, Any], harvest, used: Counter) -> Optional[Mapping[str, Any]]:
    """``batch`` without the rows the harvest holds (counted in ``used``); ``None`` when it holds them all."""
    if harvest is None or not harvest.rows:
        return batch
    check_batch(batch)
    keys = row_keys(batch)
    if keys is None:
        return batch
    keep = []
    for i, key in enumerate(keys):
        if used[key] < harvest.taken[key]:
            used[key] += 1
        else:
            keep.append(i)
    if not keep:
        return None
    if len(keep) == len(keys):
        return batch
    rows = len(keys)
    index = torch.tensor(keep)
    return {k: v[index.to(v.device)] if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == rows else v
            for k, v in batch.items()}


class RouterFeaturesMixin:
    """Router features, router fitting and routing decisions of `ASRModel` (which provides ``model``, ``router``,
    ``bank_config``, ``tasks``, ``_router_block``, ``_final_norm``, ``_feature_module``, ``_device``,
    ``_check_task``)."""

    def _pool(self, hidden: torch.Tensor, inputs: Mapping[str, Any], strict: bool = True) -> torch.Tensor:
        """Router input from the hidden state entering the router block: (B, L, d) -> (B, d) float64
        (:func:`pool_prompt` with the model's final norm)."""
        return pool_prompt(hidden, inputs, self._final_norm(), strict=strict, pooling=self.bank_config.router_pooling)

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
        """Whether routing derives ``position_ids`` from the attention mask (:func:`derives_positions`)."""
        if not hasattr(self, "_positions_from_mask_found"):
            can_generate = getattr(self.model, "can_generate", None)
            self._positions_from_mask_found = derives_positions(
                getattr(self.model, "config", None), callable(can_generate) and can_generate(), self._feature_module()
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
        return feature_pass(self._feature_module(), self._router_block(), self._final_norm(),
                            getattr(self.model, "config", None), batch, derive_positions=self._positions_from_mask(),
                            vocab_size=getattr(embeddings, "num_embeddings", None),
                            pooling=self.bank_config.router_pooling)

    def fit_router(
        self,
        batches: Iterable[Mapping[str, Any]],
        task: Optional[str],
        *,
        progress: bool = True,
        reduce_sum=None,
        harvest=None,
    ) -> "RouterFeaturesMixin":
        """Add the prompts of ``batches`` to the router statistics of ``task`` and mark the router for re-solving.

        Args:
            batches: iterable of collated batches (dicts with ``input_ids``, ``attention_mask`` and ``labels`` where
                -100 marks prompt tokens, or ``prompt_mask``; without either, every real token counts as prompt).
            task: a task of the bank, or ``None`` / ``"__base__"`` for the general route (rows routed there are
                answered by the plain base model).
            progress: show a progress bar.
            reduce_sum: in distributed runs, a function summing a tensor over processes; the statistics added by
                this call are summed so every process holds the same router.
            harvest: a :class:`~peft_asr.tuner.harvest.FeatureHarvest` of this task's training
                (:meth:`start_router_harvest`): its rows are added from the features pooled during training, and
                only the rows it lacks run the shallow pass. Raises ``HarvestMismatch`` (the router unchanged) when
                it holds a row ``batches`` lack.

        Only the blocks below ``router_layer`` run (no gradients). Returns ``self``.
        """
        if task is not None and not isinstance(task, str):
            raise TypeError(f"`task` must be a task name (str) or None for the base route, got {type(task).__name__}.")
        check_batches(batches)
        label = BASE_CLASS if task in (None, BASE_ROUTE) else self.bank_config.tasks.index(self._check_task(task)) + 1
        router = self.router
        if harvest is not None:
            _check_harvest(harvest, task, self)
        used: Counter = Counter()  # key -> rows of that key already taken from the harvest
        before = router.snapshot(classes=[label])  # all or nothing: a bad batch halfway leaves the router as it was
        seen = 0
        try:
            for batch in tqdm(batches, desc=f"router fit [{task or BASE_ROUTE}]", disable=not progress, leave=False):
                batch = _rows_not_harvested(batch, harvest, used)
                if batch is None:
                    continue  # every row of the batch is in the harvest
                pooled = self.router_features(batch)
                check_features(pooled)
                router.partial_fit(pooled, label)
                seen += pooled.shape[0]
            if harvest is not None and harvest.rows:
                if used != harvest.taken:
                    raise HarvestMismatch(
                        f"the harvest of task {task!r} holds {harvest.rows - sum(used.values())} rows that the batches "
                        "passed to `fit_router` lack (another dataset, or rows changed by the collator at random), "
                        "so its statistics cannot be used; fit without `harvest`."
                    )
                router.add_statistics(label, harvest.gram, harvest.feature_sum, harvest.rows)
                seen += harvest.rows
            if reduce_sum is not None:
                router.all_reduce_statistics(reduce_sum, before)
            elif seen == 0:
                raise ValueError(f"`fit_router` got no batches for task {task!r}; pass the task's (prompt) batches.")
        except BaseException:
            router.restore(before)
            raise
        return self

    def calibrate_base_route(self, batches: Iterable[Mapping[str, Any]], false_positive_rate: float = 0.005, *,
                             progress: bool = True) -> float:
        """Send prompts unlike every task to the plain base model, at a false-positive rate you choose.

        ``batches``: held-out prompts of the bank's tasks (not the ones the router was fitted on; any mix of tasks,
        collated as for :meth:`fit_router`). The threshold on the distance to the nearest task is set so that a
        share ``false_positive_rate`` of such prompts would go to the base model (split conformal: needs at least
        ``1 / false_positive_rate`` prompts); prompts farther from every task than that go there. It is saved with
        the bank and applies until the router statistics change (a task fitted or removed, a merge): then it is not
        applied, with a warning, until calibrated again. Needs ``router_head="lda"``. Returns the threshold.
        """
        if self.router.head != "lda":
            raise ValueError("the calibrated base route needs `router_head='lda'` (a distance to the tasks); the "
                             "ridge head has `confidence_threshold` instead.")
        check_batches(batches)
        self.router.solve()
        distances = []
        for batch in tqdm(batches, desc="base-route calibration", disable=not progress, leave=False):
            pooled = self.router_features(batch)
            check_features(pooled)
            distances.append(self.router.distance(pooled).cpu())
        if not distances:
            raise ValueError("`calibrate_base_route` got no batches; pass held-out prompts of the bank's tasks.")
        return self.router.calibrate(torch.cat(distances), false_positive_rate)

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
