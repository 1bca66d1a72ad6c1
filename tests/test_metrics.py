"""Metrics against scikit-learn, SciPy, sacrebleu and hand computations."""

import math
import warnings

import numpy as np
import pytest
import sacrebleu
import torch
from scipy import stats
from sklearn.metrics import f1_score, matthews_corrcoef

from hkft.config.tasks import task_names
from hkft.tasks.metrics import (
    classification_metrics,
    generation_metrics,
    greater_is_better,
    perplexity,
    regression_metrics,
)
from hkft.tasks.registry import task_for


def test_classification_metrics_by_hand():
    predictions, labels = np.array([0, 1, 1, 0, 1]), np.array([0, 1, 0, 0, 1])
    metrics = classification_metrics(predictions, labels)
    assert metrics["accuracy"] == pytest.approx(4 / 5)
    # class 0: precision 2/2, recall 2/3 -> F1 0.8; class 1: precision 2/3, recall 1 -> F1 0.8
    assert metrics["macro_f1"] == pytest.approx(0.8)
    tp, tn, fp, fn = 2, 2, 1, 0
    assert metrics["mcc"] == pytest.approx((tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))


def test_classification_metrics_match_sklearn_on_three_classes():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=200)
    predictions = np.where(rng.random(200) < 0.7, labels, rng.integers(0, 3, size=200))
    metrics = classification_metrics(predictions, labels)
    assert metrics["accuracy"] == pytest.approx(np.mean(predictions == labels))
    assert metrics["macro_f1"] == pytest.approx(f1_score(labels, predictions, average="macro"))
    assert metrics["mcc"] == pytest.approx(matthews_corrcoef(labels, predictions))


def test_constant_predictions_give_zero_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics = classification_metrics(np.zeros(4, dtype=int), np.array([0, 1, 0, 1]))
        assert (metrics["mcc"], metrics["accuracy"]) == (0.0, 0.5)
        assert classification_metrics(np.ones(3, dtype=int), np.ones(3, dtype=int))["accuracy"] == 1.0
        for predictions, labels in ((np.ones(4), np.arange(4.0)), (np.arange(4.0), np.ones(4))):
            metrics = regression_metrics(predictions, labels)
            assert (metrics["pearson"], metrics["spearman"]) == (0.0, 0.0)
            assert metrics["mse"] == pytest.approx(np.mean((predictions - labels) ** 2))


def test_regression_metrics_match_scipy():
    rng = np.random.default_rng(0)
    labels = rng.normal(size=50)
    predictions = labels + rng.normal(scale=0.5, size=50)
    metrics = regression_metrics(predictions, labels)
    assert metrics["pearson"] == pytest.approx(stats.pearsonr(predictions, labels)[0])
    assert metrics["spearman"] == pytest.approx(stats.spearmanr(predictions, labels)[0])
    assert metrics["mse"] == pytest.approx(np.mean((predictions - labels) ** 2))


def test_rouge_l_hand_worked_examples():
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat": 5 of 6 tokens each way.
    # LCS("a b c d", "d c b a") = 1 token: precision = recall = 1/4.
    # "x y" against "x y z w": LCS 2, precision 1, recall 1/2 -> F = 2/3.
    hypotheses = ["The cat sat on the mat.", "a b c d", "x y"]
    references = ["the cat is on the mat", "d c b a", "x y z w"]
    assert generation_metrics(hypotheses, references)["rouge_l"] == pytest.approx(100 * np.mean([5 / 6, 1 / 4, 2 / 3]))
    assert generation_metrics([""], ["x"])["rouge_l"] == 0.0


def test_rouge_l_takes_the_best_reference():
    # F against "a b" = 0, against "x y z w" = 2/3, against "z x" (LCS 1, precision = recall = 1/2) = 1/2.
    metrics = generation_metrics(["x y"], [["a b", "x y z w", "z x"]])
    assert metrics["rouge_l"] == pytest.approx(100 * 2 / 3)


def test_bleu_is_sacrebleu_corpus_bleu_with_a_variable_number_of_references():
    hypotheses = ["the cat sat on the mat", "a dog barked loudly today"]
    references = [["the cat sat on a mat", "a cat sat on the mat"], ["the dog barked loudly today"]]
    # A repeated reference changes neither clipped n-gram counts nor the closest reference length.
    streams = [["the cat sat on a mat", "the dog barked loudly today"], ["a cat sat on the mat", "the dog barked loudly today"]]
    assert generation_metrics(hypotheses, references)["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hypotheses, streams).score)
    single = [refs[0] for refs in references]
    assert generation_metrics(hypotheses, single)["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hypotheses, [single]).score)


def test_generation_metrics_need_one_reference_list_per_hypothesis():
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        generation_metrics(["a", "b"], ["a"])


def test_perplexity_is_exp_loss():
    assert perplexity(math.log(7.0)) == pytest.approx(7.0)
    assert perplexity(0.0) == 1.0
    assert perplexity(1e4) == math.inf


def test_main_metric_for_every_task_and_its_direction():
    assert set(task_names()) == {"classification", "regression", "causal-lm"}
    assert [greater_is_better(task_for(task).main_metric) for task in ("classification", "regression", "causal-lm")] == [True, True, False]
    assert not greater_is_better("eval_mse") and not greater_is_better("perplexity") and greater_is_better("mcc")


def test_logits_are_reduced_per_batch():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.5]])
    classify = task_for("classification").metric_hooks()["preprocess_logits_for_metrics"]
    assert classify(logits, None).tolist() == [1, 0]
    assert classify((logits, torch.zeros(2, 4)), None).tolist() == [1, 0]
    scores = torch.tensor([[0.5], [-1.25]])
    assert task_for("regression").metric_hooks()["preprocess_logits_for_metrics"](scores, None).tolist() == [0.5, -1.25]
    assert task_for("causal-lm").metric_hooks()["preprocess_logits_for_metrics"] is None


@pytest.mark.parametrize("task,metric,valid", [
    ("classification", "f1", False), ("classification", "macro_f1", True), ("classification", "eval_mcc", True),
    ("regression", "accuracy", False), ("regression", "spearman", True), ("causal-lm", "bleu", False),
])
def test_metric_for_best_must_be_one_the_evaluation_reports(tmp_path, task, metric, valid):
    """Checked before training: the Trainer would only fail (KeyError) at the first evaluation."""
    from hkft.config import load_config
    from hkft.errors import ConfigError
    from hkft.recipes.train import training_arguments
    from hkft.run.directory import RunDir

    cfg = load_config("quickstart", [f"model.task={task}", f"train.metric_for_best={metric}"])
    if valid:
        assert training_arguments(cfg, RunDir(tmp_path), has_eval=True).metric_for_best_model == metric
    else:
        with pytest.raises(ConfigError, match=f"train.metric_for_best: '{metric}' is not among the {task} evaluation metrics"):
            training_arguments(cfg, RunDir(tmp_path), has_eval=True)


def test_the_metric_names_checked_before_training_are_the_ones_evaluation_reports():
    """A task's eval_metrics list what its compute_metrics returns (plus the loss); they must not drift apart."""
    import numpy as np

    labels = np.array([0, 1, 1, 0])
    assert set(task_for("classification").eval_metrics) == {"loss", *classification_metrics(labels, labels)}
    assert set(task_for("regression").eval_metrics) == {"loss", *regression_metrics(labels.astype(float), labels.astype(float))}
