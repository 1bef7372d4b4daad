"""Recursive least squares for the analytic router: pure tensor math.

This module has no ``torch.nn``, ``peft`` or ``transformers`` import; every function takes and returns plain
tensors, so it can be tested (and reasoned about) without a model.

Notation. A batch of ``n`` router features is ``Phi`` (n x E); its one-hot task targets are ``Y`` (n x K).
The router is the ridge regression

    W = argmin_W ||Phi W - Y||^2 + lambda ||W||^2 = (Phi^T Phi + lambda I)^-1 Phi^T Y              (1)

over *all* data seen so far. Two equivalent ways to get there without keeping old data:

Sufficient statistics (the default path). Keep

    G = sum_b Phi_b^T Phi_b   (E x E)        C = sum_b Phi_b^T Y_b   (E x K)                      (2)

Both are sums over batches, so they can be accumulated in any order and chunking, summed across processes
(all-reduce) and added up across banks trained apart. Solving (1) from (G, C) is one Cholesky factorisation of
``G + lambda I``. A new task appends a column to ``C`` (its old rows are zero: no earlier sample belongs to it), so the
router after task k is *exactly* the one trained jointly on tasks 1..k.

Block Woodbury / RLS (the paper's recursive form). Keep ``R = (G + lambda I)^-1`` and ``W``. For a new batch
(Phi_b, Y_b), with ``S = I_n + Phi_b R Phi_b^T`` (n x n):

    K  = R Phi_b^T S^-1                                                                             (3)
    R' = R - K Phi_b R                                                                              (4)
    W' = W + K (Y_b - Phi_b W)                                                                      (5)

(3)-(5) are the matrix-inversion lemma applied to ``G' = G + Phi_b^T Phi_b``; they give the same ``W'`` as solving
(1) from the statistics, up to round-off. Round-off matters: at small ridges the system built from real LLM features
is ill conditioned, and a recursive update in float32 loses the solution. Everything here therefore runs in float64,
and the statistics path (2) is preferred because its error does not accumulate.
"""

from __future__ import annotations

import math

import torch

from .errors import RouterNumericalError

__all__ = [
    "RouterNumericalError",
    "accumulate",
    "ridge_solve",
    "woodbury_init",
    "woodbury_update",
    "joint_solve",
    "one_hot",
    "lda_solve",
    "lda_system",
    "conformal_threshold",
]


_HINT = (
    "Raise `ridge` in the ASRConfig (e.g. 10x), check that the model's hidden states are finite (fp16 models can "
    "overflow: run the router feature pass in bf16 or fp32), and keep router state in float64."
)


def _check_float64(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype != torch.float64:
        raise TypeError(f"`{name}` must be float64 (router math is exact only in double precision), got {tensor.dtype}.")


# float64 keeps ~16 digits; past a condition number of 1e14 fewer than 2 correct digits are left in W.
MAX_CONDITION = 1e14


def _check_ridge(ridge: float) -> None:
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not (ridge > 0 and math.isfinite(ridge)):
        raise ValueError(f"`ridge` must be > 0 and finite, got {ridge!r}; try 1.0.")


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Raise :class:`RouterNumericalError` when ``tensor`` holds NaN or inf."""
    if not bool(torch.isfinite(tensor).all()):
        raise RouterNumericalError(f"`{name}` contains NaN or inf values. {_HINT}")


def make_projection(in_features: int, feature_dim: int, seed: int) -> torch.Tensor:
    """The router's fixed random expansion ``P`` (d x E), float64, N(0, 1/d), reproducible from ``seed`` anywhere."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    # (d, E); scaled by 1/sqrt(d) so phi has the same per-coordinate scale as the pooled hidden state
    return torch.randn(in_features, feature_dim, generator=gen, dtype=torch.float64) / in_features**0.5


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Float64 one-hot targets: (n,) int64 -> (n, num_classes)."""
    if labels.dim() != 1:
        raise ValueError(f"`labels` must be 1-D, got shape {tuple(labels.shape)}.")
    return torch.nn.functional.one_hot(labels.long(), num_classes).to(torch.float64)


def accumulate(
    gram: torch.Tensor, cross: torch.Tensor, phi: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add one batch to the statistics of eq. (2), in place; returns ``(gram, cross)``.

    Args:
        gram: (E, E) float64 running ``sum Phi^T Phi``.
        cross: (E, K) float64 running ``sum Phi^T Y``.
        phi: (n, E) float64 features of the batch.
        targets: (n, K) float64 targets of the batch (one-hot rows).
    """
    for name, t in (("gram", gram), ("cross", cross), ("phi", phi), ("targets", targets)):
        _check_float64(name, t)
    if phi.shape[0] != targets.shape[0]:
        raise ValueError(f"`phi` has {phi.shape[0]} rows but `targets` has {targets.shape[0]}.")
    check_finite("phi", phi)
    gram.addmm_(phi.T, phi)  # (E, n) @ (n, E)
    cross.addmm_(phi.T, targets)  # (E, n) @ (n, K)
    return gram, cross


def _cholesky(a: torch.Tensor, what: str, setting: str = "") -> torch.Tensor:
    """Cholesky factor of the symmetric system ``a``, refusing a non positive definite or numerically singular one
    (``setting``, e.g. ``"ridge=0.1"``, is named in the message)."""
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) != 0:
        named = f" ({setting})" if setting else ""
        raise RouterNumericalError(f"The router system {what} is not positive definite{named}. {_HINT}")
    # cond(A) >= (max diag L / min diag L)^2 for A = L L^T. Past ~1/eps the solve returns finite but meaningless
    # numbers (a tiny ridge on colinear features): refuse instead of routing on round-off.
    diag = chol.diagonal()
    cond_lower_bound = float((diag.max() / diag.min()) ** 2)
    if not cond_lower_bound < MAX_CONDITION:
        named = f"; {setting}" if setting else ""
        raise RouterNumericalError(
            f"The router system {what} is numerically singular (condition number >= {cond_lower_bound:.1e}, "
            f"limit {MAX_CONDITION:.0e}{named}): the features are (nearly) colinear and too little regularised. {_HINT}"
        )
    return chol


def ridge_solve(gram: torch.Tensor, cross: torch.Tensor, ridge: float) -> torch.Tensor:
    """Solve eq. (1) from the statistics: ``W = (G + ridge I)^-1 C`` by Cholesky. Returns (E, K) float64."""
    _check_float64("gram", gram)
    _check_float64("cross", cross)
    _check_ridge(ridge)
    check_finite("gram", gram)
    check_finite("cross", cross)
    a = gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    chol = _cholesky(a, "G + ridge*I", f"ridge={ridge}")
    # row-major like a weight read back from disk, so routing after a reload runs the same kernel bit for bit
    weight = torch.cholesky_solve(cross, chol).contiguous()
    check_finite("router weight", weight)
    return weight


def lda_system(gram: torch.Tensor, cross: torch.Tensor, counts: torch.Tensor, shrinkage: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The system of :func:`lda_solve`: the shrunk covariance ``S`` (E x E) and the class means (E x K, zero columns
    for classes without samples), so that ``W = S^-1 means``."""
    for name, t in (("gram", gram), ("cross", cross), ("counts", counts)):
        _check_float64(name, t)
        check_finite(name, t)
    if isinstance(shrinkage, bool) or not isinstance(shrinkage, (int, float)) or not 0 < shrinkage <= 1:
        raise ValueError(f"`shrinkage` must be in (0, 1], got {shrinkage!r}; try 0.1.")
    fitted = counts > 0  # (K,)
    safe = torch.where(fitted, counts, torch.ones_like(counts))
    means = cross / safe  # (E, K); zero columns where a class has no sample
    scatter = gram - (cross * fitted) @ means.T  # (E, E): G - sum_k s_k s_k^T / n_k
    dof = max(float(counts.sum()) - int(fitted.sum()), 1.0)
    sigma = 0.5 * (scatter + scatter.T) / dof
    scale = float(sigma.diagonal().sum()) / sigma.shape[0]
    if not scale > 0:
        raise RouterNumericalError(
            "The router's features do not vary within any class (the within-class covariance is zero), so a "
            "discriminant cannot be formed; fit more than one distinct prompt per task."
        )
    shrunk = (1.0 - shrinkage) * sigma + shrinkage * scale * torch.eye(sigma.shape[0], dtype=sigma.dtype,
                                                                        device=sigma.device)
    return shrunk, means


def lda_solve(gram: torch.Tensor, cross: torch.Tensor, counts: torch.Tensor, shrinkage: float
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Linear discriminant analysis with a shared, shrunk covariance, from the statistics of eq. (2).

    With one-hot targets the columns of ``C`` are the per-class sums ``s_k`` and ``counts`` the ``n_k``, so the class
    means ``mu_k = s_k / n_k`` and the pooled within-class covariance

        Sigma = (G - sum_k s_k s_k^T / n_k) / (N - K')        (K' classes with samples, N samples)          (6)

    come from the same sums as the ridge solve: the discriminant is as exact, order-free, mergeable and removable.
    It is shrunk towards a multiple of the identity, ``S = (1 - a) Sigma + a (tr(Sigma) / E) I`` (``a`` =
    ``shrinkage`` in (0, 1]), which needs no scale to be chosen: multiplying the features by a constant leaves the
    decisions unchanged. The score of class k for a feature ``phi`` is the Gaussian log-likelihood up to a term common
    to all classes, with equal priors (a task's share of the stream says nothing about the next prompt):

        score_k(phi) = phi^T S^-1 mu_k - mu_k^T S^-1 mu_k / 2 = (phi^T S^-1 phi - D_k(phi)) / 2                 (7)

    where ``D_k`` is the squared Mahalanobis distance to ``mu_k``. Classes without samples get a zero column (the
    router masks them). Returns ``(W (E x K), bias (K,), S^-1 (E x E))``, float64.
    """
    shrunk, means = lda_system(gram, cross, counts, shrinkage)
    chol = _cholesky(shrunk, "of the shrunk within-class covariance")
    weight = torch.cholesky_solve(means, chol).contiguous()  # (E, K) = S^-1 mu
    bias = -0.5 * (means * weight).sum(dim=0)  # (K,)
    precision = torch.cholesky_inverse(chol)
    precision = (0.5 * (precision + precision.T)).contiguous()
    check_finite("router weight", weight)
    return weight, bias, precision


def conformal_threshold(scores: torch.Tensor, false_positive_rate: float) -> float:
    """The threshold that at most a share ``false_positive_rate`` of new scores from the distribution of ``scores``
    exceed, in expectation: the ``ceil((n + 1)(1 - rate))``-th smallest of the n calibration scores (split
    conformal); ``inf`` when there are too few scores for that rate (fewer than ``1 / rate - 1``)."""
    if isinstance(false_positive_rate, bool) or not isinstance(false_positive_rate, (int, float)) \
            or not 0 < false_positive_rate < 1:
        raise ValueError(f"`false_positive_rate` must be in (0, 1), got {false_positive_rate!r}; try 0.005.")
    n = scores.numel()
    rank = math.ceil((n + 1) * (1 - false_positive_rate))
    return float("inf") if rank > n else float(scores.flatten().sort().values[rank - 1])


def woodbury_init(dim: int, num_classes: int, ridge: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Start the recursive form of eq. (3)-(5) with no data: ``R = I / ridge``, ``W = 0``."""
    _check_ridge(ridge)
    r = torch.eye(dim, dtype=torch.float64, device=device) / ridge
    w = torch.zeros(dim, num_classes, dtype=torch.float64, device=device)
    return r, w


def woodbury_update(
    r: torch.Tensor, weight: torch.Tensor, phi: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One block RLS step, eq. (3)-(5). Returns the new ``(R, W)``.

    ``targets`` may have more columns than ``weight`` (a new task arrived): ``W`` is padded with zero columns first,
    which is exact because no earlier sample belonged to the new task.
    """
    for name, t in (("r", r), ("weight", weight), ("phi", phi), ("targets", targets)):
        _check_float64(name, t)
    check_finite("phi", phi)
    if targets.shape[1] > weight.shape[1]:
        pad = weight.new_zeros(weight.shape[0], targets.shape[1] - weight.shape[1])
        weight = torch.cat([weight, pad], dim=1)
    rp = r @ phi.T  # (E, n)
    s = torch.eye(phi.shape[0], dtype=r.dtype, device=r.device) + phi @ rp  # (n, n), eq. (3)
    k = torch.linalg.solve(s, rp.T).T  # (E, n) = R Phi^T S^-1; S is symmetric
    r_new = r - k @ rp.T  # eq. (4): R - K Phi R
    r_new = 0.5 * (r_new + r_new.T)  # keep R symmetric against round-off
    w_new = weight + k @ (targets - phi @ weight)  # eq. (5)
    check_finite("router weight", w_new)
    return r_new, w_new


def joint_solve(phi: torch.Tensor, targets: torch.Tensor, ridge: float) -> torch.Tensor:
    """Reference: eq. (1) on all data at once, ``solve(Phi^T Phi + ridge I, Phi^T Y)``, float64."""
    _check_float64("phi", phi)
    _check_float64("targets", targets)
    a = phi.T @ phi + ridge * torch.eye(phi.shape[1], dtype=phi.dtype, device=phi.device)
    return torch.linalg.solve(a, phi.T @ targets)
