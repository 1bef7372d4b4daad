"""AnalyticRouter: the partial_fit contract, float64 state, persistence of statistics."""

from __future__ import annotations

import pytest
import torch

from peft_asr.tuner import rls
from peft_asr.tuner.router import AnalyticRouter


def _data(seed=0, n=40, d=16, k=3):
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=gen) * 3
    x = torch.cat([centers[i] + torch.randn(n, d, generator=gen) for i in range(k)])
    y = torch.arange(k).repeat_interleave(n) + 1  # class 0 is the base route
    return x, y


def test_predict_before_fit_is_runtime_error():
    router = AnalyticRouter(16, 4)
    with pytest.raises(RuntimeError, match="not been fitted"):
        router.predict(torch.randn(2, 16))


def test_partial_fit_returns_self_and_matches_joint_ridge():
    x, y = _data()
    router = AnalyticRouter(16, 4, feature_dim=64, activation="relu", ridge=0.5, seed=3)
    assert router.partial_fit(x[:50], y[:50]) is router
    router.partial_fit(x[50:], y[50:])
    router.solve()
    phi = router.expand(x)
    joint = rls.joint_solve(phi, rls.one_hot(y, 4), 0.5)
    assert (router.weight - joint).abs().max() < 1e-10
    assert (router.predict(x) == y).float().mean() > 0.95


def test_unfitted_classes_are_never_predicted():
    x, y = _data()
    router = AnalyticRouter(16, 4).partial_fit(x[y == 1], 1)
    assert set(router.predict(x).tolist()) == {1}


def test_state_stays_float64_under_half_and_bfloat16():
    x, y = _data()
    router = AnalyticRouter(16, 4, feature_dim=32).partial_fit(x, y)
    router.half()
    router.to(torch.bfloat16)
    for name in ("weight", "class_counts", "class_gram", "cross", "projection"):
        assert getattr(router, name).dtype == torch.float64, name
    # half-precision inputs still route as float32 inputs do
    assert torch.equal(router.predict(x.half()), router.predict(x))


def test_projection_is_reproducible_from_seed():
    a = AnalyticRouter(16, 2, feature_dim=32, seed=7)
    b = AnalyticRouter(16, 2, feature_dim=32, seed=7)
    c = AnalyticRouter(16, 2, feature_dim=32, seed=8)
    assert torch.equal(a.projection, b.projection)
    assert not torch.equal(a.projection, c.projection)


def test_statistics_round_trip_and_validation():
    x, y = _data()
    router = AnalyticRouter(16, 4).partial_fit(x, y)
    state = router.statistics_state_dict()
    fresh = AnalyticRouter(16, 4)
    fresh.load_statistics(state)
    fresh._dirty = True
    assert torch.allclose(fresh.solve().weight, router.solve().weight, atol=0)
    bad = dict(state, class_gram=state["class_gram"].float())
    with pytest.raises(ValueError, match="does not belong to this bank"):
        AnalyticRouter(16, 4).load_statistics(bad)
    with pytest.raises(ValueError, match="`cross` is missing"):
        AnalyticRouter(16, 4).load_statistics({"class_gram": state["class_gram"]})


def test_router_without_statistics_refuses_to_learn():
    router = AnalyticRouter(16, 4)
    router.mark_loaded_without_statistics()
    with pytest.raises(RuntimeError, match="statistics file"):
        router.partial_fit(torch.randn(2, 16), 1)


def test_bad_batches_are_rejected():
    router = AnalyticRouter(16, 3)
    with pytest.raises(ValueError, match="router input must be"):
        router.partial_fit(torch.randn(2, 8), 1)
    with pytest.raises(ValueError, match="class labels must lie"):
        router.partial_fit(torch.randn(2, 16), torch.tensor([1, 5]))
    with pytest.raises(ValueError, match="activation"):
        AnalyticRouter(16, 3, activation="tanh")


def test_confidence_threshold_sends_unfamiliar_rows_to_base():
    x, y = _data()
    router = AnalyticRouter(16, 4, confidence_threshold=0.5).partial_fit(x, y)
    assert (router.predict(x) == y).float().mean() > 0.95
    far = torch.zeros(3, 16)  # the origin is no task's cluster: scores ~0
    assert router.predict(far).tolist() == [0, 0, 0]


def test_all_reduce_sums_only_new_statistics():
    x, y = _data()
    router = AnalyticRouter(16, 4).partial_fit(x[:30], y[:30])
    before = router.snapshot()
    router.partial_fit(x[30:], y[30:])
    router.all_reduce_statistics(lambda t: 2 * t, before)  # as if two processes added the same batches
    ref = AnalyticRouter(16, 4).partial_fit(x[:30], y[:30]).partial_fit(x[30:], y[30:]).partial_fit(x[30:], y[30:])
    assert torch.allclose(router.gram, ref.gram, atol=1e-9)
    assert torch.equal(router.class_counts, ref.class_counts)


@pytest.mark.parametrize("index", [1, 2, 3])
def test_remove_class_equals_never_having_seen_it(index):
    x, y = _data()
    router = AnalyticRouter(16, 4, feature_dim=24, seed=1).partial_fit(x, y)
    router.remove_class(index)
    keep = y != index
    relabel = torch.where(y[keep] > index, y[keep] - 1, y[keep])
    never = AnalyticRouter(16, 3, feature_dim=24, seed=1).partial_fit(x[keep], relabel)
    assert (router.solve().weight - never.solve().weight).abs().max() < 1e-10
    assert torch.equal(router.class_counts, never.class_counts)


def test_summed_statistics_cannot_remove_but_route_the_same():
    x, y = _data()
    pooled = AnalyticRouter(16, 4, per_class_statistics=False).partial_fit(x, y)
    per_class = AnalyticRouter(16, 4).partial_fit(x, y)
    assert pooled.class_gram.shape == (1, 16, 16) and per_class.class_gram.shape == (4, 16, 16)
    assert (pooled.solve().weight - per_class.solve().weight).abs().max() < 1e-10
    with pytest.raises(RuntimeError, match="per_task_statistics=False"):
        pooled.remove_class(1)
    with pytest.raises(ValueError, match="class index must be in"):
        per_class.remove_class(0)


def _grams_agree(router: AnalyticRouter) -> None:
    """The running total is the sum of the per-class Gram matrices, and the solve equals the one from that sum."""
    total = router.class_gram.sum(0)
    assert torch.allclose(router.gram, total, rtol=1e-12, atol=1e-9)
    expected = rls.ridge_solve(total, router.cross, router.ridge)
    assert torch.allclose(router.solve().weight, expected, rtol=1e-10, atol=1e-12)


def test_the_total_gram_follows_fits_removals_loads_and_reductions():
    """A solve reads a running total (not a sum over T + 1 classes); it must stay the sum after every change."""
    x, y = _data(k=5)
    router = AnalyticRouter(16, 6, feature_dim=32, activation="relu", seed=1)
    for k in range(1, 6):  # task by task, as a stream trains them
        router.partial_fit(x[y == k], k)
        _grams_agree(router)
    router.partial_fit(x[:7], torch.tensor([0, 1, 2, 0, 3, 4, 5]))  # a batch of mixed classes
    _grams_agree(router)
    router.remove_class(3)
    _grams_agree(router)
    loaded = AnalyticRouter(16, 5, feature_dim=32, activation="relu", seed=1)
    loaded.load_statistics(router.statistics_state_dict())
    assert torch.equal(loaded.gram, router.class_gram.sum(0))
    _grams_agree(loaded)
    # a fit of one class, reduced over two processes that added the same rows
    before = router.snapshot(classes=[2])
    router.partial_fit(x[y == 2][:9], 2)
    router.all_reduce_statistics(lambda t: 2 * t, before)
    _grams_agree(router)
    twice = AnalyticRouter(16, 5, feature_dim=32, activation="relu", seed=1)
    twice.load_statistics(loaded.statistics_state_dict())
    twice.partial_fit(x[y == 2][:9], 2).partial_fit(x[y == 2][:9], 2)
    assert torch.allclose(router.class_gram, twice.class_gram, rtol=1e-12, atol=1e-9)
    assert torch.allclose(router.solve().weight, twice.solve().weight, rtol=1e-10, atol=1e-12)


def test_a_snapshot_of_one_class_restores_everything_a_failed_fit_changed():
    x, y = _data(k=3)
    router = AnalyticRouter(16, 4).partial_fit(x, y)
    router.solve()
    state = {n: t.clone() for n, t in router.named_buffers()}
    before = router.snapshot(classes=[2])
    assert before["class_gram"].shape == (1, 16, 16)  # one class copied, not T + 1
    router.partial_fit(x[y == 2], 2)
    router.restore(before)
    for name, tensor in router.named_buffers():
        assert torch.equal(tensor, state[name]), name
    assert not router._dirty


def test_statistics_handed_out_or_taken_in_are_copies():
    """Fitting adds to the router's tensors in place; that must reach neither a saved state nor a loaded one."""
    x, y = _data()
    router = AnalyticRouter(16, 4).partial_fit(x[:30], y[:30])
    state = router.statistics_state_dict()
    kept = {n: t.clone() for n, t in state.items()}
    router.partial_fit(x[30:], y[30:])
    other = AnalyticRouter(16, 4)
    other.load_statistics(state)
    other.partial_fit(x[30:], y[30:])
    for name, tensor in state.items():
        assert torch.equal(tensor, kept[name]), name
