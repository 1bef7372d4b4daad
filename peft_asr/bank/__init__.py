"""Banks on disk and on the Hub: the files and their rules (``files``), atomic saving (``atomic``), checks before
loading (``check``), save/load through PEFT (``io``), the model card (``card``), ``push`` and ``merge``.

Built on :mod:`peft_asr.tuner`; imports nothing from ``peft_asr.cl`` or ``peft_asr.demo``.
"""

from .atomic import atomic_save, recover_bank
from .card import write_card, write_model_card
from .check import check_bank
from .files import STATISTICS_FILE, WEIGHTS_FILE, is_asr_model
from .io import load_bank, preflight, save_bank
from .merge import merge_banks
from .push import push_bank_to_hub

__all__ = ["STATISTICS_FILE", "WEIGHTS_FILE", "is_asr_model", "save_bank", "load_bank", "preflight", "check_bank",
           "recover_bank", "atomic_save", "write_model_card", "write_card", "merge_banks", "push_bank_to_hub"]
