"""Finished run directories as `hkft train` leaves them (config, run_info.json, metrics.json, metrics.jsonl),
written through hkft's own run-directory code: a change of the layout changes the fakes with it."""

from __future__ import annotations

from pathlib import Path

from hkft.config import HkftConfig, load_config
from hkft.run.directory import RunDir, save_run_config
from hkft.run.files import append_jsonl, atomic_write_json


def quickstart_config(*overrides: str) -> HkftConfig:
    return load_config("quickstart", list(overrides))


def write_run(root: Path, cfg: HkftConfig, metrics: dict[str, float], events: list[dict] | None = None,
              overfitting: dict | None = None, train: dict | None = None) -> Path:
    """``train``: metrics.json's training summary; ``events``: metrics.jsonl's lines, as the progress
    callback appends them."""
    run = RunDir(Path(root))
    run.root.mkdir(parents=True, exist_ok=True)
    save_run_config(run, cfg, ["hkft", "train", "--output-dir", str(run.root)])
    run.metrics_jsonl.unlink(missing_ok=True)
    run.metrics_jsonl.touch()
    for event in events or []:
        append_jsonl(run.metrics_jsonl, event)
    summary = train if train is not None else {"train_loss": 0.5, "step": 10}
    atomic_write_json(run.metrics_json, {"train": summary, "eval": {"split": "test", **metrics}, "overfitting": overfitting})
    return run.root


def fake_run(root: Path, *, method: str = "hiddenkey", rate: float = 0.1, kl_weight: float = 1.0, seed: int = 1,
             metrics: dict[str, float] | None = None, events: list[dict] | None = None, extra: tuple[str, ...] = (),
             overfitting: dict | None = None) -> Path:
    cfg = quickstart_config(f"dropout.method={method}", f"dropout.rate={rate}", f"dropout.kl_weight={kl_weight}",
                            f"train.seed={seed}", *extra)
    return write_run(root, cfg, metrics if metrics is not None else {"accuracy": 0.5}, events, overfitting)


def loss_events(losses: list[float], evals: list[float], *, kl: list[float] | None = None,
                metric: str = "accuracy") -> list[dict]:
    """Training logs at steps 1, 2, ... and eval events at steps 2, 4, ..., as ProgressCallback writes them."""
    events = []
    for step, loss in enumerate(losses, 1):
        event = {"step": step, "epoch": step / 10, "loss": loss, "learning_rate": 1e-3, "grad_norm": 0.1}
        if kl is not None:
            event["kl_loss"] = kl[step - 1]
        events.append(event)
    for index, value in enumerate(evals, 1):
        events.append({"step": 2 * index, "epoch": index / 5, "eval_loss": 0.6, f"eval_{metric}": value,
                       "eval_runtime": 0.1})
    events.append({"step": len(losses), "epoch": 1.0, "train_runtime": 3.0, "train_loss": 0.5})
    return events
