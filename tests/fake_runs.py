"""Finished run directories written by hand (config, metrics.json, metrics.jsonl), as `hkft train` leaves them."""

from __future__ import annotations

import json
from pathlib import Path

from hkft.config import HkftConfig, config_to_yaml, load_config


def quickstart_config(*overrides: str) -> HkftConfig:
    return load_config("quickstart", list(overrides))


def write_run(root: Path, cfg: HkftConfig, metrics: dict[str, float], events: list[dict] | None = None,
              overfitting: dict | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "hkft_config.yaml").write_text(config_to_yaml(cfg), encoding="utf-8")
    (root / "metrics.jsonl").write_text("".join(json.dumps(event) + "\n" for event in events or []), encoding="utf-8")
    final = {"train": {"train_loss": 0.5, "step": 10}, "eval": {"split": "test", **metrics}, "overfitting": overfitting}
    (root / "metrics.json").write_text(json.dumps(final), encoding="utf-8")
    return root


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
