"""The ``exact_match`` scorer of ``cl.scorers`` as an ``evaluate`` metric: ``evaluate.load(<this folder>)``."""

import evaluate

from peft_asr.cl.evaluate_metrics import metric_info
from peft_asr.cl.scorers import exact_match


class ExactMatch(evaluate.Metric):
    """Accuracy of exact string matches after stripping surrounding whitespace (TRACE C-STANCE, FOMC, NumGLUE)."""

    def _info(self):
        return metric_info("exact_match", self.__doc__)

    def _compute(self, predictions, references, sources=None):
        return {"exact_match": exact_match(predictions, references, sources)}
