"""Router features harvested from training itself, so fitting the router after a task needs no second pass.

The blocks below ``router_layer`` carry no adapter and are frozen, so during a training forward of the task being
trained, the hidden state entering the router block is the hidden state the router's own pass
(:meth:`~peft_asr.tuner.shallow.RouterFeaturesMixin.router_features`) would compute for the same rows, provided that
nothing in those blocks behaves differently in training mode and the positions are the router's. A one-shot forward
pre-hook on the router block pools it there (the same final norm, prompt rule and pooling, no gradient) and adds the
pooled rows to pending statistics of that task. ``fit_router(..., harvest=h)`` then runs the shallow pass only on
the rows the harvest lacks and adds the pending statistics: the same router as the separate pass, to the round-off of
the batch shapes (both are float64 sums of the same float32/bf16 rows).

Each row is counted once. A row is known by a key: a hash of its real token ids and of which of them are the prompt
(:func:`row_keys`). The harvest takes a row only when its key is still owed by the rows ``fit_router`` will read
(``expected``, counted with multiplicity before training starts), so several epochs, a sampler that repeats rows, a
``max_steps`` that stops mid-epoch or a dropped last batch never count a row twice or skip one: whatever training
did not see runs through the separate pass. Resuming from a checkpoint restores the pending statistics saved in it
(:meth:`FeatureHarvest.state_dict`); without them, the rows trained before the checkpoint simply run the separate pass.

The harvest stays off, and every row runs the separate pass, for a model whose training mode differs from its eval
mode below the router block (dropout or jitter there), an encoder-decoder model, and the calls where a training
forward's features would differ from the router's: autocast, ``inputs_embeds``, packed rows, explicit positions other
than the mask's, or padding before real tokens (:func:`harvest_blocker`, :func:`call_blocker`). ``skipped`` counts
those calls by reason.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections import Counter
from typing import Any, Iterable, Iterator, Mapping, Optional

import torch
from torch import nn

from .call_inputs import bind_inputs, hidden_from_call
from .features import is_packed, positions_from_mask, prompt_mask

__all__ = ["FeatureHarvest", "HarvestMixin", "row_keys", "harvest_blocker", "call_blocker", "HarvestMismatch"]

_NOISY_CONFIG = ("dropout", "pdrop", "jitter")  # config fields of train-mode randomness (attention_dropout, ...)


class HarvestMismatch(RuntimeError):
    """The harvested rows are not all among the rows ``fit_router`` read: the harvest cannot be used."""


def row_keys(batch: Mapping[str, Any]) -> Optional[list[bytes]]:
    """One key per row of a collated batch (its real token ids and its prompt positions, hashed), or ``None`` for a
    batch whose rows have no key (``inputs_embeds``, packed rows). One host read of the batch."""
    ids = batch.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or is_packed(batch):
        return None
    mask = batch.get("attention_mask")
    real = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else torch.ones_like(ids, dtype=torch.bool)
    prompt = prompt_mask(real.long(), batch.get("labels"), batch.get("prompt_mask"), shape=tuple(ids.shape))
    ids, real, prompt = ids.detach().cpu().long(), real.cpu(), prompt.cpu()
    keys = []
    for row in range(ids.shape[0]):
        digest = hashlib.blake2b(digest_size=16)
        digest.update(ids[row][real[row]].numpy().tobytes())
        digest.update(prompt[row][real[row]].numpy().tobytes())
        keys.append(digest.digest())
    return keys


def harvest_blocker(tuner) -> Optional[str]:
    """Why a training forward of this model cannot give the router's features (None: it can)."""
    config = getattr(tuner.model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return "an encoder-decoder model"
    if not tuner._positions_from_mask():
        return "not a decoder-only model that generates"
    for name, value in sorted((config.to_dict() if config is not None else {}).items()):
        if (any(word in name for word in _NOISY_CONFIG) and isinstance(value, (int, float))
                and not isinstance(value, bool) and value > 0):
            return f"the model config sets {name}={value} (train-mode randomness before the router block)"
    deep = {id(m) for block in _deep_blocks(tuner) for m in block.modules()}
    for name, module in tuner.model.named_modules():
        if id(module) not in deep and isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            return f"`{name}` is a dropout with p={module.p} outside the adapted blocks"
    return None


def _deep_blocks(tuner) -> Iterator[nn.Module]:
    blocks = tuner.model.get_submodule(tuner._blocks_name)
    yield from list(blocks)[tuner.bank_config.router_layer:]


def call_blocker(tuner, inputs: Mapping[str, Any], hidden: torch.Tensor) -> Optional[str]:
    """Why this training forward's hidden state is not the router's feature of its rows (None: it is). One host
    read of the mask (and of the positions, when given)."""
    if torch.is_autocast_enabled(hidden.device.type):
        return "autocast"
    ids = inputs.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or inputs.get("inputs_embeds") is not None:
        return "no input_ids"
    if inputs.get("cu_seq_lens_q") is not None or is_packed(inputs):
        return "packed rows"
    mask = inputs.get("attention_mask")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2):
        return "not a 2-D attention mask"
    real = mask.long() if mask is not None else torch.ones_like(ids)
    router_positions = positions_from_mask(real)
    positions = inputs.get("position_ids")
    if positions is None:  # the model counts positions from the row's start
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    if not bool(((positions.to(real.device) == router_positions) | (real == 0)).all()):
        return "positions differ from the attention mask's (padding before real tokens)"
    return None


class FeatureHarvest:
    """Pending router statistics of one task, pooled from its training forwards (see the module docstring).

    ``expected``: key -> how many rows with that key ``fit_router`` will read (``None``: any row, once per key).
    """

    def __init__(self, task: str, router, pooling: str, expected: Optional[Counter] = None,
                 blocker: Optional[str] = None) -> None:
        self.task = task
        self.pooling = pooling
        self.blocker = blocker
        self.expected = expected
        self.taken: Counter = Counter()  # key -> rows of that key in the statistics
        self.skipped: Counter = Counter()  # reason -> training forwards not harvested
        self.seconds = 0.0  # wall time spent pooling in training forwards
        f64 = dict(dtype=torch.float64, device=router.weight.device)
        self.gram = torch.zeros(router.dim, router.dim, **f64)  # sum phi^T phi over the taken rows
        self.feature_sum = torch.zeros(router.dim, **f64)  # sum phi
        self._router_key = _router_key(router)

    @property
    def rows(self) -> int:
        return sum(self.taken.values())

    def _owed(self, key: bytes) -> bool:
        limit = 1 if self.expected is None else self.expected.get(key, 0)
        return self.taken[key] < limit

    def add(self, pooled: torch.Tensor, keys: list[bytes], router) -> int:
        """Fold the rows still owed into the statistics; returns how many. One host read (finite rows)."""
        finite = torch.isfinite(pooled).all(dim=1).tolist()  # a row with no prompt token pools to NaN: not taken
        rows = []
        for i, key in enumerate(keys):
            if finite[i] and self._owed(key):
                self.taken[key] += 1
                rows.append(i)
        if rows:
            phi = router.expand(pooled[rows])  # (n, E) float64
            self.gram.addmm_(phi.T, phi)
            self.feature_sum += phi.sum(dim=0)
        return len(rows)

    def check_router(self, router, pooling: str) -> None:
        if _router_key(router) != self._router_key or pooling != self.pooling:
            raise HarvestMismatch("the router's features changed since the harvest began (another width or "
                                  "expansion, or another pooling); fit without it.")

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Everything needed to continue the harvest after a restart (tensors and plain values)."""
        return {"task": self.task, "pooling": self.pooling, "router": list(self._router_key),
                "taken": {k.hex(): n for k, n in self.taken.items()}, "gram": self.gram.cpu(),
                "feature_sum": self.feature_sum.cpu()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; raises ``HarvestMismatch`` when it belongs to another task, router or rows."""
        if (state.get("task") != self.task or state.get("pooling") != self.pooling
                or tuple(state.get("router", ())) != self._router_key):
            raise HarvestMismatch("the saved harvest belongs to another task or router")
        taken = Counter({bytes.fromhex(k): int(n) for k, n in state["taken"].items()})
        if self.expected is not None and any(n > self.expected.get(k, 0) for k, n in taken.items()):
            raise HarvestMismatch("the saved harvest holds rows the training data does not have")
        if tuple(state["gram"].shape) != tuple(self.gram.shape):
            raise HarvestMismatch("the saved harvest has another feature width")
        self.taken = taken
        self.gram = state["gram"].to(self.gram)
        self.feature_sum = state["feature_sum"].to(self.feature_sum)


def _router_key(router) -> tuple:
    return (router.in_features, router.dim, router.feature_dim is not None, router.activation, router.seed)


def expected_keys(batches: Iterable[Mapping[str, Any]]) -> Optional[Counter]:
    """The keys of every row of ``batches`` with multiplicity, or ``None`` when some batch has rows without keys."""
    counts: Counter = Counter()
    for batch in batches:
        keys = row_keys(batch)
        if keys is None:
            return None
        counts.update(keys)
    return counts


class HarvestMixin:
    """The harvest's side of `ASRModel`: start and stop it, and pool in a training forward while it runs."""

    def start_router_harvest(self, expected_batches: Optional[Iterable[Mapping[str, Any]]] = None) -> FeatureHarvest:
        """Begin pooling the router features of the task being trained from its training forwards.

        ``expected_batches``: the batches ``fit_router`` will read afterwards (for a Trainer, the train dataset in
        order; ``ASRCallback`` passes them), so that only their rows are taken, each as often as it occurs there.
        Without them every distinct row is taken once, and ``fit_router`` refuses the harvest if it saw a row the
        batches lack. Returns the harvest to pass as ``fit_router(..., harvest=...)``; when the model cannot be
        harvested (``harvest.blocker`` says why) it takes nothing and ``fit_router`` runs the separate pass.
        """
        task = self.training_task
        if task is None:
            raise RuntimeError("no task is being trained: call `add_task(name)` before starting a router harvest.")
        blocker = harvest_blocker(self)
        expected = None
        if blocker is None and expected_batches is not None:
            expected = expected_keys(expected_batches)
            if expected is None:
                blocker = "the rows have no keys (inputs_embeds or packed rows)"
        self._harvest = FeatureHarvest(task, self.router, self.bank_config.router_pooling, expected, blocker)
        return self._harvest

    def stop_router_harvest(self) -> Optional[FeatureHarvest]:
        """Stop pooling in training forwards; returns the harvest (or ``None`` when none ran)."""
        harvest, self._harvest = getattr(self, "_harvest", None), None
        return harvest

    @contextlib.contextmanager
    def _harvest_scope(self) -> Iterator[None]:
        """Around a forward that applies the layers' own task: when it is a training forward of the task being
        harvested, a one-shot pre-hook on the router block pools the rows into the harvest."""
        harvest = getattr(self, "_harvest", None)
        pinned = self._pinned[-1] if self._pinned else None
        if (harvest is None or harvest.blocker is not None or not self.model.training or self._generating
                or harvest.task != self.training_task or pinned not in (None, harvest.task)):
            yield
            return
        seen: dict = {}

        def capture(module, args, kwargs):
            seen.setdefault("inputs", bind_inputs(module, args, kwargs))

        def take(_module, args, kwargs):
            handles[1].remove()  # once per call
            start = time.perf_counter()
            inputs, hidden = seen.get("inputs", {}), hidden_from_call(args, kwargs)
            reason = call_blocker(self, inputs, hidden)
            if reason is not None:
                harvest.skipped[reason] += 1
            else:
                with torch.no_grad():
                    pooled = self._pool(hidden.detach(), inputs, strict=False)  # (B, E_in) float64
                harvest.add(pooled, row_keys(inputs), self.router)
            harvest.seconds += time.perf_counter() - start

        handles = [self._feature_module().register_forward_pre_hook(capture, with_kwargs=True),
                   self._router_block().register_forward_pre_hook(take, with_kwargs=True)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
