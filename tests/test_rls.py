"""Pure-tensor tests of peft_asr.tuner.rls: recursive == joint, Woodbury == statistics, numerical errors."""

from __future__ import annotations

import itertools

import pytest
import torch

from peft_asr.tuner import rls


def _task_data(num_tasks=4, per_task=60, dim=24, seed=0):
    """Features with a task-dependent mean (so tasks are separable) and one-hot labels."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_tasks, dim, generator=gen, dtype=torch.float64) * 2
    phis, labels = [], []
    for t in range(num_tasks):
        phis.append(centers[t] + torch.randn(per_task, dim, generator=gen, dtype=torch.float64))
        labels.append(torch.full((per_task,), t))
    return phis, labels


def _chunks(n, gen):
    """Random chunk boundaries of range(n)."""
    cuts = sorted(set(torch.randint(1, n, (3,), generator=gen).tolist()))
    edges = [0] + cuts + [n]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


@pytest.mark.parametrize("ridge", [1.0, 100.0, 1e-3])
def test_recursive_equals_joint_for_every_task_order_and_chunking(ridge):
    phis, labels = _task_data()
    k = len(phis)
    joint = rls.joint_solve(torch.cat(phis), rls.one_hot(torch.cat(labels), k), ridge)
    gen = torch.Generator().manual_seed(1)
    worst = 0.0
    for order in itertools.permutations(range(k)):
        gram = torch.zeros(phis[0].shape[1], phis[0].shape[1], dtype=torch.float64)
        cross = torch.zeros(phis[0].shape[1], k, dtype=torch.float64)
        for t in order:
            for a, b in _chunks(len(labels[t]), gen):
                rls.accumulate(gram, cross, phis[t][a:b], rls.one_hot(labels[t][a:b], k))
        w = rls.ridge_solve(gram, cross, ridge)
        worst = max(worst, (w - joint).abs().max().item())
    assert worst < 1e-10, worst


def test_new_task_column_keeps_earlier_solution_exact():
    """Solving after task 1 with a (not yet used) column for task 2 equals solving task 1 alone."""
    phis, labels = _task_data(num_tasks=2)
    dim = phis[0].shape[1]
    gram = torch.zeros(dim, dim, dtype=torch.float64)
    cross = torch.zeros(dim, 2, dtype=torch.float64)
    rls.accumulate(gram, cross, phis[0], rls.one_hot(labels[0], 2))
    w = rls.ridge_solve(gram, cross, 1.0)
    alone = rls.joint_solve(phis[0], rls.one_hot(labels[0], 1), 1.0)
    assert torch.allclose(w[:, :1], alone, atol=1e-12)
    assert w[:, 1].abs().max() == 0


@pytest.mark.parametrize("ridge", [1.0, 100.0])
def test_woodbury_path_equals_statistics_path(ridge):
    phis, labels = _task_data(num_tasks=3)
    dim = phis[0].shape[1]
    r, w = rls.woodbury_init(dim, 1, ridge)
    gram = torch.zeros(dim, dim, dtype=torch.float64)
    cross = torch.zeros(dim, 3, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    for t in range(3):  # tasks arrive one by one, each in random chunks; W grows a column per task
        for a, b in _chunks(len(labels[t]), gen):
            y = rls.one_hot(labels[t][a:b], t + 1)
            r, w = rls.woodbury_update(r, w, phis[t][a:b], y)
            rls.accumulate(gram, cross, phis[t][a:b], rls.one_hot(labels[t][a:b], 3))
    assert (w - rls.ridge_solve(gram, cross, ridge)).abs().max() < 1e-10
    assert torch.allclose(r, torch.linalg.inv(gram + ridge * torch.eye(dim, dtype=torch.float64)), atol=1e-10)


def test_nonfinite_features_raise_actionable_error():
    gram = torch.zeros(3, 3, dtype=torch.float64)
    cross = torch.zeros(3, 2, dtype=torch.float64)
    phi = torch.tensor([[1.0, float("inf"), 0.0]], dtype=torch.float64)
    with pytest.raises(rls.RouterNumericalError, match="Raise `ridge`"):
        rls.accumulate(gram, cross, phi, rls.one_hot(torch.tensor([0]), 2))


def test_not_positive_definite_raises_actionable_error():
    gram = -torch.eye(3, dtype=torch.float64) * 10  # impossible as a Gram matrix: a corrupted statistics file
    with pytest.raises(rls.RouterNumericalError, match="not positive definite"):
        rls.ridge_solve(gram, torch.zeros(3, 1, dtype=torch.float64), 1.0)


def test_float32_is_refused():
    with pytest.raises(TypeError, match="float64"):
        rls.ridge_solve(torch.eye(2), torch.zeros(2, 1), 1.0)


@pytest.mark.parametrize("ridge", [0, -1.0])
def test_ridge_must_be_positive(ridge):
    with pytest.raises(ValueError, match="`ridge` must be > 0"):
        rls.ridge_solve(torch.eye(2, dtype=torch.float64), torch.zeros(2, 1, dtype=torch.float64), ridge)
