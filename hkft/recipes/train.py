"""The train and eval recipes, readable top to bottom.

train: seed -> data -> base model -> LoRA -> dropout plan -> Trainer -> adapter -> final metrics.
eval:  adapter + sidecar -> base model -> data with the training label map -> metrics + predictions."""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import PeftModel
from rich.console import Console
from rich.markup import escape
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from transformers import (
    EarlyStoppingCallback,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.integrations import TensorBoardCallback

import hkft
from hkft.config import HkftConfig
from hkft.data.packing import (
    PackedCollator,
    check_packed_attention,
    pack_training_data,
)
from hkft.data.preparation import SPLITS, PreparedData
from hkft.dropout import DropoutController
from hkft.dropout.config import apply_dropout
from hkft.dropout.first_token import compute_first_token_only
from hkft.errors import ConfigError, DataError, InterruptedRun
from hkft.models.adapters import (
    base_fingerprint,
    save_lora_adapter,
)
from hkft.models.loading import (
    check_fits_positions,
    check_quantization_supported,
    check_task_fits_model,
    ensure_pad_token,
    load_base_model,
    load_tokenizer,
    position_limit,
    read_model_config,
    resolve_model_path,
)
from hkft.models.lora import build_lora_model, initial_adapter
from hkft.recipes.callbacks import CheckpointFileModes
from hkft.recipes.curves import plot_run_curves
from hkft.recipes.monitor import OverfittingMonitor, Verdict, verdict
from hkft.recipes.trainer import HkftTrainer
from hkft.run.directory import (
    RunDir,
    checkpoint_is_complete,
    latest_checkpoint,
    write_sidecar,
)
from hkft.run.files import DiskFullError, atomic_dir, atomic_write_json, is_disk_full
from hkft.run.interrupts import StopOnSignal
from hkft.run.progress import ProgressCallback
from hkft.run.tracking import track_training
from hkft.tasks.base import Task, prepare_data
from hkft.tasks.evaluation import EvalOutcome, Steps
from hkft.tasks.metrics import greater_is_better
from hkft.tasks.registry import task_for

# Far beyond any finetuning run (at ten steps a second, twelve days); a typo such as
# `train.epochs: 1e9` otherwise starts a run with an ETA of centuries.
MAX_OPTIMIZER_STEPS = 10_000_000


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    adapter_dir: Path
    metrics: dict[str, float]
    overfitting: Verdict | None = None  # None: the monitor was off or the run never evaluated
    base_metrics: dict[str, float] | None = None  # eval.compare_base: the base model on the same split
    samples: list[dict] = field(default_factory=list)  # eval.compare_base: replies before and after


def mixed_precision(precision: str) -> dict[str, bool]:
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if precision != "fp32" and not torch.cuda.is_available():
        raise ConfigError(f"train.precision {precision} needs a GPU", "use train.precision=fp32 (or auto) on a CPU")
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def check_fsdp_possible() -> None:
    """accelerate (1.15) switches FSDP on only for multi-accelerator jobs: in a CPU job (gloo) the
    Trainer would silently train with DDP, and a single process fails with a traceback."""
    if not torch.cuda.is_available():
        raise ConfigError(
            "distributed.strategy fsdp needs GPUs: accelerate shards a model only across accelerators, and on a CPU "
            "training would silently run as DDP",
            "use distributed.strategy=ddp on a CPU",
        )
    if not (torch.distributed.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1):
        raise ConfigError("distributed.strategy fsdp needs a distributed launch",
                          "start it with torchrun --nproc_per_node N -m hkft train ... or accelerate launch")


def training_arguments(cfg: HkftConfig, run: RunDir, has_eval: bool) -> TrainingArguments:
    train, task = cfg.train, task_for(cfg.model.task)
    strategy = train.eval_strategy if has_eval else "no"
    metric = train.metric_for_best or task.main_metric
    if strategy != "no" and metric.removeprefix("eval_") not in task.eval_metrics:  # else a KeyError after an epoch
        raise ConfigError(
            f"train.metric_for_best: {metric!r} is not among the {task.name} evaluation metrics",
            f"choose one of {', '.join(task.eval_metrics)}",
        )
    distributed = {}
    if cfg.distributed.strategy == "fsdp":
        check_fsdp_possible()
        distributed["fsdp"] = cfg.distributed.fsdp
    elif cfg.distributed.strategy == "deepspeed":
        if not cfg.distributed.deepspeed_config:
            raise ConfigError("distributed.strategy deepspeed needs distributed.deepspeed_config (a JSON file)")
        distributed["deepspeed"] = cfg.distributed.deepspeed_config
    return TrainingArguments(
        output_dir=str(run.checkpoints_dir),
        report_to=[target for target in cfg.output.report_to if target != "tensorboard"],
        num_train_epochs=train.epochs,
        max_steps=train.max_steps,
        learning_rate=train.lr,
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=cfg.eval.batch_size or train.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        weight_decay=train.weight_decay,
        warmup_steps=train.warmup_steps if train.warmup_steps > 0 else train.warmup_ratio,
        lr_scheduler_type=train.scheduler,
        max_grad_norm=train.max_grad_norm,
        label_smoothing_factor=train.label_smoothing,
        seed=train.seed,
        full_determinism=train.deterministic,
        eval_strategy=strategy,
        eval_steps=train.eval_steps,
        save_strategy=strategy if strategy != "no" else "epoch",
        save_steps=train.eval_steps or 500,
        save_total_limit=train.save_total_limit,
        load_best_model_at_end=strategy != "no",
        metric_for_best_model=metric if strategy != "no" else None,
        greater_is_better=greater_is_better(metric),
        logging_steps=train.logging_steps,
        logging_first_step=True,
        include_num_input_tokens_seen="non_padding",  # logs tokens seen and tokens per second
        disable_tqdm=True,
        prediction_loss_only=task.language_model,
        train_sampling_strategy="group_by_length" if cfg.data.group_by_length else "random",
        dataloader_num_workers=train.num_workers,
        use_cpu=not torch.cuda.is_available(),
        ddp_find_unused_parameters=False,
        **mixed_precision(train.precision),
        **distributed,
    )


def check_step_count(cfg: HkftConfig, examples: int, world_size: int) -> None:
    """An absurd number of optimizer steps (``train.epochs: 1e9``) is a typo, not a run to start."""
    train = cfg.train
    per_epoch = max(1, math.ceil(examples / (train.batch_size * train.grad_accum * world_size)))
    steps = train.max_steps if train.max_steps > 0 else math.ceil(train.epochs * per_epoch)
    if steps > MAX_OPTIMIZER_STEPS:
        length = f"train.max_steps {train.max_steps}" if train.max_steps > 0 else (
            f"train.epochs {train.epochs:g} over {examples} examples ({per_epoch} steps an epoch)")
        raise ConfigError(
            f"{length} is {steps:,} optimizer steps, more than hkft's limit of {MAX_OPTIMIZER_STEPS:,}",
            "set train.epochs or train.max_steps to the length you mean",
        )


def train_summary(log_history: list[dict], whole_run: dict[str, float]) -> dict:
    """The Trainer's final summary with loss, time and steps per second over the whole run
    (``whole_run``, across resumes), plus the throughput of the last training log (non-padding
    tokens per second: the final summary has none). Samples per second are left out: the Trainer
    counts them for the last session alone (0 for the resume of a finished run)."""
    summary = {key: value for key, value in log_history[-1].items() if key != "train_samples_per_second"}
    summary.update(whole_run)
    throughput = [event["train_tokens_per_second"] for event in log_history if "train_tokens_per_second" in event]
    if throughput:
        summary["train_tokens_per_second"] = throughput[-1]
    return summary


def startup_line(run: RunDir, cfg: HkftConfig, args: TrainingArguments, data, model) -> str:
    """What is about to train, where and on what, in one line."""
    trainable, total = model.get_nb_trainable_parameters()
    device = f"{args.world_size} x {args.device.type}" if args.world_size > 1 else str(args.device)
    validation = len(data.validation) if data.validation is not None else 0
    train = f"{len(data.train):,} packed training rows" if cfg.data.packing else f"{len(data.train):,} training"
    return (f"{run.root}: {cfg.model.name} on {device}, {train} / {validation:,} validation "
            f"examples, {trainable:,} trainable parameters ({trainable / total:.2%} of {total:,})")


def train(cfg: HkftConfig, run: RunDir, *, resume: bool, console: Console,
          callbacks: Sequence[TrainerCallback] = ()) -> TrainResult:
    """``callbacks`` join hkft's own, after them (a tuning trial's pruner sees an evaluation once it is logged)."""
    try:
        return track_training(cfg, run, resume, lambda: _train(cfg, run, resume=resume, console=console,
                                                               extra_callbacks=callbacks))
    finally:
        # A rank that exits with its gloo/NCCL threads still running aborts ("terminate called
        # without an active exception") and takes the whole torchrun job down with it.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train(cfg: HkftConfig, run: RunDir, *, resume: bool, console: Console,
           extra_callbacks: Sequence[TrainerCallback]) -> TrainResult:
    task = task_for(cfg.model.task)
    has_eval = cfg.train.eval_strategy != "no"  # a validation split always exists (held out if not given)
    args = training_arguments(cfg, run, has_eval)
    set_seed(cfg.train.seed, deterministic=cfg.train.deterministic)  # before any weight (LoRA included) exists
    base = setup_base(cfg)
    data = setup_data(cfg, base, args, console)
    model, collator, initial = setup_model(cfg, task, base, data, console)
    controller = setup_dropout(cfg, task, model, args)
    if args.process_index == 0:
        console.print(escape(startup_line(run, cfg, args, data, model)), highlight=False, soft_wrap=True)
    progress, stopper = ProgressCallback(run.metrics_jsonl, console), StopOnSignal()
    trainer = HkftTrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.validation if has_eval else None,
        data_collator=collator,
        processing_class=base.tokenizer,
        **task.metric_hooks(),
        callbacks=[progress, stopper, CheckpointFileModes(), *setup_callbacks(cfg, run, args, progress), *extra_callbacks],
        dropout=controller,
        task=task,
        loraplus_lr_ratio=cfg.lora.loraplus_lr_ratio,
    )
    trainer.remove_callback(PrinterCallback)  # ProgressCallback prints instead
    with stopper:
        output = fit(trainer, run, resume, stopper, progress)
        stopper.stop_at_once()
        try:
            facts = sidecar(cfg, base.path, data.label_names, label_count(cfg, data), controller)
            return _write_results(trainer, output, model, base.tokenizer, facts, data, cfg, run, initial, progress)
        except KeyboardInterrupt:
            raise InterruptedRun(
                f"stopped by {stopper.received or 'SIGINT'} after the last training step ({trainer.state.global_step}), "
                f"before the adapter and final metrics were all written; checkpoint saved in {run.checkpoints_dir}",
                "continue with the same command and --resume (it trains no further step)",
            ) from None


@dataclass(frozen=True)
class Base:
    """The base model's location, its config (read without a weight) and its tokenizer."""

    path: str
    config: PretrainedConfig
    tokenizer: PreTrainedTokenizerBase


def setup_base(cfg: HkftConfig) -> Base:
    """Find the base model and refuse what cannot train before any weight is read."""
    path = resolve_model_path(cfg.model.name, cfg.model.revision, cfg.model.gguf_file)
    config = read_model_config(cfg.model, path)
    check_task_fits_model(cfg.model, config)
    check_quantization_supported(cfg.model, path)
    return Base(path, config, load_tokenizer(path, cfg.model.task))


def setup_data(cfg: HkftConfig, base: Base, args: TrainingArguments, console: Console) -> PreparedData:
    """Tokenised (and packed) splits, checked against the model's positions and hkft's step limit."""
    with args.main_process_first(desc="tokenising"):  # rank 0 fills the datasets cache, the others reuse it
        data = prepare_data(cfg, base.tokenizer)
        if cfg.data.packing:
            data = pack_training_data(data, cfg.data.max_length)
    for notice in data.notices:
        console.print(f"[yellow]{escape(notice)}[/]", highlight=False)
    if data.train is None or len(data.train) == 0:
        raise DataError("data.train has no examples")
    check_fits_positions({split: getattr(data, split) for split in SPLITS}, cfg.data.max_length,
                         position_limit(base.config), cfg.model.name)
    check_step_count(cfg, len(data.train), args.world_size)
    label_count(cfg, data)
    return data


def label_count(cfg: HkftConfig, data: PreparedData) -> int | None:
    """The classifier's label count: the training data's, which model.num_labels may only repeat."""
    num_labels = len(data.label_names) if data.label_names else cfg.model.num_labels
    if data.label_names and cfg.model.num_labels not in (None, num_labels):
        raise ConfigError(
            f"model.num_labels is {cfg.model.num_labels}, but the training data has {num_labels} labels ({', '.join(data.label_names)})",
            "leave model.num_labels unset (it is read from the data), or check data.label_column",
        )
    return num_labels


def setup_model(cfg: HkftConfig, task: Task, base: Base, data: PreparedData,
                console: Console) -> tuple[PeftModel, Callable, dict | None]:
    """The base model with its LoRA adapter, the batch collator, and PiSSA/OLoRA's initial adapter."""
    model = load_base_model(cfg.model, base.path, label_count(cfg, data))
    notice = ensure_pad_token(model, base.tokenizer)
    if notice:
        console.print(f"[yellow]{notice}[/]")
    collator = task.collator(base.tokenizer)
    if cfg.data.packing:
        # Without a cache, transformers reads restarting position ids as packed examples; with one
        # (a model's default use_cache) it attends across them. The Trainer switches it off too.
        model.config.use_cache = False
        collator = PackedCollator(base.tokenizer.pad_token_id, collator)
    eva_batches = plain_batches(data.train, collator, cfg.train.batch_size) if cfg.lora.init == "eva" else None
    model = build_lora_model(
        model,
        cfg.lora,
        cfg.model.task,
        quantized=cfg.model.quantization != "none",
        gradient_checkpointing=cfg.train.gradient_checkpointing,
        eva_batches=eva_batches,
    )
    if cfg.data.packing:
        check_packed_attention(model)
    return model, collator, initial_adapter(model, cfg.lora)


def setup_dropout(cfg: HkftConfig, task: Task, model: PeftModel, args: TrainingArguments) -> DropoutController:
    """The dropout plan of the config, applied to the model (method.md: positions x patterns x compensation)."""
    controller = apply_dropout(model, cfg.dropout, seed=cfg.train.seed, rank=args.process_index, packed=cfg.data.packing)
    compute_first_token_only(model, not task.language_model, controller)
    return controller


def setup_callbacks(cfg: HkftConfig, run: RunDir, args: TrainingArguments, progress: ProgressCallback) -> list[TrainerCallback]:
    """The overfitting monitor, TensorBoard and early stopping, as the config asks."""
    has_eval = args.eval_strategy != "no"
    callbacks: list[TrainerCallback] = []
    if has_eval and cfg.train.overfitting.enabled:
        callbacks.append(OverfittingMonitor(cfg, args.metric_for_best_model, progress.notice))
    if "tensorboard" in cfg.output.report_to and args.process_index == 0:
        callbacks.append(TensorBoardCallback(SummaryWriter(log_dir=str(run.tb_dir))))
    if cfg.train.early_stopping_patience and has_eval:
        callbacks.append(EarlyStoppingCallback(cfg.train.early_stopping_patience))
    return callbacks


def fit(trainer: HkftTrainer, run: RunDir, resume: bool, stopper: StopOnSignal, progress: ProgressCallback):
    """The Trainer's loop, from the last checkpoint when resuming; a signal ends it with a checkpoint."""
    checkpoint = latest_checkpoint(run) if resume else None
    try:
        output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except Exception as err:
        if not is_disk_full(err):
            raise
        raise disk_full_in_training(run) from None
    finally:
        progress.close()  # also after a failure, so the error line is not drawn under a live bar
    if stopper.received:
        raise InterruptedRun(
            f"stopped by {stopper.received} at step {trainer.state.global_step}; checkpoint saved in {run.checkpoints_dir}",
            "continue with the same command and --resume",
        )
    return output


def _write_results(trainer: HkftTrainer, output, model, tokenizer, facts: dict, data, cfg: HkftConfig, run: RunDir,
                   initial, progress: ProgressCallback) -> TrainResult:
    """The adapter, then the final evaluation, the overfitting verdict and metrics.json (each file atomic)."""
    gathered = trainer.adapter_state_dict()  # on every rank: FSDP gathers the shards collectively
    if trainer.is_world_process_zero():  # before the final evaluation, so that a failure there loses no training
        save_adapter(model, tokenizer, run.adapter_dir, facts, initial=initial, state_dict=gathered)
    split = cfg.eval.split if getattr(data, cfg.eval.split) is not None else "validation"
    steps = progress.steps if trainer.is_world_process_zero() else None
    outcome = final_evaluation(trainer, data, split, cfg, tokenizer, steps)
    base = base_evaluation(trainer, data, split, cfg, tokenizer, steps) if cfg.eval.compare_base and task_for(cfg.model.task).language_model else None
    has_eval = cfg.train.eval_strategy != "no"
    found = verdict(cfg, trainer.state.log_history, trainer.args.metric_for_best_model) if has_eval else None
    if trainer.is_world_process_zero():
        summary = train_summary(trainer.state.log_history, trainer.whole_run(output))
        overfitting = None if found is None else found.as_json()
        atomic_write_json(run.metrics_json, {"train": summary, "eval": {"split": split, **outcome.metrics},
                                             **({"base_eval": {"split": split, **base.metrics}} if base else {}),
                                             "overfitting": overfitting})
        plot_run_curves(run.root, None if found is None else found.best_step)
    if base is None:
        return TrainResult(run.root, run.adapter_dir, outcome.metrics, found)
    return TrainResult(run.root, run.adapter_dir, outcome.metrics, found, base.metrics, before_and_after(base, outcome))


def base_evaluation(trainer: Trainer, data, split: str, cfg: HkftConfig, tokenizer, steps: Steps | None = None) -> EvalOutcome:
    """The same evaluation with the adapter switched off: what training changed."""
    with trainer.model.disable_adapter():
        return final_evaluation(trainer, data, split, cfg, tokenizer, steps)


def before_and_after(base: EvalOutcome, tuned: EvalOutcome, count: int = 2) -> list[dict]:
    return [
        {"input": row.get("conversation", row.get("prompt")), "base": before["prediction"], "finetuned": row["prediction"],
         "reference": row["reference"]}
        for before, row in zip(base.predictions[:count], tuned.predictions[:count])
    ]


def plain_batches(dataset, collator, batch_size: int) -> DataLoader:
    """The training data in order, as plain dicts (peft's EVA rejects a collator's BatchEncoding)."""
    return DataLoader(dataset, batch_size=batch_size, collate_fn=lambda rows: dict(collator(rows)))


def disk_full_in_training(run: RunDir) -> DiskFullError:
    """The Trainer ran out of space, most likely writing a checkpoint: drop the incomplete one (it
    frees space and would never be resumed from) and say how to continue."""
    for path in run.checkpoints_dir.glob("checkpoint-*"):
        if not checkpoint_is_complete(path):
            shutil.rmtree(path, ignore_errors=True)
    kept = latest_checkpoint(run)
    how = f"continue from {kept.name} with the same command and --resume" if kept else "run the same command again"
    return DiskFullError(f"no space left on the device while training into {run.root}", f"free some disk space, then {how}")


def final_evaluation(trainer: Trainer, data, split: str, cfg: HkftConfig, tokenizer,
                     steps: Steps | None = None) -> EvalOutcome:
    dataset = getattr(data, split)
    if dataset is None:
        return EvalOutcome({}, [])
    return task_for(cfg.model.task).evaluate(
        trainer,
        dataset,
        label_names=data.label_names,
        raw=getattr(data, f"raw_{split}", None),
        generation=cfg.eval.generation if cfg.eval.generate else None,
        tokenizer=tokenizer,
        steps=steps,
    )


def sidecar(cfg: HkftConfig, model_path: str, label_names, num_labels, controller) -> dict:
    """hkft's own facts about the adapter; adapter_config.json stays pure peft."""
    return {
        "hkft_version": hkft.__version__,
        "task": cfg.model.task,
        "label_names": label_names,
        "num_labels": num_labels,
        "base_model": cfg.model.name,
        "base_fingerprint": base_fingerprint(model_path),
        "model": cfg.model.model_dump(mode="json"),
        "dropout": controller.describe(),
        "data": cfg.data.model_dump(
            mode="json", include={"text_column", "label_column", "prompt_column", "completion_column", "template", "max_length",
                           "format", "messages_column", "chat_template", "train_on"}
        ),
    }


def save_adapter(model, tokenizer, adapter_dir: Path, facts: dict, *, initial: dict | None = None,
                 state_dict: dict | None = None) -> None:
    """``initial``: PiSSA/OLoRA's initial adapter, which the saved one is converted against (see `save_lora_adapter`);
    ``state_dict``: the gathered weights of a sharded model."""
    with atomic_dir(adapter_dir) as staging:
        save_lora_adapter(model, staging, initial, state_dict)
        tokenizer.save_pretrained(staging)
        write_sidecar(staging, facts)
