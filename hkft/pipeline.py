"""The train and eval recipes, readable top to bottom.

train: seed -> data -> base model -> LoRA -> dropout plan -> Trainer -> adapter -> final metrics.
eval:  adapter + sidecar -> base model -> data with the training label map -> metrics + predictions.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from torch.utils.tensorboard import SummaryWriter
from transformers import EarlyStoppingCallback, PrinterCallback, Trainer, TrainingArguments, set_seed
from transformers.integrations import TensorBoardCallback

import hkft
from hkft.config import HkftConfig, load_config, validate_config
from hkft.config.loading import apply_overrides
from hkft.config.schema import DropoutConfig
from hkft.data import make_collator, prepare_data
from hkft.dropout import DropoutPlan, build_plan, instrument
from hkft.errors import ConfigError, DataError, InterruptedRun
from hkft.evaluation import EvalOutcome, evaluate_model, metric_hooks
from hkft.first_token import compute_first_token_only
from hkft.io import atomic_dir, atomic_write_json, atomic_write_text
from hkft.metrics import EVAL_METRICS, MAIN_METRIC, greater_is_better
from hkft.modeling import (
    base_fingerprint,
    build_lora_model,
    check_quantization_supported,
    check_same_base,
    ensure_pad_token,
    load_base_model,
    load_adapter_model,
    load_adapter_tokenizer,
    load_tokenizer,
    resolve_model_path,
)
from hkft.interrupts import StopOnSignal
from hkft.plots import plot_run_curves
from hkft.progress import ProgressCallback
from hkft.rundir import RunDir, find_adapter_dir, latest_checkpoint, read_sidecar, write_sidecar
from hkft.trainer import HkftTrainer


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    adapter_dir: Path
    metrics: dict[str, float]
    base_metrics: dict[str, float] | None = None  # eval.compare_base: the base model on the same split
    samples: list[dict] = field(default_factory=list)  # eval.compare_base: replies before and after


@dataclass(frozen=True)
class EvalResult:
    metrics: dict[str, float]
    eval_path: Path
    predictions_path: Path


def plan_from_config(dropout: DropoutConfig) -> DropoutPlan:
    overrides = {
        name: None if position is None else (position.pattern, position.rate)
        for name, position in dropout.positions.items()
    }
    try:
        return build_plan(
            dropout.method,
            dropout.rate,
            dropout.kl_weight,
            compensation=dropout.compensation,
            branches=dropout.branches,
            layers=dropout.layers,
            position_overrides=overrides,
        )
    except ValueError as err:
        raise ConfigError(f"dropout: {err}") from None


def mixed_precision(precision: str) -> dict[str, bool]:
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if precision != "fp32" and not torch.cuda.is_available():
        raise ConfigError(f"train.precision {precision} needs a GPU", "use train.precision=fp32 (or auto) on a CPU")
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def training_arguments(cfg: HkftConfig, run: RunDir, has_eval: bool) -> TrainingArguments:
    train, task = cfg.train, cfg.model.task
    strategy = train.eval_strategy if has_eval else "no"
    metric = train.metric_for_best or MAIN_METRIC[task]
    if strategy != "no" and metric.removeprefix("eval_") not in EVAL_METRICS[task]:  # else a KeyError after an epoch
        raise ConfigError(
            f"train.metric_for_best: {metric!r} is not among the {task} evaluation metrics",
            f"choose one of {', '.join(EVAL_METRICS[task])}",
        )
    distributed = {}
    if cfg.distributed.strategy == "fsdp":
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
        prediction_loss_only=task == "causal-lm",
        train_sampling_strategy="group_by_length" if cfg.data.group_by_length else "random",
        dataloader_num_workers=train.num_workers,
        use_cpu=not torch.cuda.is_available(),
        ddp_find_unused_parameters=False,
        **mixed_precision(train.precision),
        **distributed,
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


def train(cfg: HkftConfig, run: RunDir, *, resume: bool, console: Console) -> TrainResult:
    try:
        return _train(cfg, run, resume=resume, console=console)
    finally:
        # A rank that exits with its gloo/NCCL threads still running aborts ("terminate called
        # without an active exception") and takes the whole torchrun job down with it.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train(cfg: HkftConfig, run: RunDir, *, resume: bool, console: Console) -> TrainResult:
    task = cfg.model.task
    has_eval = cfg.train.eval_strategy != "no"  # a validation split always exists (held out if not given)
    args = training_arguments(cfg, run, has_eval)
    set_seed(cfg.train.seed, deterministic=cfg.train.deterministic)  # before any weight (LoRA included) exists

    model_path = resolve_model_path(cfg.model.name, cfg.model.revision, cfg.model.gguf_file)
    check_quantization_supported(cfg.model, model_path)
    tokenizer = load_tokenizer(model_path, task)
    with args.main_process_first(desc="tokenising"):  # rank 0 fills the datasets cache, the others reuse it
        data = prepare_data(cfg, tokenizer)
    for notice in data.notices:
        console.print(f"[yellow]{escape(notice)}[/]")
    if data.train is None or len(data.train) == 0:
        raise DataError("data.train has no examples")
    num_labels = len(data.label_names) if data.label_names else cfg.model.num_labels
    if data.label_names and cfg.model.num_labels not in (None, num_labels):
        raise ConfigError(
            f"model.num_labels is {cfg.model.num_labels}, but the training data has {num_labels} labels ({', '.join(data.label_names)})",
            "leave model.num_labels unset (it is read from the data), or check data.label_column",
        )
    base = load_base_model(cfg.model, model_path, num_labels)
    notice = ensure_pad_token(base, tokenizer)
    if notice:
        console.print(f"[yellow]{notice}[/]")
    model = build_lora_model(
        base, cfg.lora, task, quantized=cfg.model.quantization != "none", gradient_checkpointing=cfg.train.gradient_checkpointing
    )
    plan = plan_from_config(cfg.dropout)
    try:
        controller = instrument(model, plan, seed=cfg.train.seed, rank=args.process_index)
    except ValueError as err:
        raise ConfigError(f"dropout: {err}") from None
    compute_first_token_only(model, task, controller)

    stopper = StopOnSignal()
    progress = ProgressCallback(run.metrics_jsonl, console)
    callbacks = [progress, stopper]
    if "tensorboard" in cfg.output.report_to and args.process_index == 0:
        callbacks.append(TensorBoardCallback(SummaryWriter(log_dir=str(run.tb_dir))))
    if cfg.train.early_stopping_patience and has_eval:
        callbacks.append(EarlyStoppingCallback(cfg.train.early_stopping_patience))
    trainer = HkftTrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.validation if has_eval else None,
        data_collator=make_collator(task, tokenizer),
        processing_class=tokenizer,
        **metric_hooks(task),
        callbacks=callbacks,
        dropout=controller,
        task=task,
    )
    trainer.remove_callback(PrinterCallback)  # ProgressCallback prints instead
    checkpoint = latest_checkpoint(run) if resume else None
    with stopper:
        try:
            output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        finally:
            progress.close()  # also after a failure, so the error line is not drawn under a live bar
    if stopper.received:
        raise InterruptedRun(
            f"stopped by {stopper.received} at step {trainer.state.global_step}; checkpoint saved in {run.checkpoints_dir}",
            "continue with the same command and --resume",
        )

    if trainer.is_world_process_zero():  # before the final evaluation, so that a failure there loses no training
        save_adapter(model, tokenizer, run.adapter_dir, sidecar(cfg, model_path, data.label_names, num_labels, controller))
    split = cfg.eval.split if getattr(data, cfg.eval.split) is not None else "validation"
    outcome = final_evaluation(trainer, data, split, cfg, tokenizer)
    metrics = {"split": split, **outcome.metrics}
    base = base_evaluation(trainer, data, split, cfg, tokenizer) if cfg.eval.compare_base and task == "causal-lm" else None
    if trainer.is_world_process_zero():
        summary = train_summary(trainer.state.log_history, trainer.whole_run(output))
        atomic_write_json(run.metrics_json, {"train": summary, "eval": metrics,
                                             **({"base_eval": {"split": split, **base.metrics}} if base else {})})
        plot_run_curves(run.root)
    if base is None:
        return TrainResult(run.root, run.adapter_dir, outcome.metrics)
    return TrainResult(run.root, run.adapter_dir, outcome.metrics, base.metrics, before_and_after(base, outcome))


def base_evaluation(trainer: Trainer, data, split: str, cfg: HkftConfig, tokenizer) -> EvalOutcome:
    """The same evaluation with the adapter switched off: what training changed."""
    with trainer.model.disable_adapter():
        return final_evaluation(trainer, data, split, cfg, tokenizer)


def before_and_after(base: EvalOutcome, tuned: EvalOutcome, count: int = 2) -> list[dict]:
    return [
        {"input": row.get("conversation", row.get("prompt")), "base": before["prediction"], "finetuned": row["prediction"],
         "reference": row["reference"]}
        for before, row in zip(base.predictions[:count], tuned.predictions[:count])
    ]


def final_evaluation(trainer: Trainer, data, split: str, cfg: HkftConfig, tokenizer) -> EvalOutcome:
    dataset = getattr(data, split)
    if dataset is None:
        return EvalOutcome({}, [])
    return evaluate_model(
        trainer,
        dataset,
        cfg.model.task,
        label_names=data.label_names,
        raw=getattr(data, f"raw_{split}", None) if cfg.eval.generate else None,
        generation=cfg.eval.generation,
        tokenizer=tokenizer,
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


def save_adapter(model, tokenizer, adapter_dir: Path, facts: dict) -> None:
    with atomic_dir(adapter_dir) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        write_sidecar(staging, facts)


def run_config_for(adapter_dir: Path) -> Path | None:
    candidate = adapter_dir.parent / "hkft_config.yaml"
    return candidate if candidate.is_file() else None


def eval_config(adapter_dir: Path, facts: dict, data: str | None, overrides: list[str]) -> tuple[HkftConfig, RunDir]:
    """The run's own config; for an adapter folder on its own, one rebuilt from its sidecar and --data.
    Results go to the run directory, or into the adapter folder itself."""
    config_path = run_config_for(adapter_dir)
    if config_path is not None:
        return load_config(config_path, overrides), RunDir(adapter_dir.parent)
    if data is None or not facts.get("model"):
        raise ConfigError(
            f"{adapter_dir} has no hkft_config.yaml beside it",
            "pass --data FILE (and --set data.text_column=... if the columns differ), or evaluate a run directory",
        )
    spec = {"model": facts["model"], "data": {"train": data, **facts.get("data", {})}}
    return validate_config(apply_overrides(spec, overrides), source=str(adapter_dir)), RunDir(adapter_dir)


def evaluate(target: Path, *, data: str | None, split: str | None, overrides: list[str], console: Console) -> EvalResult:
    adapter_dir = find_adapter_dir(target)
    facts = read_sidecar(adapter_dir)
    cfg, run = eval_config(adapter_dir, facts, data, overrides)
    split = split or (cfg.eval.split if data is not None or getattr(cfg.data, cfg.eval.split) else "validation")
    if split not in ("validation", "test", "train"):
        raise ConfigError(f"--split {split!r}: choose validation, test or train")
    if data is not None:
        setattr(cfg.data, split, data)
    task = cfg.model.task

    model_path = resolve_model_path(cfg.model.name, cfg.model.revision, cfg.model.gguf_file)
    check_same_base(model_path, adapter_dir, facts.get("base_fingerprint"))
    tokenizer = load_adapter_tokenizer(adapter_dir, model_path, task)
    prepared = prepare_data(cfg, tokenizer, label_names=facts.get("label_names"), splits=(split,))
    for notice in prepared.notices:
        console.print(f"[yellow]{escape(notice)}[/]")
    if getattr(prepared, split) is None:
        raise DataError(f"no {split} data to evaluate", f"set data.{split} or pass --data FILE")
    model = load_adapter_model(adapter_dir, cfg.model, facts, model_path, tokenizer)

    with tempfile.TemporaryDirectory(prefix="hkft-eval-") as scratch:  # the Trainer wants an output_dir; eval writes none
        args = TrainingArguments(
            output_dir=scratch,
            report_to=[],
            per_device_eval_batch_size=cfg.eval.batch_size or cfg.train.batch_size,
            disable_tqdm=True,
            prediction_loss_only=task == "causal-lm",
            use_cpu=not torch.cuda.is_available(),
        )
        trainer = Trainer(
            model=model,
            args=args,
            data_collator=make_collator(task, tokenizer),
            processing_class=tokenizer,
            **metric_hooks(task),
        )
        outcome = final_evaluation(trainer, prepared, split, cfg, tokenizer)
    eval_path, predictions_path = run.eval_json, run.predictions_jsonl
    report = {
        "split": split,
        "data": str(getattr(cfg.data, split)),
        "metrics": outcome.metrics,
        "implementations": metric_implementations(task),
        "generation": cfg.eval.generation.model_dump() if task == "causal-lm" else None,
    }
    atomic_write_json(eval_path, report)
    atomic_write_text(predictions_path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in outcome.predictions))
    return EvalResult(outcome.metrics, eval_path, predictions_path)


def metric_implementations(task: str) -> dict[str, str]:
    if task == "classification":
        return {"accuracy": "sklearn.metrics.accuracy_score", "macro_f1": "sklearn.metrics.f1_score(average='macro')",
                "mcc": "sklearn.metrics.matthews_corrcoef"}
    if task == "regression":
        return {"pearson": "scipy.stats.pearsonr", "spearman": "scipy.stats.spearmanr"}
    return {"loss": "token-level cross-entropy on completion (chat: assistant) tokens", "perplexity": "exp(loss)",
            "bleu": "sacrebleu.corpus_bleu", "rouge_l": "ROUGE-L F-measure",
            "exact_match": "reply == reference up to whitespace (chat, short references)"}
