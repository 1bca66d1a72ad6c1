"""The run's expected duration, printed once its first steps are timed (a fake clock drives it)."""

import io
import re

from rich.console import Console
from transformers import TrainerControl, TrainerState, TrainingArguments

from hkft.run.progress import ProgressCallback, format_duration


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def training(tmp_path, step_seconds: list[float], *, evaluate_at: dict[int, float] | None = None, start: int = 0,
             **arguments) -> list[str]:
    """Drives a ProgressCallback as the Trainer does: step begin, step end, then any evaluation (the
    clock moves by each step's and each evaluation's seconds). Returns the printed lines, untimed."""
    clock, buffer = FakeClock(), io.StringIO()
    callback = ProgressCallback(tmp_path / "metrics.jsonl", Console(file=buffer, force_terminal=False, width=200), clock)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], **arguments)
    state, control = TrainerState(global_step=start, max_steps=100, num_train_epochs=4, epoch=start / 25), TrainerControl()
    callback.on_train_begin(args, state, control)
    for seconds in step_seconds:
        callback.on_step_begin(args, state, control)
        clock.now += seconds
        state.global_step += 1
        state.epoch = state.global_step / 25
        callback.on_step_end(args, state, control)
        if state.global_step in (evaluate_at or {}):
            clock.now += evaluate_at[state.global_step]
            callback.on_evaluate(args, state, control)
    return [re.sub(r"^\d\d:\d\d:\d\d ", "", line) for line in buffer.getvalue().splitlines()]


def test_the_expected_duration_comes_from_the_first_steps_without_the_warm_up(tmp_path):
    lines = training(tmp_path, [30.0, 2.0, 2.0, 3.0, 2.0, 2.0, 2.0, 2.0], eval_strategy="no")
    # 30 s warm-up + 5 timed steps (median 2 s), then 94 steps left at 2 s: 30 + 11 + 188 = 229 s
    assert lines[1:] == ["expected: about 4 min for steps 1-100 (2 s a step over steps 2-6)"]


def test_evaluations_are_added_once_the_first_one_is_timed(tmp_path):
    lines = training(tmp_path, [5.0] + [2.0] * 11, evaluate_at={10: 12.0}, eval_strategy="steps", eval_steps=10)
    assert lines[1] == "expected: about 3 min for steps 1-100 (2 s a step over steps 2-6; evaluations not included)"
    # at step 10: 90 steps at 2 s and the 9 evaluations still to come at 12 s each
    assert lines[2] == "an evaluation takes 12 s: about 5 min left, the 9 evaluations to come included"
    assert len(lines) == 3  # each said once


def test_an_evaluation_before_the_estimate_is_part_of_it(tmp_path):
    lines = training(tmp_path, [5.0] + [2.0] * 9, evaluate_at={4: 6.0}, eval_strategy="steps", eval_steps=4)
    # at step 6: 5 + 10 s of steps and 6 s of evaluation so far, 94 steps at 2 s, 24 evaluations at 6 s
    assert lines[1:] == ["expected: about 6 min for steps 1-100 (2 s a step over steps 2-6, 6 s for each of the "
                         "24 evaluations to come)"]


def test_a_resumed_run_estimates_its_remaining_steps(tmp_path):
    lines = training(tmp_path, [4.0] + [3.0] * 5, start=60, eval_strategy="epoch")
    assert lines[0] == "training 100 steps from step 60"
    # 4 + 15 s so far, 34 steps left at 3 s: 121 s; the epoch evaluations still to come are not in it
    assert lines[1] == "expected: about 2 min for steps 61-100 (3 s a step over steps 62-66; evaluations not included)"


def test_a_run_too_short_to_time_says_nothing_more(tmp_path):
    assert training(tmp_path, [1.0] * 5, eval_strategy="no") == ["training 100 steps"]


def test_durations_read_naturally():
    assert [format_duration(seconds) for seconds in (0.2, 40, 89, 90, 400, 7199, 7500)] == \
        ["1 s", "40 s", "89 s", "2 min", "7 min", "2 h 00 min", "2 h 05 min"]
