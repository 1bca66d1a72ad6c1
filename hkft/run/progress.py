"""Training progress on the console (a rich bar on a terminal, plain timestamped lines in logs),
every log and eval event in metrics.jsonl, and the summary table the commands end with."""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from transformers import (
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.trainer_utils import has_length

from hkft.run.files import append_jsonl, atomic_write_text

# Shown on the console, in this order, with these names; every key still goes to metrics.jsonl.
SHOWN = {"loss": "loss", "task_loss": "task_loss", "kl_loss": "kl_loss", "learning_rate": "lr", "grad_norm": "grad_norm",
         "train_tokens_per_second": "tok/s"}
NOT_SHOWN_SUFFIXES = ("_runtime", "_per_second")
ESTIMATE_AFTER = 5  # steps timed, after the first (it carries the warm-up), before the run's length is estimated


def format_value(value: Any) -> str:
    """Floats to 4 significant digits, large ones (throughput) as whole numbers: 12,345 not 1.234e+04."""
    if not isinstance(value, float):
        return str(value)
    return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.4g}"


def format_logs(logs: dict[str, Any]) -> str:
    """``loss=0.6931  kl_loss=0.01  lr=0.0005  tok/s=4,210  eval_accuracy=0.75`` (training throughput
    is the non-padding tokens per second since the run (or its resumption) started)."""
    shown = [(SHOWN[key], logs[key]) for key in SHOWN if key in logs]
    shown += [(key, value) for key, value in logs.items() if key.startswith("eval_") and not key.endswith(NOT_SHOWN_SUFFIXES)]
    return "  ".join(f"{name}={format_value(value)}" for name, value in shown)


def drop_events_after(path: Path, step: int) -> None:
    """On resume, events logged after the checkpoint are logged again: keep only the first telling,
    and drop a line that a kill cut short (new lines would be glued onto it)."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if line.endswith("\n") and _step_of(line) <= step]
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(kept))


def _step_of(line: str) -> float:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return float("inf")


class ProgressCallback(TrainerCallback):
    """Rank 0 only: the other ranks of a distributed run stay quiet and write nothing. Without a
    ``metrics_path`` (`hkft eval`) nothing is written, only shown."""

    def __init__(self, metrics_path: Path | None, console: Console, clock: Callable[[], float] = time.monotonic):
        self.metrics_path = Path(metrics_path) if metrics_path is not None else None
        self.console = console
        self.duration = RunDuration(clock)
        self.progress: Progress | None = None
        self.task: TaskID | None = None
        self.training = False
        self._evaluation: ExitStack | None = None
        self._advance: Callable[[], None] | None = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        self.training = True
        self.duration.begin(state)
        if state.global_step > 0 and self.metrics_path is not None:
            drop_events_after(self.metrics_path, state.global_step)
        if self.console.is_terminal:
            self.progress = Progress(
                TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("eta"), TimeRemainingColumn(), console=self.console,
            )
            self.progress.start()
            self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step)
        else:
            start = f" from step {state.global_step}" if state.global_step else ""
            self._print(f"training {state.max_steps} steps{start}")

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.duration.step_begins()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, completed=state.global_step)
        if state.is_world_process_zero and (expected := self.duration.step_ends(args, state)):
            self._print(expected)

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.training and state.is_world_process_zero and (expected := self.duration.evaluated(args, state)):
            self._print(expected)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        if self.metrics_path is not None:
            append_jsonl(self.metrics_path, {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), **logs})
        line = format_logs(logs)
        if line:
            self._print(f"step {state.global_step}/{state.max_steps}  {line}")

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.close()

    def on_prediction_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                           eval_dataloader: Any = None, **kwargs: Any) -> None:
        """The final evaluation, after training, gets a bar of its own (evaluations during training
        are short and end in their own log line)."""
        if self.training or not state.is_world_process_zero or not has_length(eval_dataloader):
            return
        if self._evaluation is None:
            self._evaluation = ExitStack()
            self._advance = self._evaluation.enter_context(self.steps("evaluating", len(eval_dataloader)))
        self._advance()

    def on_predict(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self._evaluation is not None:
            self._evaluation.close()
            self._evaluation = self._advance = None

    @contextmanager
    def steps(self, description: str, total: int) -> Iterator[Callable[[], None]]:
        """Progress of work outside the training loop (final evaluation, generation): a bar on a
        terminal, a start line in a log. Yields the function that counts one batch done."""
        if not self.console.is_terminal:
            self._print(f"{description}: {total} batches")
            yield lambda: None
            return
        bar = Progress(TextColumn(f"[bold]{description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       console=self.console, transient=True)
        task = bar.add_task(description, total=total)
        with bar:
            yield lambda: bar.advance(task)

    def close(self) -> None:
        """Stop the live bar (also after a failed run, so the error line is not drawn over)."""
        self.training = False
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def notice(self, text: str) -> None:
        """A line that must stand out from the progress lines (the overfitting monitor's)."""
        self._print(text, style="yellow")

    def _print(self, text: str, style: str | None = None) -> None:
        """Above the live bar on a terminal; with a timestamp in a log file."""
        if self.progress is not None:
            self.progress.console.print(escape(text), soft_wrap=True, highlight=False, style=style)
        else:
            self.console.print(escape(f"{time.strftime('%H:%M:%S')} {text}"), soft_wrap=True, highlight=False, style=style)


def summary_table(rows: dict[str, Any], title: str, *, columns: tuple[str, str] = ("metric", "value")) -> Table:
    table = Table(title=title, header_style="bold")
    table.add_column(columns[0])
    table.add_column(columns[1])
    for key, value in rows.items():
        table.add_row(escape(str(key)), escape(format_value(value)))
    return table


def format_duration(seconds: float) -> str:
    """``40 s``, ``6 min``, ``2 h 05 min``."""
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 120 else f"{minutes // 60} h {minutes % 60:02d} min"


def evaluations_left(args: TrainingArguments, state: TrainerState) -> int:
    """Evaluations the Trainer will still run during training after the current step."""
    strategy = getattr(args.eval_strategy, "value", args.eval_strategy)
    if strategy == "steps" and args.eval_steps:
        every = int(args.eval_steps)
        return state.max_steps // every - state.global_step // every
    if strategy == "epoch":
        return max(0, math.ceil(state.num_train_epochs - (state.epoch or 0.0) - 1e-6))
    return 0


class RunDuration:
    """How long the training takes, estimated from its first steps: the median time of a step (from
    the Trainer's step begin to its step end, so evaluations and checkpoints are not in it) times the
    steps left, plus the evaluations left at the first one's time once one has run."""

    def __init__(self, clock: Callable[[], float]):
        self.clock = clock
        self.began = 0.0
        self.first_step = 0
        self.step_started: float | None = None
        self.step_ended: float | None = None
        self.step_seconds: list[float] = []
        self.evaluation_seconds: float | None = None

    def begin(self, state: TrainerState) -> None:
        self.began, self.first_step = self.clock(), state.global_step

    def step_begins(self) -> None:
        self.step_started = self.clock()

    def estimated(self) -> bool:
        return len(self.step_seconds) > ESTIMATE_AFTER

    def per_step(self) -> float:
        return statistics.median(self.step_seconds[1:] or self.step_seconds)

    def step_ends(self, args: TrainingArguments, state: TrainerState) -> str | None:
        """The estimate, once ESTIMATE_AFTER steps after the first were timed."""
        self.step_ended = self.clock()
        if self.step_started is None or self.estimated():
            return None
        self.step_seconds.append(self.step_ended - self.step_started)
        self.step_started = None
        if not self.estimated():
            return None
        per_step, count = self.per_step(), evaluations_left(args, state)
        total = self.step_ended - self.began + (state.max_steps - state.global_step) * per_step
        if not count:
            evaluations = ""
        elif self.evaluation_seconds is None:
            evaluations = "; evaluations not included"
        else:
            total += count * self.evaluation_seconds
            evaluations = f", {format_duration(self.evaluation_seconds)} for each of the {count} evaluations to come"
        return (f"expected: about {format_duration(total)} for steps {self.first_step + 1}-{state.max_steps} "
                f"({per_step:.2g} s a step over steps {state.global_step - ESTIMATE_AFTER + 1}-{state.global_step}"
                f"{evaluations})")

    def evaluated(self, args: TrainingArguments, state: TrainerState) -> str | None:
        """The first evaluation during training is timed; if the estimate is out already, the time left
        with the evaluations to come."""
        if self.evaluation_seconds is not None or self.step_ended is None:
            return None
        self.evaluation_seconds = self.clock() - self.step_ended
        count = evaluations_left(args, state)
        if not self.estimated() or not count:
            return None
        left = (state.max_steps - state.global_step) * self.per_step() + count * self.evaluation_seconds
        return (f"an evaluation takes {format_duration(self.evaluation_seconds)}: about {format_duration(left)} left, "
                f"the {count} evaluations to come included")
