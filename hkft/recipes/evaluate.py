"""The eval recipe: adapter + sidecar -> base model -> data with the training label map -> metrics + predictions."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from transformers import PrinterCallback, Trainer, TrainingArguments

from hkft.config import HkftConfig, load_config, validate_config
from hkft.config.loading import apply_overrides
from hkft.errors import ConfigError, DataError
from hkft.models.adapters import (
    check_same_base,
    load_adapter_model,
    load_adapter_tokenizer,
)
from hkft.models.loading import (
    check_fits_positions,
    position_limit,
    read_model_config,
    resolve_model_path,
)
from hkft.recipes.train import final_evaluation
from hkft.run.directory import (
    READER_BUSY_HINT,
    RunDir,
    find_adapter_dir,
    owned,
    read_sidecar,
    run_root_of,
    sidecar_label_names,
)
from hkft.run.files import atomic_write_json, atomic_write_text
from hkft.run.progress import ProgressCallback
from hkft.tasks.base import prepare_data
from hkft.tasks.registry import task_for


@dataclass(frozen=True)
class EvalResult:
    metrics: dict[str, float]
    eval_path: Path
    predictions_path: Path


def run_config_for(adapter_dir: Path) -> Path | None:
    candidate = adapter_dir.parent / "hkft_config.yaml"
    return candidate if candidate.is_file() else None


def eval_config(adapter_dir: Path, facts: dict, data: str | None, overrides: list[str]) -> tuple[HkftConfig, RunDir]:
    """The run's own config; for an adapter folder on its own, one rebuilt from its sidecar and --data.
    Results go to the run directory, or into the adapter folder itself."""
    config_path = run_config_for(adapter_dir)
    if config_path is not None:
        return load_config(config_path, overrides, overrides_from="--set"), RunDir(adapter_dir.parent)
    if data is None or not facts.get("model"):
        raise ConfigError(
            f"{adapter_dir} has no hkft_config.yaml beside it",
            "pass --data FILE (and --set data.text_column=... if the columns differ), or evaluate a run directory",
        )
    spec = {"model": facts["model"], "data": {"train": data, **facts.get("data", {})}}
    return (validate_config(apply_overrides(spec, overrides), source=str(adapter_dir), overrides=overrides, overrides_from="--set"),
            RunDir(adapter_dir))


def evaluate(target: Path, *, data: str | None, split: str | None, overrides: list[str], console: Console) -> EvalResult:
    """Scores an adapter only while no other process uses its run: never a half-written adapter,
    nor results that a training still running is about to replace."""
    with owned(run_root_of(target), READER_BUSY_HINT, required=False):
        return _evaluate(target, data=data, split=split, overrides=overrides, console=console)


def _evaluate(target: Path, *, data: str | None, split: str | None, overrides: list[str], console: Console) -> EvalResult:
    adapter_dir = find_adapter_dir(target)
    facts = read_sidecar(adapter_dir)
    cfg, run = eval_config(adapter_dir, facts, data, overrides)
    task = task_for(cfg.model.task)
    sidecar_label_names(adapter_dir, facts, task.keeps_label_names)
    split = split or (cfg.eval.split if data is not None or getattr(cfg.data, cfg.eval.split) else "validation")
    if split not in ("validation", "test", "train"):
        raise ConfigError(f"--split {split!r}: choose validation, test or train")
    if data is not None:
        setattr(cfg.data, split, data)
    model_path = resolve_model_path(cfg.model.name, cfg.model.revision, cfg.model.gguf_file)
    check_same_base(model_path, adapter_dir, facts.get("base_fingerprint"))
    tokenizer = load_adapter_tokenizer(adapter_dir, model_path, task.name)
    prepared = prepare_data(cfg, tokenizer, label_names=facts.get("label_names"), splits=(split,))
    for notice in prepared.notices:
        console.print(f"[yellow]{escape(notice)}[/]")
    if getattr(prepared, split) is None:
        raise DataError(f"no {split} data to evaluate", f"set data.{split} or pass --data FILE")
    check_fits_positions({split: getattr(prepared, split)}, cfg.data.max_length,
                         position_limit(read_model_config(cfg.model, model_path)), cfg.model.name)
    model = load_adapter_model(adapter_dir, cfg.model, facts, model_path, tokenizer)

    with tempfile.TemporaryDirectory(prefix="hkft-eval-") as scratch:  # the Trainer wants an output_dir; eval writes none
        args = TrainingArguments(
            output_dir=scratch,
            report_to=[],
            per_device_eval_batch_size=cfg.eval.batch_size or cfg.train.batch_size,
            disable_tqdm=True,
            prediction_loss_only=task.language_model,
            use_cpu=not torch.cuda.is_available(),
        )
        progress = ProgressCallback(None, console)  # train's bars for the evaluation and the generation
        trainer = Trainer(
            model=model,
            args=args,
            data_collator=task.collator(tokenizer),
            processing_class=tokenizer,
            **task.metric_hooks(),
            callbacks=[progress],
        )
        trainer.remove_callback(PrinterCallback)
        outcome = final_evaluation(trainer, prepared, split, cfg, tokenizer, progress.steps)
    eval_path, predictions_path = run.eval_json, run.predictions_jsonl
    report = {
        "split": split,
        "data": str(getattr(cfg.data, split)),
        "metrics": outcome.metrics,
        "implementations": task.metric_sources,
        "generation": cfg.eval.generation.model_dump() if task.language_model else None,
    }
    atomic_write_json(eval_path, report)
    atomic_write_text(predictions_path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in outcome.predictions))
    return EvalResult(outcome.metrics, eval_path, predictions_path)
