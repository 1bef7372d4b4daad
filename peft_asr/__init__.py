"""peft-asr: Analytic Subspace Routing (Any-SSR, arXiv 2503.13575) for continual learning, as a PEFT method.

``import peft_asr`` registers the ``ASR`` PEFT type, so ``get_peft_model(model, ASRConfig(...))``,
``PeftModel.from_pretrained`` and ``AutoPeftModelForCausalLM`` work with ASR banks.

The package has four parts, each built only on those before it (docs/architecture.md): ``peft_asr.tuner`` (the PEFT
method), ``peft_asr.bank`` (bank files, save/load, card, push, merge), ``peft_asr.cl`` (the continual-learning
toolkit, extra ``[cl]``) and ``peft_asr.demo``; ``peft_asr.cli`` is the ``peft-asr`` command. ``_registry`` is the one
module that touches PEFT internals.
"""

from ._registry import ASR_PEFT_TYPE, register

register()

from . import _moved  # noqa: E402
from ._version import __version__  # noqa: E402
from .bank import merge_banks, recover_bank  # noqa: E402
from .deploy.shallow_router import ShallowRouter  # noqa: E402
from .tuner import (ASRCallback, ASRConfig, ASRConfigError, ASRConfigTypeError, ASRError, ASRModel,  # noqa: E402
                    AnalyticRouter, BankError, BASE_ROUTE, RouterNumericalError)

_moved.install()


__all__ = [
    "ASRConfig",
    "ASRModel",
    "ASRCallback",
    "merge_banks",
    "AnalyticRouter",
    "BASE_ROUTE",
    "ASR_PEFT_TYPE",
    "RouterNumericalError",
    "ASRError",
    "ASRConfigError",
    "ASRConfigTypeError",
    "BankError",
    "recover_bank",
    "ShallowRouter",
    "__version__",
]


def __getattr__(name: str):
    """``peft_asr.hub`` and the other 0.1.0 module paths as attributes of the package, as they were."""
    if f"{__name__}.{name}" in _moved.MOVED:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
