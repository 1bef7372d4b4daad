"""Properties checked on many generated inputs (hypothesis), and the router's numerics under half-precision models.

Example counts are modest (25-50 per property, no deadline) so the file runs in well under a minute on 2 cores.
"""

from __future__ import annotations

import json
import math
import os
import tempfile

import pytest
import torch
from conftest import ALPHA_IDS, BETA_IDS, left_pad, prompts, right_pad, tiny_llama, two_task_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import peft_asr  # noqa: F401
from peft_asr import ASRConfig, ASRConfigError, RouterNumericalError
from peft_asr.tuner.router import AnalyticRouter

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: one thread, no oversubscription


SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# ---------------------------------------------------------------- ASRConfig through JSON
names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,12}", fullmatch=True)
configs = st.fixed_dictionaries(
    {
        "r": st.integers(1, 64),
        "lora_alpha": st.one_of(st.integers(1, 128), st.floats(0.01, 100.0)),
        "lora_dropout": st.floats(0.0, 0.99),
        "target_modules": st.one_of(st.lists(st.sampled_from(["q_proj", "k_proj", "v_proj", "o_proj", "c_attn"]),
                                             min_size=1, max_size=4, unique=True), st.just(r".*\.(q|v)_proj")),
        "router_layer": st.integers(0, 40),
        "feature_dim": st.one_of(st.none(), st.integers(1, 4096)),
        "activation": st.sampled_from(["none", "relu"]),
        "ridge": st.floats(1e-6, 1e6),
        "router_seed": st.integers(0, 2**31),
        "confidence_threshold": st.one_of(st.none(), st.floats(-10, 10)),
        "tasks": st.lists(names, max_size=6, unique=True).filter(lambda t: "__base__" not in t),
        "per_task_statistics": st.booleans(),
        "save_router_statistics": st.booleans(),
        "base_model_name_or_path": st.one_of(st.none(), st.text(max_size=20)),
    }
)


def _normal(config: ASRConfig) -> dict:
    data = config.to_dict()
    if isinstance(data["target_modules"], (set, list)):
        data["target_modules"] = sorted(data["target_modules"])
    return data


@settings(max_examples=50, **SETTINGS)
@given(configs)
def test_config_round_trips_through_json(fields):
    config = ASRConfig(task_type="CAUSAL_LM", **fields)
    with tempfile.TemporaryDirectory() as folder:
        config.save_pretrained(folder)
        back = ASRConfig.from_pretrained(folder)
    assert _normal(back) == _normal(config)


# ---------------------------------------------------------------- fuzzed config JSON
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=8,
)


@pytest.fixture(scope="module")
def valid_json():
    config = ASRConfig(task_type="CAUSAL_LM", target_modules=["q_proj"], tasks=["a", "b"], base_hidden_size=32,
                       base_num_layers=4, layers_pattern="layers", layers_to_transform=[2, 3], router_layer=2)
    with tempfile.TemporaryDirectory() as folder:
        config.save_pretrained(folder)
        with open(os.path.join(folder, "adapter_config.json")) as handle:
            return json.load(handle)


@settings(max_examples=50, **SETTINGS)
@given(
    changes=st.dictionaries(st.sampled_from(sorted(ASRConfig.__dataclass_fields__) + ["unknown_key", "rr"]),
                            json_values, max_size=4),
    drop=st.lists(st.sampled_from(sorted(ASRConfig.__dataclass_fields__)), max_size=2),
    whole=st.one_of(st.none(), json_values),
)
def test_fuzzed_config_json_raises_only_our_errors(valid_json, changes, drop, whole):
    data = dict(valid_json)
    data.update(changes)
    for key in drop:
        data.pop(key, None)
    payload = data if whole is None else whole
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "adapter_config.json"), "w") as handle:
            json.dump(payload, handle)
        try:
            config = ASRConfig.from_pretrained(folder)
        except ASRConfigError:
            return  # a clear error of ours: fine
        # anything that loads must be a valid config: re-validating it changes nothing
        assert isinstance(config, ASRConfig) and config.peft_type == "ASR"
        assert config.r >= 1 and config.ridge > 0 and math.isfinite(config.ridge)


@settings(max_examples=25, **SETTINGS)
@given(raw=st.binary(max_size=64))
def test_garbage_bytes_as_config_raise_only_our_errors(raw):
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "adapter_config.json"), "wb") as handle:
            handle.write(raw)
        with pytest.raises(ASRConfigError):
            ASRConfig.from_pretrained(folder)


# ---------------------------------------------------------------- the router: chunking and task order
@settings(max_examples=40, **SETTINGS)
@given(
    seed=st.integers(0, 2**16),
    num_tasks=st.integers(1, 4),
    dim=st.integers(2, 8),
    ridge=st.sampled_from([1e-2, 1.0, 100.0]),
    head=st.sampled_from(["ridge", "lda"]),
    data=st.data(),
)
def test_router_is_invariant_to_chunking_and_task_order(seed, num_tasks, dim, ridge, head, data):
    gen = torch.Generator().manual_seed(seed)
    samples = [torch.randn(int(torch.randint(1, 12, (1,), generator=gen)), dim, generator=gen, dtype=torch.float64)
               + 3 * torch.randn(1, dim, generator=gen, dtype=torch.float64) for _ in range(num_tasks)]
    general = torch.randn(5, dim, generator=gen, dtype=torch.float64)

    reference = AnalyticRouter(in_features=dim, num_classes=num_tasks + 1, ridge=ridge, head=head)
    reference.partial_fit(general, 0)
    for task, x in enumerate(samples):
        reference.partial_fit(x, task + 1)
    reference.solve()

    # the same data, tasks added in another order (classes appended as they arrive), each split into random chunks
    order = data.draw(st.permutations(range(num_tasks)), label="task order")
    other = AnalyticRouter(in_features=dim, num_classes=1, ridge=ridge, head=head)
    for position, task in enumerate(order):
        other.add_class()
        x = samples[task]
        cuts = sorted(data.draw(st.lists(st.integers(1, max(1, len(x) - 1)), max_size=3), label=f"cuts {task}"))
        for chunk in torch.tensor_split(x, [c for c in cuts if c < len(x)]):
            if len(chunk):
                other.partial_fit(chunk, position + 1)
        if position == num_tasks // 2:  # the base route's data arrives in the middle of the stream
            other.partial_fit(general, 0)
    if num_tasks // 2 >= num_tasks:
        other.partial_fit(general, 0)
    other.solve()
    columns = [0] + [1 + list(order).index(task) for task in range(num_tasks)]  # other's column of each task
    scale = max(1.0, float(reference.weight.abs().max()))
    assert float((other.weight[:, columns] - reference.weight).abs().max()) <= 1e-9 * scale
    assert float((other.bias[columns] - reference.bias).abs().max()) <= 1e-9 * max(1.0, float(reference.bias.abs().max()))
    assert torch.equal(other.class_counts[columns], reference.class_counts)


@settings(max_examples=30, **SETTINGS)
@given(seed=st.integers(0, 2**16), ridge=st.floats(1e-300, 1e-6), copies=st.integers(2, 6))
def test_tiny_ridge_on_colinear_features_never_gives_nan(seed, ridge, copies):
    """An ill-conditioned system either solves to finite numbers or raises RouterNumericalError, never NaN."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(1, 6, generator=gen, dtype=torch.float64)
    router = AnalyticRouter(in_features=6, num_classes=2, ridge=ridge)
    router.partial_fit(torch.cat([base * (k + 1) for k in range(copies)]), 1)  # rank 1 in 6 dimensions
    try:
        router.solve()
    except RouterNumericalError as err:
        assert "ridge" in str(err)
        return
    assert torch.isfinite(router.weight).all()


# ---------------------------------------------------------------- routing: padding side and pad length
_MODEL = {}


def _model():
    if "m" not in _MODEL:
        _MODEL["m"] = two_task_model()
    return _MODEL["m"]


@settings(max_examples=25, **SETTINGS)
@given(
    rows=st.lists(st.tuples(st.sampled_from(["alpha", "beta"]), st.integers(1, 10), st.integers(0, 2**16)),
                  min_size=1, max_size=4),
    side=st.sampled_from(["left", "right"]),
    extra=st.integers(0, 6),
)
def test_routing_ignores_padding_side_and_length(rows, side, extra):
    model = _model()
    ids = {"alpha": ALPHA_IDS, "beta": BETA_IDS}
    tokens = [prompts(*ids[task], 1, seed=seed, min_len=length, max_len=length)[0] for task, length, seed in rows]
    alone = [model.route_scores(**left_pad([t]))[0] for t in tokens]  # each prompt alone, no padding
    pad = left_pad if side == "left" else right_pad
    batch = pad(tokens + [[ALPHA_IDS[0]] * (max(map(len, tokens)) + extra)])  # a longer row forces `extra` pads
    scores = model.route_scores(**batch)[: len(tokens)]
    routes = model.route(**batch)[: len(tokens)]
    assert routes == [model.tasks[int(row.argmax())] for row in alone]  # the base route is not fitted here
    # float32 features: padding changes the matmul shapes, hence round-off (~1e-7), never the routed task
    assert float((scores - torch.stack(alone)).abs().max()) < 1e-4


# ---------------------------------------------------------------- numerics under half-precision models
@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 5e-2), (torch.float16, 5e-3)])
def test_half_precision_models_keep_float64_router_state(dtype, tolerance):
    """Router state is float64 whatever the model dtype, and equals the float32 model's up to the model's rounding.

    Tolerance: the relative (Frobenius) difference of the statistics G and C from the float32 model's. The router
    math itself is exact in float64; the features come from the model's forward pass, whose rounding is 2^-8 ~ 4e-3
    per operation in bf16 and 2^-11 ~ 5e-4 in fp16, accumulated over the 2 blocks below the router layer and the final
    norm. 5e-2 (bf16) and 5e-3 (fp16) leave a 10x margin over what we measure, and routing must not change at all.
    """
    full = two_task_model(tiny_llama())
    half = two_task_model(tiny_llama().to(dtype))
    assert next(half.base_model.model.parameters()).dtype == dtype
    a, b = full.base_model.router, half.base_model.router
    for name, tensor in b.statistics_state_dict().items():
        assert tensor.dtype == torch.float64, name
    assert b.solve().weight.dtype == torch.float64
    for name in ("class_gram", "cross"):
        x, y = getattr(a, name), getattr(b, name)
        assert float((x - y).norm() / x.norm()) < tolerance, name
    assert torch.equal(a.class_counts, b.class_counts)
    held = prompts(*ALPHA_IDS, 6, seed=60) + prompts(*BETA_IDS, 6, seed=61)
    expected = ["alpha"] * 6 + ["beta"] * 6
    assert full.route(**left_pad(held)) == expected
    assert half.route(**left_pad(held)) == expected
    half.to(torch.float32).to(dtype)  # casting the model back and forth never touches the router
    assert b.weight.dtype == torch.float64 and b.class_gram.dtype == torch.float64
