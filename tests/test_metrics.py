"""Tests of peft_asr.cl.metrics and peft_asr.cl.scorers against numbers computed by hand (the arithmetic is in the comment next to each one).

Sources of golden numbers: hand arithmetic from the formulas in the module docstring, except the SARI example of HF
``evaluate``'s ``sari`` metric card (value printed there). During development the SARI and edit-similarity
implementations were also compared, outside this suite, with HF's ``sari.py`` + sacreBLEU 2.4.3 and with fuzzywuzzy
0.18 on the TRACE 20Minuten / Py150 eval splits (identical on every pair); those packages are not test dependencies.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

from peft_asr import cl as M
from peft_asr.cl import metrics as CM

NAN = float("nan")

# T = 3. Above the diagonal: scores on tasks not trained yet (needed only by FWT).
R3 = [
    [0.80, 0.30, 0.10],
    [0.85, 0.90, 0.20],
    [0.50, 0.70, 0.40],
]
BASE3 = [None, 0.10, 0.25]


# --------------------------------------------------------------------------------------------------------------
# Continual-learning metrics
# --------------------------------------------------------------------------------------------------------------


def test_average_performance_is_mean_of_last_row():
    # (0.5 + 0.7 + 0.4) / 3 = 1.6 / 3
    assert M.average_performance(R3) == pytest.approx(1.6 / 3, abs=1e-12)


def test_backward_transfer_by_hand():
    # ((R[2][0] - R[0][0]) + (R[2][1] - R[1][1])) / 2 = ((0.5 - 0.8) + (0.7 - 0.9)) / 2 = -0.25
    assert M.backward_transfer(R3) == pytest.approx(-0.25, abs=1e-12)


def test_forward_transfer_by_hand():
    # ((R[0][1] - b1) + (R[1][2] - b2)) / 2 = ((0.3 - 0.1) + (0.2 - 0.25)) / 2 = 0.15 / 2 = 0.075
    assert M.forward_transfer(R3, BASE3) == pytest.approx(0.075, abs=1e-12)


def test_forgetting_uses_the_best_earlier_score_not_the_diagonal():
    # task 0: max(R[0][0], R[1][0]) - R[2][0] = 0.85 - 0.5 = 0.35 (the diagonal 0.8 would give 0.30)
    # task 1: max(R[1][1]) - R[2][1] = 0.9 - 0.7 = 0.2;  mean = 0.55 / 2 = 0.275  (while -BWT = 0.25)
    assert M.forgetting(R3) == pytest.approx(0.275, abs=1e-12)


def test_improvement_gives_positive_bwt_and_negative_forgetting():
    r = [[0.5, None], [0.7, 0.6]]
    # BWT = 0.7 - 0.5 = 0.2; forgetting = max(R[0][0]) - R[1][0] = 0.5 - 0.7 = -0.2
    assert M.backward_transfer(r) == pytest.approx(0.2, abs=1e-12)
    assert M.forgetting(r) == pytest.approx(-0.2, abs=1e-12)


def test_cl_summary_keys_and_values():
    out = M.cl_summary(R3, BASE3)
    assert set(out) == {"op", "bwt", "fwt", "forgetting"}
    assert out["op"] == pytest.approx(1.6 / 3)
    assert out["bwt"] == pytest.approx(-0.25)
    assert out["fwt"] == pytest.approx(0.075)
    assert out["forgetting"] == pytest.approx(0.275)
    assert M.cl_summary(R3)["fwt"] is None  # no baseline -> no FWT


@pytest.mark.parametrize("upper", [None, NAN])
def test_upper_triangle_may_be_missing_without_fwt(upper):
    r = [[0.8, upper, upper], [0.85, 0.9, upper], [0.5, 0.7, 0.4]]
    assert M.cl_summary(r) == pytest.approx({"op": 1.6 / 3, "bwt": -0.25, "fwt": None, "forgetting": 0.275})


def test_numpy_and_torch_inputs_match_lists():
    ref = M.cl_summary(R3, BASE3)
    assert M.cl_summary(np.array(R3), BASE3) == pytest.approx(ref)
    assert M.cl_summary(torch.tensor(R3, dtype=torch.float32), BASE3) == pytest.approx(ref, abs=1e-6)


def test_single_task_edge_case():
    # T = 1: OP is the one score; there is no earlier task to forget or to transfer from.
    assert M.cl_summary([[0.7]], [0.1]) == {"op": pytest.approx(0.7), "bwt": 0.0, "fwt": None, "forgetting": 0.0}


@pytest.mark.parametrize(
    "bad, match",
    [
        ([], "at least one task"),
        ([[0.5, 0.1], [0.2]], r"row 1 has 1 entries"),
        ([[0.5], [0.2]], r"row 0 has 1 entries"),
        (np.zeros((2, 2, 1)), "square"),
        ("abc", "square"),
        ([[0.5, None], [None, 0.4]], r"`R\[1\]\[0\]` must be a score"),
        ([[NAN]], r"`R\[0\]\[0\]` must be a score"),
        ([[0.5, None], [0.7, 1.2]], r"`R\[1\]\[1\]` must be in \[0, 1\], got 1.2"),
        ([[50.0]], "divide 0-100 scores by 100"),
        ([[0.5, -0.1], [0.7, 0.6]], r"`R\[0\]\[1\]` must be in \[0, 1\]"),
        ([[0.5, "x"], [0.7, 0.6]], r"`R\[0\]\[1\]` must be a number"),
    ],
)
def test_matrix_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        M.average_performance(bad)


def test_forward_transfer_errors():
    with pytest.raises(ValueError, match=r"needs `R\[0\]\[1\]`"):
        M.forward_transfer([[0.5, None], [0.7, 0.6]], [0.1, 0.2])
    with pytest.raises(ValueError, match=r"one base-model score per task \(3\), got 2"):
        M.forward_transfer(R3, [0.1, 0.2])
    with pytest.raises(ValueError, match=r"`baseline\[1\]` must be a score in \[0, 1\], got None"):
        M.forward_transfer(R3, [0.1, None, 0.2])
    with pytest.raises(ValueError, match=r"`baseline\[2\]` must be a score in \[0, 1\], got 40"):
        M.cl_summary(R3, [0.1, 0.2, 40])


# Only the diagonal and the last row measured (eval scope "diagonal+final").
R3_DIAG_FINAL = [
    [0.80, None, None],
    [None, 0.90, None],
    [0.50, 0.70, 0.40],
]


def test_diagonal_and_last_row_give_op_and_bwt_only():
    # OP = (0.5 + 0.7 + 0.4) / 3; BWT = ((0.5 - 0.8) + (0.7 - 0.9)) / 2 = -0.25, as with the full R3
    out = M.cl_summary(R3_DIAG_FINAL, BASE3)
    assert out == pytest.approx({"op": 1.6 / 3, "bwt": -0.25, "fwt": None, "forgetting": None})
    with pytest.raises(ValueError, match=r"forgetting needs `R\[1\]\[0\]` \(task 0's score after stage 1\)"):
        M.forgetting(R3_DIAG_FINAL)
    with pytest.raises(ValueError, match=r"FWT needs `R\[0\]\[1\]`"):
        M.forward_transfer(R3_DIAG_FINAL, BASE3)
    with pytest.raises(ValueError, match=r"`baseline\[2\]` must be a score in \[0, 1\], got 40"):
        M.cl_summary(R3_DIAG_FINAL, [0.1, 0.2, 40])  # the baseline is checked although FWT is not computed
    # the diagonal itself must be measured
    with pytest.raises(ValueError, match=r"`R\[1\]\[1\]` must be a score .* The diagonal and the last row"):
        M.cl_summary([[0.8, None, None], [0.85, None, None], [0.5, 0.7, 0.4]])


def test_bootstrap_intervals_by_hand():
    # every prompt of a task scores the same: every resample gives the same OP, so the interval is a point
    # OP = (1 + 0 + 0.5) / 3 = 0.5; BWT = ((1 - 1) + (0 - 1)) / 2 = -0.5
    final = [[1.0] * 5, [0.0] * 4, [0.5] * 3]
    diag = [[1.0] * 5, [1.0] * 4, [0.5] * 3]
    out = CM.bootstrap_intervals(final, diag, n_resamples=50)
    assert out["op"] == pytest.approx((0.5, 0.5)) and out["bwt"] == pytest.approx((-0.5, -0.5))
    assert CM.bootstrap_intervals(final)["bwt"] is None


def test_bootstrap_intervals_pair_the_stages_and_have_the_binomial_width():
    rng = np.random.default_rng(1)
    final = [rng.integers(0, 2, 400).astype(float).tolist() for _ in range(2)]
    # the same prompts scoring the same just after training: a paired resample never sees a difference
    assert CM.bootstrap_intervals(final, final, seed=3)["bwt"] == (0.0, 0.0)
    low, high = CM.bootstrap_intervals(final, seed=3)["op"]
    point = np.mean([np.mean(f) for f in final])
    # 800 Bernoulli(~0.5) prompts: standard error sqrt(0.25 / 800) = 0.0177, 95% half-width 1.96 * 0.0177 = 0.035
    assert low < point < high and (high - low) / 2 == pytest.approx(0.035, abs=0.006)
    assert CM.bootstrap_intervals(final, seed=3) == CM.bootstrap_intervals(final, seed=3)  # seeded
    assert CM.bootstrap_intervals(final, seed=4) != CM.bootstrap_intervals(final, seed=3)


def test_bootstrap_intervals_of_the_paired_difference_of_two_methods():
    rng = np.random.default_rng(2)
    a = [rng.integers(0, 2, 300).astype(float).tolist() for _ in range(3)]
    # b differs from a on 15 prompts of the first task only: OP(a) - OP(b) = (15 / 300) / 3 exactly
    b = [list(t) for t in a]
    flipped = [k for k, v in enumerate(b[0]) if v == 1.0][:15]
    for k in flipped:
        b[0][k] = 0.0
    out = CM.bootstrap_intervals(a, versus=b, seed=0)
    low, high = out["op_diff"]
    assert low <= 15 / 300 / 3 <= high and low >= 0.0  # a never scores below b on a prompt: no draw goes below 0
    op_low, op_high = out["op"]
    assert high - low < (op_high - op_low) / 3  # paired: far narrower than one method's own interval
    assert CM.bootstrap_intervals(a, versus=a)["op_diff"] == (0.0, 0.0)
    assert "op_diff" not in CM.bootstrap_intervals(a)
    with pytest.raises(ValueError, match=r"task 1 has 300 final scores but 2 versus ones"):
        CM.bootstrap_intervals(a, versus=[a[0], [1.0, 0.0], a[2]])


def test_bootstrap_intervals_errors():
    with pytest.raises(ValueError, match=r"task 0 has 2 final scores but 3 diagonal ones"):
        CM.bootstrap_intervals([[1.0, 0.0]], [[1.0, 0.0, 1.0]])
    with pytest.raises(ValueError, match=r"`final\[1\]` must be a non-empty list"):
        CM.bootstrap_intervals([[1.0], []])
    with pytest.raises(ValueError, match=r"`final\[0\]` must hold scores in \[0, 1\]"):
        CM.bootstrap_intervals([[100.0]])
    with pytest.raises(ValueError, match=r"`diagonal` must hold one list of per-prompt scores per task \(2\)"):
        CM.bootstrap_intervals([[1.0], [0.0]], [[1.0]])
    with pytest.raises(ValueError, match=r"`confidence` must be in \(0, 1\)"):
        CM.bootstrap_intervals([[1.0]], confidence=95)
    with pytest.raises(ValueError, match="`n_resamples` must be an int >= 1"):
        CM.bootstrap_intervals([[1.0]], n_resamples=0)


def test_token_agreement_by_hand():
    from peft_asr.cl.metrics import token_agreement

    assert token_agreement([1, 2, 3], [1, 2, 3]) == 1.0
    assert token_agreement([1, 9, 3], [1, 2, 3]) == pytest.approx(2 / 3)  # position 1 differs
    assert token_agreement([1, 2], [1, 2, 3, 4]) == pytest.approx(2 / 4)  # the missing positions disagree
    assert token_agreement([], []) == 1.0 and token_agreement([], [5]) == 0.0
    with pytest.raises(ValueError, match="`tokens` must be a sequence of tokens, got str"):
        token_agreement("abc", [1])


# --------------------------------------------------------------------------------------------------------------
# Routing
# --------------------------------------------------------------------------------------------------------------


def test_routing_confusion_and_accuracy_by_hand():
    true = ["fomc", "fomc", "py150", "__base__", "py150"]
    pred = ["fomc", "py150", "py150", "fomc", "py150"]
    labels = ["__base__", "fomc", "py150"]
    # rows true, columns pred: __base__ -> fomc once; fomc -> fomc, py150; py150 -> py150 twice
    assert M.routing_confusion(true, pred, labels) == [[0, 1, 0], [0, 1, 1], [0, 0, 2]]
    # 3 of 5 on the diagonal
    assert M.routing_accuracy(true, pred) == pytest.approx(0.6)


def test_routing_errors():
    with pytest.raises(ValueError, match=r"`pred` holds routes that are not in `labels`: \['numglue'\]"):
        M.routing_confusion(["fomc"], ["numglue"], ["fomc"])
    with pytest.raises(ValueError, match=r"`true` holds routes .*\['__base__'\]"):
        M.routing_confusion(["__base__"], ["fomc"], ["fomc"])
    with pytest.raises(ValueError, match="unique"):
        M.routing_confusion(["fomc"], ["fomc"], ["fomc", "fomc"])
    with pytest.raises(ValueError, match="non-empty list of route names"):
        M.routing_confusion(["fomc"], ["fomc"], [])
    with pytest.raises(ValueError, match=r"`true` has 2 items but `pred` has 1"):
        M.routing_accuracy(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="empty"):
        M.routing_accuracy([], [])


# --------------------------------------------------------------------------------------------------------------
# Task scorers
# --------------------------------------------------------------------------------------------------------------


def test_exact_match_by_hand():
    preds = [" A ", "B", "", "12"]
    refs = ["A", "C", "", "12.0"]
    # " A " == "A" after strip: 1; "B" != "C": 0; empty pair: 0 (TRACE's rule); "12" != "12.0": 0  -> 1/4
    assert M.exact_match(preds, refs) == pytest.approx(0.25)


def test_first_letter_by_hand():
    preds = ["A\nbecause ...", " B", "", "c"]
    refs = ["A\nThe answer is", "B\nx", "A", "C\ny"]
    # A==A: 1; B==B after the leading space: 1; empty prediction: 0; "c" != "C" (case-sensitive): 0  -> 2/4
    assert M.first_letter_accuracy(preds, refs) == pytest.approx(0.5)


def test_rouge_l_by_hand_lcs():
    preds = ["the cat lay on a mat", "the cat on the mat", ""]
    refs = ["The cat sat on the mat.", "the cat sat on the mat", "x"]
    # pair 1: tokens (lowercased, "." dropped) the cat sat on the mat / the cat lay on a mat; LCS = the cat on mat = 4
    #         P = 4/6, R = 4/6, F = 2/3
    # pair 2: LCS = the cat on the mat = 5; P = 5/5, R = 5/6, F = 2 * 1 * 5/6 / (1 + 5/6) = 10/11
    # pair 3: empty prediction -> 0 (still counted)
    # mean = (2/3 + 10/11 + 0) / 3 = (22/33 + 30/33) / 3 = 52/99
    assert M.rouge_l(preds, refs) == pytest.approx(52 / 99, abs=1e-12)


def test_sari_hf_golden_example():
    # HF evaluate metric card / docstring of `sari`: {'sari': 26.953601953601954} on a 0-100 scale
    sources = ["About 95 species are currently accepted."]
    predictions = ["About 95 you now get in."]
    references = [
        ["About 95 species are currently known.", "About 95 species are now accepted.", "95 species are now accepted."]
    ]
    assert M.sari(predictions, references, sources) == pytest.approx(0.26953601953601954, abs=1e-12)
    # the docstring spells the same text with spaces before "."; 13a tokenization makes both identical
    spaced = [[r.replace(".", " .") for r in references[0]]]
    assert M.sari(["About 95 you now get in ."], spaced, ["About 95 species are currently accepted ."]) == (
        pytest.approx(0.26953601953601954, abs=1e-12)
    )


def test_sari_hf_perfect_match_example():
    # HF evaluate metric card, "Perfect match between prediction and reference": {'sari': 100.0}
    s = "About 95 species are currently accepted ."
    assert M.sari([s], [[s]], [s]) == pytest.approx(1.0)


def test_sari_by_hand_missing_addition():
    # source "a b", prediction "a", reference "a c" (one reference)
    # n=1: keep {a}: P=1, R=1 -> F=1; delete {b}, the reference drops b too -> P=1; add: none added (P=0/0=1) but
    #      the reference adds c -> R=0 -> F=0
    # n=2: keep: no kept bigram, the reference keeps none of "a b" -> 0/0 = 1 twice -> F=1; delete "a b" (the
    #      reference drops it) -> P=1; add: reference adds "a c" -> R=0 -> F=0
    # n=3,4: no n-grams anywhere -> every term 0/0 = 1
    # keep = 1, del = 1, add = (0 + 0 + 1 + 1)/4 = 0.5  -> SARI = 2.5 / 3
    assert M.sari(["a"], ["a c"], ["a b"]) == pytest.approx(2.5 / 3, abs=1e-12)


def test_sari_by_hand_two_references_scale_counts():
    # source "a b", prediction "a b", references ["a", "a b"]: counts of source / prediction are scaled by 2 refs
    # n=1: refs {a: 2, b: 1}; kept {a: 2, b: 2}, good {a: 2, b: 1}: P = (2/2 + 1/2) / 2 = 3/4,
    #      R = (2 + 1) / (2 + 1) = 1, F = 2 * 3/4 / (7/4) = 6/7; nothing deleted or added -> 1, 1
    # n=2: refs {"a b": 1}; kept {"a b": 2}, good {"a b": 1}: P = 1/2, R = 1/1, F = 2/3; del, add -> 1, 1
    # n=3,4: all 1
    # keep = (6/7 + 2/3 + 1 + 1) / 4 = 37/42; del = add = 1 -> SARI = (37/42 + 2) / 3 = 121/126
    assert M.sari(["a b"], [["a", "a b"]], ["a b"]) == pytest.approx(121 / 126, abs=1e-12)


def test_sari_empty_prediction_is_not_zero():
    # tensor2tensor's 0/0 = 1 convention: source "a b", prediction "" (one empty token), reference "a"
    # n=1: keep: nothing kept, reference keeps a -> P=1, R=0 -> F=0; delete {a, b}, good {b} -> P = 1/2;
    #      add {""}: P = 0/1, reference adds nothing -> R = 1 -> F = 0
    # n=2: keep F=1; delete "a b" (reference drops it) P=1; add F=1.  n=3,4: all 1
    # keep = 3/4, del = 3.5/4, add = 3/4 -> SARI = (0.75 + 0.875 + 0.75) / 3 = 2.375/3
    assert M.sari([""], ["a"], ["a b"]) == pytest.approx(2.375 / 3, abs=1e-12)


def test_sari_is_mean_over_rows():
    assert M.sari(["a", "a b"], ["a c", ["a", "a b"]], ["a b", "a b"]) == pytest.approx((2.5 / 3 + 121 / 126) / 2)


def test_sari_errors():
    with pytest.raises(ValueError, match="`sari` needs `sources`"):
        M.sari(["a"], ["a"])
    with pytest.raises(ValueError, match=r"`sources` has 2 items but `predictions` has 1"):
        M.sari(["a"], ["a"], ["a", "b"])
    with pytest.raises(ValueError, match=r"`references\[0\]` must be a str or a non-empty list"):
        M.sari(["a"], [[]], ["a"])
    with pytest.raises(TypeError, match=r"`references\[0\]` must hold only str"):
        M.sari(["a"], [["a", 3]], ["a"])


def test_edit_similarity_by_hand():
    preds = ["abcd", "x = <NUM_LIT>", "print(<STR_LIT:hello>)", "aXXXXXXX", "<STR_LIT>"]
    refs = ["abce", "x = 0", "print(hello)", "aYYYYYYY", "y"]
    # "abcd"/"abce": M = 3 ("abc"), 2*3/8 = 0.75 -> 75
    # "<NUM_LIT>" -> "0": identical -> 100;  "<STR_LIT:hello>" -> "hello": identical -> 100
    # "aXXXXXXX"/"aYYYYYYY": M = 1, 100 * 2/16 = 12.5 -> round half to even = 12 (as fuzzywuzzy; floor(x+.5) = 13)
    # "<STR_LIT>" -> "" : empty after post-processing -> 0
    # mean = (75 + 100 + 100 + 12 + 0) / 5 / 100 = 287 / 500
    assert M.edit_similarity(preds, refs) == pytest.approx(287 / 500, abs=1e-12)


@pytest.mark.parametrize("name", ["exact_match", "first_letter", "rouge_l", "edit_similarity"])
def test_single_reference_scorers_validate(name):
    fn = M.get_scorer(name)
    with pytest.raises(ValueError, match=r"`predictions` has 1 items but `references` has 2"):
        fn(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="empty"):
        fn([], [])
    with pytest.raises(TypeError, match=r"`predictions\[0\]` must be a str"):
        fn([1], ["a"])
    with pytest.raises(TypeError, match=r"`references\[0\]` must be a str.*Only `sari`"):
        fn(["a"], [["a"]])
    assert fn(["same text"], ["same text"]) == pytest.approx(1.0)


def test_scorers_are_in_unit_interval_on_trace_like_inputs():
    preds, refs, srcs = ["B", "zwei Hunde", "def f(x):"], ["A", "zwei Katzen", "def f(y):"], ["s1", "drei Hunde", "s3"]
    for name, fn in M.SCORERS.items():
        value = fn(preds, refs, srcs)
        assert 0.0 <= value <= 1.0 and math.isfinite(value), (name, value)


def test_registry():
    assert set(M.SCORERS) == {"exact_match", "first_letter", "rouge_l", "sari", "edit_similarity"}
    assert M.get_scorer("sari") is M.sari
    assert M.get_scorer("first_letter") is M.first_letter_accuracy
    with pytest.raises(ValueError, match=r"Unknown scorer 'bleu'; choose one of \['edit_similarity', 'exact_match'"):
        M.get_scorer("bleu")


# --------------------------------------------------------------------------------------------------------------
# The scorers as `evaluate` modules (peft_asr.cl.evaluate_metrics), loaded from their folders with the network off
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def offline_evaluate(tmp_path_factory):
    """``evaluate`` with its module cache in a temp folder and every socket connection refused."""
    import evaluate  # in the [test] extra
    import socket

    def no_network(*args, **kwargs):
        raise OSError("network access is disabled in this test")

    root = tmp_path_factory.mktemp("evaluate")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evaluate.config, "HF_MODULES_CACHE", root / "modules")
        mp.setattr(socket.socket, "connect", no_network)
        mp.setattr(sys, "path", list(sys.path))  # evaluate.load appends the module cache
        yield evaluate, root


PAIRS = (  # predictions, references, sources: TRACE-like, with an empty prediction and a Py150 literal
    ["B", "zwei Hunde laufen", "", "def f(x): return <NUM_LIT>", "A\nbecause"],
    ["A", "zwei Katzen laufen", "a", "def f(y): return 0", "A\nsince"],
    ["s1", "drei Hunde laufen schnell", "a b", "def f(x):", "which?"],
)


@pytest.mark.parametrize("name", ["exact_match", "first_letter", "rouge_l", "sari", "edit_similarity"])
def test_evaluate_modules_load_offline_and_match_the_scorers(offline_evaluate, name):
    from peft_asr.cl.evaluate_metrics import metric_path

    evaluate, root = offline_evaluate
    metric = evaluate.load(metric_path(name), keep_in_memory=True, cache_dir=str(root / "metrics"))
    preds, refs, srcs = PAIRS
    kwargs = {"sources": srcs} if name == "sari" else {}
    assert metric.compute(predictions=preds, references=refs, **kwargs) == {name: M.SCORERS[name](preds, refs, srcs)}
    if name == "sari":  # several references per row
        multi = [[r, r.upper()] for r in refs]
        assert metric.compute(predictions=preds, references=multi, sources=srcs)["sari"] == M.sari(preds, multi, srcs)


def test_evaluate_metric_path_and_trainer_compute_metrics(offline_evaluate):
    from transformers import EvalPrediction

    from peft_asr.cl.evaluate_metrics import load, metric_path, trainer_compute_metrics

    with pytest.raises(ValueError, match=r"no evaluate module for 'bleu'; choose one of \['exact_match'"):
        metric_path("bleu")

    class Chars:  # a character tokenizer: id = ord(c); 0 pads; ids 1-2 are special
        pad_token_id = 0

        def decode(self, ids, skip_special_tokens=False):
            if any(int(i) < 0 for i in ids):  # as fast tokenizers do
                raise OverflowError("number too small to fit in target type")
            return "".join(chr(i) for i in ids if not (skip_special_tokens and i < 3))

    _, root = offline_evaluate
    enc = [ord(c) for c in "Q?"]
    rows = [(enc, [ord(c) for c in "yes"]), (enc + enc, [ord(c) for c in "no"])]  # (prompt, answer)
    width = max(len(p) + len(a) for p, a in rows)
    inputs = np.zeros((2, width), dtype=np.int64)
    labels = np.full((2, width), -100, dtype=np.int64)
    for i, (p, a) in enumerate(rows):
        inputs[i, : len(p) + len(a)] = p + a
        labels[i, len(p): len(p) + len(a)] = a
    right = np.zeros_like(inputs)
    right[:, :-1] = np.where(labels[:, 1:] == -100, 5, labels[:, 1:])  # position t predicts label t + 1
    metric = load("exact_match", cache_dir=str(root / "metrics"))
    score = trainer_compute_metrics("exact_match", Chars(), metric=metric)
    assert score(EvalPrediction(right, labels)) == {"exact_match": 1.0}
    logits = np.eye(128, dtype=np.float32)[right]  # (B, L, V): the argmax is `right`
    logits[1, :, :] = np.eye(128, dtype=np.float32)[ord("x")]  # the second answer is wrong
    assert score(EvalPrediction(logits, labels)) == {"exact_match": 0.5}
    # generated ids (Seq2SeqTrainer): decoded whole, -100 as padding
    generated = trainer_compute_metrics("exact_match", Chars(), causal_lm=False, metric=metric)
    gen = np.array([[ord("n"), ord("o"), -100]])
    assert generated(EvalPrediction(gen, np.array([[ord("n"), ord("o"), -100]]))) == {"exact_match": 1.0}
    with pytest.raises(ValueError, match="include_for_metrics"):
        trainer_compute_metrics("sari", Chars(), metric=metric)(EvalPrediction(right, labels))
    # sari reads the prompts from the inputs; Trainer pads inputs, labels and predictions across eval batches with
    # -100, which no tokenizer can decode: those positions are not part of any prompt
    from peft_asr.cl.scorers import sari

    pad = np.full((2, 3), -100, dtype=np.int64)
    padded = [np.concatenate([a, pad], axis=1) for a in (inputs, labels, right)]
    with_sources = trainer_compute_metrics("sari", Chars(), metric=load("sari", cache_dir=str(root / "metrics")))
    got = with_sources(EvalPrediction(padded[2], padded[1], inputs=padded[0]))
    assert got == {"sari": sari(["yes", "no"], ["yes", "no"], ["Q?", "Q?Q?"])}
