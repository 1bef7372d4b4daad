"""The Analytic Subspace Routing tuner: what PEFT would adopt as ``peft/tuners/asr/``.

``config`` (ASRConfig), ``layer`` (the per-task LoRA layer), ``model`` (ASRModel, the BaseTuner), ``shallow`` (the
router's pass over the blocks below ``router_layer``), ``routing`` / ``hooks`` / ``call_inputs`` (the routing contract
of every forward and generate), ``features`` (the prompt rule and pooling), ``router`` + ``rls`` (the closed-form
router and its math), ``validation``, ``callback`` (the Trainer callback), ``paths`` (PEFT's file layout rules),
``errors``. It imports nothing from ``peft_asr.bank``, ``peft_asr.cl`` or ``peft_asr.demo``.
"""

from .callback import ASRCallback
from .config import BASE_ROUTE, ASRConfig
from .errors import ASRConfigError, ASRConfigTypeError, ASRError, BankError, RouterNumericalError
from .model import ASRModel
from .router import AnalyticRouter

__all__ = ["ASRConfig", "ASRModel", "ASRCallback", "AnalyticRouter", "BASE_ROUTE", "ASRError", "ASRConfigError",
           "ASRConfigTypeError", "BankError", "RouterNumericalError"]
