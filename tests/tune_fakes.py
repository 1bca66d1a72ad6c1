"""Training stand-ins for hkft tune's tests: a run of STEPS steps that evaluates and checkpoints every
EVAL_EVERY steps, resumes from its last complete checkpoint like the Trainer, and logs which process
trained which steps of which run directory. Its scores depend on the learning rate only, so a trial that
was cut and resumed ends exactly where an uninterrupted one does.

Run as a script, it is an `hkft tune` worker with this stand-in:
``python tests/tune_fakes.py STUDY.yaml CALLS.jsonl STEP_SECONDS``."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from hkft.config import config_to_yaml

STEPS, EVAL_EVERY = 6, 2


def accuracy(lr: float, step: int) -> float:
    """Best at lr 1e-3, 0.1 lower per decade away; rising by 0.05 per evaluation to its final value."""
    final = 0.9 - abs(math.log10(lr) + 3) / 10
    return round(final - 0.05 * (STEPS - step) / EVAL_EVERY, 10)


class SteppedTrials:
    def __init__(self, log: Path, step_seconds: float = 0.0, stop=None):
        self.log = Path(log)
        self.step_seconds = step_seconds
        self.stop = stop  # stop(run_dir, step) -> BaseException or None: raised before that step trains
        # (step STEPS + 1: after the run finished)

    def __call__(self, cell, *, resume: bool, console=None, callbacks=()) -> None:
        run = cell.run_dir
        run.mkdir(parents=True, exist_ok=True)
        (run / "hkft_config.yaml").write_text(config_to_yaml(cell.config))
        start = max((int(path.name.split("-")[1]) for path in run.glob("checkpoints/checkpoint-*")
                     if (path / "trainer_state.json").is_file()), default=0) if resume else 0
        events = run / "metrics.jsonl"
        kept = [line for line in (events.read_text().splitlines() if resume and events.exists() else [])
                if json.loads(line)["step"] <= start]
        events.write_text("".join(line + "\n" for line in kept))
        with self.log.open("a") as log:
            log.write(json.dumps({"pid": os.getpid(), "run_dir": str(run), "resume": resume, "start": start}) + "\n")
        lr = cell.config.train.lr
        for step in range(start + 1, STEPS + 1):
            if self.stop is not None and (stopped := self.stop(run, step)) is not None:
                raise stopped
            print(f"{run.name} step {step}/{STEPS}", flush=True)
            time.sleep(self.step_seconds)
            if step % EVAL_EVERY:
                continue
            value = accuracy(lr, step)
            with events.open("a") as log:
                log.write(json.dumps({"step": step, "eval_accuracy": value}) + "\n")
            checkpoint = run / "checkpoints" / f"checkpoint-{step}"
            checkpoint.mkdir(parents=True, exist_ok=True)
            (checkpoint / "adapter_model.safetensors").write_bytes(b"")
            (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step}))  # last, as the Trainer
            for callback in callbacks:
                callback.on_evaluate(None, SimpleNamespace(global_step=step, max_steps=STEPS), None,
                                     metrics={"eval_accuracy": value})
        (run / "metrics.json").write_text(json.dumps({"train": {}, "eval": {"split": "test", "accuracy": accuracy(lr, STEPS)}}))
        if self.stop is not None and (stopped := self.stop(run, STEPS + 1)) is not None:
            raise stopped  # trained to the end, and stopped before the study heard of it


def main(study: str, calls: str, step_seconds: str) -> None:
    from rich.console import Console

    from hkft.study.search import plan_tune, run_tune
    from hkft.study.spec import load_study

    run_tune(plan_tune(load_study(study)), Console(width=100), train_fn=SteppedTrials(Path(calls), float(step_seconds)))


if __name__ == "__main__":
    main(*sys.argv[1:])
