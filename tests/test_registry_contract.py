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
                 "_mark_only_adapters_as_trainable", "_check_target_module_exists", "merge_and_unload", "unload"):
        assert hasattr(BaseTuner, name), name
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
