"""The analytic router of Analytic Subspace Routing: a classifier solved in closed form from sufficient statistics,
either the paper's ridge regression (``head="ridge"``) or a shrunk shared-covariance discriminant (``head="lda"``).

Input: one pooled hidden state per sequence (see :mod:`peft_asr.tuner.features`). Feature map:
``phi = act(h @ P)`` with a fixed, seeded random projection ``P`` (d x E), or ``phi = h`` when no expansion is
configured. Output: one score per class; class 0 is the *base* route (the plain base model, fed with general data),
classes 1..T are the tasks in the order they were added.

State, all float64 whatever the model dtype (``.half()`` or ``.to(torch.bfloat16)`` on the model moves it between
devices but never changes its dtype):

* ``weight`` (E x K) and ``class_counts`` (K,): the solved router; saved with the bank. The ``lda`` head also saves
  ``bias`` (K,), ``precision`` (E x E, for distances) and the calibrated base route (``ood_threshold``, ``ood_counts``,
  :mod:`peft_asr.tuner.base_route`).
* ``class_gram`` (K x E x E, or 1 x E x E when ``per_class_statistics`` is off), ``cross`` (E x K): the sufficient
  statistics of :mod:`peft_asr.tuner.rls`, with the Gram matrix kept per class so that a class can be removed exactly
  (``G`` is their sum); saved to a separate optional file because they can be large (E=8192 is 512 MiB per class),
  needed only to keep learning or to remove a task.
* ``projection`` (d x E): regenerated from ``seed``; never saved.

``partial_fit`` validates each batch and returns ``self``; ``predict`` before any fit raises. Solving is lazy (the
weight is re-solved when routing or saving next needs it): fitting T tasks costs one factorisation, not T.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from . import rls
from .base_route import BaseRouteMixin

__all__ = ["AnalyticRouter", "BASE_CLASS", "HEADS", "statistics_problem"]

BASE_CLASS = 0  # column of the "general" route that sends a row to the plain base model
HEADS = ("ridge", "lda")  # ridge regression onto one-hot targets (the paper); shared-covariance discriminant
_STATISTICS = ("class_gram", "cross", "class_counts")


def statistics_problem(stats: dict, dim: int, classes: int, per_class: bool) -> Optional[str]:
    """What makes ``stats`` not the statistics of a router with ``dim`` features and ``classes`` classes (a missing
    tensor, a wrong shape or dtype), or None: the one shape rule of the router and of the bank's checks."""
    expected = {"class_gram": (classes if per_class else 1, dim, dim), "cross": (dim, classes),
                "class_counts": (classes,)}
    for name, shape in expected.items():
        tensor = stats.get(name)
        if tensor is None:
            return f"`{name}` is missing"
        if tuple(tensor.shape) != shape or tensor.dtype != torch.float64:
            return f"`{name}` is {tuple(tensor.shape)} {tensor.dtype}, expected {shape} float64"
    return None


class AnalyticRouter(BaseRouteMixin, nn.Module):
    """Task classifier on frozen features (ridge or LDA head), trained task by task without keeping data.

    Args:
        in_features: width ``d`` of the pooled hidden state.
        num_classes: ``K`` = number of tasks + 1 (the base route is class 0).
        feature_dim: ``E``, width of the random expansion; ``None`` keeps the pooled feature as is (``E = d``).
        activation: ``"relu"`` or ``"none"``, applied after the expansion.
        ridge: ``lambda`` of eq. (1) in :mod:`peft_asr.tuner.rls`.
        seed: seed of the projection ``P``.
        confidence_threshold: rows whose best task score is below this go to the base route; ``None`` disables it.
        per_class_statistics: keep one Gram matrix per class (exact ``remove_class``) instead of their sum.
        head: ``"ridge"`` (eq. (1) of :mod:`peft_asr.tuner.rls`) or ``"lda"`` (eq. (6)-(7)).
        shrinkage: the ``lda`` head's covariance shrinkage, in (0, 1].
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        feature_dim: Optional[int] = None,
        activation: str = "none",
        ridge: float = 1.0,
        seed: int = 0,
        confidence_threshold: Optional[float] = None,
        per_class_statistics: bool = True,
        head: str = "ridge",
        shrinkage: float = 0.1,
    ) -> None:
        super().__init__()
        for name, value, minimum in (("in_features", in_features, 1), ("num_classes", num_classes, 1),
                                     ("feature_dim", 1 if feature_dim is None else feature_dim, 1), ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
        if activation not in ("none", "relu"):
            raise ValueError(f"`activation` must be 'none' or 'relu', got {activation!r}.")
        rls._check_ridge(ridge)
        if head not in HEADS:
            raise ValueError(f"`head` must be one of {HEADS}, got {head!r}.")
        if isinstance(shrinkage, bool) or not isinstance(shrinkage, (int, float)) or not 0 < shrinkage <= 1:
            raise ValueError(f"`shrinkage` must be in (0, 1], got {shrinkage!r}; try 0.1.")
        self.head = head
        self.shrinkage = float(shrinkage)
        self.in_features = int(in_features)
        self.feature_dim = int(feature_dim) if feature_dim is not None else None
        self.activation = activation
        self.ridge = float(ridge)
        self.seed = int(seed)
        self.confidence_threshold = confidence_threshold
        self.per_class_statistics = bool(per_class_statistics)
        dim = self.dim
        f64 = dict(dtype=torch.float64)
        projection = rls.make_projection(self.in_features, self.feature_dim, seed) if self.feature_dim else None
        self.register_buffer("projection", projection, persistent=False)  # None: no expansion
        self.register_buffer("weight", torch.zeros(dim, num_classes, **f64))
        self.register_buffer("class_counts", torch.zeros(num_classes, **f64))
        # the discriminant's per-class offsets and the precision S^-1 its distances use (eq. (7) of rls); saved only
        # with that head, so banks of the ridge head keep the files of earlier versions
        lda = self.head == "lda"
        self.register_buffer("bias", torch.zeros(num_classes, **f64), persistent=lda)
        self.register_buffer("precision", torch.zeros((dim, dim) if lda else (0, 0), **f64), persistent=lda)
        # the calibrated base route (`calibrate_base_route`): rows farther than this from every task go to the base
        # model; `ood_counts` are the class counts it was calibrated at (other counts: it no longer applies)
        self.register_buffer("ood_threshold", torch.full((1,), float("inf"), **f64), persistent=lda)
        self.register_buffer("ood_counts", torch.zeros(num_classes, **f64), persistent=lda)
        self._ood_key: Optional[tuple] = None
        self._ood_live = False
        grams = num_classes if self.per_class_statistics else 1
        self.register_buffer("class_gram", torch.zeros(grams, dim, dim, **f64), persistent=False)
        self.register_buffer("cross", torch.zeros(dim, num_classes, **f64), persistent=False)
        # the sum of `class_gram` over classes, kept up to date so a solve costs the same whatever the number of
        # tasks (summing T + 1 Gram matrices grew with T); not saved: it is recomputed from the per-class ones
        self.register_buffer("total_gram", torch.zeros(dim, dim, **f64), persistent=False)
        # False after a bank is loaded without its statistics file: the router can route but not learn more.
        self.has_statistics = True
        self._dirty = False
        self._fitted_key: Optional[tuple] = None  # host-side cache of `is_fitted` (see there)
        self._fitted = False

    @classmethod
    def from_config(cls, config) -> "AnalyticRouter":
        """The router an :class:`~peft_asr.ASRConfig` describes (wrapped, so its base hidden size is known)."""
        return cls(in_features=config.router_in_features, num_classes=config.num_tasks + 1,
                   feature_dim=config.feature_dim, activation=config.activation, ridge=config.ridge,
                   seed=config.router_seed, confidence_threshold=config.confidence_threshold,
                   per_class_statistics=config.per_task_statistics, head=config.router_head,
                   shrinkage=config.router_shrinkage)

    @property
    def dim(self) -> int:
        """``E``: the width of the router feature."""
        return self.feature_dim if self.feature_dim is not None else self.in_features

    @property
    def num_classes(self) -> int:
        return self.weight.shape[1]

    @property
    def gram(self) -> torch.Tensor:
        """``G = sum phi^T phi`` over every class (E x E): the running total, no sum over classes."""
        return self.total_gram if self.per_class_statistics else self.class_gram[0]

    def _retotal(self) -> None:
        if self.per_class_statistics:
            self.total_gram = self.class_gram.sum(dim=0)

    # ------------------------------------------------------------------ dtype safety
    def _apply(self, fn, recurse=True):
        # Follow device moves but never dtype casts: router state is float64 by design (docs/concepts.md).
        for name, buf in self._buffers.items():
            if buf is None:
                continue
            device = fn(torch.empty(0, dtype=buf.dtype, device=buf.device)).device
            self._buffers[name] = buf.to(device)
        return self

    # ------------------------------------------------------------------ features
    def expand(self, pooled: torch.Tensor) -> torch.Tensor:
        """Router features from pooled hidden states: (B, d) -> (B, E), float64."""
        if pooled.dim() != 2 or pooled.shape[1] != self.in_features:
            raise ValueError(
                f"router input must be (batch, {self.in_features}), got shape {tuple(pooled.shape)}; the bank was "
                "probably built for a base model with another hidden size."
            )
        phi = pooled.to(device=self.weight.device, dtype=torch.float64)
        if self.projection is not None:
            phi = phi @ self.projection  # (B, d) @ (d, E) -> (B, E)
        if self.activation == "relu":
            phi = torch.relu(phi)
        return phi

    # ------------------------------------------------------------------ classes
    def add_class(self) -> int:
        """Append a class column (a new task); returns its index. Exact: no earlier sample belonged to it."""
        self.weight = torch.cat([self.weight, self.weight.new_zeros(self.dim, 1)], dim=1)
        self.cross = torch.cat([self.cross, self.cross.new_zeros(self.dim, 1)], dim=1)
        self.class_counts = torch.cat([self.class_counts, self.class_counts.new_zeros(1)])
        self.bias = torch.cat([self.bias, self.bias.new_zeros(1)])
        self.ood_counts = torch.cat([self.ood_counts, self.ood_counts.new_zeros(1)])
        if self.per_class_statistics:
            self.class_gram = torch.cat([self.class_gram, self.class_gram.new_zeros(1, self.dim, self.dim)])
        return self.num_classes - 1

    def remove_class(self, index: int) -> None:
        """Remove class ``index`` and every sample it contributed: the router equals one that never saw it."""
        if not self.per_class_statistics:
            raise RuntimeError(
                "this router keeps only the summed Gram matrix (`per_task_statistics=False`), so a task cannot be "
                "taken out of it exactly."
            )
        if not self.has_statistics:
            raise RuntimeError("this router was loaded without its statistics file, so a task cannot be taken out.")
        if not 1 <= index < self.num_classes:
            raise ValueError(f"class index must be in [1, {self.num_classes}), got {index}.")
        keep = [k for k in range(self.num_classes) if k != index]
        self.class_gram = self.class_gram[keep].contiguous()
        self.cross = self.cross[:, keep].contiguous()
        self.class_counts = self.class_counts[keep].contiguous()
        self.weight = self.weight[:, keep].contiguous()
        self.bias = self.bias[keep].contiguous()
        self.ood_counts = torch.zeros_like(self.ood_counts[keep])  # the covariance changed: calibrate again
        # summed again rather than subtracted: subtracting a class that dominates the total would leave the
        # remaining classes' sum with the rounding error of the removed one
        self._retotal()
        self._dirty = True

    # ------------------------------------------------------------------ fitting
    def partial_fit(self, pooled: torch.Tensor, labels: torch.Tensor | int) -> "AnalyticRouter":
        """Add a batch to the statistics of eq. (2). ``labels``: class index per row, or one int for all rows."""
        self._check_can_learn()
        phi = self.expand(pooled)  # (B, E)
        if isinstance(labels, int):
            labels = torch.full((phi.shape[0],), labels, dtype=torch.long, device=phi.device)
        labels = labels.to(phi.device).long()
        if labels.shape != (phi.shape[0],):
            raise ValueError(f"`labels` must have shape ({phi.shape[0]},), got {tuple(labels.shape)}.")
        if bool(((labels < 0) | (labels >= self.num_classes)).any()):
            raise ValueError(f"class labels must lie in [0, {self.num_classes}), got {labels.unique().tolist()}.")
        targets = rls.one_hot(labels, self.num_classes)  # (B, K)
        if self.per_class_statistics:
            for k in labels.unique().tolist():  # usually one class per batch
                rows = labels == k
                rls.accumulate(self.class_gram[k], self.cross, phi[rows], targets[rows])
            self.total_gram.addmm_(phi.T, phi)  # (E, B) @ (B, E): the same rows, into the total
        else:
            rls.accumulate(self.class_gram[0], self.cross, phi, targets)
        self.class_counts += targets.sum(dim=0)
        self._dirty = True
        return self

    def add_statistics(self, label: int, gram: torch.Tensor, feature_sum: torch.Tensor, count: int) -> None:
        """Add ``count`` rows of class ``label`` given by their sums (``gram = sum phi^T phi``, ``feature_sum =
        sum phi``, float64), as :meth:`partial_fit` of those rows would: a harvest from training."""
        self._check_can_learn()
        self.class_gram[label if self.per_class_statistics else 0] += gram
        if self.per_class_statistics:
            self.total_gram += gram
        self.cross[:, label] += feature_sum  # one-hot targets: the class's column of Phi^T Y is sum phi
        self.class_counts[label] += count
        self._dirty = True

    def _check_can_learn(self) -> None:
        if not self.has_statistics:
            raise RuntimeError(
                "this router was loaded without its statistics file (router_statistics.safetensors), so it can route "
                "but not learn more tasks exactly. Save banks with `save_router_statistics=True` to keep learning."
            )

    def all_reduce_statistics(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor], since: dict) -> None:
        """Sum the statistics added since the snapshot ``since`` (from :meth:`snapshot`) across processes.

        ``reduce_sum`` maps a tensor to its sum over processes (e.g. ``accelerator.reduce(t, "sum")``). Only the
        increments are reduced, so state that every process already shares is not counted twice; with a snapshot of
        some classes, only their Gram matrices are (every process must have fitted the same classes).
        """
        for name in ("cross", "class_counts", "total_gram"):
            setattr(self, name, since[name] + reduce_sum(getattr(self, name) - since[name]))
        index = self._classes_of(since)
        self.class_gram[index] = since["class_gram"] + reduce_sum(self.class_gram[index] - since["class_gram"])
        self._dirty = True

    def _classes_of(self, snapshot: dict):
        classes = snapshot["classes"]
        return slice(None) if classes is None else torch.tensor(classes, device=self.class_gram.device)

    def snapshot(self, classes: Optional[list[int]] = None) -> dict:
        """Copies of the statistics, to compute per-call increments (see :meth:`all_reduce_statistics`) or to
        :meth:`restore` them. ``classes``: only the Gram matrices of these classes are copied (the ones a fit will
        change), so a snapshot costs the same whatever the number of tasks."""
        if classes is not None and not self.per_class_statistics:
            classes = [0]  # one summed Gram matrix
        index = slice(None) if classes is None else list(classes)
        return {"_dirty": self._dirty, "classes": None if classes is None else list(classes),
                "class_gram": self.class_gram[index].clone(), "cross": self.cross.clone(),
                "class_counts": self.class_counts.clone(), "total_gram": self.total_gram.clone()}

    def restore(self, snapshot: dict) -> None:
        """Put back the statistics of a :meth:`snapshot` (taken with the same classes)."""
        for name in ("cross", "class_counts", "total_gram"):
            setattr(self, name, snapshot[name].clone())
        if snapshot["classes"] is None:
            self.class_gram = snapshot["class_gram"].clone()
        else:
            self.class_gram[self._classes_of(snapshot)] = snapshot["class_gram"]
        self._dirty = snapshot["_dirty"]

    def solve(self) -> "AnalyticRouter":
        """Re-solve ``weight`` from the statistics (Cholesky, float64). A no-op when nothing changed."""
        if self._dirty:
            if self.head == "lda" and not bool((self.class_counts > 0).any()):
                # nothing fitted (an empty bank being saved): the zero solution of no data, as the ridge gives
                self.weight, self.bias = torch.zeros_like(self.weight), torch.zeros_like(self.bias)
            elif self.head == "lda":
                self.weight, self.bias, self.precision = rls.lda_solve(self.gram, self.cross, self.class_counts,
                                                                       self.shrinkage)
            else:
                self.weight = rls.ridge_solve(self.gram, self.cross, self.ridge)
            self._dirty = False
        return self

    # ------------------------------------------------------------------ prediction
    @property
    def is_fitted(self) -> bool:
        """Whether any class has samples. Checked on every routed forward, so the answer is cached on the host and
        recomputed (one device sync) only when ``class_counts`` changes: a new tensor or an in-place update."""
        counts = self.class_counts
        key = (counts.data_ptr(), counts._version, counts.numel(), counts.device)
        if key != self._fitted_key:
            self._fitted = bool((counts > 0).any())
            self._fitted_key = key
        return self._fitted

    def scores(self, pooled: torch.Tensor) -> torch.Tensor:
        """Scores ``phi @ W + b``: (B, d) -> (B, K) float64 (``b`` is zero for the ridge head). Classes never fitted
        score ``-inf``."""
        if not self.is_fitted:
            raise RuntimeError(
                "the router has not been fitted on any task yet: call `fit_router(batches, task=...)` (the Trainer "
                "callback `ASRCallback` does it at the end of training), or pin a task with `use_task(name)`."
            )
        self.solve()
        scores = self.expand(pooled) @ self.weight + self.bias  # (B, E) @ (E, K) -> (B, K)
        unfitted = self.class_counts == 0  # (K,)
        return scores.masked_fill(unfitted, float("-inf"))

    def predict(self, pooled: torch.Tensor) -> torch.Tensor:
        """Class index per row: (B, d) -> (B,) int64 on the router's device; 0 is the base route."""
        scores = self.scores(pooled)  # (B, K)
        best = scores.argmax(dim=1)  # (B,)
        if self.confidence_threshold is not None:
            # ridge: the raw best task score; lda: the best task's posterior probability (equal priors)
            confidence = scores.softmax(dim=1) if self.head == "lda" else scores
            task_best = confidence[:, 1:].max(dim=1).values  # (B,)
            best = torch.where(task_best < self.confidence_threshold, torch.zeros_like(best), best)
        if self.head == "lda" and self._ood_applies():
            best = torch.where(self.distance(pooled) > self.ood_threshold, torch.zeros_like(best), best)
        # A NaN feature (an overflowed fp16 hidden state) would make argmax pick a task at random: such rows go to the
        # base route instead. No host sync here (this runs inside every routed forward); `ASRModel.route` raises.
        finite = torch.isfinite(pooled).all(dim=1).to(best.device)  # (B,)
        return torch.where(finite, best, torch.zeros_like(best))

    # ------------------------------------------------------------------ persistence
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.solve()  # a saved bank always carries the weight that matches its statistics
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def statistics_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors needed to keep learning: ``class_gram``, ``cross``, ``class_counts`` (float64, CPU)."""
        if not self.has_statistics:
            raise RuntimeError("this router has no statistics to save (it was loaded without them).")
        # copies: the router goes on adding to its own tensors in place
        return {n: getattr(self, n).detach().to("cpu", copy=True).contiguous() for n in _STATISTICS}

    def load_statistics(self, state: dict[str, torch.Tensor], solved: bool = False, copy: bool = True) -> None:
        """Restore the statistics saved by :meth:`statistics_state_dict`; shapes and dtype are checked.

        ``solved``: the current ``weight`` is already the solution of these statistics (a bank checked on load), so it
        is kept bit for bit instead of being re-solved. ``copy=False``: the router takes the tensors themselves (a
        state just read from a file, which nobody else holds): no second copy of the ``(T + 1) x E x E`` Grams.
        """
        problem = statistics_problem(state, self.dim, self.num_classes, self.per_class_statistics)
        if problem is not None:
            raise ValueError(f"router statistics: {problem}: the statistics file does not belong to this bank.")
        for name in _STATISTICS:
            rls.check_finite(name, state[name])
        device = self.weight.device
        # copies (unless the caller hands the tensors over): fitting adds to these in place
        self.class_gram = state["class_gram"].to(device, copy=copy)
        self.cross = state["cross"].to(device, copy=copy)
        self.class_counts = state["class_counts"].to(device, copy=copy)
        self._retotal()
        self.has_statistics = True
        self._dirty = not solved

    def mark_loaded_without_statistics(self) -> None:
        """After loading ``weight``/``class_counts`` only: route with them; refuse to learn more."""
        self.has_statistics = False
        self._dirty = False

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, feature_dim={self.feature_dim}, activation={self.activation!r}, "
            f"head={self.head!r}, ridge={self.ridge}, shrinkage={self.shrinkage}, classes={self.num_classes}"
        )
