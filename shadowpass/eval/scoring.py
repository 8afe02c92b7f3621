"""Scoring as RULER does (Hsieh et al., 2024, arXiv 2404.06654): the fraction of reference
strings found in the output (case-insensitive), x100, averaged over the samples of a task;
plus agreement of greedy outputs with dense attention on the same prompts."""
from __future__ import annotations

from typing import Iterable, Optional, Sequence


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """Fraction in [0, 1] of ``references`` that occur in ``prediction`` (case-insensitive).

    >>> string_match_all("The keys are 123 and 456.", ["123", "789"])
    0.5
    """
    if not references:
        raise ValueError("a sample needs at least one reference string")
    pred = prediction.lower()
    return sum(ref.lower() in pred for ref in references) / len(references)


def task_score(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """RULER's per-task score: mean of string_match_all over samples, x100 (0..100)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} samples")
    if not predictions:
        return float("nan")
    return 100.0 * sum(map(string_match_all, predictions, references)) / len(predictions)


def exact_agreement(tokens: Sequence[int], dense_tokens: Sequence[int]) -> bool:
    """Greedy output identical to dense attention's (token ids, up to and including EOS)."""
    return list(tokens) == list(dense_tokens)


def token_agreement(tokens: Sequence[int], dense_tokens: Sequence[int]) -> float:
    """Fraction of dense's tokens reproduced before the first divergence (0..1)."""
    n = 0
    for a, b in zip(tokens, dense_tokens):
        if a != b:
            break
        n += 1
    return n / max(len(dense_tokens), 1)


def mean(xs: Iterable[float]) -> Optional[float]:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None
