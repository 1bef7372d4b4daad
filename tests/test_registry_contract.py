"""What peft_asr relies on inside PEFT. If a PEFT upgrade breaks one of these, this file fails first and loudly."""

from __future__ import annotations

import importlib
import inspect

import peft
import pytest
from packaging.version import Version


def test_peft_version_is_in_the_tested_range():
    assert Version("0.21.0") <= Version(peft.__version__) < Version("0.22"), (
        f"peft {peft.__version__} is outside the range peft_asr was tested with (>=0.21.0,<0.22); "
        "re-run this contract suite before widening the pin in pyproject.toml"
    )


def test_asr_peft_type_and_mappings_are_registered():
    import peft_asr
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import PeftType

    assert PeftType.ASR == "ASR" and PeftType("ASR") is PeftType.ASR and PeftType.ASR in list(PeftType)
    assert PEFT_TYPE_TO_CONFIG_MAPPING["ASR"] is peft_asr.ASRConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["ASR"] is peft_asr.ASRModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING["ASR"] == "asr_"


def test_registration_is_idempotent():
    import peft_asr
    from peft import PeftModel
    from peft.utils import PeftType

    save = PeftModel.save_pretrained
    importlib.reload(importlib.import_module("peft_asr._registry"))
    peft_asr.register()
    peft_asr.register()
    assert [m for m in PeftType if m == "ASR"] == [PeftType.ASR]
    assert PeftModel.save_pretrained is save  # not wrapped twice


def test_peft_signatures_we_wrap_or_call():
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
    from peft.utils import register_peft_method

    assert list(inspect.signature(register_peft_method).parameters) == [
        "name", "config_cls", "model_cls", "prefix", "is_mixed_compatible"]
    save = inspect.signature(PeftModel.save_pretrained.__wrapped__).parameters
    assert list(save)[:3] == ["self", "save_directory", "safe_serialization"] and "is_main_process" in save
    load = inspect.signature(PeftModel.load_adapter.__wrapped__).parameters
    assert list(load)[:3] == ["self", "model_id", "adapter_name"]
    push = inspect.signature(PeftModel.push_to_hub.__wrapped__).parameters
    assert list(push)[:2] == ["self", "repo_id"]
    assert getattr(PeftModel.push_to_hub, "__peft_asr_wrapped__", False)
    assert hasattr(PeftModel, "_enable_peft_forward_hooks")
    src = inspect.getsource(PeftModel._enable_peft_forward_hooks)
    assert "base_model._enable_peft_forward_hooks" in src
    for name in ("_pre_injection_hook", "_post_injection_hook", "_create_and_replace", "_prepare_adapter_config",
                 "_mark_only_adapters_as_trainable", "_check_target_module_exists", "merge_and_unload", "unload",
                 "_check_merge_allowed"):
        assert hasattr(BaseTuner, name), name
    # merge refusals run before any layer changes only if PEFT calls this check from both merge paths
    for method in (BaseTuner.merge_adapter, BaseTuner._unload_and_optionally_merge):
        assert "_check_merge_allowed" in inspect.getsource(method), method.__name__
    for name in ("set_adapter", "_freeze_non_trainable_peft_weights", "set_requires_grad", "enable_adapters"):
        assert hasattr(BaseTunerLayer, name), name


def test_peft_key_mapping_round_trips_task_parameters():
    """Task parameters sit one level below the adapter name; PEFT must strip and restore it symmetrically."""
    from peft.tuners.tuners_utils import _remove_adapter_name_from_state_dict_key

    key = "base_model.model.layers.2.q_proj.asr_A.default.topic"
    assert _remove_adapter_name_from_state_dict_key(key, "default") == "base_model.model.layers.2.q_proj.asr_A.topic"


def test_peft_config_loader_accepts_our_type(tmp_path):
    from peft import PeftConfig

    from peft_asr import ASRConfig

    ASRConfig(task_type="CAUSAL_LM", tasks=["a"]).save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, ASRConfig) and loaded.tasks == ["a"]


def test_generate_and_init_wrappers_and_the_special_forward_arguments():
    """`task_names` reaches `_enable_peft_forward_hooks` and is stripped before the base model (PEFT's
    `special_peft_forward_args`); `generate` of the PeftModel classes enters the tuner's generate scope."""
    from peft import peft_model
    from peft.peft_model import PeftModel

    import peft_asr  # noqa: F401
    from peft_asr._registry import GENERATE_CLASSES, TASK_NAMES_ARG

    assert getattr(PeftModel.__init__, "__peft_asr_wrapped__", False)
    for name in GENERATE_CLASSES:
        cls = getattr(peft_model, name)
        assert "generate" in cls.__dict__ and getattr(cls.__dict__["generate"], "__peft_asr_wrapped__", False), name
        src = inspect.getsource(cls.__dict__["generate"].__wrapped__)
        assert "_enable_peft_forward_hooks" in src and "special_peft_forward_args" in src, name
    # every other PeftModel class inherits one of the wrapped `generate`s (or has none)
    for name, cls in vars(peft_model).items():
        if isinstance(cls, type) and issubclass(cls, PeftModel) and "generate" in cls.__dict__:
            assert name in GENERATE_CLASSES, f"{name} defines its own generate: wrap it in _registry"
    init_src = inspect.getsource(PeftModel.__init__.__wrapped__)
    assert "self.special_peft_forward_args" in init_src
    forward_src = inspect.getsource(peft_model.PeftModelForCausalLM.forward)
    assert "k not in self.special_peft_forward_args" in forward_src

    from conftest import tiny_llama
    from peft import get_peft_model

    from peft_asr import ASRConfig

    model = get_peft_model(tiny_llama(), ASRConfig(task_type="CAUSAL_LM", target_modules=["q_proj"], router_layer=1))
    assert TASK_NAMES_ARG in model.special_peft_forward_args
    other = get_peft_model(tiny_llama(), peft.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    assert TASK_NAMES_ARG not in other.special_peft_forward_args


@pytest.mark.parametrize("head, extra", [("ridge", ()), ("lda", ("bias", "precision", "ood_threshold", "ood_counts"))])
def test_peft_state_dict_holds_the_router_under_the_keys_banks_use(head, extra):
    """The router is buffers of the tuner; PEFT's own state-dict hooks save and load them, under the keys the bank's
    checks read (a bank file format: tests/test_bank_compat.py loads a bank of 0.1.0, whose ridge router had two)."""
    import torch
    from conftest import two_task_model
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    from peft_asr.bank.files import ROUTER_COUNTS_KEY, ROUTER_PREFIX, ROUTER_WEIGHT_KEY

    model = two_task_model(router_head=head)
    state = get_peft_model_state_dict(model)
    assert {k for k in state if "asr_router" in k} == {ROUTER_WEIGHT_KEY, ROUTER_COUNTS_KEY} | {
        ROUTER_PREFIX + name for name in extra}
    changed = {k: v.clone() for k, v in state.items()}
    changed[ROUTER_WEIGHT_KEY] += 1.0
    set_peft_model_state_dict(model, changed)
    assert torch.equal(model.base_model.router.weight, changed[ROUTER_WEIGHT_KEY])


@pytest.mark.parametrize("written_by, loads", [("99.0.0", True), (peft.__version__, False), (None, False)])
def test_config_of_a_newer_peft_loads_with_a_warning_when_only_peft_keys_are_new(tmp_path, written_by, loads):
    """A newer PEFT may add fields to its base config; a bank it wrote loads here with a warning. Unknown keys in a
    config of this PEFT (or of none named) are still refused: they are typos or another library's."""
    import json
    import warnings

    from peft_asr import ASRConfig, ASRConfigError

    ASRConfig(task_type="CAUSAL_LM", tasks=["a"]).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    data["a_new_peft_field"] = True
    if written_by is None:
        data.pop("peft_version", None)
    else:
        data["peft_version"] = written_by
    path.write_text(json.dumps(data))
    if loads:
        with pytest.warns(UserWarning, match=r"written by peft 99\.0\.0 .*ignoring the keys \['a_new_peft_field'\]"):
            config = ASRConfig.from_pretrained(tmp_path)
        assert config.tasks == ["a"] and not hasattr(config, "a_new_peft_field")
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(ASRConfigError, match=r"unknown keys \['a_new_peft_field'\]"):
                ASRConfig.from_pretrained(tmp_path)
