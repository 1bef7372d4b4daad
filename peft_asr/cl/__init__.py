"""The continual-learning toolkit around the tuner: tasks and their loaders (``tasks``), tokenisation and batches
(``tokenization``), the accuracy-matrix and routing metrics (``metrics``), the task scorers (``scorers``), the stream
runner (``runner``) and ``plots``. Needs the ``[cl]`` extra (``datasets``, ``pyyaml``, ``rouge-score``; ``matplotlib``
for plots); none of it is imported by ``import peft_asr``.
"""

from .metrics import (average_performance, backward_transfer, cl_summary, forgetting, forward_transfer,
                      routing_accuracy, routing_confusion)
from .runner import StreamResults, evaluate_routing, evaluate_tasks, generate_answers, run_stream
from .scorers import SCORERS, edit_similarity, exact_match, first_letter_accuracy, get_scorer, rouge_l, sari
from .tasks import (METRICS, TRACE_METRICS, Task, load_hf_task, load_olora_task, load_prompt_answer_json,
                    load_trace_task, olora_prompt)
from .tokenization import IGNORE_INDEX, PromptAnswerCollator, format_prompt, prompt_batches, tokenize_examples

__all__ = [
    "Task", "METRICS", "TRACE_METRICS", "load_prompt_answer_json", "load_trace_task", "load_olora_task", "olora_prompt",
    "load_hf_task", "IGNORE_INDEX", "format_prompt", "tokenize_examples", "PromptAnswerCollator", "prompt_batches",
    "average_performance", "backward_transfer", "forward_transfer", "forgetting", "cl_summary", "routing_confusion",
    "routing_accuracy", "exact_match", "first_letter_accuracy", "rouge_l", "sari", "edit_similarity", "SCORERS",
    "get_scorer", "StreamResults", "run_stream", "generate_answers", "evaluate_tasks", "evaluate_routing",
]
