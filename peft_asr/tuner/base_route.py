"""The calibrated base route of the discriminant head: a prompt far from every task goes to the plain base model.

The distance is the squared Mahalanobis distance to the nearest task under the router's shared, shrunk covariance
(eq. (7) of :mod:`peft_asr.tuner.rls`), so it comes from the same statistics as the decisions. Its threshold is set
from held-out prompts of the tasks and a false-positive rate the user chooses (split conformal,
:func:`~peft_asr.tuner.rls.conformal_threshold`): at most that share of such prompts is sent to the base model. No
statistic bounds that rate without held-out prompts: on real features, the Gaussian quantile of the training
prompts' own distances let 26-87% of held-out task prompts past it (docs/router_defaults.md).
"""

from __future__ import annotations

import math
import warnings

import torch

from . import rls

__all__ = ["BaseRouteMixin"]


class BaseRouteMixin:
    """The base-route methods of :class:`~peft_asr.tuner.router.AnalyticRouter` (which holds ``ood_threshold``,
    ``ood_counts``, ``class_counts``, ``precision`` and ``head``)."""

    def distance(self, pooled: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distance to the nearest task, ``min_k D_k`` of eq. (7) in :mod:`peft_asr.tuner.rls`:
        (B, d) -> (B,) float64 (``"lda"`` head only; the base route's own class is not a task)."""
        if self.head != "lda":
            raise RuntimeError("the distance to the tasks needs `router_head='lda'` (the ridge head has no covariance).")
        scores = self.scores(pooled)[:, 1:]  # (B, T); -inf for tasks without samples
        phi = self.expand(pooled)
        quadratic = ((phi @ self.precision) * phi).sum(dim=1)  # (B,) phi^T S^-1 phi
        return quadratic - 2 * scores.max(dim=1).values

    def calibrate(self, distances: torch.Tensor, false_positive_rate: float) -> float:
        """Set the base-route threshold from the :meth:`distance` of held-out task prompts so that a share
        ``false_positive_rate`` of such prompts go to the base model; returns it. Valid until the statistics change."""
        threshold = rls.conformal_threshold(distances.detach().to("cpu", torch.float64), false_positive_rate)
        if threshold == float("inf"):
            raise ValueError(f"{distances.numel()} calibration prompts are too few for a false-positive rate of "
                             f"{false_positive_rate}: pass at least {math.ceil(1 / false_positive_rate)}.")
        self.ood_threshold = torch.full_like(self.ood_threshold, threshold)
        self.ood_counts = self.class_counts.clone()
        return threshold

    def _ood_applies(self) -> bool:
        """Whether a calibrated threshold matches the current statistics (cached like :attr:`is_fitted`)."""
        key = (self.class_counts.data_ptr(), self.class_counts._version, self.ood_counts.data_ptr(),
               self.ood_counts._version, self.ood_threshold._version, self.class_counts.numel())
        if key != self._ood_key:
            self._ood_key = key
            calibrated = bool(torch.isfinite(self.ood_threshold).all())
            self._ood_live = calibrated and torch.equal(self.ood_counts, self.class_counts)
            if calibrated and not self._ood_live:
                warnings.warn("the base route's distance threshold was calibrated on other router statistics (a task "
                              "was fitted or removed since, or banks were merged), so it is not applied; call "
                              "`calibrate_base_route` again with held-out prompts of every task.", UserWarning,
                              stacklevel=4)
        return self._ood_live

