"""The only module that touches PEFT internals; it sits above ``tuner`` and ``bank`` and wires them into PEFT.

What PEFT offers a hook for goes through that hook: the tuner overrides ``BaseTuner``'s extension points as PEFT's own
tuners do, and the router is buffers that PEFT's state-dict hooks save and load (``_get_adapter_state_dict`` /
``_remap_adapter_state_dict_for_load``). What it offers none for is here.

What we rely on (pinned by ``tests/test_registry_contract.py``; ``peft`` is pinned to the tested range in
``pyproject.toml``):

1. ``peft.utils.peft_types.PeftType`` is a ``str`` enum; we add the member ``ASR`` at runtime.
2. ``peft.utils.register_peft_method(name=..., config_cls=..., model_cls=..., prefix=...)`` fills PEFT's mappings
   so that ``get_peft_model``, ``PeftModel.from_pretrained`` and ``AutoPeftModel*`` find our classes.
3. ``PeftModel.save_pretrained(save_directory, safe_serialization=..., is_main_process=..., ...)`` and
   ``PeftModel.load_adapter(model_id, adapter_name, ...)``: we wrap both so that an ASR bank also writes and reads
   its optional router-statistics file and its model card. The wrappers do nothing for other PEFT methods.
   ``PeftModel.from_pretrained(model, model_id, adapter_name, ..., subfolder=...)`` is wrapped too, so that a bank is
   checked (an interrupted save finished, a Hub bank's files fetched from one revision) *before* PEFT injects
   layers into the base model, and PEFT then builds the model from those checked files; and
   ``PeftModel.push_to_hub(repo_id, ...)`` (transformers' ``PushToHubMixin``), so that an ASR bank is uploaded with
   its own model card in one commit (``peft_asr.bank.push``).
4. ``PeftModel._enable_peft_forward_hooks`` calls ``base_model._enable_peft_forward_hooks(*args, **kwargs)`` as a
   context around every forward and ``generate``; our routing hooks live in that context.
5. ``PeftModel.special_peft_forward_args`` (an instance attribute set in ``__init__``) names the keyword arguments
   that ``forward``/``generate`` pass to that context and strip before calling the base model; ``PeftModel.__init__``
   is wrapped to add ``task_names`` for ASR models. The ``generate`` methods of ``PeftModel``,
   ``PeftModelForCausalLM`` and ``PeftModelForSeq2SeqLM`` are wrapped to enter ``ASRModel.generate_scope``, so the
   context knows a ``generate`` from a ``forward`` (a generate routes on its prompt whatever ``model.training``
   says; a training-mode forward uses the task being trained).

Registration is idempotent: importing ``peft_asr`` twice, or reloading it, registers once. ``ASR_PEFT_TYPE`` is
added before the tuner is imported, because ``ASRConfig()`` reads ``PeftType.ASR``.
"""

from __future__ import annotations

import enum
import functools

from peft.utils import peft_types

__all__ = ["ASR_PEFT_TYPE", "register", "PEFT_METHOD_NAME"]

PEFT_METHOD_NAME = "asr"
_MARK = "__peft_asr_wrapped__"


def _add_peft_type() -> enum.Enum:
    """Add ``PeftType.ASR`` (value ``"ASR"``) to PEFT's enum, once."""
    cls = peft_types.PeftType
    if "ASR" in cls.__members__:
        return cls["ASR"]
    member = str.__new__(cls, "ASR")  # == tuner.config.ASR_TYPE
    member._name_ = "ASR"
    member._value_ = "ASR"
    member.__objclass__ = cls
    if hasattr(member, "_sort_order_"):
        member._sort_order_ = len(cls._member_names_)
    cls._member_map_["ASR"] = member
    cls._value2member_map_["ASR"] = member
    cls._member_names_.append("ASR")
    type.__setattr__(cls, "ASR", member)
    return member


ASR_PEFT_TYPE = _add_peft_type()  # before the tuner is imported: ASRConfig() reads PeftType.ASR

from .bank.files import is_asr_model  # noqa: E402
from .bank.io import load_bank, local_load_kwargs, preflight, save_bank  # noqa: E402
from .bank.push import push_bank_to_hub  # noqa: E402
from .tuner.config import ASRConfig  # noqa: E402
from .tuner.model import ASRModel  # noqa: E402


def _wrap_bank_io() -> None:
    """Wrap ``PeftModel.save_pretrained`` / ``load_adapter`` with the ASR bank hooks (no-ops for other methods)."""
    from peft import PeftModel

    if getattr(PeftModel.save_pretrained, _MARK, False):
        return
    original_save = PeftModel.save_pretrained
    original_load = PeftModel.load_adapter

    @functools.wraps(original_save)
    def save_pretrained(self, save_directory, *args, **kwargs):
        if not is_asr_model(self):
            return original_save(self, save_directory, *args, **kwargs)
        return save_bank(self, original_save, save_directory, *args, **kwargs)

    @functools.wraps(original_load)
    def load_adapter(self, model_id, adapter_name, *args, **kwargs):
        if not is_asr_model(self):
            return original_load(self, model_id, adapter_name, *args, **kwargs)
        return load_bank(self, original_load, model_id, adapter_name, *args, **kwargs)

    original_from_pretrained = PeftModel.__dict__["from_pretrained"].__func__

    @functools.wraps(original_from_pretrained)
    def from_pretrained(cls, model, model_id, *args, **kwargs):
        local = preflight(model_id, kwargs)  # None for other PEFT methods
        if local is not None:  # an ASR bank, checked: PEFT builds the model from those very files
            model_id, kwargs = local, local_load_kwargs(kwargs)
        return original_from_pretrained(cls, model, model_id, *args, **kwargs)

    original_push = PeftModel.push_to_hub

    @functools.wraps(original_push)
    def push_to_hub(self, repo_id, *args, **kwargs):
        if not is_asr_model(self):
            return original_push(self, repo_id, *args, **kwargs)
        return push_bank_to_hub(self, repo_id, *args, **kwargs)

    _wrap_generate_and_init()
    setattr(save_pretrained, _MARK, True)
    setattr(load_adapter, _MARK, True)
    setattr(from_pretrained, _MARK, True)
    setattr(push_to_hub, _MARK, True)
    PeftModel.push_to_hub = push_to_hub
    PeftModel.save_pretrained = save_pretrained
    PeftModel.load_adapter = load_adapter
    PeftModel.from_pretrained = classmethod(from_pretrained)


GENERATE_CLASSES = ("PeftModel", "PeftModelForCausalLM", "PeftModelForSeq2SeqLM")
TASK_NAMES_ARG = "task_names"


def _wrap_generate_and_init() -> None:
    """``task_names`` as a special forward argument of ASR models, and ``generate`` inside the generate scope."""
    from peft import peft_model
    from peft.peft_model import PeftModel

    original_init = PeftModel.__init__

    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        if is_asr_model(self):
            self.special_peft_forward_args = set(self.special_peft_forward_args) | {TASK_NAMES_ARG}

    setattr(__init__, _MARK, True)
    PeftModel.__init__ = __init__
    for name in GENERATE_CLASSES:
        cls = getattr(peft_model, name)
        original = cls.__dict__["generate"]

        def make(original):
            @functools.wraps(original)
            def generate(self, *args, **kwargs):
                if not is_asr_model(self):
                    return original(self, *args, **kwargs)
                with self.base_model.generate_scope():
                    return original(self, *args, **kwargs)

            setattr(generate, _MARK, True)
            return generate

        cls.generate = make(original)


def register() -> None:
    """Register the ASR method with PEFT (idempotent)."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    if ASR_PEFT_TYPE not in PEFT_TYPE_TO_TUNER_MAPPING:
        register_peft_method(name=PEFT_METHOD_NAME, config_cls=ASRConfig, model_cls=ASRModel, prefix=ASRModel.prefix)
    _wrap_bank_io()
