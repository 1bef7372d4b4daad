"""The router's discriminant head (``head="lda"``): the closed form of eq. (6)-(7) in :mod:`peft_asr.tuner.rls`,
computed from the same statistics as the ridge head, so it keeps every exactness property of the router."""

from __future__ import annotations

import pytest
import torch

from peft_asr.tuner import rls
from peft_asr.tuner.errors import RouterNumericalError
from peft_asr.tuner.router import AnalyticRouter


def _data(seed=0, n=(30, 45, 25), d=12):
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(1, d, generator=gen, dtype=torch.float64) * 2
          + torch.randn(m, d, generator=gen, dtype=torch.float64) @ torch.randn(d, d, generator=gen, dtype=torch.float64)
          for m in n]
    x = torch.cat(xs)
    y = torch.cat([torch.full((m,), k + 1) for k, m in enumerate(n)])
    return x, y


def _reference(x, y, classes, shrinkage):
    """Textbook LDA on the raw rows: class means, pooled covariance, shrinkage, Gaussian scores with equal priors."""
    means = torch.stack([x[y == k].mean(0) for k in classes])  # (K', d)
    centred = torch.cat([x[y == k] - x[y == k].mean(0) for k in classes])
    sigma = centred.T @ centred / (len(x) - len(classes))
    d = sigma.shape[0]
    shrunk = (1 - shrinkage) * sigma + shrinkage * sigma.trace() / d * torch.eye(d, dtype=torch.float64)
    inverse = torch.linalg.inv(shrunk)
    distances = torch.stack([((x - m) @ inverse * (x - m)).sum(1) for m in means], 1)  # (N, K')
    quadratic = ((x @ inverse) * x).sum(1, keepdim=True)
    return (quadratic - distances) / 2, inverse


@pytest.mark.parametrize("shrinkage", [1e-3, 0.1, 1.0])
def test_lda_scores_equal_the_textbook_discriminant(shrinkage):
    x, y = _data()
    router = AnalyticRouter(12, 4, head="lda", shrinkage=shrinkage).partial_fit(x, y)
    expected, inverse = _reference(x, y, [1, 2, 3], shrinkage)
    scores = router.scores(x)  # (N, 4): the base route was never fitted
    assert torch.isinf(scores[:, 0]).all()
    assert float((scores[:, 1:] - expected).abs().max()) < 1e-9 * float(expected.abs().max())
    assert float((router.precision - inverse).abs().max()) < 1e-9 * float(inverse.abs().max())


def test_lda_is_scale_free_and_ridge_is_not():
    x, y = _data()
    for scale in (1e-3, 1e3):
        lda, lda_scaled = (AnalyticRouter(12, 4, head="lda").partial_fit(v, y) for v in (x, x * scale))
        assert torch.equal(lda.predict(x), lda_scaled.predict(x * scale))
    ridge, ridge_scaled = (AnalyticRouter(12, 4, ridge=1.0).partial_fit(v, y) for v in (x, x * 1e-3))
    assert not torch.equal(ridge.predict(x), ridge_scaled.predict(x * 1e-3))  # the ridge needs a scale


@pytest.mark.parametrize("index", [1, 2, 3])
def test_lda_remove_class_equals_never_having_seen_it(index):
    x, y = _data()
    router = AnalyticRouter(12, 4, head="lda").partial_fit(x, y)
    router.remove_class(index)
    keep = y != index
    relabel = torch.where(y[keep] > index, y[keep] - 1, y[keep])
    never = AnalyticRouter(12, 3, head="lda").partial_fit(x[keep], relabel)
    router.solve(), never.solve()
    assert float((router.weight - never.weight).abs().max()) < 1e-10 * float(never.weight.abs().max())
    assert float((router.bias - never.bias).abs().max()) < 1e-10 * float(never.bias.abs().max())


def test_lda_from_summed_statistics_equals_per_class_and_reduces_like_ridge():
    x, y = _data()
    per_class = AnalyticRouter(12, 4, head="lda").partial_fit(x, y).solve()
    summed = AnalyticRouter(12, 4, head="lda", per_class_statistics=False).partial_fit(x, y).solve()
    assert float((per_class.weight - summed.weight).abs().max()) < 1e-10 * float(per_class.weight.abs().max())
    # two "processes" see halves of the rows; summing their increments gives the router that saw all of them
    halves = [AnalyticRouter(12, 4, head="lda") for _ in range(2)]
    snapshots = [r.snapshot(classes=[0, 1, 2, 3]) for r in halves]
    for r, rows in zip(halves, (slice(0, None, 2), slice(1, None, 2))):
        r.partial_fit(x[rows], y[rows])
    other = halves[1]
    names = ("cross", "class_counts", "total_gram", "class_gram")

    def reduce_sum(delta):  # this process's increment plus the other's, found by shape
        for name in names:
            mine = getattr(other, name) - (snapshots[1][name] if name != "class_gram" else snapshots[1]["class_gram"])
            if mine.shape == delta.shape:
                return delta + mine
        raise AssertionError(delta.shape)

    halves[0].all_reduce_statistics(reduce_sum, snapshots[0])
    assert float((halves[0].solve().weight - per_class.weight).abs().max()) < 1e-10 * float(per_class.weight.abs().max())


def test_lda_refuses_features_without_spread_and_bad_shrinkage():
    with pytest.raises(ValueError, match="shrinkage"):
        AnalyticRouter(4, 2, head="lda", shrinkage=0.0)
    with pytest.raises(ValueError, match="head"):
        AnalyticRouter(4, 2, head="svm")
    router = AnalyticRouter(4, 3, head="lda").partial_fit(torch.ones(3, 4, dtype=torch.float64), 1)
    router.partial_fit(torch.ones(2, 4, dtype=torch.float64) * 2, 2)
    with pytest.raises(RouterNumericalError, match="do not vary"):
        router.solve()
    with pytest.raises(ValueError, match="shrinkage"):
        rls.lda_solve(router.gram, router.cross, router.class_counts, 1.5)


def test_lda_state_round_trips_and_ridge_keeps_its_saved_keys():
    x, y = _data()
    lda = AnalyticRouter(12, 4, head="lda").partial_fit(x, y)
    state = lda.state_dict()
    assert set(state) == {"weight", "class_counts", "bias", "precision", "ood_threshold", "ood_counts"}
    assert set(AnalyticRouter(12, 4).state_dict()) == {"weight", "class_counts"}  # files of earlier versions
    loaded = AnalyticRouter(12, 4, head="lda")
    loaded.load_state_dict(state)
    loaded.mark_loaded_without_statistics()
    assert torch.equal(loaded.predict(x), lda.predict(x))


# ---------------------------------------------------------------- the calibrated base route
def test_calibrated_threshold_bounds_the_share_of_task_prompts_sent_to_base():
    x, y = _data(n=(200, 200, 200))
    fit, held = torch.arange(len(x)) % 2 == 0, torch.arange(len(x)) % 2 == 1
    router = AnalyticRouter(12, 4, head="lda").partial_fit(x[fit], y[fit])
    calibration, evaluation = x[held][::2], x[held][1::2]
    threshold = router.calibrate(router.distance(calibration), 0.02)
    assert float((router.distance(calibration) > threshold).double().mean()) <= 0.02
    far = x[:20] * 0 + 50.0  # far from every task
    assert (router.predict(far) == 0).all()
    assert float((router.predict(evaluation) == 0).double().mean()) <= 0.05
    with pytest.raises(ValueError, match="too few"):
        router.calibrate(router.distance(calibration[:10]), 0.02)
    with pytest.raises(ValueError, match="false_positive_rate"):
        router.calibrate(router.distance(calibration), 0.0)


def test_a_threshold_from_older_statistics_is_not_applied_and_says_so():
    x, y = _data(n=(100, 100, 100))
    router = AnalyticRouter(12, 4, head="lda").partial_fit(x, y)
    router.calibrate(router.distance(x), 0.05)
    far = torch.full((3, 12), 50.0, dtype=torch.float64)
    assert (router.predict(far) == 0).all()
    router.partial_fit(x[:5], 1)  # the router learned more: the threshold was calibrated on other statistics
    with pytest.warns(UserWarning, match="calibrate_base_route"):
        decisions = router.predict(far)
    assert (decisions != 0).all()  # the discriminant alone decides
    state = router.state_dict()
    assert torch.isfinite(state["ood_threshold"]).all() and not torch.equal(state["ood_counts"], state["class_counts"])
    # a removal changes the covariance too: a threshold calibrated before it is not applied either
    removed = AnalyticRouter(12, 4, head="lda").partial_fit(x, y)
    removed.calibrate(removed.distance(x), 0.05)
    removed.remove_class(3)
    with pytest.warns(UserWarning, match="calibrate_base_route"):
        assert (removed.predict(far) != 0).all()


def test_the_ridge_head_has_no_distance():
    x, y = _data()
    with pytest.raises(RuntimeError, match="lda"):
        AnalyticRouter(12, 4).partial_fit(x, y).distance(x)


def test_confidence_of_the_discriminant_is_a_posterior_probability():
    x, y = _data()
    router = AnalyticRouter(12, 4, head="lda", confidence_threshold=0.5).partial_fit(x, y)
    assert (router.predict(x) != 0).float().mean() > 0.9  # posteriors of training rows are near 1
    router.confidence_threshold = 1.01  # no probability reaches it: every row falls back
    assert (router.predict(x) == 0).all()


def test_model_calibration_sends_far_prompts_to_the_base_model_and_survives_a_reload(tmp_path):
    from conftest import ALPHA_IDS, BETA_IDS, left_pad, prompts, tiny_llama, two_task_model
    from peft import PeftModel

    model = two_task_model()
    held = [left_pad(prompts(*ALPHA_IDS, 100, seed=11)), left_pad(prompts(*BETA_IDS, 100, seed=12))]
    threshold = model.calibrate_base_route(held, false_positive_rate=0.02, progress=False)
    familiar = left_pad(prompts(*ALPHA_IDS, 20, seed=14) + prompts(*BETA_IDS, 20, seed=15))
    mixed = left_pad(prompts(*ALPHA_IDS, 6, seed=16) + prompts(100, 128, 10, seed=13))
    router = model.base_model.router
    far = (router.distance(model.router_features(mixed)) > threshold).tolist()
    assert any(far) and not all(far)  # the case separates something: the test can fail both ways
    routes = model.route(**mixed)
    assert [r == "__base__" for r in routes] == far  # exactly the rows beyond the threshold
    assert sum(r == "__base__" for r in model.route(**familiar)) <= 2
    # the routed forward decides the same way as `route` (the base route answers like the plain model)
    with torch.no_grad():
        routed = model(**mixed).logits
        with model.use_task("__base__"):
            plain = model(**mixed).logits
    rows = torch.tensor(far)
    assert torch.allclose(routed[rows], plain[rows], atol=1e-6)
    # and every other row as the same row alone with its routed task pinned
    from conftest import real_logits
    raw = prompts(*ALPHA_IDS, 6, seed=16) + prompts(100, 128, 10, seed=13)
    mixed_rows = real_logits(model, raw)
    for row, route, logits in zip(raw, routes, mixed_rows):
        assert torch.allclose(logits, real_logits(model, [row], pinned=route)[0], atol=1e-5), route
    model.save_pretrained(tmp_path / "bank")
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "bank").eval()
    assert float(reloaded.base_model.router.ood_threshold) == threshold
    assert reloaded.route(**mixed) == routes
    ridge = two_task_model(router_head="ridge")
    with pytest.raises(ValueError, match="lda"):
        ridge.calibrate_base_route(held)
