"""The overfitting monitor on real curves: MiniLM (the quickstart's model and reviews) trained to
overfit, and trained as the quickstart trains it. README.md ("The overfitting monitor") quotes these
runs' numbers."""

import json
from pathlib import Path

import pytest

from hkft.config import presets_dir
from hkft.recipes.monitor import evaluations

QUICKSTART_TRAIN = presets_dir() / "data/quickstart/train.jsonl"


def overfitting_of(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())["overfitting"]


def logged(run: Path) -> list:
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return evaluations(events, "accuracy")


@pytest.mark.slow
def test_minilm_memorising_64_reviews_is_flagged_soon_after_its_best(tmp_path, cli):
    """64 training reviews (8% of them with the other label's text), 25 epochs at a learning rate of
    1e-2 without dropout: the training loss goes to zero and the validation loss triples."""
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text("".join(QUICKSTART_TRAIN.read_text().splitlines(keepends=True)[:64]))
    run = tmp_path / "memorise"
    result = cli("train", "quickstart", "--output-dir", run, "--set", f"data.train={tiny}",
                 "--set", "dropout.method=none", "--set", "train.epochs=25", "--set", "train.lr=1e-2",
                 "--set", "train.batch_size=16", "--set", "train.warmup_ratio=0", "--set", "train.eval_strategy=steps",
                 "--set", "train.eval_steps=4", "--set", "train.logging_steps=4")
    assert result.exit_code == 0, result.stderr
    points = logged(run)
    lowest = min(point.loss for point in points)
    assert points[-1].loss > 2 * lowest and points[-1].train_loss < 0.01  # it did overfit, by numbers
    found = overfitting_of(run)
    assert found["detected"] and found["first_step"] <= found["best_step"] + 8
    lines = result.stdout.splitlines()
    alarms = [index for index, line in enumerate(lines) if "best checkpoint so far" in line]
    assert len(alarms) == 1
    evaluation = next(line for line in reversed(lines[: alarms[0]]) if "eval_loss=" in line)  # the one it speaks after
    fired_at = int(evaluation.split("step ")[1].split("/")[0])
    assert fired_at <= found["best_step"] + 4 * 4  # within four evaluations of the best one


@pytest.mark.slow
def test_minilm_as_the_quickstart_trains_it_is_not_flagged(tmp_path, cli):
    """The quickstart's settings (800 reviews, HiddenKey at 0.1, learning rate 3e-3) for 3 epochs,
    evaluated every 5 steps: the validation loss falls, with a bump of 11% halfway; no alarm."""
    run = tmp_path / "quickstart"
    result = cli("train", "quickstart", "--output-dir", run, "--set", "train.epochs=3", "--set", "train.eval_strategy=steps",
                 "--set", "train.eval_steps=5", "--set", "train.logging_steps=5")
    assert result.exit_code == 0, result.stderr
    points = logged(run)
    assert len(points) == 15 and points[-1].loss < 0.7 * points[0].loss  # it learned
    found = overfitting_of(run)
    assert not found["detected"] and "overfitting since" not in result.stdout
    assert "overfitting: none seen" in result.stdout
