"""Text metrics of generated responses: ROUGE-L and exact match (spec §12.3), on a 0-100 scale.

Both follow the reference evaluation (`rouge_metric.compute_metrics`, from natural-instructions) so that our
numbers are comparable with the published ones:

- ROUGE-L is the F-measure of Google's `rouge_score` with `use_stemmer=True` and its default tokenizer, which
  lowercases, replaces every run of characters outside `[a-z0-9]` by a space (so all non-ASCII text is
  dropped), and Porter-stems tokens longer than three characters.
- Exact match lowercases, removes ASCII punctuation, collapses whitespace and compares for equality.

Each example scores the maximum over its references; a corpus score is `100 x` the mean over examples. Unlike
the reference, predictions and references of different lengths are an error, not silently truncated.
"""

from __future__ import annotations

import functools
import string
from collections.abc import Sequence

from dskd.errors import DskdError

References = str | Sequence[str]
"""One reference text, or several (the example's score is the best over them)."""

_PUNCTUATION = frozenset(string.punctuation)


@functools.cache
def _rouge_scorer():
    # Building a RougeScorer sets up the Porter stemmer, which is slow; one instance is reused (it keeps no
    # state between calls). Imported here so that importing dskd.evaluation.metrics stays cheap.
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def _as_references(references: References) -> tuple[str, ...]:
    refs = (references,) if isinstance(references, str) else tuple(references)
    if not refs:
        raise DskdError("an example has no reference text; give each example at least one reference response")
    return refs


def normalize_answer(text: str) -> str:
    """Lowercase, remove ASCII punctuation, collapse whitespace (the exact-match normalisation)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(text.split())


def rouge_l(prediction: str, references: References) -> float:
    """ROUGE-L F-measure (stemmed), best over `references`, times 100."""
    scorer = _rouge_scorer()
    return 100.0 * max(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in _as_references(references))


def exact_match(prediction: str, references: References) -> float:
    """100 if the normalised prediction equals any normalised reference, else 0."""
    pred = normalize_answer(prediction)
    return 100.0 if any(pred == normalize_answer(ref) for ref in _as_references(references)) else 0.0


def _check_lengths(predictions: Sequence[str], references: Sequence[References]) -> None:
    if len(predictions) != len(references):
        raise DskdError(
            f"got {len(predictions)} predictions for {len(references)} examples with references; "
            f"score one prediction per example"
        )
    if not predictions:
        raise DskdError("no examples to score; give at least one prediction with its references")


def corpus_rouge_l(predictions: Sequence[str], references: Sequence[References]) -> float:
    """Mean of `rouge_l` over examples (0-100)."""
    _check_lengths(predictions, references)
    return sum(rouge_l(p, r) for p, r in zip(predictions, references)) / len(predictions)


def corpus_exact_match(predictions: Sequence[str], references: Sequence[References]) -> float:
    """Mean of `exact_match` over examples (0-100)."""
    _check_lengths(predictions, references)
    return sum(exact_match(p, r) for p, r in zip(predictions, references)) / len(predictions)


def score_corpus(predictions: Sequence[str], references: Sequence[References]) -> dict[str, float]:
    """`{"exact_match", "rougeL"}` of a corpus, both 0-100."""
    return {
        "exact_match": corpus_exact_match(predictions, references),
        "rougeL": corpus_rouge_l(predictions, references),
    }


def score_examples(predictions: Sequence[str], references: Sequence[References]) -> list[dict[str, float]]:
    """`{"exact_match", "rougeL"}` of each example (0-100): the corpus scores are their means, so a part of the
    corpus (e.g. the samples one teacher serves) can be scored from the same answers."""
    _check_lengths(predictions, references)
    return [{"exact_match": exact_match(p, r), "rougeL": rouge_l(p, r)} for p, r in zip(predictions, references)]
