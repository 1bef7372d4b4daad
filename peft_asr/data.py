"""Tasks for continual learning, and their tokenisation into prompt/answer training rows.

A *task* is a named pair of splits of ``{"prompt": str, "answer": str}`` rows plus the name of the scorer that grades
its answers. Loaders build tasks from the TRACE benchmark, the O-LoRA ``CL_Benchmark`` and any ``datasets`` source;
see ``docs/data.md`` for the formats.

Tokenisation follows one rule that the router depends on (``features.prompt_mask``): a training row is

    input_ids = prompt_ids + answer_ids + [eos]
    labels    = [-100] * len(prompt_ids) + answer_ids + [eos]

so ``labels == -100`` marks exactly the prompt, the tokens the router pools over. The prompt is encoded the same way
for training (``tokenize_examples``) and for generation/routing (``prompt_batches``), so the router sees identical
features in both.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .features import IGNORE_INDEX  # label of positions without loss; it also marks the prompt for the router

__all__ = [
    "IGNORE_INDEX",
    "METRICS",
    "TRACE_METRICS",
    "Task",
    "load_prompt_answer_json",
    "load_trace_task",
    "load_olora_task",
    "olora_prompt",
    "load_hf_task",
    "format_prompt",
    "tokenize_examples",
    "PromptAnswerCollator",
    "prompt_batches",
    "shard_batches",
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

# Same alphabet as `peft_asr.config.validate_task_name`: task names become keys of the saved bank.
_TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,63}")

Row = dict[str, str]


def _check_rows(rows: object, where: str) -> list[Row]:
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
        if not isinstance(self.name, str) or not _TASK_NAME.fullmatch(self.name):
            raise ValueError(
                f"`name` must be 1-64 letters, digits, '_' or '-' starting with a letter or digit, got {self.name!r} "
                "(task names become keys in the saved ASR bank)."
            )
        self.train = _check_rows(self.train, f"task {self.name!r}: train")
        self.eval = _check_rows(self.eval, f"task {self.name!r}: eval")
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
    rows = _check_rows(records, str(path))
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


# ------------------------------------------------------------------------------------------------------ tokenisation


def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(tokenizer: Any, prompt: str, use_chat_template: Optional[bool] = None) -> str:
    """The text the model reads before the answer.

    With a chat template (``use_chat_template`` ``None`` and the tokenizer has one, or ``True``) the prompt becomes one
    user turn followed by the generation prompt:
    ``tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
    add_generation_prompt=True)``. Otherwise the prompt is returned unchanged.
    """
    if use_chat_template is None:
        use_chat_template = _has_chat_template(tokenizer)
    if not use_chat_template:
        return prompt
    if not _has_chat_template(tokenizer):
        raise ValueError(
            "`use_chat_template=True` but the tokenizer has no chat template; set `tokenizer.chat_template` or pass "
            "`use_chat_template=None`/`False`."
        )
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def _encode_prompt(tokenizer: Any, prompt: str, use_chat_template: Optional[bool]) -> list[int]:
    """Token ids of the formatted prompt, with BOS exactly once.

    A chat template already writes BOS into the text, so it is encoded without special tokens (as
    ``apply_chat_template(tokenize=True)`` does); plain prompts get the tokenizer's special tokens (BOS for Llama).
    A prompt that itself starts with the BOS text (TRACE Py150 starts with ``<s>``) would give BOS twice: one is
    dropped.
    """
    chat = _has_chat_template(tokenizer) if use_chat_template is None else use_chat_template
    text = format_prompt(tokenizer, prompt, use_chat_template)
    ids = list(tokenizer(text, add_special_tokens=not chat)["input_ids"])
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        ids = ids[1:]
    return ids


def _encode_prompt_left_truncated(
    tokenizer: Any, prompt: str, budget: int, use_chat_template: Optional[bool]
) -> list[int]:
    """``_encode_prompt`` with at most ``budget`` tokens, dropping the *start of the user prompt* first.

    The user text is cut on the left at token level and formatted again, so BOS and the chat-template header (which
    tell the model where a turn starts) survive. Only if the template alone is longer than ``budget`` are the
    formatted ids cut on the left directly (keeping a leading BOS).
    """
    ids = _encode_prompt(tokenizer, prompt, use_chat_template)
    if len(ids) <= budget:
        return ids
    raw = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    drop = len(ids) - budget
    for _ in range(8):  # decode/encode may merge tokens differently: a few rounds converge
        if drop >= len(raw):
            break
        text = tokenizer.decode(raw[drop:], skip_special_tokens=False)
        ids = _encode_prompt(tokenizer, text, use_chat_template)
        if len(ids) <= budget:
            return ids
        drop += len(ids) - budget
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and ids and ids[0] == bos and budget >= 2:
        return [bos] + ids[len(ids) - budget + 1:]
    return ids[len(ids) - budget:]


def tokenize_examples(
    tokenizer: Any,
    rows: Sequence[Mapping[str, str]],
    *,
    max_length: int = 256,
    use_chat_template: Optional[bool] = None,
) -> list[dict[str, list[int]]]:
    """Training rows ``{"input_ids", "labels"}`` (lists of ints) from ``{"prompt", "answer"}`` rows.

    ``input_ids = prompt_ids + answer_ids + [eos]`` and ``labels = [-100] * len(prompt_ids) + answer_ids + [eos]``:
    the loss is on the answer and the end of sequence only, and ``labels == -100`` marks exactly the prompt, which the
    router pools over. ``prompt_ids`` encodes ``format_prompt(tokenizer, prompt, use_chat_template)`` with BOS once;
    ``answer_ids`` encodes the answer without special tokens.

    Truncation to ``max_length``: the prompt is cut from the left (its start is dropped; BOS and the chat-template
    header are kept), so the answer is kept whole. Only an answer (+ eos) longer than ``max_length // 2`` that does
    not fit is itself cut on the right (then without eos), leaving ``max_length // 2`` tokens to the prompt.

    Raises:
        ValueError: ``max_length`` < 2, the tokenizer has no ``eos_token_id``, or a row lacks a prompt/answer.
    """
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
        raise ValueError(f"`max_length` must be an int >= 2 (one prompt and one answer token), got {max_length!r}.")
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("the tokenizer has no `eos_token_id`; set `tokenizer.eos_token` so answers can end.")
    rows = _check_rows(list(rows), "rows")
    out = []
    for row in rows:
        prompt_ids = _encode_prompt(tokenizer, row["prompt"], use_chat_template)
        answer_ids = list(tokenizer(row["answer"], add_special_tokens=False)["input_ids"]) + [eos]
        if len(prompt_ids) + len(answer_ids) > max_length:
            keep_prompt = max(max_length - len(answer_ids), min(len(prompt_ids), max_length // 2))
            answer_ids = answer_ids[: max_length - keep_prompt]
            prompt_ids = _encode_prompt_left_truncated(tokenizer, row["prompt"], keep_prompt, use_chat_template)
        if not prompt_ids:
            raise ValueError(f"prompt {row['prompt'][:50]!r} encodes to no token; the router needs a prompt token.")
        out.append({"input_ids": prompt_ids + answer_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids})
    return out


class PromptAnswerCollator:
    """Pads ``tokenize_examples`` rows into a training batch (right padding).

    Returns ``input_ids`` (padded with ``pad_token_id``), ``attention_mask`` (0 on padding) and ``labels`` (padded
    with -100), all ``(B, L)`` long tensors. Other keys of the rows are ignored.

    Args:
        pad_token_id (`int`): id written on padding positions (they are masked out of attention and loss).
    """

    def __init__(self, pad_token_id: int) -> None:
        if not isinstance(pad_token_id, int) or isinstance(pad_token_id, bool) or pad_token_id < 0:
            raise ValueError(
                f"`pad_token_id` must be an int >= 0, got {pad_token_id!r}; use `tokenizer.pad_token_id` "
                "(or `tokenizer.eos_token_id` when the tokenizer has no pad token)."
            )
        self.pad_token_id = pad_token_id

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if len(rows) == 0:
            raise ValueError("cannot collate an empty batch.")
        seqs = []
        for i, row in enumerate(rows):
            if "input_ids" not in row or "labels" not in row:
                raise ValueError(
                    f"row {i} needs 'input_ids' and 'labels' (from `tokenize_examples`), got {sorted(row)}."
                )
            ids, labels = list(row["input_ids"]), list(row["labels"])
            if len(ids) != len(labels) or not ids:
                raise ValueError(
                    f"row {i}: 'input_ids' ({len(ids)}) and 'labels' ({len(labels)}) must have the same non-zero "
                    "length."
                )
            seqs.append((ids, labels))
        width = max(len(ids) for ids, _ in seqs)
        input_ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)  # (B, L)
        attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, L)
        labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)  # (B, L)
        for i, (ids, lab) in enumerate(seqs):
            n = len(ids)
            input_ids[i, :n] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, :n] = 1
            labels[i, :n] = torch.tensor(lab, dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(pad_token_id={self.pad_token_id})"


def prompt_batches(
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    batch_size: int = 16,
    max_length: int = 256,
    use_chat_template: Optional[bool] = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Left-padded prompt batches for ``generate`` and routing, in the order of ``prompts``.

    Each prompt is encoded exactly as in `tokenize_examples` (same formatting, BOS once, left truncation to
    ``max_length``), so the router sees the features it was fitted on. Yields ``{"input_ids", "attention_mask"}``
    ``(B, L)`` long tensors. Left padding puts every prompt's last token at the end, where generation continues.
    The tokenizer's ``padding_side`` is restored after each batch.

    Raises:
        ValueError: the tokenizer has no ``pad_token_id``, ``batch_size``/``max_length`` < 1, or a non-text prompt.
    """
    for arg, value in (("batch_size", batch_size), ("max_length", max_length)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"`{arg}` must be an int >= 1, got {value!r}.")
    if getattr(tokenizer, "pad_token_id", None) is None:
        raise ValueError("the tokenizer has no pad token; set `tokenizer.pad_token = tokenizer.eos_token` first.")
    prompts = list(prompts)
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p:
            raise ValueError(f"prompts[{i}] must be a non-empty str, got {p!r}.")
    for start in range(0, len(prompts), batch_size):
        encoded = [
            {"input_ids": _encode_prompt_left_truncated(tokenizer, p, max_length, use_chat_template)}
            for p in prompts[start: start + batch_size]
        ]
        old_side = tokenizer.padding_side
        tokenizer.padding_side = "left"
        try:
            batch = tokenizer.pad(encoded, padding=True, return_tensors="pt")
        finally:
            tokenizer.padding_side = old_side
        yield {"input_ids": batch["input_ids"].long(), "attention_mask": batch["attention_mask"].long()}


def shard_batches(
    dataset: Any, collate_fn: Any, *, batch_size: int, rank: int = 0, world_size: int = 1
) -> Iterator[Any]:
    """Collated batches of the rows ``rank, rank + world_size, ...`` of ``dataset``, in order.

    Across ``world_size`` processes every row is visited exactly once: unlike a distributed sampler, nothing is
    repeated to even out the last batch. This is how the router pass of ``ASRCallback`` reads a task's prompts.
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
    if not 0 <= rank < world_size:
        raise ValueError(f"`rank` must be in [0, {world_size}), got {rank}.")
    indices = list(range(rank, len(dataset), world_size))
    for start in range(0, len(indices), batch_size):
        yield collate_fn([dataset[i] for i in indices[start:start + batch_size]])
