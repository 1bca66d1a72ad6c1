"""The overfitting monitor: at every evaluation, has the validation loss risen while the training loss fell?

Small validation sets make noisy curves: the lowest of thirty noisy evaluations is an outlier, and
a comparison against it fires on a plateau. The monitor compares averages instead, and measures the
noise from the curve itself. At each evaluation (``rises``), on the log validation loss:

- the *recent level* is the mean of the last ``RECENT`` evaluations (fewer early in a run);
- the *reference* is the smoothed minimum before them: the lowest mean over ``k`` consecutive
  evaluations, ``k`` at least ``MIN_REFERENCE`` and at least half the evaluations before the recent
  ones (the more windows compete for the minimum, the more the lowest is luck: wider windows);
- the *noise* is the smaller of two estimates of one evaluation's standard deviation: the pooled
  spread inside the two windows (too large when the reference straddles a sharp turn), and the
  spread of the curve's second differences, the largest fifth left out (too large when the
  curve jumps).

An evaluation shows the symptom when the recent level lies above the reference by more than
``min_loss_change`` (relative) and by more than ``STANDARD_ERRORS`` standard errors, while the
training loss, averaged over the same two windows, fell by more than ``min_loss_change``. The
monitor fires when the symptom has held for ``patience`` evaluations in a row. A later evaluation
whose metric beats the best at that time by more than ``min_delta`` disproves the alarm (the run
recovered); the symptom may then fire again.

tests/test_monitor_simulation.py measures false alarms on noisy plateaus and the detection of rises
on seeded simulations. The verdict is a pure function of the Trainer's ``log_history``, which every
checkpoint saves and a resumed run restores: a resumed run reaches the verdict an uninterrupted one does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from scipy import stats
from transformers import (
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from hkft.config.schema import HkftConfig, OverfittingConfig
from hkft.tasks.metrics import greater_is_better

RECENT = 4  # evaluations averaged into the recent level
MIN_REFERENCE = 4  # evaluations averaged into the reference, at least
REFERENCE_SHARE = 2  # or half the evaluations before the recent ones, when that is more
STANDARD_ERRORS = 3.0  # how far beyond the noise the rise must be
TRIMMED = 0.8  # the share of the curve's second differences its noise is measured from (the smallest)
NOISE_FLOOR = 0.005  # relative: a curve without noise still needs a rise above min_loss_change


@dataclass(frozen=True)
class Evaluation:
    step: int
    epoch: float
    metric: float  # the validation metric that picks the best checkpoint
    loss: float | None  # the validation loss
    train_loss: float | None  # mean training task loss logged since the previous evaluation (None: none was)


@dataclass(frozen=True)
class Finding:
    since: int  # index of the first evaluation of those the validation loss has stayed above its smoothed minimum
    what: str  # what was seen, in words


@dataclass(frozen=True)
class Verdict:
    """``gap``: the validation loss minus the training task loss at the last evaluation (the training
    loss is the mean of those logged since the evaluation before, or the latest logged before it; it
    is measured with dropout on)."""

    detected: bool
    best_step: int
    best_metric: float
    first_step: int | None  # since this evaluation the validation loss stayed above its smoothed minimum
    gap: float | None
    suggestion: str | None

    def as_json(self) -> dict[str, Any]:
        return {"detected": self.detected, "best_step": self.best_step, "best_metric": self.best_metric,
                "first_step": self.first_step, "gap": self.gap, "suggestion": self.suggestion}


def evaluations(log_history: list[dict[str, Any]], metric: str) -> list[Evaluation]:
    """The evaluation events of a Trainer's log history, each with the mean training loss logged since
    the evaluation before (None when nothing was: ``logging_steps`` longer than the evaluation interval).
    A KL method's ``loss`` holds its weighted KL term too: ``task_loss`` is the one to compare."""
    key = f"eval_{metric}"
    points, pending = [], []
    for event in log_history:
        if "loss" in event:
            pending.append(float(event.get("task_loss", event["loss"])))
        if key in event:
            loss = event.get("eval_loss")
            points.append(Evaluation(int(event["step"]), float(event.get("epoch") or 0.0), float(event[key]),
                                     None if loss is None else float(loss),
                                     sum(pending) / len(pending) if pending else None))
            pending = []
    return points


def latest_train_loss(points: list[Evaluation], index: int) -> float | None:
    """The training loss logged before evaluation ``index``: its own, else the latest one before it."""
    for point in reversed(points[: index + 1]):
        if point.train_loss is not None:
            return point.train_loss
    return None


def best_index(points: list[Evaluation], metric: str) -> int:
    """As the Trainer picks its best checkpoint: the first evaluation no later one strictly beats."""
    sign = 1.0 if greater_is_better(metric) else -1.0
    best = 0
    for index, point in enumerate(points):
        if sign * point.metric > sign * points[best].metric:
            best = index
    return best


# A trimmed mean of squares underestimates the variance: E[X^2 | X^2 below its TRIMMED quantile] for
# a standard normal X, over which the curve's estimate is divided.
_TRIMMED_VARIANCE = float(stats.chi2.cdf(stats.chi2.ppf(TRIMMED, 1), 3) / TRIMMED)


def curve_noise(log_losses: list[float]) -> float | None:
    """The standard deviation of the noise along a curve, from its second differences (a straight
    stretch gives zero): the largest fifth left out, so that a jump or a turn does not count as noise."""
    if len(log_losses) < 4:
        return None
    squares = sorted((after - 2 * middle + before) ** 2
                     for before, middle, after in zip(log_losses, log_losses[1:], log_losses[2:]))
    kept = squares[: max(1, round(TRIMMED * len(squares)))]
    return math.sqrt(sum(kept) / len(kept) / 6 / _TRIMMED_VARIANCE)


@dataclass(frozen=True)
class Rise:
    """The validation loss at one evaluation against its smoothed minimum before (indices into the
    evaluations; levels are geometric means, changes relative)."""

    reference: range  # the evaluations of the smoothed minimum
    recent: range  # the last evaluations, up to RECENT
    reference_loss: float
    recent_loss: float
    change: float  # recent_loss / reference_loss - 1
    noise: float  # the standard deviation of one evaluation's log loss
    standard_errors: float  # the rise (in logs) over its standard error
    train_change: float | None  # the training loss over the same windows, relative (None: not logged)

    def significant(self, settings: OverfittingConfig) -> bool:
        """Beyond the noise, larger than min_loss_change, and the training loss fell by that much."""
        return (self.standard_errors > STANDARD_ERRORS and self.change > settings.min_loss_change
                and self.train_change is not None and self.train_change < -settings.min_loss_change)


class _Sums:
    """Prefix sums of the logs of a series (None, or not positive: left out), so that the mean and
    the spread of any window of evaluations cost O(1)."""

    def __init__(self, values: list[float | None]):
        self.count, self.total, self.squares = [0], [0.0], [0.0]
        for value in values:
            known = value is not None and value > 0
            log = math.log(value) if known else 0.0
            self.count.append(self.count[-1] + known)
            self.total.append(self.total[-1] + log)
            self.squares.append(self.squares[-1] + log * log)

    def known(self, window: range) -> int:
        return self.count[window.stop] - self.count[window.start]

    def mean(self, window: range) -> float:
        return (self.total[window.stop] - self.total[window.start]) / self.known(window)

    def spread(self, window: range) -> float:
        """The sum of squared deviations from the window's mean."""
        total = self.total[window.stop] - self.total[window.start]
        return max(0.0, self.squares[window.stop] - self.squares[window.start] - total * total / self.known(window))


def rises(points: list[Evaluation]) -> list[Rise | None]:
    """At each evaluation, the validation loss against its smoothed minimum before the recent window,
    from the evaluations up to that one only. None before the fourth evaluation, and from a missing
    validation loss on."""
    loss, train = _Sums([point.loss for point in points]), _Sums([point.train_loss for point in points])
    log_losses = [math.log(point.loss) if loss.known(range(index, index + 1)) else math.nan
                  for index, point in enumerate(points)]

    def train_level(window: range) -> float | None:
        """The mean log training loss logged in the window, or the latest logged before it."""
        if train.known(window):
            return train.mean(window)
        logged = [index for index in range(window.start) if train.known(range(index, index + 1))]
        return train.mean(range(logged[-1], logged[-1] + 1)) if logged else None

    found: list[Rise | None] = []
    for end in range(1, len(points) + 1):
        recent_count = min(RECENT, max(2, end // 3))
        before = end - recent_count
        width = max(min(MIN_REFERENCE, before), before // REFERENCE_SHARE)
        along = curve_noise(log_losses[:end]) if loss.known(range(end)) == end else None
        if along is None:
            found.append(None)
            continue
        start = min(range(before - width + 1), key=lambda first: loss.total[first + width] - loss.total[first])
        reference, recent = range(start, start + width), range(before, end)
        lowest, now = loss.mean(reference), loss.mean(recent)
        inside = math.sqrt((loss.spread(reference) + loss.spread(recent)) / (width + recent_count - 2))
        noise = max(NOISE_FLOOR, min(inside, along))
        train_before, train_now = train_level(reference), train_level(recent)
        found.append(Rise(
            reference=reference, recent=recent, reference_loss=math.exp(lowest), recent_loss=math.exp(now),
            change=math.expm1(now - lowest), noise=noise,
            standard_errors=(now - lowest) / (noise * math.sqrt(1 / width + 1 / recent_count)),
            train_change=None if train_before is None or train_now is None else math.expm1(train_now - train_before),
        ))
    return found


def symptom(points: list[Evaluation], rise: Rise | None, settings: OverfittingConfig) -> Finding | None:
    """The validation loss rose, significantly and by more than min_loss_change, above its smoothed
    minimum, while the training loss fell by more than min_loss_change."""
    if rise is None or not rise.significant(settings):
        return None
    first, last = points[rise.reference.start], points[rise.reference.stop - 1]
    since = 1 + max(index for index in range(rise.reference.start, rise.recent.start)
                    if points[index].loss <= rise.reference_loss)
    what = (f"the validation loss rose {rise.change:.0%} above its smoothed minimum ({rise.reference_loss:.4g}, the "
            f"mean of steps {first.step}-{last.step}) to {rise.recent_loss:.4g} over the last {len(rise.recent)} "
            f"evaluations ({rise.standard_errors:.1f} standard errors of its noise), while the training loss fell "
            f"{-rise.train_change:.0%}")
    return Finding(since, what)


@dataclass(frozen=True)
class Alarm:
    at: int  # index of the evaluation where the symptom had lasted `patience` evaluations
    best: int  # index of the best evaluation at that time
    finding: Finding


def disproved(points: list[Evaluation], alarm: Alarm, settings: OverfittingConfig, metric: str) -> bool:
    """An evaluation after the alarm beat the best metric at the alarm by more than min_delta: the run
    recovered (a noisy new best by less does not clear a rising validation loss)."""
    sign = 1.0 if greater_is_better(metric) else -1.0
    peak = points[alarm.best].metric
    return any(sign * (point.metric - peak) > settings.min_delta for point in points[alarm.at + 1:])


def alarms(points: list[Evaluation], settings: OverfittingConfig, metric: str) -> list[Alarm]:
    """The evaluations where the monitor speaks: the first one where the symptom has held for
    ``patience`` evaluations in a row, then again only once that alarm is disproved (the run
    recovered from what it saw, then overfit anew)."""
    findings = [symptom(points, rise, settings) for rise in rises(points)]
    raised: list[Alarm] = []
    for index in range(settings.patience - 1, len(points)):
        if any(finding is None for finding in findings[index - settings.patience + 1: index + 1]):
            continue
        if raised and not disproved(points[: index + 1], raised[-1], settings, metric):
            continue
        raised.append(Alarm(index, best_index(points[: index + 1], metric), findings[index]))
    return raised


def standing_alarm(points: list[Evaluation], settings: OverfittingConfig, metric: str) -> Alarm | None:
    """The monitor's decision on a whole run: its last alarm, unless a later evaluation disproved it."""
    raised = alarms(points, settings, metric)
    return raised[-1] if raised and not disproved(points, raised[-1], settings, metric) else None


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
    checkpoint. Overfitting is detected when the monitor spoke and no later evaluation disproved it."""
    metric = metric.removeprefix("eval_")
    points = evaluations(log_history, metric)
    if not cfg.train.overfitting.enabled or not points:
        return None
    best = best_index(points, metric)
    alarm = standing_alarm(points, cfg.train.overfitting, metric)
    detected = alarm is not None
    last, train_loss = points[-1], latest_train_loss(points, len(points) - 1)
    gap = last.loss - train_loss if last.loss is not None and train_loss is not None else None
    return Verdict(
        detected=detected,
        best_step=points[best].step,
        best_metric=points[best].metric,
        first_step=points[alarm.finding.since].step if alarm is not None else None,
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
