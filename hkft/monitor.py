"""The overfitting monitor: at every evaluation, the validation loss and metric against the training loss.

Two symptoms, each held for ``patience`` evaluations in a row (``train.overfitting``):

- the metric: the validation metric stays more than ``min_delta`` worse than its best, while the
  losses diverge from theirs at the best evaluation;
- the loss: the validation loss rises at every evaluation, and over those evaluations the losses
  diverge.

The losses diverge when the validation loss rises and the training loss falls, each by more than
``min_loss_change`` (relative). Requiring both keeps noise (and a run that learns nothing) silent.

The verdict is a pure function of the Trainer's ``log_history``, which every checkpoint saves and a
resumed run restores: a resumed run reaches the verdict an uninterrupted one does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from hkft.config.schema import HkftConfig, OverfittingConfig
from hkft.metrics import greater_is_better


@dataclass(frozen=True)
class Evaluation:
    step: int
    epoch: float
    metric: float  # the validation metric that picks the best checkpoint
    loss: float | None  # the validation loss
    train_loss: float | None  # mean training task loss logged since the previous evaluation


@dataclass(frozen=True)
class Finding:
    since: int  # index of the first evaluation that showed it
    what: str  # what was seen, in words


@dataclass(frozen=True)
class Verdict:
    """``gap``: the validation loss minus the training task loss at the last evaluation (the training
    loss is the mean of those logged since the evaluation before; it is measured with dropout on)."""

    detected: bool
    best_step: int
    best_metric: float
    first_step: int | None  # the first evaluation that showed the symptom the monitor spoke of
    gap: float | None
    suggestion: str | None

    def as_json(self) -> dict[str, Any]:
        return {"detected": self.detected, "best_step": self.best_step, "best_metric": self.best_metric,
                "first_step": self.first_step, "gap": self.gap, "suggestion": self.suggestion}


def evaluations(log_history: list[dict[str, Any]], metric: str) -> list[Evaluation]:
    """The evaluation events of a Trainer's log history, each with the training loss logged before it.
    A KL method's ``loss`` holds its weighted KL term too: ``task_loss`` is the one to compare."""
    key = f"eval_{metric}"
    points, pending, last_train = [], [], None
    for event in log_history:
        if "loss" in event:
            pending.append(float(event.get("task_loss", event["loss"])))
        if key in event:
            if pending:
                last_train = sum(pending) / len(pending)
                pending = []
            loss = event.get("eval_loss")
            points.append(Evaluation(int(event["step"]), float(event.get("epoch") or 0.0), float(event[key]),
                                     None if loss is None else float(loss), last_train))
    return points


def best_index(points: list[Evaluation], metric: str) -> int:
    """As the Trainer picks its best checkpoint: the first evaluation no later one strictly beats."""
    sign = 1.0 if greater_is_better(metric) else -1.0
    best = 0
    for index, point in enumerate(points):
        if sign * point.metric > sign * points[best].metric:
            best = index
    return best


def _diverged(earlier: Evaluation, later: Evaluation, min_change: float) -> bool:
    """From ``earlier`` to ``later`` the validation loss rose and the training loss fell, each by
    more than ``min_change`` (relative)."""
    losses = (earlier.loss, later.loss, earlier.train_loss, later.train_loss)
    if any(loss is None for loss in losses):
        return False
    return later.loss > earlier.loss * (1 + min_change) and later.train_loss < earlier.train_loss * (1 - min_change)


def metric_symptom(points: list[Evaluation], settings: OverfittingConfig, metric: str) -> Finding | None:
    """At each of the last `patience` evaluations, the metric is more than min_delta worse than at the
    best one, and the losses have diverged since it (a metric that wavers while the losses hold
    still is noise, not overfitting)."""
    best = best_index(points, metric)
    peak, sign = points[best], (1.0 if greater_is_better(metric) else -1.0)
    streak = len(points)
    while (streak > best + 1 and sign * (peak.metric - points[streak - 1].metric) > settings.min_delta
           and _diverged(peak, points[streak - 1], settings.min_loss_change)):
        streak -= 1
    held = len(points) - streak
    if held < settings.patience:
        return None
    last = points[-1]
    what = (f"the validation {metric} has stayed more than {settings.min_delta:g} worse than its best "
            f"({peak.metric:.4g} at step {peak.step}) for {held} evaluations, while the training loss fell "
            f"({peak.train_loss:.4g} -> {last.train_loss:.4g}) and the validation loss rose "
            f"({peak.loss:.4g} -> {last.loss:.4g})")
    return Finding(streak, what)


def loss_symptom(points: list[Evaluation], settings: OverfittingConfig) -> Finding | None:
    """The validation loss rose at each of the last `patience` evaluations, and over them the losses
    diverged by more than min_loss_change."""
    if len(points) <= settings.patience:
        return None
    window = points[-settings.patience - 1:]
    losses = [point.loss for point in window]
    if any(loss is None for loss in losses) or not all(b > a for a, b in zip(losses, losses[1:])):
        return None
    start, end = window[0], window[-1]
    if not _diverged(start, end, settings.min_loss_change):
        return None
    what = (f"the validation loss rose {settings.patience} evaluations in a row ({start.loss:.4g} -> {end.loss:.4g}, "
            f"+{end.loss / start.loss - 1:.0%}) while the training loss fell ({start.train_loss:.4g} -> "
            f"{end.train_loss:.4g})")
    return Finding(len(points) - settings.patience, what)


@dataclass(frozen=True)
class Alarm:
    at: int  # index of the evaluation where the symptom had lasted `patience` evaluations
    best: int  # index of the best evaluation at that time
    finding: Finding


def alarms(points: list[Evaluation], settings: OverfittingConfig, metric: str) -> list[Alarm]:
    """The evaluations where the monitor speaks: the first one that shows a symptom long enough, then
    again only after a new best (the run recovered from what it saw, then overfit anew)."""
    raised: list[Alarm] = []
    for end in range(1, len(points) + 1):
        seen = points[:end]
        best = best_index(seen, metric)
        if raised and raised[-1].best == best:
            continue
        finding = metric_symptom(seen, settings, metric) or loss_symptom(seen, settings)
        if finding is not None:
            raised.append(Alarm(end - 1, best, finding))
    return raised


def patience_needed(points: list[Evaluation], best: int, metric: str) -> int:
    """The smallest early-stopping patience that would still have reached the best evaluation: the
    longest run of evaluations without a new best before it."""
    improvements = [index for index in range(best + 1) if best_index(points[: index + 1], metric) == index]
    return max([1, *(b - a for a, b in zip(improvements, improvements[1:]))])


def suggestion(cfg: HkftConfig, points: list[Evaluation], best: int, metric: str) -> str:
    """What to change, from the paper's findings: LoRA overfits too, and its dropout methods
    (HiddenKey first) reduce it; with a method on, more dropout or less training."""
    if cfg.dropout.method == "none":
        advice = ["--set dropout.method=hiddenkey --set dropout.rate=0.1 (LoRA overfits too; HiddenKey's dropout "
                  "is the paper's remedy)"]
    else:
        rate = cfg.dropout.rate
        advice = [f"a higher dropout.rate (now {rate:g}; try --set dropout.rate={min(2 * rate, 0.3):.2g})"] if rate < 0.3 else []
        if cfg.train.max_steps > 0:
            advice.append(f"fewer steps (--set train.max_steps={points[best].step})")
        else:
            advice.append(f"fewer epochs (--set train.epochs={max(1, math.ceil(points[best].epoch))})")
    if cfg.train.early_stopping_patience is None:
        patience = patience_needed(points, best, metric)
        stop = best + patience
        if stop < len(points) - 1:
            advice.append(f"early stopping (--set train.early_stopping_patience={patience} would have stopped at "
                          f"step {points[stop].step} with the same best checkpoint)")
    return "try " + ", or ".join(advice)


def verdict(cfg: HkftConfig, log_history: list[dict[str, Any]], metric: str) -> Verdict | None:
    """None when the monitor is off or the run was never evaluated. ``metric`` picks the best
    checkpoint. Overfitting is detected when the monitor spoke after the best evaluation was reached:
    an alarm that a later best proved wrong does not count."""
    metric = metric.removeprefix("eval_")
    points = evaluations(log_history, metric)
    if not cfg.train.overfitting.enabled or not points:
        return None
    best = best_index(points, metric)
    raised = alarms(points, cfg.train.overfitting, metric)
    detected = bool(raised) and raised[-1].best == best
    last = points[-1]
    gap = last.loss - last.train_loss if last.loss is not None and last.train_loss is not None else None
    return Verdict(
        detected=detected,
        best_step=points[best].step,
        best_metric=points[best].metric,
        first_step=points[raised[-1].finding.since].step if detected else None,
        gap=gap,
        suggestion=suggestion(cfg, points, best, metric) if detected else None,
    )


def alarm_line(points: list[Evaluation], alarm: Alarm, metric: str) -> str:
    """The console line at the evaluation where the monitor speaks."""
    best = points[alarm.best]
    return (f"overfitting since step {points[alarm.finding.since].step}: {alarm.finding.what}; the best checkpoint "
            f"so far (step {best.step}, {metric} {best.metric:.4g}) is kept and loaded at the end")


def verdict_line(found: Verdict) -> str:
    """The run's closing verdict."""
    gap = "" if found.gap is None else f"; generalisation gap {found.gap:.4g} (validation minus training loss)"
    if not found.detected:
        return f"overfitting: none seen{gap}"
    return f"overfitting since step {found.first_step}{gap}: {found.suggestion}"


class OverfittingMonitor(TrainerCallback):
    """Speaks at the evaluation where the run is seen to overfit. It keeps no state of its own: the
    Trainer's log history (restored on resume) decides, so a resumed run speaks where an
    uninterrupted one would."""

    def __init__(self, cfg: HkftConfig, metric: str, say: Callable[[str], None]):
        self.settings = cfg.train.overfitting
        self.metric = metric.removeprefix("eval_")
        self.say = say

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        points = evaluations(state.log_history, self.metric)
        raised = alarms(points, self.settings, self.metric)
        if raised and raised[-1].at == len(points) - 1:
            self.say(alarm_line(points, raised[-1], self.metric))
