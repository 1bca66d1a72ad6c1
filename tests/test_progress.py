"""Progress lines, metrics.jsonl and the summary table."""

import io
import json
import re

import torch
from rich.console import Console
from transformers import (
    PrinterCallback,
    Trainer,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from hkft.run.progress import ProgressCallback, summary_table


def state(step: int, *, max_steps: int = 10, epoch: float = 0.5, rank_zero: bool = True) -> TrainerState:
    return TrainerState(global_step=step, max_steps=max_steps, epoch=epoch, is_world_process_zero=rank_zero)


def plain_console() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=False, width=200), buffer


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


class Regressor(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)

    def forward(self, x, labels=None):
        prediction = self.linear(x).squeeze(-1)
        return {"loss": torch.nn.functional.mse_loss(prediction, labels), "logits": prediction}


def test_log_events_go_to_metrics_jsonl_and_plain_timestamped_lines(tmp_path):
    console, buffer = plain_console()
    callback = ProgressCallback(tmp_path / "metrics.jsonl", console)
    args, control = TrainingArguments(output_dir=str(tmp_path), report_to=[]), TrainerControl()
    callback.on_train_begin(args, state(0), control)
    callback.on_log(args, state(3, epoch=0.3), control, logs={"loss": 0.5, "kl_loss": 0.0125, "learning_rate": 1e-3,
                                                               "grad_norm": 2.0, "train_tokens_per_second": 12345.6})
    callback.on_log(args, state(4, epoch=0.4), control, logs={"eval_loss": 0.25, "eval_accuracy": 0.75,
                                                               "eval_runtime": 1.5, "eval_samples_per_second": 9.0})
    callback.on_train_end(args, state(4), control)
    assert read_jsonl(tmp_path / "metrics.jsonl") == [
        {"step": 3, "epoch": 0.3, "loss": 0.5, "kl_loss": 0.0125, "learning_rate": 1e-3, "grad_norm": 2.0,
         "train_tokens_per_second": 12345.6},
        {"step": 4, "epoch": 0.4, "eval_loss": 0.25, "eval_accuracy": 0.75, "eval_runtime": 1.5, "eval_samples_per_second": 9.0},
    ]
    lines = buffer.getvalue().splitlines()
    assert re.fullmatch(r"\d\d:\d\d:\d\d training 10 steps", lines[0])
    assert re.fullmatch(r"\d\d:\d\d:\d\d step 3/10  loss=0\.5  kl_loss=0\.0125  lr=0\.001  grad_norm=2  tok/s=12,346", lines[1])
    assert re.fullmatch(r"\d\d:\d\d:\d\d step 4/10  eval_loss=0\.25  eval_accuracy=0\.75", lines[2])
    assert len(lines) == 3


def test_other_ranks_write_and_print_nothing(tmp_path):
    console, buffer = plain_console()
    callback = ProgressCallback(tmp_path / "metrics.jsonl", console)
    args, control = TrainingArguments(output_dir=str(tmp_path), report_to=[]), TrainerControl()
    callback.on_train_begin(args, state(0, rank_zero=False), control)
    callback.on_log(args, state(1, rank_zero=False), control, logs={"loss": 1.0})
    assert not (tmp_path / "metrics.jsonl").exists() and buffer.getvalue() == ""


def test_live_bar_on_a_terminal_tracks_the_step(tmp_path):
    buffer = io.StringIO()
    callback = ProgressCallback(tmp_path / "m.jsonl", Console(file=buffer, force_terminal=True, width=120))
    args, control = TrainingArguments(output_dir=str(tmp_path), report_to=[]), TrainerControl()
    callback.on_train_begin(args, state(2, max_steps=8), control)
    callback.on_step_end(args, state(5, max_steps=8), control)
    assert callback.progress.tasks[0].completed == 5 and callback.progress.tasks[0].total == 8
    callback.on_log(args, state(5, max_steps=8), control, logs={"loss": 0.125})
    callback.on_train_end(args, state(8, max_steps=8), control)
    assert callback.progress is None
    assert "step 5/8  loss=0.125" in buffer.getvalue()


def test_resume_drops_events_logged_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": step, "loss": 1.0 / step}) + "\n" for step in range(1, 9)) + '{"step": 9, "lo')
    console, _ = plain_console()
    callback = ProgressCallback(path, console)
    args, control = TrainingArguments(output_dir=str(tmp_path), report_to=[]), TrainerControl()
    callback.on_train_begin(args, state(6), control)
    callback.on_log(args, state(7), control, logs={"loss": 0.5})
    assert [record["step"] for record in read_jsonl(path)] == [1, 2, 3, 4, 5, 6, 7]
    assert read_jsonl(path)[-1]["loss"] == 0.5


def test_a_real_trainer_logs_every_event_it_records(tmp_path):
    """metrics.jsonl holds exactly the Trainer's own log_history, step and epoch included."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(16, 4, generator=generator)
    data = [{"x": row, "labels": row.sum()} for row in features]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], max_steps=4, per_device_train_batch_size=4,
                             logging_steps=1, eval_strategy="steps", eval_steps=2, save_strategy="no", use_cpu=True,
                             disable_tqdm=True, learning_rate=0.1)
    console, buffer = plain_console()
    callback = ProgressCallback(tmp_path / "metrics.jsonl", console)
    trainer = Trainer(model=Regressor(), args=args, train_dataset=data, eval_dataset=data[:8], callbacks=[callback])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert records == [{"epoch": round(entry.pop("epoch"), 4), **entry} for entry in trainer.state.log_history]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in records if "eval_loss" in r] == [2, 4]
    assert sum("eval_loss=" in line for line in buffer.getvalue().splitlines()) == 2


def test_summary_table_formats_numbers_and_escapes_markup():
    table = summary_table({"accuracy": 0.8333333, "steps": 120, "[bold]adapter": "runs/x/adapter"}, "hkft train")
    buffer = io.StringIO()
    Console(file=buffer, width=100, force_terminal=False).print(table)
    text = buffer.getvalue()
    assert "hkft train" in text and "0.8333" in text and "0.83333" not in text and "120" in text
    assert "[bold]adapter" in text and "runs/x/adapter" in text


def test_the_final_evaluation_shows_its_progress_but_evaluations_during_training_do_not(tmp_path):
    console, buffer = plain_console()
    callback = ProgressCallback(tmp_path / "metrics.jsonl", console)
    args, control = TrainingArguments(output_dir=str(tmp_path), report_to=[]), TrainerControl()
    batches = [0, 1, 2]
    callback.on_train_begin(args, state(0), control)
    callback.on_prediction_step(args, state(5), control, eval_dataloader=batches)
    callback.on_train_end(args, state(10), control)
    assert "evaluating" not in buffer.getvalue()
    for _ in batches:
        callback.on_prediction_step(args, state(10), control, eval_dataloader=batches)
    callback.on_predict(args, state(10), control, metrics={})
    assert [line.split(" ", 1)[1] for line in buffer.getvalue().splitlines()[1:]] == ["evaluating: 3 batches"]


def test_work_outside_the_training_loop_gets_a_bar_on_a_terminal(tmp_path):
    buffer = io.StringIO()
    callback = ProgressCallback(tmp_path / "m.jsonl", Console(file=buffer, force_terminal=True, width=120))
    with callback.steps("generating", 4) as advance:
        for _ in range(4):
            advance()
    assert "generating" in buffer.getvalue() and "4/4" in buffer.getvalue()
