"""The overfitting monitor on synthetic curves (noise must not fire it, real overfitting must) and on
real runs: one built to overfit is flagged, a short calm one is not, and a resumed run reaches the
verdict of an uninterrupted one."""

import json
import math
import os
import random
import signal

import numpy as np
import pytest
import torch
import yaml
from checkpoints import save_tiny_model, write_jsonl
from conftest import assert_one_line_error
from transformers import (
    EarlyStoppingCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from hkft.config import load_config
from hkft.recipes.monitor import (
    OverfittingMonitor,
    alarms,
    evaluations,
    latest_train_loss,
    rises,
    verdict,
)
from hkft.run.progress import ProgressCallback

EVERY = 5  # steps between evaluations


def history(train: list[float], val_loss: list[float], accuracy: list[float], *, kl: float | None = None) -> list[dict]:
    """A Trainer log history: two training logs, then an evaluation, every EVERY steps."""
    events = []
    for index, (loss, eval_loss, metric) in enumerate(zip(train, val_loss, accuracy)):
        step = (index + 1) * EVERY
        for offset, share in ((2, 1.1), (0, 0.9)):  # mean of the two is `loss`
            event = {"loss": loss * share, "step": step - offset, "epoch": (step - offset) / 10}
            if kl is not None:
                event = {**event, "loss": loss * share + kl, "task_loss": loss * share}
            events.append(event)
        events.append({"eval_loss": eval_loss, "eval_accuracy": metric, "step": step, "epoch": step / 10})
    return events


def config(*overrides: str):
    return load_config("quickstart", ["dropout.method=none", *overrides])


def calm_curves(rng: np.random.Generator, count: int = 20) -> tuple[list[float], list[float], list[float]]:
    """A run that learns and levels off: training loss falls, validation loss falls to a plateau,
    accuracy (on 200 examples) rises to one, each with the noise of a real run around it."""
    t = np.arange(count)
    train = 0.7 * np.exp(-t / 4) + 0.1
    val = 0.5 * np.exp(-t / 4) + 0.25
    accuracy = 0.9 - 0.35 * np.exp(-t / 3)
    train = train * (1 + 0.05 * rng.standard_normal(count))
    val = val * (1 + 0.02 * rng.standard_normal(count))
    accuracy = np.round((accuracy + 0.01 * rng.standard_normal(count)) * 200) / 200
    return list(train), list(val), list(accuracy)


def chance_curves(rng: np.random.Generator, count: int = 20) -> tuple[list[float], list[float], list[float]]:
    """A run that learns nothing (a learning rate too high): every curve is noise around chance,
    accuracy on 40 examples."""
    train = 0.69 * (1 + 0.03 * rng.standard_normal(count))
    val = 0.70 * (1 + 0.03 * rng.standard_normal(count))
    accuracy = np.round((0.5 + 0.03 * rng.standard_normal(count)) * 40) / 40
    return list(train), list(val), list(accuracy)


def overfit_curves(rng: np.random.Generator, turn: int = 6, count: int = 20) -> tuple[list[float], list[float], list[float]]:
    """Training loss falls to zero; validation loss is U-shaped with its bottom at ``turn``;
    accuracy peaks there and falls, with noise."""
    t = np.arange(count)
    train = 0.7 * np.exp(-t / 3) * (1 + 0.05 * rng.standard_normal(count))
    val = 0.35 + 0.02 * (t - turn) ** 2 * (1 + 0.02 * rng.standard_normal(count))
    accuracy = np.where(t <= turn, 0.6 + 0.05 * t, 0.9 - 0.015 * (t - turn)) + 0.005 * rng.standard_normal(count)
    return list(train), list(val), list(accuracy)


@pytest.mark.parametrize("curves", [calm_curves, chance_curves])
def test_noise_never_fires_the_defaults(curves):
    cfg = config()
    fired = []
    for seed in range(300):
        found = verdict(cfg, history(*curves(np.random.default_rng(seed))), "accuracy")
        if found.detected:
            fired.append(seed)
    assert fired == []


def test_real_overfitting_fires_where_the_validation_loss_turns():
    cfg = config()
    for seed in range(100):
        events = history(*overfit_curves(np.random.default_rng(seed), turn=6))
        found = verdict(cfg, events, "accuracy")
        assert found.detected, seed
        turn_step = 7 * EVERY  # the first evaluation after the bottom of the U
        assert turn_step <= found.first_step <= turn_step + 2 * EVERY, (seed, found)
        assert found.best_step == max(evaluations(events, "accuracy"), key=lambda point: point.metric).step
        assert "dropout.method=hiddenkey" in found.suggestion and "dropout.rate=0.1" in found.suggestion


# A run that learns, bottoms out at evaluation 5 (step 30) and then overfits: the validation loss
# climbs 47% while the training loss keeps falling and the accuracy holds.
TRAIN = [0.85 ** index for index in range(14)]
VALIDATION = [0.9, 0.75, 0.65, 0.6, 0.58, 0.57, 0.6, 0.64, 0.68, 0.72, 0.76, 0.8, 0.82, 0.84]
ACCURACY = [0.6, 0.7, 0.75, 0.8] + [0.8] * 10


def test_validation_loss_rising_while_training_loss_falls_fires_even_if_the_metric_holds():
    events = history(TRAIN, VALIDATION, ACCURACY)
    found = verdict(config(), events, "accuracy")
    assert found.detected and found.first_step == 7 * EVERY  # the first evaluation after the minimum
    assert found.best_step == 4 * EVERY and found.best_metric == 0.8
    assert found.gap == pytest.approx(0.84 - TRAIN[-1])
    raised = alarms(evaluations(events, "accuracy"), config().train.overfitting, "accuracy")
    assert [alarm.at for alarm in raised] == [11]  # the third evaluation in a row that shows the rise


def test_the_rise_is_measured_against_the_noise_of_the_curve():
    """The same 15% step (above min_loss_change) fires on a curve that zigzags by 1% and not on one that
    zigzags by 10%: the threshold is the curve's own noise, not a fixed number of rises."""
    index = np.arange(24)
    train = list(0.7 * np.exp(-index / 8))
    step = np.where(index < 14, 0.4, 0.46)
    zigzag = (-1.0) ** index
    assert verdict(config(), history(train, list(step * (1 + 0.01 * zigzag)), [0.8] * 24), "accuracy").detected
    assert not verdict(config(), history(train, list(step * (1 + 0.1 * zigzag)), [0.8] * 24), "accuracy").detected


def test_the_rise_is_a_t_statistic_against_the_lowest_window(monkeypatch):
    """Recomputed independently: the reference is the lowest mean of the widest windows (numpy, brute
    force), the noise the smaller of the pooled spread (as scipy's two-sample t-test pools it) and
    the curve's trimmed second differences."""
    from scipy import stats

    rng = np.random.default_rng(7)
    losses = 0.5 * np.exp(np.r_[np.linspace(0.4, 0, 10), np.linspace(0, 0.3, 20)] + 0.05 * rng.standard_normal(30))
    points = evaluations(history(list(0.7 * np.exp(-np.arange(30) / 8)), list(losses), [0.8] * 30), "accuracy")
    logs = np.log(losses)
    for end in (12, 20, 30):
        rise = rises(points)[end - 1]
        recent = logs[end - 4:end]
        width = max(4, (end - 4) // 2)
        means = [logs[start:start + width].mean() for start in range(end - 4 - width + 1)]
        start = int(np.argmin(means))
        reference = logs[start:start + width]
        assert (rise.reference, rise.recent) == (range(start, start + width), range(end - 4, end))
        assert rise.change == pytest.approx(np.exp(recent.mean() - reference.mean()) - 1)
        difference = recent.mean() - reference.mean()
        pooled = difference / stats.ttest_ind(recent, reference).statistic / np.sqrt(1 / width + 1 / 4)
        second = np.sort(np.diff(logs[:end], 2) ** 2)[: round(0.8 * (end - 2))]
        trimmed_variance = stats.chi2.cdf(stats.chi2.ppf(0.8, 1), 3) / 0.8
        along = np.sqrt(second.mean() / 6 / trimmed_variance)
        assert rise.noise == pytest.approx(min(pooled, along))
        assert rise.standard_errors == pytest.approx(difference / (min(pooled, along) * np.sqrt(1 / width + 1 / 4)))


def test_rising_losses_on_both_sides_are_instability_not_overfitting():
    train = [1.0, 0.8, 0.6, 0.5, 0.45, 0.4, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95, 1.05, 1.15]
    accuracy = [0.6, 0.7, 0.75, 0.8, 0.8, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.55, 0.5, 0.5]
    assert not verdict(config(), history(train, VALIDATION, accuracy), "accuracy").detected


def test_the_thresholds_decide():
    validation = [0.9, 0.75, 0.65, 0.6, 0.58, 0.57, 0.58, 0.6, 0.62, 0.64, 0.65, 0.66, 0.66, 0.66]  # +16%
    events = history(TRAIN, validation, ACCURACY)
    assert verdict(config(), events, "accuracy").detected
    assert not verdict(config("train.overfitting.min_loss_change=0.2"), events, "accuracy").detected
    assert not verdict(config("train.overfitting.patience=6"), events, "accuracy").detected
    assert verdict(config("train.overfitting.enabled=false"), events, "accuracy") is None
    flat_training = history([0.3] * 14, validation, ACCURACY)  # the training loss must fall too
    assert not verdict(config(), flat_training, "accuracy").detected


def test_a_misspelt_or_out_of_range_setting_is_one_clear_error(cli):
    assert_one_line_error(cli("config", "quickstart", "--set", "train.overfitting.patiense=2"),
                          "train.overfitting.patiense: unknown key (did you mean train.overfitting.patience?)")
    assert_one_line_error(cli("config", "quickstart", "--set", "train.overfitting.min_loss_change=1.5"),
                          "train.overfitting.min_loss_change")


def test_a_kl_methods_training_loss_is_its_task_loss():
    train, val, accuracy = [1.0, 0.8, 0.6, 0.4], [0.9, 0.7, 0.6, 0.6], [0.6, 0.7, 0.8, 0.8]
    points = evaluations(history(train, val, accuracy, kl=5.0), "accuracy")
    assert [point.train_loss for point in points] == pytest.approx(train)


def test_an_evaluation_without_training_logs_since_the_one_before_has_no_training_loss():
    """logging_steps longer than the evaluation interval: evaluations every 5 steps, training logs every
    10. Each evaluation gets the logs since the one before, or none: never the previous one's again."""
    events = []
    for step in range(5, 45, 5):
        if step % 10 == 0:
            events.append({"loss": 2.0 - step / 40, "step": step, "epoch": step / 40})
        events.append({"eval_loss": 1.0, "eval_accuracy": 0.5, "step": step, "epoch": step / 40})
    points = evaluations(events, "accuracy")
    assert [point.train_loss for point in points] == [None, 1.75, None, 1.5, None, 1.25, None, 1.0]
    assert latest_train_loss(points, 4) == 1.5 and latest_train_loss(points, 0) is None


def test_sparse_training_logs_still_show_overfitting_and_its_gap():
    """Training logs before every other evaluation only: the training loss over a window is the mean
    of those logged in it, and the gap uses the latest one logged."""
    events = []
    for index, event in enumerate(history(TRAIN, VALIDATION, ACCURACY)):
        if "loss" not in event or (index // 3) % 2 == 0:  # three events per evaluation, two of them training logs
            events.append(event)
    assert [point.train_loss for point in evaluations(events, "accuracy")][:4] == pytest.approx([1.0, None, 0.85 ** 2, None])
    found = verdict(config(), events, "accuracy")
    assert found.detected and found.first_step == 7 * EVERY
    assert found.gap == pytest.approx(0.84 - TRAIN[-2])  # the last evaluation's logs were dropped


def test_an_alarm_a_later_best_disproves_does_not_count():
    train = [0.85 ** index for index in range(20)]
    validation = VALIDATION[:12] + [0.7, 0.6, 0.5, 0.45, 0.42, 0.4, 0.4, 0.4]  # recovers: a second descent
    accuracy = ACCURACY[:12] + [0.8, 0.82, 0.85, 0.88, 0.9, 0.9, 0.9, 0.9]
    events = history(train, validation, accuracy)
    assert [alarm.at for alarm in alarms(evaluations(events, "accuracy"), config().train.overfitting, "accuracy")] == [11]
    found = verdict(config(), events, "accuracy")
    assert not found.detected and found.best_step == 17 * EVERY and found.first_step is None


def test_a_new_best_within_min_delta_does_not_clear_a_rising_validation_loss():
    """A noisy metric edges past its best by less than min_delta while the validation loss keeps
    rising: still the same alarm. With a smaller min_delta it disproves the first alarm, and the
    rise, still there, raises a second one."""
    accuracy = ACCURACY[:-1] + [0.81]  # a new best by 0.01 at the last evaluation
    events = history(TRAIN, VALIDATION, accuracy)
    found = verdict(config(), events, "accuracy")
    assert found.detected and found.best_step == 14 * EVERY and found.first_step == 7 * EVERY
    points = evaluations(events, "accuracy")
    assert [alarm.at for alarm in alarms(points, config().train.overfitting, "accuracy")] == [11]
    assert [alarm.at for alarm in alarms(points, config("train.overfitting.min_delta=0.005").train.overfitting,
                                         "accuracy")] == [11, 13]


def early_stopping_step(metrics: list[float], patience: int) -> int | None:
    """Where transformers' own EarlyStoppingCallback stops on this metric sequence (None: never)."""
    callback = EarlyStoppingCallback(early_stopping_patience=patience)
    args = TrainingArguments(output_dir="unused", report_to=[], metric_for_best_model="accuracy", greater_is_better=True)
    state, control = TrainerState(), TrainerControl()
    for index, metric in enumerate(metrics):
        callback.on_evaluate(args, state, control, metrics={"eval_accuracy": metric})
        if state.best_metric is None or metric > state.best_metric:
            state.best_metric = metric
        if control.should_training_stop:
            return index
    return None


def test_suggested_early_stopping_patience_keeps_the_best_and_stops_sooner():
    accuracy = [0.6, 0.7, 0.7, 0.7, 0.8, 0.75, 0.7, 0.7, 0.65, 0.6, 0.6, 0.6, 0.6, 0.6]  # a new best after 3 flat
    found = verdict(config(), history(TRAIN, VALIDATION, accuracy), "accuracy")
    patience = int(found.suggestion.split("train.early_stopping_patience=")[1].split()[0])
    assert early_stopping_step(accuracy[:5], patience - 1) is not None  # one less would have missed the best
    stop = early_stopping_step(accuracy, patience)
    assert stop is not None and stop > accuracy.index(0.8)
    assert f"stopped at step {(stop + 1) * EVERY} with the same best checkpoint" in found.suggestion


def test_with_a_method_on_it_suggests_more_dropout_or_fewer_epochs():
    cfg = load_config("quickstart", ["dropout.rate=0.1", "train.early_stopping_patience=2"])
    found = verdict(cfg, history(TRAIN, VALIDATION, ACCURACY), "accuracy")
    best_epoch = 4 * EVERY / 10
    assert "--set dropout.rate=0.2" in found.suggestion
    assert f"--set train.epochs={math.ceil(best_epoch)}" in found.suggestion
    assert "early_stopping" not in found.suggestion  # already on
    cfg.dropout.rate = 0.3  # as high as it sensibly goes: only less training is left to suggest
    found = verdict(cfg, history(TRAIN, VALIDATION, ACCURACY), "accuracy")
    assert "dropout.rate" not in found.suggestion and "train.epochs=" in found.suggestion


def test_the_callback_speaks_once_at_the_evaluation_where_it_fires_also_across_a_resume(tmp_path):
    events = history(TRAIN, VALIDATION, ACCURACY)
    args, control = TrainingArguments(output_dir=str(tmp_path), report_to=[]), TrainerControl()
    said: list[tuple[int, str]] = []

    def run(evaluated: list[dict], begin: int) -> None:
        """A session that starts after ``begin`` evaluations (a resume) and evaluates up to the end."""
        monitor = OverfittingMonitor(config(), "eval_accuracy", lambda text: said.append((state.global_step, text)))
        state = TrainerState(log_history=evaluated[: 3 * begin])
        monitor.on_train_begin(args, state, control)
        for index in range(begin, len(evaluated) // 3):
            state.log_history = evaluated[: 3 * (index + 1)]
            state.global_step = (index + 1) * EVERY
            monitor.on_evaluate(args, state, control)

    run(events, 0)
    assert [step for step, _ in said] == [12 * EVERY]
    text = said[0][1]
    assert text.startswith(f"overfitting since step {7 * EVERY}: the validation loss rose ")
    assert "above its smoothed minimum" in text and "while the training loss fell" in text
    assert f"the best checkpoint so far (step {4 * EVERY}, accuracy 0.8) is kept" in text
    for begin in (5, 12):  # resumed before and after it spoke
        said.clear()
        run(events, begin)
        assert [step for step, _ in said] == ([12 * EVERY] if begin <= 11 else [])


THINGS = ["phone", "lamp", "chair", "kettle", "tent", "drill", "watch", "bag", "desk", "fan"]
GOOD, BAD = ["great", "fine", "good", "nice", "solid"], ["awful", "broken", "bad", "poor", "weak"]


@pytest.fixture(scope="module")
def reviews(tmp_path_factory):
    """40 training reviews with every third label flipped (noise a model can only memorise), 40 clean
    validation reviews, and a tiny LLaMA-style classifier: a run that trains long enough overfits."""
    root = tmp_path_factory.mktemp("overfit")
    rows = [{"text": f"the {thing} is {word}", "label": "pos" if word in GOOD else "neg"} for thing in THINGS for word in GOOD + BAD]
    random.Random(0).shuffle(rows)
    flipped = {"pos": "neg", "neg": "pos"}
    train = [dict(row, label=flipped[row["label"]]) if index % 3 == 0 else row for index, row in enumerate(rows[:40])]
    torch.manual_seed(3)  # random weights: with these, the long run's validation loss climbs 59% from its low
    model = save_tiny_model("llama", root / "model", [row["text"] for row in rows])
    preset = {
        "model": {"name": str(model), "task": "classification"},
        "dropout": {"method": "none"},
        "data": {"train": str(write_jsonl(root / "train.jsonl", train)),
                 "validation": str(write_jsonl(root / "validation.jsonl", rows[40:80]))},
        "train": {"epochs": 10, "batch_size": 8, "lr": 2e-2, "warmup_ratio": 0.0, "logging_steps": 2,
                  "eval_strategy": "steps", "eval_steps": 2},
        "eval": {"split": "validation"},
        "output": {"report_to": []},
    }
    (root / "p.yaml").write_text(yaml.safe_dump(preset))
    return root


def overfitting_of(run) -> dict:
    return json.loads((run / "metrics.json").read_text())["overfitting"]


def trainer_state(run) -> dict:
    """The Trainer's own record, from the last checkpoint it wrote."""
    last = max((run / "checkpoints").glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    return json.loads((last / "trainer_state.json").read_text())


@pytest.fixture(scope="module")
def overfit_run(reviews):
    from typer.testing import CliRunner

    from hkft.cli import app

    result = CliRunner().invoke(app, ["train", str(reviews / "p.yaml"), "--output-dir", str(reviews / "over")],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    return reviews / "over", result.stdout


def test_a_run_built_to_overfit_is_flagged(overfit_run):
    run, stdout = overfit_run
    found = overfitting_of(run)
    assert set(found) == {"detected", "best_step", "best_metric", "first_step", "gap", "suggestion"}
    assert found["detected"]
    losses = {point.step: point.loss for point in evaluations(trainer_state(run)["log_history"], "accuracy")}
    lowest = min(losses, key=losses.get)
    assert lowest < found["first_step"] <= lowest + 3 * 2  # within 3 evaluations of the validation loss's low
    state = trainer_state(run)
    assert (found["best_step"], found["best_metric"]) == (state["best_global_step"], state["best_metric"])
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last_eval = max((event for event in events if "eval_loss" in event), key=lambda event: event["step"])
    previous = max(event["step"] for event in events if "eval_loss" in event and event["step"] < last_eval["step"])
    train = [event["loss"] for event in events if "loss" in event and previous < event["step"] <= last_eval["step"]]
    assert found["gap"] == pytest.approx(last_eval["eval_loss"] - sum(train) / len(train))
    assert found["gap"] > 0.5  # memorised noise: far better on training data than on validation data
    alarm = [line for line in stdout.splitlines() if "overfitting since step" in line and "best checkpoint so far" in line]
    assert len(alarm) == 1
    assert stdout.rstrip().splitlines()[-1].startswith(f"overfitting since step {found['first_step']}; generalisation gap")
    assert "dropout.method=hiddenkey" in found["suggestion"]


def test_a_short_calm_run_is_not_flagged(reviews, cli):
    result = cli("train", reviews / "p.yaml", "--output-dir", reviews / "calm", "--set", "train.epochs=4",
                 "--set", "train.lr=3e-3")
    assert result.exit_code == 0, result.stderr
    found = overfitting_of(reviews / "calm")
    assert not found["detected"] and found["first_step"] is None and found["suggestion"] is None
    assert len(evaluations(trainer_state(reviews / "calm")["log_history"], "accuracy")) == 10  # enough to have fired
    assert "overfitting since" not in result.stdout and "overfitting: none seen" in result.stdout
    from safetensors.torch import load_file

    trainable = sum(tensor.numel() for tensor in load_file(reviews / "calm/adapter/adapter_model.safetensors").values())
    start = f"{reviews / 'calm'}: {reviews / 'model'} on cpu, 40 training / 40 validation examples, {trainable:,} trainable"
    assert result.stdout.splitlines()[0].startswith(start), result.stdout.splitlines()[0]


def test_a_run_without_evaluation_has_no_verdict(reviews, cli):
    result = cli("train", reviews / "p.yaml", "--output-dir", reviews / "blind", "--set", "train.max_steps=2",
                 "--set", "train.eval_strategy=no")
    assert result.exit_code == 0, result.stderr
    assert overfitting_of(reviews / "blind") is None and "overfitting" not in result.stdout


@pytest.mark.slow
def test_a_resumed_run_reaches_the_verdict_of_an_uninterrupted_one(reviews, overfit_run, cli, monkeypatch):
    straight, _ = overfit_run
    original = ProgressCallback.on_step_end

    def stop_at_step_27(self, args, state, control, **kwargs):
        original(self, args, state, control, **kwargs)
        if state.global_step == 27:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(ProgressCallback, "on_step_end", stop_at_step_27)
    run = reviews / "resumed"
    stopped = cli("train", reviews / "p.yaml", "--output-dir", run)
    assert stopped.exit_code == 130, stopped.stderr
    monkeypatch.setattr(ProgressCallback, "on_step_end", original)
    resumed = cli("train", reviews / "p.yaml", "--output-dir", run, "--resume")
    assert resumed.exit_code == 0, resumed.stderr
    assert overfitting_of(run) == overfitting_of(straight)
