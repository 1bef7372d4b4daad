"""Quantized (bitsandbytes 4-bit / 8-bit, QLoRA) and half-precision (bf16 / fp16) bases: training, routing, a mixed
batch against its rows pinned, the bank on disk, generate, and merging one task into the base.

The bases are the tiny Llama of conftest, saved once and loaded back with ``from_pretrained`` (how transformers
quantizes); bitsandbytes runs these tests on the CPU. Every bank is trained the way a user trains one: task
``alpha`` for a few optimizer steps, then task ``beta``, then the router fitted on both; a quantized base goes
through PEFT's ``prepare_model_for_kbit_training`` first (gradient checkpointing on), as in QLoRA.
"""

from __future__ import annotations

import copy
import importlib.util
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import real_logits, ALPHA_IDS, BETA_IDS, PromptAnswerData, collate, left_pad, prompts, tiny_llama, two_task_model
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from safetensors import safe_open

import peft_asr  # noqa: F401  (registers the method)
from peft_asr import ASRConfig
from peft_asr.tuner.layer import ASRLayer
from peft_asr.tuner.merging import merge_delta

needs_bnb = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None,
    reason="bitsandbytes is not installed (`pip install bitsandbytes`, part of the `test` extra)",
)
QUANTIZED = [pytest.param("4bit", marks=needs_bnb), pytest.param("8bit", marks=needs_bnb)]
KINDS = QUANTIZED + ["bf16", "fp16"]
# the logits' dtype: the 4-bit base computes in float32 (`bnb_4bit_compute_dtype`), the 8-bit one in its input's
LOGIT_DTYPE = {"4bit": torch.float32, "8bit": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

ALPHA = prompts(*ALPHA_IDS, 3, seed=11)  # held-out prompts
BETA = prompts(*BETA_IDS, 3, seed=12)
MIXED = [ALPHA[0], BETA[0], BETA[1], ALPHA[1]]
MIXED_TASKS = ["alpha", "beta", "beta", "alpha"]


def _load_kwargs(kind: str) -> dict:
    if kind in ("bf16", "fp16", "fp32"):
        return {"dtype": {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[kind]}
    from transformers import BitsAndBytesConfig

    if kind == "4bit":  # no double quantization: the absmax of every block is exact, which the bound below uses
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    return {"dtype": torch.float32, "quantization_config": config}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matrices: one thread is faster, and much faster on a loaded machine (see conftest's `one_thread`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(path)  # quantization needs a `from_pretrained` path
    return path


def _train(model, ids: tuple[int, int], seed: int, steps: int = 4) -> None:
    """A few AdamW steps on the task being trained (prompt + answer rows, the prompt masked by -100)."""
    data = PromptAnswerData(*ids, 8, seed)
    batch = collate([data[i] for i in range(len(data))])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def _base_state(model) -> dict[str, torch.Tensor]:
    """Every tensor of the base model as stored: 4-bit codes and their quantization statistics included."""
    state = model.get_base_model().state_dict()
    return {k: v.clone() for k, v in state.items() if ".asr_" not in k and isinstance(v, torch.Tensor)}


@dataclass
class Bank:
    model: PeftModel  # trained on its base, router fitted
    before_beta: dict[str, torch.Tensor]  # every subspace before task beta was trained
    base_before: dict[str, torch.Tensor]  # the base as stored, before task beta was trained
    folder: Path  # the bank saved


@pytest.fixture(scope="module")
def bank(base_dir, tmp_path_factory):
    """``bank(kind)``: the bank trained on that base (built once per kind), and its saved folder."""
    from transformers import AutoModelForCausalLM

    built = {}

    def get(kind: str) -> Bank:
        if kind not in built:
            torch.manual_seed(0)
            base = AutoModelForCausalLM.from_pretrained(base_dir, **_load_kwargs(kind))
            if kind in ("4bit", "8bit"):  # the QLoRA recipe: frozen base, input gradients, gradient checkpointing
                base = prepare_model_for_kbit_training(base, gradient_checkpointing_kwargs={"use_reentrant": False})
            model = get_peft_model(base, ASRConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                                                   target_modules=["q_proj", "v_proj"], router_layer=2))
            model.add_task("alpha")
            _train(model, ALPHA_IDS, seed=1)
            model.add_task("beta")
            before_beta = {n: p.detach().clone() for n, p in model.named_parameters() if ".asr_" in n}
            base_before = _base_state(model)
            _train(model, BETA_IDS, seed=2)
            model.fit_router([left_pad(prompts(*ALPHA_IDS, 48, seed=1))], task="alpha", progress=False)
            model.fit_router([left_pad(prompts(*BETA_IDS, 48, seed=2))], task="beta", progress=False)
            folder = tmp_path_factory.mktemp(f"bank-{kind}")
            model.save_pretrained(folder)
            built[kind] = Bank(model.eval(), before_beta, base_before, folder)
        return built[kind]

    return get


def _reload(base_dir, folder, kind: str):
    """The saved bank on a freshly loaded base of ``kind``."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, **_load_kwargs(kind))
    return PeftModel.from_pretrained(base, folder).eval()


def _tolerance(kind: str, logits: torch.Tensor) -> float:
    """Float32 logits agree to 1e-5, as in test_core. A half-precision base rounds every block's output to its dtype,
    and a padded batch rounds differently from a row alone: allow 4 units in the last place of the largest logit."""
    dtype = LOGIT_DTYPE[kind]
    if dtype == torch.float32:
        return 1e-5
    return 4 * torch.finfo(dtype).eps * logits.abs().max().item()


# ---------------------------------------------------------------- training
@pytest.mark.parametrize("kind", KINDS)
def test_training_changes_only_the_trained_task(bank, kind):
    b = bank(kind)
    after = {n: p.detach() for n, p in b.model.named_parameters() if ".asr_" in n}
    for name, before in b.before_beta.items():
        if name.endswith(".beta"):
            assert not torch.equal(after[name], before), name  # the trained subspace moved
        else:
            assert torch.equal(after[name], before), name  # alpha's subspace is bit-identical
    base_after = _base_state(b.model)
    assert base_after.keys() == b.base_before.keys()
    assert all(torch.equal(base_after[k], v) for k, v in b.base_before.items())  # the (quantized) base is untouched
    assert {n.rsplit(".", 1)[-1] for n, p in b.model.named_parameters() if p.requires_grad} == {"beta"}
    # adapters are float32 whatever the base stores (as PEFT's `autocast_adapter_dtype`)
    assert {p.dtype for n, p in b.model.named_parameters() if ".asr_" in n} == {torch.float32}


# ---------------------------------------------------------------- routing
@pytest.mark.parametrize("kind", KINDS)
def test_routing_on_the_base(bank, kind):
    model = bank(kind).model
    assert model.route(**left_pad(ALPHA)) == ["alpha"] * 3
    assert model.route(**left_pad(MIXED)) == MIXED_TASKS
    assert model.route_scores(**left_pad(MIXED)).dtype == torch.float64
    router = model.base_model.router
    assert {b.dtype for b in router.buffers() if b.is_floating_point()} == {torch.float64}  # whatever the base's dtype


@pytest.mark.parametrize("kind", KINDS)
def test_mixed_batch_equals_each_row_pinned(bank, kind):
    model = bank(kind).model
    mixed = real_logits(model, MIXED)
    tol = _tolerance(kind, torch.cat(mixed))
    worst = 0.0
    for row, task, got in zip(MIXED, MIXED_TASKS, mixed):
        alone = real_logits(model, [row], pinned=task)[0]
        worst = max(worst, (got - alone).abs().max().item())
        for other in ("alpha" if task == "beta" else "beta", "__base__"):  # the tasks differ far beyond `tol`
            assert (got - real_logits(model, [row], pinned=other)[0]).abs().max() > 10 * tol, other
    print(f"{kind}: max |mixed - pinned| logit difference {worst:.3e} (tolerance {tol:.1e})")
    assert worst <= tol


# ---------------------------------------------------------------- the bank on disk
@pytest.mark.parametrize("kind", [QUANTIZED[0], "bf16"])
def test_bank_round_trips_on_the_base(bank, base_dir, kind):
    b = bank(kind)
    with safe_open(str(b.folder / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(".asr_" in k for k in keys), keys  # subspaces and router only: no (quantized) base weight
    loaded = _reload(base_dir, b.folder, kind)
    batch = left_pad(MIXED)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, b.model(**batch).logits)
    assert loaded.route(**batch) == MIXED_TASKS


# ---------------------------------------------------------------- generate
@needs_bnb
def test_generate_on_a_4bit_base_routes_each_row(bank):
    model = bank("4bit").model
    batch = left_pad(MIXED)
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        routed = model.generate(**batch, **kwargs)
        explicit = model.generate(**batch, task_names=MIXED_TASKS, **kwargs)
        base = model.generate(**batch, task_names=[None] * len(MIXED), **kwargs)
        assert torch.equal(routed, explicit)
        assert not torch.equal(routed, base)
        for i, (row, task) in enumerate(zip(MIXED, MIXED_TASKS)):
            with model.use_task(task):
                alone = model.generate(**left_pad([row]), **kwargs)
            assert routed[i, -kwargs["max_new_tokens"]:].tolist() == alone[0, -kwargs["max_new_tokens"]:].tolist(), i


# ---------------------------------------------------------------- merging
def _dense(layer) -> torch.Tensor:
    """The (out, in) weight a base layer computes with, dequantized."""
    from peft.utils.integrations import dequantize_bnb_weight, get_bnb_param_type

    weight = layer.weight
    kind = get_bnb_param_type(weight)
    if not kind:
        return weight.detach().float()
    state = weight.quant_state if kind == "4bit" else layer.state
    return dequantize_bnb_weight(weight, state=state).float()


def _rounding_bound(kind: str, merged: torch.Tensor) -> torch.Tensor:
    """Per element, the largest error of quantizing ``merged`` (out, in) once, by how bitsandbytes quantizes.

    4-bit NF4: blocks of 64 numbers scaled by their absmax, each rounded to the nearest of 16 codes, so the error is
    at most half the widest gap between codes times the block's absmax. 8-bit: rows scaled by their absmax and
    rounded to one of 255 levels (absmax / 254 at most), after a cast to float16 (2^-11 relative; twice that is
    allowed, for the float32 arithmetic of the scales). The 4-bit bound gets the same 1e-4 relative slack.
    """
    if kind == "4bit":
        import bitsandbytes as bnb

        half_gap = bnb.functional.get_4bit_type("nf4", device="cpu").sort().values.diff().max() / 2
        blocks = merged.reshape(-1, 64)  # (out * in / 64, 64): bitsandbytes' blocks over the row-major weight
        return (half_gap * blocks.abs().amax(1, keepdim=True)).expand_as(blocks).reshape(merged.shape) * 1.0001
    absmax = merged.abs().amax(1, keepdim=True)  # (out, 1)
    return (absmax / 254 + absmax * 2.0 ** -10).expand_as(merged)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_and_unload_one_task(bank, base_dir, kind):
    """Merging ``beta`` into the base: the merged model answers as ``beta`` unmerged, up to the rounding.

    Each merged weight is ``W + ΔW`` rounded once onto the base's grid (checked element by element). The logits:
    on a 4-bit / 8-bit base the merge rounds the adapted layers' weights onto the same grid on which loading the
    base rounded *every* weight, so the merged model may differ from ``beta`` unmerged by no more than the same bank
    on this base differs from it on a float32 base. On a bf16 / fp16 base the one extra rounding moves the logits
    no more than running a row in another batch does (the tolerance of the mixed-batch test). Either way the merged
    model must be far closer to ``beta`` than to the plain base: the task is really merged.
    """
    folder = bank(kind).folder
    model = _reload(base_dir, folder, kind)
    reference = _reload(base_dir, folder, "fp32")
    batch = left_pad(BETA)
    with torch.no_grad():
        with model.use_task("beta"):
            pinned = model(**batch).logits.float()
        with model.use_task(None):
            plain = model(**batch).logits.float()
        with reference.use_task("beta"):
            exact = reference(**batch).logits.float()
    layers = {n: m for n, m in model.base_model.model.named_modules() if isinstance(m, ASRLayer)}
    with torch.no_grad():  # what each merged weight should be before it is rounded: W + ΔW
        expected = {n: _dense(m.get_base_layer()) + m.get_delta_weight("default", "beta").float()
                    for n, m in layers.items()}
    types = {n: type(m.get_base_layer()) for n, m in layers.items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = model.merge_and_unload(task="beta")
    rounding = [str(w.message) for w in caught if "quantizes the merged weights again" in str(w.message)]
    assert len(rounding) == (1 if kind in ("4bit", "8bit") else 0), rounding
    assert not any(isinstance(m, ASRLayer) for m in merged.modules())
    with torch.no_grad():
        got = merged(**batch).logits.float()
    for name, weight in expected.items():
        layer = merged.get_submodule(name)
        assert type(layer) is types[name]  # still a 4-bit / 8-bit / half layer: requantized, not dequantized
        error = (_dense(layer) - weight).abs()
        if kind in ("4bit", "8bit"):
            assert (error <= _rounding_bound(kind, weight)).all(), name
        else:  # one rounding to the dtype: half a unit in the last place
            assert (error <= weight.abs() * torch.finfo(layer.weight.dtype).eps / 2 + 2.0 ** -25).all(), name
    merge_error = (got - pinned).abs().max().item()
    base_error = (pinned - exact).abs().max().item()
    task_effect = (pinned - plain).abs().max().item()
    print(f"{kind}: max |merged - beta unmerged| logit {merge_error:.3e}; the base's own rounding {base_error:.3e}; "
          f"beta vs the plain base {task_effect:.3e}")
    if kind in ("4bit", "8bit"):
        assert merge_error <= base_error
    else:  # rounding the merged weights to the dtype moves the logits as little as batching them differently does
        assert merge_error <= _tolerance(kind, pinned)
    assert merge_error < 0.1 * task_effect


@pytest.mark.parametrize("kind", QUANTIZED)
def test_unmerge_restores_the_quantized_base_exactly(bank, base_dir, kind):
    model = _reload(base_dir, bank(kind).folder, kind)
    batch = left_pad(MIXED)
    before = _base_state(model)
    with torch.no_grad():
        routed = model(**batch).logits
        with model.use_task("beta"):
            pinned = model(**batch).logits
            with pytest.warns(UserWarning, match="quantizes the merged weights again"):
                model.merge_adapter()
            assert model.base_model.merged_task == "beta"
            merged = model(**batch).logits
        model.unmerge_adapter()
        again = model(**batch).logits
    assert not torch.equal(merged, pinned) and (merged - pinned).abs().max() < 0.1  # rounded, close
    after = _base_state(model)
    assert all(torch.equal(after[k], v) for k, v in before.items())  # the codes kept at merge time, not re-rounded
    assert torch.equal(again, routed)


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_a_weight_that_cannot_be_merged_is_refused_before_any_layer_changes():
    model = two_task_model()
    bases = [m.get_base_layer() for m in model.modules() if isinstance(m, ASRLayer)]
    last = bases[-1]  # the last adapted layer: a merge that checked layer by layer would have merged the others
    last.weight = torch.nn.Parameter(torch.zeros_like(last.weight, dtype=torch.int8), requires_grad=False)
    before = [b.weight.detach().clone() for b in bases]
    for merge in (lambda: model.merge_and_unload(task="beta"), model.merge_adapter):
        with model.use_task("beta"):
            with pytest.raises(TypeError, match=r"stores its weight as Tensor \(torch.int8\).*use_task"):
                merge()
        assert all(torch.equal(b.weight, w) for b, w in zip(bases, before))  # no layer merged
        assert sum(isinstance(m, ASRLayer) for m in model.modules()) == len(bases)  # none unloaded


def test_a_second_task_is_not_merged_over_a_merged_one():
    model = two_task_model()
    with model.use_task("alpha"):
        model.merge_adapter()
    before = _weights(model)
    with pytest.raises(RuntimeError, match=r"task 'alpha' is already merged.*unmerge_adapter\(\)"):
        model.merge_and_unload(task="beta")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_a_broken_subspace_is_refused_before_any_layer_changes():
    model = two_task_model()
    name = [n for n, _ in model.named_parameters() if n.endswith("asr_B.default.beta")][-1]
    with torch.no_grad():
        model.get_parameter(name)[0, 0] = float("nan")
    before = _weights(model)
    with pytest.raises(ValueError, match="task 'beta' has NaN or inf weights in `.*layers.3.self_attn.v_proj`"):
        model.merge_and_unload(task="beta")
    assert all(p.nan_to_num().equal(before[n].nan_to_num()) for n, p in model.named_parameters())


@needs_bnb
def test_4bit_merge_reads_the_cpu_packed_layout():
    """bitsandbytes repacks a 4-bit weight for its AVX512-BF16 CPU kernel on the first eval forward (on CPUs that
    have the instructions); a merge must read it as the standard layout, not as codes in the wrong order."""
    import bitsandbytes as bnb

    if not hasattr(bnb.functional, "_convert_weight_packed_for_cpu"):
        pytest.skip("this bitsandbytes has no CPU-packed 4-bit layout")
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
    weight = layer.weight
    weight.data, weight.quant_state = bnb.functional._convert_weight_packed_for_cpu(weight.data, weight.quant_state)
    unpacked = copy.deepcopy(weight)  # the reference: bitsandbytes' own inverse (it keeps absmax rounded to bf16)
    unpacked.data, unpacked.quant_state = bnb.functional._convert_weight_packed_for_cpu_inverse(
        unpacked.data, unpacked.quant_state)
    delta = torch.randn(64, 64) * 0.01
    expected = bnb.functional.dequantize_4bit(unpacked.data, unpacked.quant_state) + delta
    merge_delta(layer, delta, safe_merge=True, task="t")
    assert layer.weight.quant_state.dtype == torch.float32
    assert ((_dense(layer) - expected).abs() <= _rounding_bound("4bit", expected)).all()
