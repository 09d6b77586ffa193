"""Text and label metrics: ROUGE (the `rouge-score` package), exact match, accuracy, macro-F1."""

from __future__ import annotations

from collections.abc import Sequence

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE F-measures (x100), with stemming, as HF `evaluate`'s rouge reports them."""
    from rouge_score import rouge_scorer, scoring

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = {t: 0.0 for t in ROUGE_TYPES}
    for prediction, reference in zip(predictions, references, strict=True):
        # rougeLsum splits summaries on newlines
        scores: dict[str, scoring.Score] = scorer.score(reference, prediction)
        for t in ROUGE_TYPES:
            totals[t] += scores[t].fmeasure
    n = max(len(predictions), 1)
    return {t: 100 * totals[t] / n for t in ROUGE_TYPES}


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    pairs = list(zip(predictions, references, strict=True))
    return 100 * sum(p.strip() == r.strip() for p, r in pairs) / max(len(pairs), 1)


def accuracy(predictions: Sequence, references: Sequence) -> float:
    pairs = list(zip(predictions, references, strict=True))
    return sum(p == r for p, r in pairs) / max(len(pairs), 1)


def macro_f1(predictions: Sequence, references: Sequence) -> float:
    """Unweighted mean over the labels present in references or predictions of per-label F1."""
    labels = sorted(set(references) | set(predictions), key=str)
    f1s = []
    for label in labels:
        tp = sum(p == label and r == label for p, r in zip(predictions, references, strict=True))
        fp = sum(p == label and r != label for p, r in zip(predictions, references, strict=True))
        fn = sum(p != label and r == label for p, r in zip(predictions, references, strict=True))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(f1s) / max(len(f1s), 1)


def text_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    return {**rouge(predictions, references), "exact_match": exact_match(predictions, references)}


def label_metrics(predictions: Sequence, references: Sequence) -> dict[str, float]:
    return {"accuracy": accuracy(predictions, references), "macro_f1": macro_f1(predictions, references)}


# what run.eval_metrics, eval and sweeps compute for each task; the first is the one a sweep picks by
TASK_METRICS = {"seq2seq": text_metrics, "causal": text_metrics, "classification": label_metrics}
PICK_METRIC = {"seq2seq": "rougeL", "causal": "rougeL", "classification": "accuracy"}


def task_metrics(task: str, predictions: Sequence, references: Sequence) -> dict[str, float]:
    """The metrics of `task` (ROUGE and exact match for generation, accuracy and macro-F1 for labels)."""
    return TASK_METRICS[task](predictions, references)
