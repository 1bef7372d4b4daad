"""The ``first_letter`` scorer of ``cl.scorers`` as an ``evaluate`` metric: ``evaluate.load(<this folder>)``."""

import evaluate

from peft_asr.cl.evaluate_metrics import metric_info
from peft_asr.cl.scorers import first_letter_accuracy


class FirstLetter(evaluate.Metric):
    """Accuracy on the first non-space character (TRACE ScienceQA: the option letter)."""

    def _info(self):
        return metric_info("first_letter", self.__doc__)

    def _compute(self, predictions, references, sources=None):
        return {"first_letter": first_letter_accuracy(predictions, references, sources)}
