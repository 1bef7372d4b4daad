"""The ``edit_similarity`` scorer of ``cl.scorers`` as an ``evaluate`` metric: ``evaluate.load(<this folder>)``."""

import evaluate

from peft_asr.cl.evaluate_metrics import metric_info
from peft_asr.cl.scorers import edit_similarity


class EditSimilarity(evaluate.Metric):
    """Mean fuzzywuzzy fuzz.ratio / 100 after TRACE's Py150 literal post-processing."""

    def _info(self):
        return metric_info("edit_similarity", self.__doc__)

    def _compute(self, predictions, references, sources=None):
        return {"edit_similarity": edit_similarity(predictions, references, sources)}
