"""ASRConfig validation and JSON round trip."""

from __future__ import annotations

import json

import pytest

from peft_asr import ASRConfig


def test_json_round_trip(tmp_path):
    cfg = ASRConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"], router_layer=3, feature_dim=128,
                    activation="relu", ridge=0.5, tasks=["a", "b-2"], confidence_threshold=0.3)
    cfg.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "ASR" and data["tasks"] == ["a", "b-2"]
    back = ASRConfig.from_pretrained(tmp_path)
    for field in ("r", "router_layer", "feature_dim", "activation", "ridge", "tasks", "confidence_threshold"):
        assert getattr(back, field) == getattr(cfg, field), field
    assert back.target_modules == {"q_proj"}


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"r": 0}, ValueError, r"`r` must be an integer >= 1"),
        ({"r": 2.5}, ValueError, r"`r` must be an integer"),
        ({"lora_alpha": -1}, ValueError, "`lora_alpha` must be a positive number"),
        ({"lora_dropout": 1.5}, ValueError, r"`lora_dropout` must be in \[0, 1\)"),
        ({"router_layer": -1}, ValueError, "`router_layer` must be an integer >= 0"),
        ({"feature_dim": 0}, ValueError, "`feature_dim` must be an integer >= 1"),
        ({"activation": "gelu"}, ValueError, "`activation` must be 'none' or 'relu'"),
        ({"ridge": 0}, ValueError, "`ridge` must be a number > 0"),
        ({"ridge": True}, ValueError, "`ridge` must be a number > 0"),
        ({"tasks": "a"}, TypeError, "`tasks` must be a list"),
        ({"tasks": ["a", "a"]}, ValueError, "already in the bank"),
        ({"tasks": [""]}, ValueError, "is not valid"),
        ({"tasks": ["__base__"]}, ValueError, "reserved"),
        ({"tasks": [3]}, TypeError, "task name must be a str"),
        ({"format_version": 99}, ValueError, "upgrade peft-asr"),
        ({"confidence_threshold": "high"}, ValueError, "`confidence_threshold` must be a number"),
    ],
)
def test_bad_values_raise_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        ASRConfig(task_type="CAUSAL_LM", **kwargs)


def test_every_field_is_documented():
    import dataclasses

    doc = ASRConfig.__doc__
    own = [f for f in dataclasses.fields(ASRConfig) if f.name in ASRConfig.__annotations__]
    for f in own:
        assert f"{f.name} (`" in doc, f"{f.name} is missing from the Args block"
        assert f.metadata.get("help"), f"{f.name} has no help metadata"


@pytest.mark.parametrize("name", ["abc\n", "abc ", "-abc", "a" * 65, "ab/c", "é"])
def test_one_task_name_rule_for_the_config_the_model_and_the_data(name):
    """Task names become state-dict keys; the config, `add_task` and `Task` share one rule (a trailing newline
    passed the config's check once while the data loaders refused it)."""
    from conftest import two_task_model

    from peft_asr.cl import Task
    from peft_asr.tuner.config import is_task_name

    assert not is_task_name(name)
    with pytest.raises(ValueError, match="is not valid"):
        ASRConfig(task_type="CAUSAL_LM", tasks=[name])
    with pytest.raises(ValueError, match="is not valid"):
        two_task_model().add_task(name)
    with pytest.raises(ValueError, match="must be 1-64 letters"):
        Task(name=name, train=[], eval=[{"prompt": "p", "answer": "a"}])
    assert is_task_name("abc") and is_task_name("a-b_9") and is_task_name("a" * 64)
