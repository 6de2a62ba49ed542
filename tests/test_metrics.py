"""ROUGE-L and exact match: equal to Google's `rouge_score` and to the reference normalisation (spec §12.3)."""

import pytest
from rouge_score import rouge_scorer

from dskd.errors import DskdError
from dskd.evaluation.metrics import (
    corpus_exact_match,
    corpus_rouge_l,
    exact_match,
    normalize_answer,
    rouge_l,
    score_corpus,
)

# Built independently of dskd.evaluation.metrics: the scorer the published numbers come from.
ORACLE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)

CASES = [
    ("The cat sat on the mat.", "A cat was sitting on the mat"),
    ("running dogs jumped quickly", "the dog runs and jumps quick"),  # matches only after Porter stemming
    ("Paris is the capital of France", "The capital of France is Paris."),
    ("", "something"),
    ("completely unrelated words", "nothing in common here"),
    ("Ünïcödé café résumé naïve 東京 is big", "cafe resume naive tokyo is big"),
]


@pytest.mark.parametrize("prediction,reference", CASES)
def test_rouge_l_equals_rouge_score_f_measure_times_100(prediction, reference):
    expected = 100.0 * ORACLE.score(reference, prediction)["rougeL"].fmeasure
    assert rouge_l(prediction, reference) == pytest.approx(expected, abs=1e-12)
    assert rouge_l(prediction, [reference]) == pytest.approx(expected, abs=1e-12)


def test_rouge_l_stems_so_inflections_match():
    assert rouge_l("running dogs", "run dog") == pytest.approx(100.0)
    assert rouge_l("running dogs", "ran doggy") < 100.0


def test_rouge_l_drops_non_ascii_text():
    # Non-ASCII characters become word breaks: "東京" vanishes and "café" becomes "caf".
    assert rouge_l("東京 is big", "is big") == pytest.approx(100.0)
    assert rouge_l("café is big", "caf is big") == pytest.approx(100.0)
    assert rouge_l("東京 日本", "東京 日本") == 0.0  # nothing is left to match (an empty LCS scores 0)


def test_rouge_l_takes_the_best_reference():
    prediction = "the quick brown fox"
    refs = ("a slow green turtle", "the quick brown fox jumps", "quick fox")
    expected = max(100.0 * ORACLE.score(r, prediction)["rougeL"].fmeasure for r in refs)
    assert rouge_l(prediction, refs) == pytest.approx(expected)
    assert rouge_l(prediction, refs) > rouge_l(prediction, refs[0])


@pytest.mark.parametrize(
    "prediction,reference,expected",
    [
        ("Paris", "paris", 100.0),
        ("Paris.", "paris", 100.0),
        ("  Hello,   world! ", "hello world", 100.0),
        ("hello\n\tworld", "Hello World", 100.0),
        ("it's", "its", 100.0),
        ("hello world", "hello  worlds", 0.0),
        ("the answer", "answer", 0.0),  # articles are kept: only case, punctuation and spacing are normalised
        ("café", "cafe", 0.0),  # non-ASCII is not folded
        ("", "", 100.0),
    ],
)
def test_exact_match_normalises_case_punctuation_and_whitespace_only(prediction, reference, expected):
    assert exact_match(prediction, reference) == expected


def test_exact_match_is_max_over_references():
    assert exact_match("Blue", ("red", "blue!", "green")) == 100.0
    assert exact_match("Blue", ("red", "green")) == 0.0


def test_normalize_answer_removes_ascii_punctuation_and_collapses_spaces():
    assert normalize_answer(' A "quoted" (text) -- here. ') == "a quoted text here"


def test_corpus_scores_are_means_over_examples():
    predictions = ["Paris", "running dogs", "no"]
    references = [("paris",), ("the dog runs", "cats"), "yes"]
    expected_rouge = (
        sum(
            max(100.0 * ORACLE.score(r, p)["rougeL"].fmeasure for r in ([refs] if isinstance(refs, str) else refs))
            for p, refs in zip(predictions, references)
        )
        / 3
    )
    assert corpus_rouge_l(predictions, references) == pytest.approx(expected_rouge)
    assert corpus_exact_match(predictions, references) == pytest.approx(100.0 / 3)
    assert score_corpus(predictions, references) == {
        "exact_match": pytest.approx(100.0 / 3),
        "rougeL": pytest.approx(expected_rouge),
    }


def test_mismatched_prediction_and_reference_counts_are_an_error_not_a_truncation():
    with pytest.raises(DskdError, match="2 predictions for 3 examples"):
        score_corpus(["a", "b"], ["a", "b", "c"])


def test_an_example_without_references_is_an_error():
    with pytest.raises(DskdError, match="no reference"):
        rouge_l("text", ())
    with pytest.raises(DskdError, match="no examples"):
        corpus_exact_match([], [])
