"""Task metrics from standard implementations (scikit-learn, SciPy, sacrebleu) plus ROUGE-L."""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import sacrebleu
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

# The metric that picks the best checkpoint, and whether larger is better.
MAIN_METRIC = {"classification": "accuracy", "regression": "pearson", "causal-lm": "loss"}


def classification_metrics(predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "macro_f1": float(f1_score(labels, predictions, average="macro", zero_division=0)),
        "mcc": float(matthews_corrcoef(labels, predictions)),
    }


def regression_metrics(predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Pearson and Spearman are 0 (not NaN) when either side is constant."""
    predictions, labels = np.asarray(predictions, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    constant = np.ptp(predictions) == 0 or np.ptp(labels) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pearson = 0.0 if constant else float(stats.pearsonr(predictions, labels)[0])
        spearman = 0.0 if constant else float(stats.spearmanr(predictions, labels)[0])
    return {"pearson": pearson, "spearman": spearman, "mse": float(np.mean((predictions - labels) ** 2))}


def perplexity(mean_loss: float) -> float:
    return math.exp(mean_loss)


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _lcs_length(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(hypothesis: str, reference: str) -> float:
    """ROUGE-L F-measure on lower-cased alphanumeric tokens (the rouge-score package's convention)."""
    hyp, ref = _tokens(hypothesis), _tokens(reference)
    if not hyp or not ref:
        return 0.0
    lcs = _lcs_length(hyp, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(hyp), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def generation_metrics(hypotheses: list[str], references: list[list[str]] | list[str]) -> dict[str, float]:
    """Corpus BLEU (sacrebleu) and ROUGE-L (best reference per example, averaged), both 0-100.

    ``references`` holds one string or a list of strings per hypothesis (E2E has several).
    """
    per_example = [[ref] if isinstance(ref, str) else list(ref) for ref in references]
    if len(per_example) != len(hypotheses):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(per_example)} references")
    depth = max((len(refs) for refs in per_example), default=1)
    # sacrebleu wants one stream per reference position; pad short lists with their first reference.
    streams = [[refs[i] if i < len(refs) else refs[0] for refs in per_example] for i in range(depth)]
    bleu = sacrebleu.corpus_bleu(hypotheses, streams).score if hypotheses else 0.0
    rouge = [max(rouge_l(hyp, ref) for ref in refs) for hyp, refs in zip(hypotheses, per_example)]
    return {"bleu": float(bleu), "rouge_l": 100.0 * float(np.mean(rouge)) if rouge else 0.0}
