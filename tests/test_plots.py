"""Plots: PNG files on disk, and the series inside the figures (labels, x/y data, point counts)."""

from __future__ import annotations

import statistics

import numpy as np
import pytest
from fake_runs import fake_run, loss_events

from hkft.recipes.curves import figure_run_curves, plot_run_curves, read_curves
from hkft.study.comparison import collect_runs, comparison_table
from hkft.study.plots import (
    figure_loss_by_method,
    figure_metric_by_method,
    figure_metric_vs_rate,
    plot_comparison,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def lines_by_label(axes) -> dict[str, np.ndarray]:
    return {line.get_label(): line.get_xydata() for line in axes.get_lines()}


def test_run_curves_png_and_series(tmp_path):
    run = fake_run(tmp_path / "run", events=loss_events([1.0, 0.8, 0.7, 0.5], [0.6, 0.75], kl=[0.01, 0.02, 0.02, 0.03]))
    path = plot_run_curves(run)
    assert path == run / "curves.png"
    assert path.read_bytes().startswith(PNG_SIGNATURE)

    figure = figure_run_curves(read_curves(run / "metrics.jsonl"), "accuracy")
    loss_axes, eval_axes, kl_axes = figure.axes  # the KL twin axis is added last
    np.testing.assert_array_equal(lines_by_label(loss_axes)["training loss"], [[1, 1.0], [2, 0.8], [3, 0.7], [4, 0.5]])
    np.testing.assert_array_equal(lines_by_label(kl_axes)["kl_loss"], [[1, 0.01], [2, 0.02], [3, 0.02], [4, 0.03]])
    np.testing.assert_array_equal(lines_by_label(eval_axes)["eval_accuracy"], [[2, 0.6], [4, 0.75]])
    assert eval_axes.get_title() == "eval accuracy"


def test_run_curves_show_training_and_validation_loss_on_one_axis_with_the_best_step(tmp_path):
    events = loss_events([1.0, 0.8, 0.7, 0.5], [0.6, 0.75])
    events[-2]["eval_loss"] = 0.9  # the validation loss rose at step 4
    run = fake_run(tmp_path / "run", method="none", events=events)
    figure = figure_run_curves(read_curves(run / "metrics.jsonl"), "accuracy", best_step=2)
    loss_axes, eval_axes = figure.axes
    assert loss_axes.get_title() == "training and validation loss"
    lines = lines_by_label(loss_axes)
    np.testing.assert_array_equal(lines["training loss"], [[1, 1.0], [2, 0.8], [3, 0.7], [4, 0.5]])
    np.testing.assert_array_equal(lines["validation loss"], [[2, 0.6], [4, 0.9]])
    for axes in (loss_axes, eval_axes):
        assert lines_by_label(axes)["best (step 2)"][:, 0].tolist() == [2, 2]  # a vertical line at the best step
    assert plot_run_curves(run, best_step=2).read_bytes().startswith(PNG_SIGNATURE)


def chat_events() -> list[dict]:
    """What a chat run without evaluation logs with a KL method: loss = task loss + KL, large at first."""
    kl = [2.28, 0.9, 0.3, 0.1]
    task = [1.9, 1.6, 1.4, 1.3]
    return [{"step": 5 * step, "epoch": step / 4, "loss": t + k, "task_loss": t, "kl_loss": k, "learning_rate": 1e-4}
            for step, (t, k) in enumerate(zip(task, kl), 1)]


def test_a_kl_runs_curve_is_its_task_loss_with_the_kl_on_its_own_axis(tmp_path):
    run = fake_run(tmp_path / "chat", events=chat_events(), extra=("model.task=causal-lm",))
    figure = figure_run_curves(read_curves(run / "metrics.jsonl"), "loss")
    loss_axes, kl_axes = figure.axes  # one panel: no evaluation, so neither a validation curve nor a metric panel
    assert loss_axes.get_title() == "training loss"
    assert list(lines_by_label(loss_axes)) == ["training task loss"]
    np.testing.assert_array_equal(lines_by_label(loss_axes)["training task loss"], [[5, 1.9], [10, 1.6], [15, 1.4], [20, 1.3]])
    np.testing.assert_array_equal(lines_by_label(kl_axes)["kl_loss"][:, 1], [2.28, 0.9, 0.3, 0.1])
    assert kl_axes.bbox.bounds == loss_axes.bbox.bounds and kl_axes.get_ylabel() == "kl_loss"  # a twin: its own y axis
    assert all(not axes.texts for axes in figure.axes)
    assert plot_run_curves(run).read_bytes().startswith(PNG_SIGNATURE)


def test_a_causal_lm_run_draws_its_validation_loss_once(tmp_path):
    events = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.8}, {"step": 2, "eval_loss": 1.9}]
    run = fake_run(tmp_path / "lm", events=events, extra=("model.task=causal-lm",))
    (axes,) = figure_run_curves(read_curves(run / "metrics.jsonl"), "loss", best_step=2).axes
    assert sorted(lines_by_label(axes)) == ["best (step 2)", "training loss", "validation loss"]


def test_run_curves_without_kl_or_eval_have_no_empty_panel(tmp_path):
    run = fake_run(tmp_path / "run", method="none", events=[{"step": 1, "loss": 0.9}, {"step": 2, "loss": 0.8}])
    figure = figure_run_curves(read_curves(run / "metrics.jsonl"), "accuracy")
    (axes,) = figure.axes
    assert axes.get_title() == "training loss" and not axes.texts
    assert plot_run_curves(run).read_bytes().startswith(PNG_SIGNATURE)


def test_a_run_that_logged_nothing_gets_no_curves_png(tmp_path):
    run = fake_run(tmp_path / "run", method="none", events=[{"step": 2, "train_runtime": 1.0, "train_loss": 0.7}])
    assert figure_run_curves(read_curves(run / "metrics.jsonl"), "accuracy") is None
    assert plot_run_curves(run) is None and not (run / "curves.png").exists()


SEED_LOSSES = {1: [1.0, 0.8, 0.6, 0.4], 2: [0.9, 0.7, 0.5, 0.3], 3: [1.2, 0.6, 0.7, 0.2]}


@pytest.fixture
def study(tmp_path):
    """none (rate ignored), hiddenkey- and hiddenkey at p in {0.05, 0.1}, 3 seeds each."""
    for seed, losses in SEED_LOSSES.items():
        evals = [0.5 + seed / 100, 0.6 + seed / 100]
        fake_run(tmp_path / f"none-{seed}", method="none", seed=seed, metrics={"accuracy": 0.70 + seed / 100},
                 events=loss_events(losses, evals))
        for method in ("hiddenkey-", "hiddenkey"):
            for rate in (0.05, 0.1):
                accuracy = 0.75 + rate + seed / 100 + (0.02 if method == "hiddenkey" else 0.0)
                fake_run(tmp_path / f"{method}-{rate}-{seed}", method=method, rate=rate, seed=seed,
                         metrics={"accuracy": accuracy}, events=loss_events([x + rate for x in losses], evals))
    return tmp_path


def test_comparison_pngs(study, tmp_path):
    paths = plot_comparison(comparison_table(collect_runs([study])), tmp_path / "out")
    assert [path.name for path in paths] == ["loss_by_method.png", "metric_by_method.png", "metric_vs_rate.png"]
    for path in paths:
        assert path.read_bytes().startswith(PNG_SIGNATURE)


def test_loss_by_method_is_the_median_over_seeds(study):
    rows = comparison_table(collect_runs([study]))
    (axes,) = figure_loss_by_method(rows).axes
    lines = lines_by_label(axes)
    assert sorted(lines) == ["hiddenkey p=0.05", "hiddenkey p=0.1", "hiddenkey- p=0.05", "hiddenkey- p=0.1", "none"]
    expected = [statistics.median(losses[i] for losses in SEED_LOSSES.values()) for i in range(4)]  # 1.0 .7 .6 .3
    np.testing.assert_allclose(lines["none"], np.column_stack([[1, 2, 3, 4], expected]))
    np.testing.assert_allclose(lines["hiddenkey p=0.1"][:, 1], np.array(expected) + 0.1)
    assert axes.get_title() == "quickstart/train.jsonl"


def test_loss_by_method_uses_the_task_loss_of_kl_methods(tmp_path):
    events = [{"step": 1, "loss": 0.9, "task_loss": 0.7, "kl_loss": 0.2}, {"step": 2, "loss": 0.8, "task_loss": 0.6}]
    fake_run(tmp_path / "hk", events=events)
    fake_run(tmp_path / "none", method="none", events=[{"step": 1, "loss": 0.75}, {"step": 2, "loss": 0.65}])
    (axes,) = figure_loss_by_method(comparison_table(collect_runs([tmp_path]))).axes
    lines = lines_by_label(axes)
    np.testing.assert_allclose(lines["hiddenkey"], [[1, 0.7], [2, 0.6]])
    np.testing.assert_allclose(lines["none"], [[1, 0.75], [2, 0.65]])


def test_metric_by_method(study):
    rows = comparison_table(collect_runs([study]))
    (axes,) = figure_metric_by_method(rows).axes
    lines = lines_by_label(axes)
    assert len(lines) == 5
    np.testing.assert_allclose(lines["hiddenkey- p=0.05"], [[2, 0.52], [4, 0.62]])  # seeds 1-3: median at seed 2


def test_metric_vs_rate(study):
    rows = comparison_table(collect_runs([study]))
    (axes,) = figure_metric_vs_rate(rows).axes
    series = {container.get_label(): container for container in axes.containers}
    assert sorted(series) == ["hiddenkey", "hiddenkey-"]
    line, _, (bars,) = series["hiddenkey"]
    # accuracy = 0.77 + rate + seed/100 over seeds 1-3: median at seed 2, sample std 0.01
    np.testing.assert_allclose(line.get_xydata(), [[0.05, 0.84], [0.1, 0.89]])
    segments = bars.get_segments()
    np.testing.assert_allclose([segment[:, 1] for segment in segments], [[0.83, 0.85], [0.88, 0.90]])
    (baseline,) = [line for line in axes.get_lines() if line.get_label() == "none"]
    np.testing.assert_allclose(baseline.get_ydata(), [0.72, 0.72])  # horizontal: the rate means nothing for `none`


def test_one_panel_per_dataset(study, tmp_path):
    fake_run(tmp_path / "stsb", extra=("model.task=regression", "data.train=/data/stsb/train.jsonl"),
             metrics={"pearson": 0.9}, events=[{"step": 2, "eval_pearson": 0.8}, {"step": 1, "loss": 2.0}])
    rows = comparison_table(collect_runs([study, tmp_path / "stsb"]))
    figure = figure_metric_by_method(rows)
    assert [axes.get_title() for axes in figure.axes] == ["quickstart/train.jsonl", "stsb/train.jsonl"]
    lines = lines_by_label(figure.axes[1])
    assert list(lines) == ["hiddenkey"]
    np.testing.assert_allclose(lines["hiddenkey"], [[2, 0.8]])
    assert figure.axes[1].get_ylabel().startswith("eval pearson")
