"""Training progress on the console (a rich bar on a terminal, plain lines in logs) and metrics.jsonl."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import TrainerCallback

from hkft.io import append_jsonl

SHOWN = ("loss", "task_loss", "kl_loss", "learning_rate", "grad_norm")


def _format(logs: dict[str, Any]) -> str:
    shown = [(key, value) for key, value in logs.items() if key in SHOWN or key.startswith("eval_")]
    return "  ".join(
        f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
        for key, value in shown
        if not key.endswith(("_runtime", "_per_second"))
    )


class ProgressCallback(TrainerCallback):
    """Rank 0 only: the other ranks of a distributed run stay quiet and write nothing."""

    def __init__(self, metrics_path: Path, console: Console):
        self.metrics_path = metrics_path
        self.console = console
        self.progress: Progress | None = None
        self.task = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        if self.console.is_terminal:
            self.progress = Progress(
                TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("eta"), TimeRemainingColumn(), console=self.console,
            )
            self.progress.start()
            self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step)
        else:
            self.console.print(f"{time.strftime('%H:%M:%S')} training {state.max_steps} steps")

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), **logs}
        append_jsonl(self.metrics_path, record)
        line = _format(logs)
        if line:
            prefix = f"step {state.global_step}/{state.max_steps}"
            (self.progress.console if self.progress else self.console).print(
                f"{time.strftime('%H:%M:%S')} {prefix}  {line}" if self.progress is None else f"{prefix}  {line}",
                soft_wrap=True, highlight=False,
            )

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

