"""The ``rouge_l`` scorer of ``cl.scorers`` as an ``evaluate`` metric: ``evaluate.load(<this folder>)``."""

import evaluate

from peft_asr.cl.evaluate_metrics import metric_info
from peft_asr.cl.scorers import rouge_l


class RougeL(evaluate.Metric):
    """Mean ROUGE-L F-measure from the rouge_score package, no stemming (TRACE MeetingBank)."""

    def _info(self):
        return metric_info("rouge_l", self.__doc__)

    def _compute(self, predictions, references, sources=None):
        return {"rouge_l": rouge_l(predictions, references, sources)}
