"""The task scorers of ``peft_asr.cl.scorers`` as HF ``evaluate`` metrics, loadable offline.

Each folder ``<name>/<name>.py`` holds one ``evaluate.Metric`` whose ``_compute`` calls the scorer of the same name in
``scorers.py`` (one implementation, two interfaces), so ``evaluate.load(metric_path(name))`` works without the Hub::

    from peft_asr.cl.evaluate_metrics import load
    load("sari").compute(predictions=preds, references=refs, sources=srcs)  # {"sari": float in [0, 1]}

``trainer_compute_metrics`` wraps one as a ``Trainer(compute_metrics=...)``. Needs the ``evaluate`` package (imported
on first use; ``metric_path`` works without it). ``evaluate.load`` copies the script into ``HF_MODULES_CACHE``
(``~/.cache/huggingface/modules`` by default); ``load`` keeps the predictions in memory, so only an empty folder is
made under ``HF_METRICS_CACHE`` (or ``cache_dir=``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

__all__ = ["NAMES", "metric_path", "load", "metric_info", "trainer_compute_metrics"]

NAMES = ("exact_match", "first_letter", "rouge_l", "sari", "edit_similarity")  # the keys of scorers.SCORERS

_DIR = Path(__file__).resolve().parent


def metric_path(name: str) -> str:
    """The folder to pass to ``evaluate.load`` for the scorer ``name`` (one of ``NAMES``)."""
    if name not in NAMES:
        raise ValueError(f"no evaluate module for {name!r}; choose one of {list(NAMES)}.")
    return str(_DIR / name)


def load(name: str, **kwargs: Any) -> Any:
    """``evaluate.load(metric_path(name), keep_in_memory=True, **kwargs)``: the scorer as an ``evaluate`` metric."""
    try:
        import evaluate
    except ImportError as err:  # optional dependency: only this interface needs it
        raise ImportError("these metrics need the `evaluate` package: `pip install evaluate`.") from err
    kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(metric_path(name), **kwargs)


def metric_info(name: str, description: str, with_sources: bool = False) -> Any:
    """The ``evaluate.MetricInfo`` of a scorer module: string predictions and references (and sources for SARI).

    SARI takes one reference string or a list of them per row, so it gets two feature sets (one kind per call).
    """
    import datasets
    import evaluate

    def features(reference: Any) -> Any:
        cols = {"predictions": datasets.Value("string"), "references": reference}
        if with_sources:
            cols["sources"] = datasets.Value("string")
        return datasets.Features(cols)

    feats = features(datasets.Value("string"))
    if with_sources:
        feats = [features(datasets.Sequence(datasets.Value("string"))), feats]
    return evaluate.MetricInfo(
        description=description,
        citation="",
        inputs_description=(
            "predictions (list of str), references (list of str"
            + (" or list of list of str), sources (list of str)" if with_sources else ")")
            + f"; returns {{'{name}': float in [0, 1]}}, the value of peft_asr.cl.scorers.SCORERS['{name}']."
        ),
        features=feats,
        module_type="metric",
    )


def _decode(tokenizer: Any, rows: Sequence[Any]) -> list[str]:
    return [tokenizer.decode([int(t) for t in row], skip_special_tokens=True) for row in rows]


def trainer_compute_metrics(
    name: str, tokenizer: Any, *, causal_lm: bool = True, metric: Optional[Any] = None
) -> Callable[[Any], dict[str, float]]:
    """A ``Trainer(compute_metrics=...)`` function that scores decoded predictions with the metric ``name``.

    ``causal_lm=True`` (a ``Trainer`` on ``tokenize_examples`` rows): ``predictions`` are logits ``(B, L, V)`` or
    their argmax ``(B, L)`` (pass ``preprocess_logits_for_metrics=lambda logits, labels: logits.argmax(-1)`` to keep
    memory low); position ``t`` predicts label ``t + 1`` and only answer positions (``labels != -100``) are decoded,
    so the score is teacher-forced. For ``sari`` the prompt is the source: set
    ``TrainingArguments(include_for_metrics=["inputs"])``. ``causal_lm=False`` (``Seq2SeqTrainer`` with
    ``predict_with_generate=True``): ``predictions`` are generated ids, decoded whole.

    Returns:
        `Callable`: ``EvalPrediction -> {name: float}``.
    """
    import numpy as np

    from ...tuner.features import IGNORE_INDEX

    metric = load(name) if metric is None else metric

    def compute_metrics(eval_pred: Any) -> dict[str, float]:
        preds, labels = eval_pred.predictions, eval_pred.label_ids
        preds = np.asarray(preds[0] if isinstance(preds, tuple) else preds)
        labels = np.asarray(labels)
        inputs = getattr(eval_pred, "inputs", None)
        if causal_lm:
            if preds.ndim == 3:
                preds = preds.argmax(-1)
            keep = labels[:, 1:] != IGNORE_INDEX  # (B, L - 1): answer positions, as targets of the previous token
            pred_texts = _decode(tokenizer, [p[:-1][k] for p, k in zip(preds, keep)])
            ref_texts = _decode(tokenizer, [lab[1:][k] for lab, k in zip(labels, keep)])
            if inputs is not None:
                # the prompt: real input tokens without a label (Trainer pads inputs across batches with -100)
                inputs = _decode(tokenizer, [i[(lab == IGNORE_INDEX) & (i != IGNORE_INDEX)]
                                             for i, lab in zip(np.asarray(inputs), labels)])
        else:
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            pred_texts = _decode(tokenizer, np.where(preds == IGNORE_INDEX, pad, preds))
            ref_texts = _decode(tokenizer, np.where(labels == IGNORE_INDEX, pad, labels))
            if inputs is not None:
                inputs = _decode(tokenizer, np.where(np.asarray(inputs) == IGNORE_INDEX, pad, np.asarray(inputs)))
        kwargs: Mapping[str, Any] = {"sources": inputs} if name == "sari" else {}
        if name == "sari" and inputs is None:
            raise ValueError(
                "`sari` needs the sources: set `TrainingArguments(include_for_metrics=['inputs'])` so the Trainer "
                "passes the inputs to `compute_metrics`."
            )
        return {k: float(v) for k, v in metric.compute(predictions=pred_texts, references=ref_texts, **kwargs).items()}

    return compute_metrics
