"""Child processes of tests/test_atomic_save.py: save a small bank over and over until the parent SIGKILLs them.

They start from a fork server that has already imported torch, transformers and peft_asr, so a trial costs a fork and
a tiny model, not a Python start-up.
"""

from __future__ import annotations

import os
import signal

import torch


def tiny_base():
    """A 3-block Llama of width 16 (deterministic)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, pad_token_id=0, tie_word_embeddings=False,
    )).eval()


def tiny_bank_model():
    """`tiny_base` with one task: saves in a few milliseconds."""
    from peft import get_peft_model

    import peft_asr  # noqa: F401
    from peft_asr import ASRConfig

    model = get_peft_model(tiny_base(), ASRConfig(task_type="CAUSAL_LM", r=2, lora_alpha=4, target_modules=["q_proj"],
                                           router_layer=1))
    model.add_task("alpha")
    return model


def batch(step: int) -> dict:
    gen = torch.Generator().manual_seed(step)
    return {"input_ids": torch.randint(3, 64, (2, 5), generator=gen), "attention_mask": torch.ones(2, 5, dtype=torch.long)}


def change(model, step: int) -> None:
    """Make every file of the next save differ from the last one: weights, statistics, config and card."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".asr_B." in name:
                param.fill_(step * 1e-3)
    model.base_model.bank_config.confidence_threshold = step / 1000  # adapter_config.json
    model.fit_router([batch(step)], task="alpha", progress=False)  # statistics, router weight, counts in the card


def _log(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, line.encode() + b"\n")
    finally:
        os.close(fd)


def save_loop(root: str, use_exchange: bool, ready) -> None:
    """Forever: save step i into ``refs/i`` (the reference), log ``b i``, save it over ``bank``, log ``e i``."""
    import peft_asr.bank.atomic as hub

    torch.set_num_threads(1)
    hub.USE_EXCHANGE = use_exchange
    model = tiny_bank_model()
    step = 0
    while True:
        step += 1
        change(model, step)
        model.save_pretrained(os.path.join(root, "refs", str(step)))
        _log(os.path.join(root, "log"), f"b {step}")
        model.save_pretrained(os.path.join(root, "bank"))
        _log(os.path.join(root, "log"), f"e {step}")
        if step == 2:
            ready.set()


def crash_between_renames(root: str) -> None:
    """Save twice with the two-rename swap, and die (SIGKILL) right before the second save's second rename."""
    import peft_asr.bank.atomic as hub

    torch.set_num_threads(1)
    hub.USE_EXCHANGE = False
    model = tiny_bank_model()
    change(model, 1)
    model.save_pretrained(os.path.join(root, "refs", "1"))
    model.save_pretrained(os.path.join(root, "bank"))
    change(model, 2)
    model.save_pretrained(os.path.join(root, "refs", "2"))
    real_rename = os.rename

    def rename(src, dst):
        if os.path.basename(os.fspath(dst)) == "bank" and ".tmp-" in os.path.basename(os.fspath(src)):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_rename(src, dst)

    hub.os.rename = rename  # `hub.os` is the os module: this process dies anyway
    model.save_pretrained(os.path.join(root, "bank"))
