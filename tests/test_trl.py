"""Training with TRL's `SFTTrainer` + `ASRCallback`: plain, packed and padding-free batches count each prompt once.

TRL packs several examples into one row (``packing=True``) or flattens a batch into one row (``padding_free=True``),
with ``position_ids`` restarting at 0 for every example. The router pass splits such rows back into their examples,
so 24 prompts count as 24 and the router statistics equal those of the unpacked run (1e-10, float64).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

trl = pytest.importorskip("trl", reason="TRL is not installed (pip install -e '.[test]')")

import peft_asr  # noqa: E402,F401
from peft import get_peft_model  # noqa: E402

from peft_asr import ASRCallback, ASRConfig  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from tiny_model import byte_tokenizer, random_llama  # noqa: E402

WORDS = ["apple", "house", "green", "table", "river", "stone", "cloud", "mouse"]
N = 24  # prompts per task


def _rows(kind: str, text: bool = False) -> list[dict]:
    words = (WORDS * 3)[:N]
    if kind == "reverse":
        pairs = [(f"Reverse the word {w}:", " " + w[::-1]) for w in words]
    else:
        pairs = [(f"Spell out {w} in capitals please:", " " + w.upper()) for w in words]
    if text:
        return [{"text": p + c} for p, c in pairs]
    return [{"prompt": p, "completion": c} for p, c in pairs]


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def _model(tokenizer):
    torch.manual_seed(0)
    return get_peft_model(random_llama(len(tokenizer)), ASRConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                                                                  target_modules=["q_proj", "v_proj"], router_layer=2))


def _train(model, tokenizer, task: str, tmp_path, text: bool = False, **sft):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model.add_task(task)
    args = SFTConfig(output_dir=str(tmp_path / task), max_steps=2, per_device_train_batch_size=4, report_to="none",
                     save_strategy="no", use_cpu=True, learning_rate=1e-3, disable_tqdm=True, **sft)
    router = model.base_model.router
    before = {k: v.clone() for k, v in router.statistics_state_dict().items()}
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(_rows(task, text)),
                         processing_class=tokenizer, callbacks=[ASRCallback(progress=False)])
    trainer.train()
    after = router.statistics_state_dict()
    return {k: after[k] - before[k] for k in after}


MODES = {
    "plain": dict(max_length=128),
    "packing": dict(packing=True, max_length=128),
    "padding_free": dict(padding_free=True, max_length=None),
}


@pytest.mark.parametrize("text", [False, True], ids=["prompt-completion", "text"])
def test_every_prompt_counts_once_whatever_the_packing(tokenizer, tmp_path, text):
    deltas = {}
    for mode, sft in MODES.items():
        model = _model(tokenizer)
        deltas[mode] = _train(model, tokenizer, "reverse", tmp_path / mode, text=text, **sft)
        assert deltas[mode]["class_counts"].tolist() == [0.0, float(N)], mode  # 24 prompts count as 24
    for mode in ("packing", "padding_free"):
        for key in ("class_gram", "cross"):
            diff = (deltas[mode][key] - deltas["plain"][key]).abs().max().item()
            assert diff < 1e-10, (mode, key, diff)  # recursive == joint: same statistics as the unpacked run


def test_packed_training_routes_each_task(tokenizer, tmp_path):
    model = _model(tokenizer)
    _train(model, tokenizer, "reverse", tmp_path, packing=True, max_length=128)
    _train(model, tokenizer, "capitals", tmp_path, packing=True, max_length=128)
    model.eval()
    prompts = ["Reverse the word lemon:", "Spell out lemon in capitals please:", "Reverse the word bread:"]
    batch = tokenizer(prompts, padding=True, return_tensors="pt")
    assert model.route(**batch) == ["reverse", "capitals", "reverse"]


def test_sft_trainer_with_peft_config_is_refused_before_training(tokenizer, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    steps = []
    args = SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to="none",
                     save_strategy="no", use_cpu=True, max_length=128, disable_tqdm=True)
    trainer = SFTTrainer(model=random_llama(len(tokenizer)), args=args, processing_class=tokenizer,
                         train_dataset=Dataset.from_list(_rows("reverse")),
                         peft_config=ASRConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"],
                                               router_layer=2),
                         callbacks=[ASRCallback(progress=False)])
    trainer.add_callback(type("Steps", (trl.trainer.sft_trainer.TrainerCallback,), {
        "on_step_end": lambda self, *a, **k: steps.append(1)})())
    with pytest.raises(RuntimeError, match=r"no task is being trained.*SFTTrainer\(model=model"):
        trainer.train()
    assert steps == []  # refused before any training step
