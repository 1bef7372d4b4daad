"""peft-asr: Analytic Subspace Routing (Any-SSR, arXiv 2503.13575) for continual learning, as a PEFT method.

``import peft_asr`` registers the ``ASR`` PEFT type, so ``get_peft_model(model, ASRConfig(...))``,
``PeftModel.from_pretrained`` and ``AutoPeftModelForCausalLM`` work with ASR banks.
"""

from ._registry import ASR_PEFT_TYPE, register

register()

from .callback import ASRCallback  # noqa: E402
from .config import BASE_ROUTE, ASRConfig  # noqa: E402
from .merge import merge_banks  # noqa: E402
from .model import ASRModel  # noqa: E402
from .router import AnalyticRouter  # noqa: E402
from .errors import ASRConfigError, ASRConfigTypeError, ASRError, BankError, RouterNumericalError  # noqa: E402
from .hub import recover_bank  # noqa: E402

__version__ = "0.1.0"

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
    "__version__",
]
