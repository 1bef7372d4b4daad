"""Tasks for continual learning: named prompt/answer splits with their scorer, and the loaders that build them.

A *task* is a named pair of splits of ``{"prompt": str, "answer": str}`` rows plus the name of the scorer that grades
its answers. Loaders build tasks from the TRACE benchmark, the O-LoRA ``CL_Benchmark`` and any ``datasets`` source;
see ``docs/data.md`` for the formats.

JSON files are read with ``json``, not ``datasets.load_dataset("json", keep_in_memory=True)``: on the 15 TRACE
prompt/answer files (6.1 MB) that takes 0.205 s with a warm cache and 0.504 s with a fresh one against 0.044 s
(``benchmarks/perf_toolkit.py``), fills a missing key with ``None`` (so the error could not say the key is absent) and
reports a malformed file as a ``DatasetGenerationError`` without its line. ``load_hf_task`` takes a ``load_dataset`` spec for ``datasets`` sources.
``Task.subsample`` keeps ``random.Random(seed).sample`` rather than ``Dataset.shuffle(seed).select``: the committed
benchmark results (``benchmarks/results/cl_*.json``, 64 train / 16 eval rows per task, seed 0) were drawn with it, and
``shuffle(0).select`` keeps only 7 of the same 64 rows of a 500-row split (``benchmarks/perf_toolkit.py``).
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from ..tuner.config import is_task_name

__all__ = [
    "METRICS",
    "TRACE_METRICS",
    "Row",
    "Task",
    "load_prompt_answer_json",
    "load_trace_task",
    "load_olora_task",
    "olora_prompt",
    "load_hf_task",
]

METRICS = ("exact_match", "first_letter", "rouge_l", "sari", "edit_similarity")

# Metric of every TRACE task, from TRACE's `evaluations/eval_*.py` (see shared/data/trace/README.md).
TRACE_METRICS = {
    "C-STANCE": "exact_match",
    "FOMC": "exact_match",
    "MeetingBank": "rouge_l",
    "Py150": "edit_similarity",
    "ScienceQA": "first_letter",  # the answer is "<letter>\n<explanation>"; only the letter is graded
    "NumGLUE-cm": "exact_match",
    "NumGLUE-ds": "exact_match",
    "20Minuten": "sari",
}


Row = dict[str, str]


def check_rows(rows: object, where: str) -> list[Row]:
    if not isinstance(rows, list):
        raise ValueError(
            f"{where} must be a list of {{'prompt': str, 'answer': str}} dicts, got {type(rows).__name__}."
        )
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"{where}[{i}] must be a dict with 'prompt' and 'answer', got {type(row).__name__}.")
        missing = [k for k in ("prompt", "answer") if k not in row]
        if missing:
            raise ValueError(
                f"{where}[{i}] has no {missing} key(s) (keys: {sorted(row)}); rows need 'prompt' and 'answer'."
            )
        for key in ("prompt", "answer"):
            if not isinstance(row[key], str):
                raise ValueError(
                    f"{where}[{i}][{key!r}] must be a str, got {type(row[key]).__name__} ({row[key]!r}); "
                    "convert labels to text first (e.g. `str(label)` or the class name)."
                )
        if not row["prompt"]:
            raise ValueError(f"{where}[{i}]['prompt'] is empty; the router needs a prompt to route on.")
    return rows


@dataclass
class Task:
    """One task of a continual-learning sequence: a name, train/eval rows and the scorer of its answers.

    Args:
        name (`str`):
            Task name, used as the ASR task key (``model.add_task(task.name)``): 1-64 letters, digits, ``_`` or ``-``,
            starting with a letter or digit.
        train (`list[dict]`):
            Training rows ``{"prompt": str, "answer": str}``. May be empty (a task that is only evaluated, such as
            TRACE MeetingBank whose train split is absent).
        eval (`list[dict]`):
            Evaluation rows, same format; must not be empty.
        metric (`str`, *optional*, defaults to `"exact_match"`):
            Name of the scorer of the answers: one of ``exact_match``, ``first_letter``, ``rouge_l``, ``sari``,
            ``edit_similarity``.
        description (`str`, *optional*, defaults to `""`):
            Free text: where the data comes from, how it was subsampled.
    """

    name: str
    train: list[Row] = field(metadata={"help": "Training rows {'prompt': str, 'answer': str}; may be empty."})
    eval: list[Row] = field(metadata={"help": "Evaluation rows {'prompt': str, 'answer': str}; must not be empty."})
    metric: str = field(default="exact_match", metadata={"help": f"Scorer of the answers, one of {METRICS}."})
    description: str = field(default="", metadata={"help": "Free text: source of the data, subsampling."})

    def __post_init__(self) -> None:
        if not is_task_name(self.name):
            raise ValueError(
                f"`name` must be 1-64 letters, digits, '_' or '-' starting with a letter or digit, got {self.name!r} "
                "(task names become keys in the saved ASR bank)."
            )
        self.train = check_rows(self.train, f"task {self.name!r}: train")
        self.eval = check_rows(self.eval, f"task {self.name!r}: eval")
        if not self.eval:
            raise ValueError(f"task {self.name!r}: `eval` is empty; a task needs at least one evaluation row.")
        if self.metric not in METRICS:
            raise ValueError(f"`metric` must be one of {list(METRICS)}, got {self.metric!r}.")
        if not isinstance(self.description, str):
            raise ValueError(f"`description` must be a str, got {type(self.description).__name__}.")

    def subsample(self, max_train: Optional[int] = None, max_eval: Optional[int] = None, seed: int = 0) -> "Task":
        """A copy with at most ``max_train`` train and ``max_eval`` eval rows, drawn without replacement.

        Deterministic: each split is drawn with its own ``random.Random(seed)``, so ``max_eval`` does not change
        which train rows are kept. Kept rows stay in file order. ``None`` (or a limit at least the split size) keeps
        the whole split.
        """
        for arg, value in (("max_train", max_train), ("max_eval", max_eval)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f"`{arg}` must be None or an int >= 0, got {value!r}.")
        if max_eval == 0:
            raise ValueError("`max_eval` must be at least 1 (a task needs an evaluation row), got 0.")

        def pick(rows: list[Row], k: Optional[int]) -> list[Row]:
            if k is None or k >= len(rows):
                return list(rows)
            keep = sorted(random.Random(seed).sample(range(len(rows)), k))
            return [rows[i] for i in keep]

        return Task(
            name=self.name,
            train=pick(self.train, max_train),
            eval=pick(self.eval, max_eval),
            metric=self.metric,
            description=self.description,
        )


# ----------------------------------------------------------------------------------------------------------- loaders


def _read_json_records(path: Path) -> list[Any]:
    """A JSON list, or JSON lines (one object per line), from ``path``."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; check the data root and the task name.")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as whole_error:
        # Not one JSON document: try JSON lines.
        data = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                data.append(json.loads(line))
            except json.JSONDecodeError as line_error:
                raise ValueError(
                    f"{path} is neither a JSON list ({whole_error.msg} at line {whole_error.lineno}) nor JSON lines "
                    f"(line {lineno}: {line_error.msg}); fix the file."
                ) from None
        return data
    if isinstance(data, dict):
        return [data]  # JSON lines with one record
    if not isinstance(data, list):
        raise ValueError(f"{path} must hold a JSON list of records, got a JSON {type(data).__name__}.")
    return data


def load_prompt_answer_json(path: Union[str, Path]) -> list[Row]:
    """Rows ``{"prompt": str, "answer": str}`` from a TRACE-style file: a JSON list, or JSON lines.

    Extra keys of a record are dropped.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not JSON / JSON lines, or a record lacks ``prompt``/``answer`` or has non-text values.
    """
    path = Path(path)
    records = _read_json_records(path)
    rows = check_rows(records, str(path))
    return [{"prompt": r["prompt"], "answer": r["answer"]} for r in rows]


def load_trace_task(
    root: Union[str, Path],
    name: str,
    *,
    max_train: Optional[int] = None,
    max_eval: Optional[int] = None,
    seed: int = 0,
    metric: Optional[str] = None,
    allow_missing_train: bool = False,
) -> Task:
    """A TRACE task from ``root/name/train.json`` and ``root/name/eval.json``.

    Args:
        root (`str` or `Path`): folder holding one sub-folder per task (e.g. ``shared/data/trace``).
        name (`str`): task folder and task name, e.g. ``"FOMC"``, ``"NumGLUE-cm"``.
        max_train, max_eval, seed: passed to `Task.subsample`.
        metric (`str`, *optional*): the scorer; by default ``TRACE_METRICS[name]`` (needed for non-TRACE names).
        allow_missing_train (`bool`, *optional*, defaults to `False`): if ``True`` a missing ``train.json`` gives
            an empty train split (TRACE MeetingBank ships no train split); otherwise it is an error.
    """
    task_dir = Path(root) / name
    if not task_dir.is_dir():
        available = sorted(p.name for p in Path(root).iterdir() if p.is_dir()) if Path(root).is_dir() else []
        raise FileNotFoundError(f"no TRACE task folder {task_dir} (tasks under {root}: {available}).")
    if metric is None:
        if name not in TRACE_METRICS:
            raise ValueError(
                f"task {name!r} is not a TRACE task with a known metric ({sorted(TRACE_METRICS)}); pass `metric=`."
            )
        metric = TRACE_METRICS[name]
    train_path = task_dir / "train.json"
    if train_path.exists():
        train = load_prompt_answer_json(train_path)
    elif allow_missing_train:
        train = []
    else:
        raise FileNotFoundError(
            f"{train_path} does not exist; pass `allow_missing_train=True` to load the task for evaluation only."
        )
    task = Task(
        name=name,
        train=train,
        eval=load_prompt_answer_json(task_dir / "eval.json"),
        metric=metric,
        description=f"TRACE {name} from {task_dir}",
    )
    return task.subsample(max_train, max_eval, seed)


def olora_prompt(instruction: str, labels: Sequence[str], sentence: str) -> str:
    """O-LoRA's model input (``src/uie_dataset_lora.py`` of cmnfriend/O-LoRA).

    ``instruction + "Option: " + ", ".join(labels) + " \\n" + sentence + "\\nAnswer:"``; an empty instruction
    (COPA, whose sentence already holds the question and options A/B) gives ``sentence + "\\nAnswer:"``.
    """
    if not instruction:
        return sentence + "\nAnswer:"
    return instruction + "Option: " + ", ".join(labels) + " \n" + sentence + "\nAnswer:"


def load_olora_task(
    root: Union[str, Path],
    name: str,
    *,
    max_train: Optional[int] = None,
    max_eval: Optional[int] = None,
    seed: int = 0,
) -> Task:
    """An O-LoRA ``CL_Benchmark`` task from ``root/name/{train,test,labels}.json`` and ``root/instructions.json``.

    Rows ``{"sentence", "label"}`` become ``{"prompt": olora_prompt(instruction, labels, sentence), "answer": label}``
    (upstream's template, see `olora_prompt`); the eval split is ``test.json``; the metric is ``exact_match``.
    """
    root = Path(root)
    task_dir = root / name
    if not task_dir.is_dir():
        available = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise FileNotFoundError(f"no O-LoRA task folder {task_dir} (tasks under {root}: {available}).")
    instructions_path = root / "instructions.json"
    if not instructions_path.is_file():
        raise FileNotFoundError(f"{instructions_path} does not exist; it maps each task to its instruction text.")
    try:
        instructions = json.loads(instructions_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{instructions_path} is not valid JSON ({e.msg} at line {e.lineno}); fix the file.") from None
    if not isinstance(instructions, dict) or name not in instructions:
        keys = sorted(instructions) if isinstance(instructions, dict) else []
        raise ValueError(f"{instructions_path} has no instruction for task {name!r} (tasks: {keys}); add one.")
    instruction = instructions[name]
    labels = _read_json_records(task_dir / "labels.json")
    if not all(isinstance(label, str) for label in labels):
        raise ValueError(f"{task_dir / 'labels.json'} must be a JSON list of label strings, got {labels!r}.")

    def convert(split: str) -> list[Row]:
        path = task_dir / f"{split}.json"
        rows = []
        for i, rec in enumerate(_read_json_records(path)):
            if not isinstance(rec, Mapping) or not isinstance(rec.get("sentence"), str) or not isinstance(
                rec.get("label"), str
            ):
                raise ValueError(f"{path}[{i}] must be {{'sentence': str, 'label': str}}, got {rec!r}.")
            rows.append({"prompt": olora_prompt(instruction, labels, rec["sentence"]), "answer": rec["label"]})
        return rows

    task = Task(
        name=name,
        train=convert("train"),
        eval=convert("test"),
        metric="exact_match",
        description=f"O-LoRA CL_Benchmark {name} from {task_dir}",
    )
    return task.subsample(max_train, max_eval, seed)


def load_hf_task(
    name: str,
    source: Any,
    *,
    prompt_column: str = "prompt",
    answer_column: str = "answer",
    split_train: Optional[str] = "train",
    split_eval: str = "validation",
    metric: str = "exact_match",
    description: str = "",
    max_train: Optional[int] = None,
    max_eval: Optional[int] = None,
    seed: int = 0,
) -> Task:
    """A task from a ``datasets`` source.

    Args:
        name (`str`): task name.
        source: a ``datasets.DatasetDict`` (or any mapping split -> ``Dataset``); a single ``datasets.Dataset``
            (used as the eval split; needs ``split_train=None``); a ``load_dataset`` spec: a dict of keyword
            arguments such as ``{"path": "json", "data_files": {"train": "a.json", "validation": "b.json"}}`` or a
            path string.
        prompt_column, answer_column (`str`): columns holding the prompt and the answer. A ``ClassLabel`` answer
            column is turned into its class names; other non-text values are an error.
        split_train (`str` or `None`, defaults to `"train"`): train split; ``None`` for an eval-only task.
        split_eval (`str`, defaults to `"validation"`): eval split.
        metric, description: see `Task`.
        max_train, max_eval, seed: passed to `Task.subsample`.
    """
    import datasets

    is_split_mapping = isinstance(source, Mapping) and bool(source) and all(
        isinstance(v, datasets.Dataset) for v in source.values()
    )
    if isinstance(source, (dict, str, Path)) and not is_split_mapping:
        spec = {"path": str(source)} if isinstance(source, (str, Path)) else dict(source)
        if "path" not in spec:
            raise ValueError(f"a `load_dataset` spec needs a 'path' key (e.g. 'json'), got keys {sorted(spec)}.")
        source = datasets.load_dataset(**spec)
    if isinstance(source, datasets.Dataset):
        if split_train is not None:
            raise ValueError(
                "a single `datasets.Dataset` has no splits: pass `split_train=None` to use it as the eval split, or a "
                "`DatasetDict({'train': ..., 'validation': ...})`."
            )
        splits: Mapping[str, Any] = {split_eval: source}
    elif isinstance(source, Mapping):
        splits = source
    else:
        raise TypeError(
            f"`source` must be a datasets.Dataset, a DatasetDict or a load_dataset spec, got {type(source).__name__}."
        )

    for split in (split_train, split_eval):
        if split is not None and split not in splits:
            raise ValueError(
                f"split {split!r} is not in the source (splits: {sorted(splits)}); set `split_train`/`split_eval`."
            )

    def convert(split: str) -> list[Row]:
        ds = splits[split]
        for col in (prompt_column, answer_column):
            if col not in ds.column_names:
                raise ValueError(
                    f"split {split!r} has no column {col!r} (columns: {ds.column_names}); "
                    "set `prompt_column`/`answer_column`."
                )
        answers = ds[answer_column]
        feature = ds.features.get(answer_column)
        if isinstance(feature, datasets.ClassLabel):
            answers = [feature.int2str(a) for a in answers]
        return [{"prompt": p, "answer": a} for p, a in zip(ds[prompt_column], answers)]

    task = Task(
        name=name,
        train=convert(split_train) if split_train is not None else [],
        eval=convert(split_eval),
        metric=metric,
        description=description,
    )
    return task.subsample(max_train, max_eval, seed)
