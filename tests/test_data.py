"""Tests of `peft_asr.cl.tasks` and `peft_asr.cl.tokenization`: tasks, loaders, prompt/answer tokenisation, collation and prompt batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from peft_asr.cl import (
    IGNORE_INDEX,
    TRACE_METRICS,
    PromptAnswerCollator,
    Task,
    format_prompt,
    load_hf_task,
    load_olora_task,
    load_prompt_answer_json,
    load_trace_task,
    prompt_batches,
    tokenize_examples,
)
from peft_asr.tuner.features import prompt_mask

from conftest import SHARED, STORIES

TRACE = SHARED / "data" / "trace"
OLORA = SHARED / "data" / "olora"


def rows(n: int, prefix: str = "q") -> list[dict]:
    return [{"prompt": f"{prefix}{i}", "answer": f"a{i}"} for i in range(n)]


# ------------------------------------------------------------------------------------------------------------ Task


def test_task_accepts_valid_and_trace_names():
    task = Task("NumGLUE-cm", train=rows(2), eval=rows(1), metric="exact_match")
    assert task.name == "NumGLUE-cm" and len(task.train) == 2 and task.eval[0] == {"prompt": "q0", "answer": "a0"}
    Task("20Minuten", train=[], eval=rows(1), metric="sari")  # starts with a digit: allowed


@pytest.mark.parametrize("name", ["", "-fomc", "has space", "a" * 65, "fomc\n", 3])
def test_task_rejects_bad_names(name):
    with pytest.raises(ValueError, match="`name` must be 1-64 letters"):
        Task(name, train=[], eval=rows(1))


def test_task_rejects_bad_rows_metric_and_empty_eval():
    with pytest.raises(ValueError, match=r"has no \['answer'\] key"):
        Task("t", train=[{"prompt": "p"}], eval=rows(1))
    with pytest.raises(ValueError, match=r"\['answer'\] must be a str, got int"):
        Task("t", train=[], eval=[{"prompt": "p", "answer": 3}])
    with pytest.raises(ValueError, match="prompt'\\] is empty"):
        Task("t", train=[], eval=[{"prompt": "", "answer": "a"}])
    with pytest.raises(ValueError, match="`eval` is empty"):
        Task("t", train=rows(3), eval=[])
    with pytest.raises(ValueError, match="`metric` must be one of"):
        Task("t", train=[], eval=rows(1), metric="accuracy")


def test_subsample_is_deterministic_ordered_and_independent_per_split():
    task = Task("t", train=rows(50), eval=rows(20, "e"))
    a = task.subsample(max_train=10, max_eval=5, seed=3)
    b = task.subsample(max_train=10, max_eval=5, seed=3)
    assert a.train == b.train and a.eval == b.eval
    assert len(a.train) == 10 and len(a.eval) == 5
    idx = [task.train.index(r) for r in a.train]
    assert idx == sorted(idx) and len(set(idx)) == 10  # file order kept, no repeats
    # max_eval does not change which train rows are drawn
    assert task.subsample(max_train=10, max_eval=2, seed=3).train == a.train
    assert task.subsample(max_train=10, seed=4).train != a.train
    # limits at or above the size keep everything
    assert task.subsample(max_train=500).train == task.train
    assert task.train == rows(50)  # the original is untouched


def test_subsample_errors():
    task = Task("t", train=rows(5), eval=rows(5))
    with pytest.raises(ValueError, match="`max_eval` must be at least 1"):
        task.subsample(max_eval=0)
    with pytest.raises(ValueError, match="`max_train` must be None or an int >= 0, got -1"):
        task.subsample(max_train=-1)


# ------------------------------------------------------------------------------------------------ loaders on tmp files


def write_json_list(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n", encoding="utf-8")
    return path


def test_load_prompt_answer_json_list_and_lines(tmp_path):
    recs = [{"prompt": "p1", "answer": "a1", "extra": 1}, {"prompt": "p2", "answer": "a2"}]
    assert load_prompt_answer_json(write_json_list(tmp_path / "l.json", recs)) == [
        {"prompt": "p1", "answer": "a1"}, {"prompt": "p2", "answer": "a2"}
    ]
    lines = tmp_path / "l.jsonl"
    lines.write_text("\n".join(json.dumps(r) for r in recs) + "\n\n", encoding="utf-8")
    assert [r["answer"] for r in load_prompt_answer_json(lines)] == ["a1", "a2"]


def test_load_prompt_answer_json_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json does not exist"):
        load_prompt_answer_json(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('[{"prompt": "p", "answer": ', encoding="utf-8")
    with pytest.raises(ValueError, match="neither a JSON list .* nor JSON lines"):
        load_prompt_answer_json(bad)
    with pytest.raises(ValueError, match=r"\[1\] has no \['prompt'\] key"):
        load_prompt_answer_json(write_json_list(tmp_path / "k.json", [{"prompt": "p", "answer": "a"}, {"answer": "a"}]))
    scalar = tmp_path / "s.json"
    scalar.write_text('"text"', encoding="utf-8")
    with pytest.raises(ValueError, match="must hold a JSON list of records, got a JSON str"):
        load_prompt_answer_json(scalar)


def test_load_trace_task_tmp(tmp_path):
    write_json_list(tmp_path / "FOMC" / "train.json", rows(6))
    write_json_list(tmp_path / "FOMC" / "eval.json", rows(4, "e"))
    task = load_trace_task(tmp_path, "FOMC", max_train=3, seed=1)
    assert (task.name, task.metric, len(task.train), len(task.eval)) == ("FOMC", "exact_match", 3, 4)

    write_json_list(tmp_path / "mine" / "eval.json", rows(2))
    with pytest.raises(ValueError, match="not a TRACE task with a known metric.*pass `metric=`"):
        load_trace_task(tmp_path, "mine", allow_missing_train=True)
    with pytest.raises(FileNotFoundError, match="pass `allow_missing_train=True`"):
        load_trace_task(tmp_path, "mine", metric="rouge_l")
    task = load_trace_task(tmp_path, "mine", metric="rouge_l", allow_missing_train=True)
    assert task.train == [] and task.metric == "rouge_l"
    with pytest.raises(FileNotFoundError, match=r"no TRACE task folder .*absent.*\['FOMC', 'mine'\]"):
        load_trace_task(tmp_path, "absent")


def make_olora(root: Path) -> None:
    (root).mkdir(parents=True, exist_ok=True)
    (root / "instructions.json").write_text(
        json.dumps({"topic": "What is the topic?\n", "copa": ""}), encoding="utf-8"
    )
    for name, labels in (("topic", ["World", "Sports"]), ("copa", ["A", "B"])):
        write_json_list(root / name / "labels.json", labels)
        write_json_list(root / name / "train.json", [{"label": labels[i % 2], "sentence": f"s{i}"} for i in range(4)])
        write_json_list(root / name / "test.json", [{"label": labels[1], "sentence": "t0"}])


def test_load_olora_task_follows_upstream_template(tmp_path):
    make_olora(tmp_path)
    task = load_olora_task(tmp_path, "topic")
    # O-LoRA src/uie_dataset_lora.py: instruction + "Option: " + labels + " \n" + sentence + "\nAnswer:"
    assert task.train[1] == {"prompt": "What is the topic?\nOption: World, Sports \ns1\nAnswer:", "answer": "Sports"}
    assert task.eval == [{"prompt": "What is the topic?\nOption: World, Sports \nt0\nAnswer:", "answer": "Sports"}]
    assert task.metric == "exact_match"
    copa = load_olora_task(tmp_path, "copa")
    assert copa.train[0] == {"prompt": "s0\nAnswer:", "answer": "A"}  # no instruction, no options for COPA
    assert len(load_olora_task(tmp_path, "topic", max_train=2).train) == 2


def test_load_olora_task_errors(tmp_path):
    make_olora(tmp_path)
    (tmp_path / "other").mkdir()
    with pytest.raises(ValueError, match=r"has no instruction for task 'other' \(tasks: \['copa', 'topic'\]\)"):
        load_olora_task(tmp_path, "other")
    write_json_list(tmp_path / "topic" / "test.json", [{"label": "World", "text": "x"}])
    with pytest.raises(ValueError, match=r"test.json\[0\] must be \{'sentence': str, 'label': str\}"):
        load_olora_task(tmp_path, "topic")
    (tmp_path / "instructions.json").unlink()
    with pytest.raises(FileNotFoundError, match="instructions.json does not exist"):
        load_olora_task(tmp_path, "topic")


def test_load_hf_task_from_datasetdict_spec_and_classlabel(tmp_path):
    import datasets

    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"q": ["a", "b", "c"], "y": ["1", "2", "3"]}),
        "validation": datasets.Dataset.from_dict({"q": ["d"], "y": ["4"]}),
    })
    task = load_hf_task("hf", dd, prompt_column="q", answer_column="y", max_train=2)
    assert len(task.train) == 2 and task.eval == [{"prompt": "d", "answer": "4"}]

    write_json_list(tmp_path / "tr.json", rows(3))
    write_json_list(tmp_path / "ev.json", rows(2, "e"))
    spec = {"path": "json", "data_files": {"train": str(tmp_path / "tr.json"), "eval": str(tmp_path / "ev.json")},
            "cache_dir": str(tmp_path / "cache")}
    task = load_hf_task("js", spec, split_eval="eval", metric="rouge_l")
    assert task.train == rows(3) and task.eval == rows(2, "e") and task.metric == "rouge_l"

    feats = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    ds = datasets.Dataset.from_dict({"text": ["x", "y"], "label": [1, 0]}, features=feats)
    task = load_hf_task("cls", ds, prompt_column="text", answer_column="label", split_train=None)
    assert [r["answer"] for r in task.eval] == ["pos", "neg"] and task.train == []


def test_load_hf_task_errors():
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"prompt": ["a"], "text": ["b"]})})
    with pytest.raises(ValueError, match=r"split 'validation' is not in the source \(splits: \['train'\]\)"):
        load_hf_task("t", dd)
    with pytest.raises(ValueError, match=r"has no column 'answer' \(columns: \['prompt', 'text'\]\)"):
        load_hf_task("t", dd, split_eval="train")
    with pytest.raises(ValueError, match="a single `datasets.Dataset` has no splits"):
        load_hf_task("t", dd["train"])
    with pytest.raises(ValueError, match="must be a str, got int"):
        load_hf_task("t", datasets.Dataset.from_dict({"prompt": ["a"], "answer": [1]}), split_train=None)
    with pytest.raises(TypeError, match="`source` must be a datasets.Dataset"):
        load_hf_task("t", 42)


# ----------------------------------------------------------------------------------------------- real ../shared data

TRACE_COUNTS = {  # from shared/data/trace/README.md
    "C-STANCE": (500, 100), "FOMC": (497, 84), "MeetingBank": (0, 100), "Py150": (465, 100),
    "ScienceQA": (500, 100), "NumGLUE-cm": (500, 41), "NumGLUE-ds": (487, 100), "20Minuten": (500, 100),
}


@pytest.mark.parametrize("name", sorted(TRACE_COUNTS))
def test_real_trace_counts_and_metrics(name):
    if not (TRACE / name).is_dir():
        pytest.skip(f"TRACE data not available at {TRACE} (../shared is absent)")
    task = load_trace_task(TRACE, name, allow_missing_train=name == "MeetingBank")
    assert (len(task.train), len(task.eval)) == TRACE_COUNTS[name]
    assert task.metric == TRACE_METRICS[name]
    if name == "FOMC":
        assert task.eval[0]["prompt"].startswith("What is the monetary policy stance")
        assert {r["answer"] for r in task.eval} <= {"A", "B", "C"}
    if name == "MeetingBank":
        with pytest.raises(FileNotFoundError, match="allow_missing_train"):
            load_trace_task(TRACE, name)


OLORA_COUNTS = {"agnews": (1000, 500), "dbpedia": (1000, 500), "CB": (250, 56), "RTE": (1000, 277), "COPA": (400, 100)}


@pytest.mark.parametrize("name", sorted(OLORA_COUNTS))
def test_real_olora_counts_and_prompts(name):
    if not (OLORA / name).is_dir():
        pytest.skip(f"O-LoRA data not available at {OLORA} (../shared is absent)")
    task = load_olora_task(OLORA, name)
    assert (len(task.train), len(task.eval)) == OLORA_COUNTS[name]
    labels = json.loads((OLORA / name / "labels.json").read_text(encoding="utf-8"))
    assert {r["answer"] for r in task.train + task.eval} <= set(labels)
    assert all(r["prompt"].endswith("\nAnswer:") for r in task.eval)
    if name == "COPA":
        assert task.eval[0]["prompt"].startswith("Which sentence is the")
    else:
        assert f"Option: {', '.join(labels)} \n" in task.eval[0]["prompt"]


# ---------------------------------------------------------------------------------------------------- tokenisation


@pytest.fixture(scope="module")
def stories_tok():
    if not (STORIES / "tokenizer.json").exists():
        pytest.skip(f"the stories260K tokenizer is not available at {STORIES} (../shared is absent)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(STORIES)
    assert not tok.chat_template  # the tests below rely on the plain path
    return tok


@pytest.fixture
def chat_tok():
    """A word-level tokenizer whose encoder adds BOS and whose chat template also writes BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "<bos>", "<eos>", "<user>", "</user>", "<bot>"]
    words += "what is two plus three five the cat sat on mat".split()
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tk.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        chat_template=(
            "{{ bos_token }}{% for m in messages %}<user> {{ m['content'] }} </user>{% endfor %}"
            "{% if add_generation_prompt %} <bot>{% endif %}"
        ),
    )


QA = [
    {"prompt": "Once upon a time there was a cat.\nAnswer:", "answer": "yes"},
    {"prompt": "Tom had a red ball and a big dog. What did Tom have?\nAnswer:", "answer": "a red ball"},
]


def test_masking_covers_exactly_the_prompt(stories_tok):
    tok = stories_tok
    out = tokenize_examples(tok, QA, max_length=256)
    for row, ex in zip(QA, out):
        prompt_ids = tok(row["prompt"])["input_ids"]  # with BOS, as a plain LM reads it
        answer_ids = tok(row["answer"], add_special_tokens=False)["input_ids"]
        n = len(prompt_ids)
        assert prompt_ids[0] == tok.bos_token_id and prompt_ids.count(tok.bos_token_id) == 1
        assert ex["input_ids"] == prompt_ids + answer_ids + [tok.eos_token_id]
        assert ex["labels"][:n] == [IGNORE_INDEX] * n
        assert ex["labels"][n:] == answer_ids + [tok.eos_token_id]  # answer and eos are supervised
        assert IGNORE_INDEX not in ex["labels"][n:]


def test_bos_is_not_doubled_when_prompt_starts_with_bos_text(stories_tok):
    # TRACE Py150 prompts start with the literal "<s>", which the Llama tokenizer turns into BOS.
    assert stories_tok("<s> def f")["input_ids"][:2] == [1, 1]  # the trap this guards against
    ex = tokenize_examples(stories_tok, [{"prompt": "<s> def f(x):", "answer": "return x"}])[0]
    assert ex["input_ids"][0] == stories_tok.bos_token_id and ex["input_ids"][1] != stories_tok.bos_token_id


def test_truncation_cuts_the_prompt_from_the_left(stories_tok):
    tok = stories_tok
    prompt = "Lily and Tom went to the park to play with a ball.\nWho went to the park?\nAnswer:"
    row = {"prompt": prompt, "answer": "Lily"}
    full = tokenize_examples(tok, [row], max_length=512)[0]
    cut = tokenize_examples(tok, [row], max_length=20)[0]
    answer_part = tok("Lily", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert len(full["input_ids"]) > 20 and len(cut["input_ids"]) <= 20
    assert cut["input_ids"][0] == tok.bos_token_id  # BOS survives the cut
    assert cut["input_ids"][-len(answer_part):] == answer_part  # the answer is kept whole
    assert cut["labels"][-len(answer_part):] == answer_part
    n_prompt = cut["labels"].count(IGNORE_INDEX)
    assert n_prompt == len(cut["input_ids"]) - len(answer_part) and n_prompt >= 2
    assert tok.decode(cut["input_ids"][:n_prompt], skip_special_tokens=True).endswith("Answer:")  # end kept


def test_middle_truncation_keeps_the_instruction_and_the_answer_cue(stories_tok):
    tok = stories_tok
    instruction = "Say what the story is about.\n"
    body = " ".join(f"Lily saw {n} red birds in the park." for n in range(20))
    prompt = instruction + body + "\nQuestion: who saw the birds?\nAnswer:"
    row = {"prompt": prompt, "answer": "Lily"}
    full = tokenize_examples(tok, [row], max_length=1024)[0]
    cut = tokenize_examples(tok, [row], max_length=80, truncation="middle")[0]
    assert len(full["input_ids"]) > 160 and len(cut["input_ids"]) <= 80
    n_prompt = cut["labels"].count(IGNORE_INDEX)
    text = tok.decode(cut["input_ids"][:n_prompt], skip_special_tokens=True)
    assert cut["input_ids"][0] == tok.bos_token_id
    assert text.startswith(instruction.strip()) and text.endswith("who saw the birds?\nAnswer:"), text
    assert "Lily saw 0 red birds" in text and "10 red birds" not in text  # the middle of the input went
    left = tokenize_examples(tok, [row], max_length=80)[0]  # the default still cuts the start
    assert not tok.decode(left["input_ids"], skip_special_tokens=True).startswith(instruction.strip())
    # prompt batches encode a prompt exactly as training does, with the same rule
    (batch,) = prompt_batches(tok, [prompt], max_length=n_prompt, truncation="middle")
    assert batch["input_ids"][0].tolist() == cut["input_ids"][:n_prompt]
    with pytest.raises(ValueError, match="`truncation` must be one of \\('left', 'middle'\\), got 'right'"):
        tokenize_examples(tok, [row], truncation="right")
    with pytest.raises(ValueError, match="`truncation` must be one of"):
        next(prompt_batches(tok, [prompt], truncation="end"))


def test_middle_truncation_keeps_the_chat_template(chat_tok):
    # the user text loses its middle; BOS, the turn markers and the generation prompt stay
    (cut,) = tokenize_examples(chat_tok, [{"prompt": "what is two plus three the cat", "answer": "five"}],
                               max_length=9, truncation="middle")  # 7 prompt tokens: 3 words of the 7
    assert cut["input_ids"] == chat_tok.convert_tokens_to_ids(
        ["<bos>", "<user>", "what", "is", "cat", "</user>", "<bot>", "five", "<eos>"])
    (batch,) = prompt_batches(chat_tok, ["what is two plus three the cat"], max_length=7, truncation="middle")
    assert batch["input_ids"][0].tolist() == cut["input_ids"][:7]


def test_truncation_cuts_a_long_answer_only_beyond_half(stories_tok):
    tok = stories_tok
    row = {"prompt": "Tell me a story about a cat and a dog.\nAnswer:", "answer": "Once upon a time " * 20}
    ex = tokenize_examples(tok, [row], max_length=32)[0]
    assert len(ex["input_ids"]) == 32
    assert ex["labels"].count(IGNORE_INDEX) == 16  # max_length // 2 prompt tokens are kept
    assert ex["input_ids"][-1] != tok.eos_token_id  # a cut answer does not teach the model to stop


def test_tokenize_examples_errors(stories_tok):
    with pytest.raises(ValueError, match="`max_length` must be an int >= 2"):
        tokenize_examples(stories_tok, QA, max_length=1)
    with pytest.raises(ValueError, match=r"rows\[0\] has no \['answer'\] key"):
        tokenize_examples(stories_tok, [{"prompt": "p"}])


def test_collator_right_pads_and_prompt_mask_matches(stories_tok):
    tok = stories_tok
    ex = tokenize_examples(tok, QA)
    batch = PromptAnswerCollator(pad_token_id=tok.pad_token_id)(ex)
    lengths = [len(e["input_ids"]) for e in ex]
    B, L = 2, max(lengths)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.shape == (B, L) and t.dtype == torch.long for t in batch.values())
    short = lengths.index(min(lengths))
    n = lengths[short]
    assert batch["attention_mask"][short].tolist() == [1] * n + [0] * (L - n)  # right padding
    assert batch["input_ids"][short, n:].eq(tok.pad_token_id).all()
    assert batch["labels"][short, n:].eq(IGNORE_INDEX).all()
    assert batch["input_ids"][short, :n].tolist() == ex[short]["input_ids"]
    # the router pools over exactly the prompt tokens
    mask = prompt_mask(batch["attention_mask"], batch["labels"])
    assert mask.sum(1).tolist() == [e["labels"].count(IGNORE_INDEX) for e in ex]


def test_collator_equals_seq2seq_collator_with_right_padding(stories_tok):
    from transformers import DataCollatorForSeq2Seq

    tok = stories_tok
    ex = tokenize_examples(tok, QA + [{"prompt": "Hi", "answer": "a long answer about a cat and a dog"}])
    old_side = tok.padding_side
    tok.padding_side = "right"  # the library collator pads on the tokenizer's side; ours always pads right
    try:
        theirs = DataCollatorForSeq2Seq(tok, label_pad_token_id=IGNORE_INDEX, return_tensors="pt")(ex)
    finally:
        tok.padding_side = old_side
    ours = PromptAnswerCollator(tok.pad_token_id)(ex)
    assert set(ours) == set(theirs)
    for key, value in ours.items():
        assert value.dtype == theirs[key].dtype and torch.equal(value, theirs[key]), key


def test_collator_errors():
    with pytest.raises(ValueError, match="`pad_token_id` must be an int >= 0, got None"):
        PromptAnswerCollator(None)
    collate = PromptAnswerCollator(0)
    with pytest.raises(ValueError, match="cannot collate an empty batch"):
        collate([])
    with pytest.raises(ValueError, match="must have the same non-zero length"):
        collate([{"input_ids": [1, 2], "labels": [-100]}])


def test_prompt_batches_left_pad_and_match_training_prompts(stories_tok):
    tok = stories_tok
    old_side = tok.padding_side
    tok.padding_side = "right"
    try:
        prompts = [r["prompt"] for r in QA] + ["Hi"]
        batches = list(prompt_batches(tok, prompts, batch_size=2))
        assert tok.padding_side == "right"  # restored
    finally:
        tok.padding_side = old_side
    assert [b["input_ids"].shape[0] for b in batches] == [2, 1]
    first = batches[0]
    train_prompts = [e["input_ids"][: e["labels"].count(IGNORE_INDEX)] for e in tokenize_examples(tok, QA)]
    width = first["input_ids"].shape[1]
    for i, ids in enumerate(train_prompts):
        n = len(ids)
        assert first["attention_mask"][i].tolist() == [0] * (width - n) + [1] * n  # left padding
        assert first["input_ids"][i, width - n:].tolist() == ids  # same ids as in training
        assert first["input_ids"][i, : width - n].eq(tok.pad_token_id).all()
    assert batches[1]["input_ids"][0, -1].item() != tok.pad_token_id


def test_prompt_batches_truncate_and_errors(stories_tok):
    tok = stories_tok
    long = "The cat sat on the mat and looked at the dog. " * 10 + "\nAnswer:"
    (batch,) = prompt_batches(tok, [long], max_length=12)
    assert batch["input_ids"].shape == (1, 12) and batch["input_ids"][0, 0].item() == tok.bos_token_id
    with pytest.raises(ValueError, match="`batch_size` must be an int >= 1, got 0"):
        next(prompt_batches(tok, ["a"], batch_size=0))
    with pytest.raises(ValueError, match=r"prompts\[1\] must be a non-empty str"):
        next(prompt_batches(tok, ["a", ""]))


def test_chat_template_path(chat_tok):
    tok = chat_tok
    text = format_prompt(tok, "what is two plus three")
    assert text == "<bos><user> what is two plus three </user> <bot>"
    assert format_prompt(tok, "what is two plus three", use_chat_template=False) == "what is two plus three"
    (ex,) = tokenize_examples(tok, [{"prompt": "what is two plus three", "answer": "five"}])
    ids = tok.convert_tokens_to_ids(["<bos>", "<user>", "what", "is", "two", "plus", "three", "</user>", "<bot>"])
    five, eos = tok.convert_tokens_to_ids("five"), tok.eos_token_id
    assert ex["input_ids"] == ids + [five, eos]  # BOS once although the encoder also adds BOS
    assert ex["labels"] == [IGNORE_INDEX] * len(ids) + [five, eos]
    # without the template the encoder's BOS is used, once
    (plain,) = tokenize_examples(tok, [{"prompt": "the cat", "answer": "sat"}], use_chat_template=False)
    assert plain["input_ids"] == tok.convert_tokens_to_ids(["<bos>", "the", "cat", "sat"]) + [eos]
    # truncation drops the start of the user text and keeps BOS and the turn markers
    (cut,) = tokenize_examples(tok, [{"prompt": "what is two plus three", "answer": "five"}], max_length=7)
    assert cut["input_ids"] == tok.convert_tokens_to_ids(["<bos>", "<user>", "three", "</user>", "<bot>"]) + [five, eos]
    (batch,) = prompt_batches(tok, ["what is two plus three", "the cat"])
    assert batch["input_ids"][1].tolist() == [0] * 3 + tok.convert_tokens_to_ids(
        ["<bos>", "<user>", "the", "cat", "</user>", "<bot>"]
    )


def test_use_chat_template_true_without_template(stories_tok):
    with pytest.raises(ValueError, match="`use_chat_template=True` but the tokenizer has no chat template"):
        format_prompt(stories_tok, "hi", use_chat_template=True)


def test_prompt_batches_needs_pad_token(chat_tok):
    chat_tok.pad_token = None
    with pytest.raises(ValueError, match="tokenizer has no pad token; set `tokenizer.pad_token"):
        next(prompt_batches(chat_tok, ["the cat"]))
