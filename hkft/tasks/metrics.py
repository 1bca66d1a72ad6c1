"""Task metrics from standard implementations: scikit-learn, SciPy, sacrebleu and rouge-score."""

from __future__ import annotations

import math
import warnings

import numpy as np
import sacrebleu
from rouge_score import rouge_scorer
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

LOWER_IS_BETTER = frozenset({"loss", "mse", "perplexity"})
# Chat evaluation reports exact match when every reference reply has at most this many words.
SHORT_REFERENCE_WORDS = 16


def greater_is_better(metric: str) -> bool:
    return metric.removeprefix("eval_") not in LOWER_IS_BETTER


def classification_metrics(predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """MCC is 0 for constant predictions; sklearn's warnings about one-class inputs are silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "accuracy": float(accuracy_score(labels, predictions)),
            "macro_f1": float(f1_score(labels, predictions, average="macro", zero_division=0)),
            "mcc": float(matthews_corrcoef(labels, predictions)),
        }


def regression_metrics(predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Pearson and Spearman are 0 (not NaN, and without a warning) when either side is constant."""
    predictions, labels = np.asarray(predictions, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    constant = np.ptp(predictions) == 0 or np.ptp(labels) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pearson = 0.0 if constant else float(stats.pearsonr(predictions, labels)[0])
        spearman = 0.0 if constant else float(stats.spearmanr(predictions, labels)[0])
    return {"pearson": pearson, "spearman": spearman, "mse": float(np.mean((predictions - labels) ** 2))}


def perplexity(mean_loss: float) -> float:
    try:
        return math.exp(mean_loss)
    except OverflowError:
        return math.inf


def generation_metrics(hypotheses: list[str], references: list[list[str]] | list[str]) -> dict[str, float]:
    """Corpus BLEU (sacrebleu) and ROUGE-L F-measure (best reference per example, averaged), both 0-100.

    ``references`` holds one string or a list of strings per hypothesis (E2E has several).
    """
    per_example = [[ref] if isinstance(ref, str) else list(ref) for ref in references]
    if len(per_example) != len(hypotheses):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(per_example)} references")
    if not hypotheses:
        return {"bleu": 0.0, "rouge_l": 0.0}
    depth = max(len(refs) for refs in per_example)
    # sacrebleu takes one stream per reference position; None marks a missing reference.
    streams = [[refs[i] if i < len(refs) else None for refs in per_example] for i in range(depth)]
    bleu = sacrebleu.corpus_bleu(hypotheses, streams).score
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge = [scorer.score_multi(refs, hyp)["rougeL"].fmeasure for hyp, refs in zip(hypotheses, per_example)]
    return {"bleu": float(bleu), "rouge_l": 100.0 * float(np.mean(rouge))}


def exact_match(hypotheses: list[str], references: list[str]) -> float:
    """Share of hypotheses equal to their reference up to surrounding and repeated whitespace, 0-100."""
    if not hypotheses:
        return 0.0
    same = [" ".join(hyp.split()) == " ".join(ref.split()) for hyp, ref in zip(hypotheses, references, strict=True)]
    return 100.0 * sum(same) / len(same)


