"""Task metrics from standard implementations: scikit-learn, SciPy, sacrebleu and rouge-score."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
import sacrebleu
import torch
from rouge_score import rouge_scorer
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

# The metric that picks the best checkpoint for each task.
MAIN_METRIC = {"classification": "accuracy", "regression": "pearson", "causal-lm": "loss"}
# What the Trainer's evaluation reports per task (generation metrics come after training only).
EVAL_METRICS = {
    "classification": ("loss", "accuracy", "macro_f1", "mcc"),
    "regression": ("loss", "pearson", "spearman", "mse"),
    "causal-lm": ("loss",),
}
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


def preprocess_logits_for_metrics(task: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """The Trainer's per-batch reduction, so evaluation keeps one value per example instead of every
    logit: class ids for classification, the squeezed score for regression, nothing for causal LM
    (which is scored by its loss and by generation)."""
    if task == "causal-lm":
        return None

    def reduce(logits: torch.Tensor | tuple[torch.Tensor, ...], labels: torch.Tensor) -> torch.Tensor:
        logits = logits[0] if isinstance(logits, tuple) else logits
        return logits.argmax(dim=-1) if task == "classification" else logits.squeeze(-1)

    return reduce


def metric_implementations(task: str) -> dict[str, str]:
    if task == "classification":
        return {"accuracy": "sklearn.metrics.accuracy_score", "macro_f1": "sklearn.metrics.f1_score(average='macro')",
                "mcc": "sklearn.metrics.matthews_corrcoef"}
    if task == "regression":
        return {"pearson": "scipy.stats.pearsonr", "spearman": "scipy.stats.spearmanr"}
    return {"loss": "token-level cross-entropy on completion (chat: assistant) tokens", "perplexity": "exp(loss)",
            "bleu": "sacrebleu.corpus_bleu", "rouge_l": "ROUGE-L F-measure",
            "exact_match": "reply == reference up to whitespace (chat, short references)"}
