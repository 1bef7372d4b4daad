"""The ``sari`` scorer of ``cl.scorers`` as an ``evaluate`` metric: ``evaluate.load(<this folder>)``."""

import evaluate

from peft_asr.cl.evaluate_metrics import metric_info
from peft_asr.cl.scorers import sari


class Sari(evaluate.Metric):
    """Mean sentence SARI as HF evaluate's sari and tensor2tensor compute it, divided by 100 (TRACE 20Minuten)."""

    def _info(self):
        return metric_info("sari", self.__doc__, with_sources=True)

    def _compute(self, predictions, references, sources):
        return {"sari": sari(predictions, references, sources)}
