"""Metrics against scikit-learn, SciPy, sacrebleu and hand computations."""

import math

import numpy as np
import pytest
import sacrebleu
from scipy import stats

from hkft.metrics import classification_metrics, generation_metrics, perplexity, regression_metrics, rouge_l


def test_classification_metrics_by_hand():
    predictions, labels = np.array([0, 1, 1, 0, 1]), np.array([0, 1, 0, 0, 1])
    metrics = classification_metrics(predictions, labels)
    assert metrics["accuracy"] == pytest.approx(4 / 5)
    # class 0: precision 2/2, recall 2/3 -> F1 0.8; class 1: precision 2/3, recall 1 -> F1 0.8
    assert metrics["macro_f1"] == pytest.approx(0.8)
    tp, tn, fp, fn = 2, 2, 1, 0
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert metrics["mcc"] == pytest.approx(mcc)


def test_constant_predictions_do_not_crash():
    metrics = classification_metrics(np.zeros(4, dtype=int), np.array([0, 1, 0, 1]))
    assert metrics["mcc"] == 0.0 and metrics["accuracy"] == 0.5
    assert regression_metrics(np.ones(4), np.arange(4.0))["pearson"] == 0.0


def test_regression_metrics_match_scipy():
    rng = np.random.default_rng(0)
    labels = rng.normal(size=50)
    predictions = labels + rng.normal(scale=0.5, size=50)
    metrics = regression_metrics(predictions, labels)
    assert metrics["pearson"] == pytest.approx(stats.pearsonr(predictions, labels)[0])
    assert metrics["spearman"] == pytest.approx(stats.spearmanr(predictions, labels)[0])
    assert metrics["mse"] == pytest.approx(np.mean((predictions - labels) ** 2))


def test_rouge_l_hand_worked_example():
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat" = 5 tokens
    precision, recall = 5 / 6, 5 / 6
    assert rouge_l("The cat sat on the mat.", "the cat is on the mat") == pytest.approx(2 * precision * recall / (precision + recall))
    assert rouge_l("a b c d", "d c b a") == pytest.approx(2 * 0.25 * 0.25 / 0.5)
    assert rouge_l("", "x") == 0.0


def test_bleu_is_sacrebleu_corpus_bleu_and_takes_several_references():
    hypotheses = ["the cat sat on the mat", "a dog barked loudly today"]
    references = [["the cat sat on a mat", "a cat sat on the mat"], ["the dog barked loudly today"]]
    metrics = generation_metrics(hypotheses, references)
    streams = [["the cat sat on a mat", "the dog barked loudly today"], ["a cat sat on the mat", "the dog barked loudly today"]]
    assert metrics["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hypotheses, streams).score)
    best_first = max(rouge_l(hypotheses[0], reference) for reference in references[0])
    assert best_first == pytest.approx(5 / 6)
    assert metrics["rouge_l"] == pytest.approx(100 * np.mean([best_first, rouge_l(hypotheses[1], references[1][0])]))


def test_generation_metrics_need_one_reference_list_per_hypothesis():
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        generation_metrics(["a", "b"], ["a"])


def test_perplexity_is_exp_loss():
    assert perplexity(math.log(7.0)) == pytest.approx(7.0)
