"""The overfitting monitor on simulated runs, 1,000 seeded runs per cell, through its own decision
functions (``alarms`` for whether it ever spoke, ``verdict`` for what metrics.json says).

Goals: at most 2% false alarms on noisy plateaus (15-40 evaluations, up to 5% relative noise), at
least 95% detection of a sustained rise of the validation loss by 20% or more after its minimum.

The generators (evaluation ``i`` of ``n``; ``e`` a fresh standard normal draw per evaluation):
- training loss, in every run: ``(0.6 exp(-3 i / n) + 0.05) (1 + 0.05 e)``, falling throughout;
- accuracy, in every run: the share of 200 validation examples right, a binomial draw around the
  true accuracy (a standard deviation of about 2.5 points, as on a small validation set);
- plateau: validation loss ``0.35 (1 + noise e)``, flat from the first evaluation; true accuracy 0.85;
- levelling plateau: validation loss ``0.35 (1 + 0.8 exp(-i / 1.5)) (1 + noise e)``, falling then
  flat; true accuracy ``0.85 - 0.25 exp(-i / 1.5)``;
- rise: the levelling curve for 8 evaluations down to its minimum, then the validation loss rises
  ``size`` (relative) linearly over ``ramp`` evaluations and holds ``hold`` more, times
  ``(1 + noise e)``, while the true accuracy sags 2 points with it:
  gradual = 20% over 12 evaluations, held 3; sharp = 20% at once, held 5 (6 evaluations at the
  top); the reported case = 25% over 12 evaluations, the run ending at the top.
The rates measured here are in README.md ("The overfitting monitor").
"""

from __future__ import annotations

import numpy as np
import pytest

from hkft.config import load_config
from hkft.recipes.monitor import alarms, evaluations, verdict

RUNS = 1000
CFG = load_config("quickstart", ["dropout.method=none"])
LEVEL = 0.35
VALIDATION_EXAMPLES = 200


def training_loss(rng: np.random.Generator, count: int) -> np.ndarray:
    return (0.6 * np.exp(-3 * np.arange(count) / count) + 0.05) * (1 + 0.05 * rng.standard_normal(count))


def measured_accuracy(rng: np.random.Generator, true: np.ndarray) -> np.ndarray:
    return rng.binomial(VALIDATION_EXAMPLES, true) / VALIDATION_EXAMPLES


def plateau(rng: np.random.Generator, count: int, noise: float, *, levelling: bool = False):
    index = np.arange(count)
    shape = 1 + 0.8 * np.exp(-index / 1.5) if levelling else np.ones(count)
    accuracy = 0.85 - 0.25 * np.exp(-index / 1.5) if levelling else np.full(count, 0.85)
    validation = LEVEL * shape * (1 + noise * rng.standard_normal(count))
    return training_loss(rng, count), validation, measured_accuracy(rng, accuracy)


def rise(rng: np.random.Generator, noise: float, *, size: float, ramp: int, hold: int, before: int = 8):
    count = before + 1 + ramp + hold
    index = np.arange(count)
    descent = np.exp(-np.minimum(index, before) / 1.5)
    share = np.clip((index - before) / ramp, 0, 1)
    validation = LEVEL * (1 + 0.8 * descent) * (1 + size * share) * (1 + noise * rng.standard_normal(count))
    accuracy = 0.85 - 0.25 * descent - 0.02 * share
    return training_loss(rng, count), validation, measured_accuracy(rng, accuracy)


RISES = {"gradual": {"size": 0.2, "ramp": 12, "hold": 3}, "sharp": {"size": 0.2, "ramp": 1, "hold": 5},
         "reported": {"size": 0.25, "ramp": 12, "hold": 0}}


def history(train, validation, accuracy) -> list[dict]:
    """A Trainer log history: a training log, then an evaluation, every 10 steps."""
    events = []
    for index, (loss, eval_loss, metric) in enumerate(zip(train, validation, accuracy)):
        step = 10 * (index + 1)
        events.append({"loss": float(loss), "step": step - 5, "epoch": step / 100})
        events.append({"eval_loss": float(eval_loss), "eval_accuracy": float(metric), "step": step, "epoch": step / 100})
    return events


def spoke(curves) -> bool:
    """Whether the monitor printed an alarm at any evaluation (later disproved or not)."""
    return bool(alarms(evaluations(history(*curves), "accuracy"), CFG.train.overfitting, "accuracy"))


def false_alarm_rate(count: int, noise: float, *, levelling: bool = False) -> float:
    rng = np.random.default_rng(1000 * count + round(1000 * noise) + levelling)
    return float(np.mean([spoke(plateau(rng, count, noise, levelling=levelling)) for _ in range(RUNS)]))


def detection_rate(shape: str, noise: float) -> float:
    rng = np.random.default_rng(round(1000 * noise) + len(shape))
    return float(np.mean([verdict(CFG, history(*rise(rng, noise, **RISES[shape])), "accuracy").detected
                          for _ in range(RUNS)]))


@pytest.mark.parametrize("count", [15, 30, 40])
@pytest.mark.parametrize("noise", [0.02, 0.03, 0.04, 0.05])
def test_a_flat_noisy_validation_loss_rarely_fires(count, noise):
    assert false_alarm_rate(count, noise) <= 0.02


@pytest.mark.parametrize("count", [15, 30, 40])
def test_a_validation_loss_that_levels_off_rarely_fires(count):
    assert false_alarm_rate(count, 0.05, levelling=True) <= 0.02


@pytest.mark.parametrize("shape", list(RISES))
@pytest.mark.parametrize("noise", [0.02, 0.03, 0.04])
def test_a_sustained_rise_is_detected(shape, noise):
    assert detection_rate(shape, noise) >= 0.95
