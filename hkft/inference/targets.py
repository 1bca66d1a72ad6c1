"""What `hkft chat` and `hkft predict` use: a run directory (or its adapter/ folder), a model folder
written by `hkft merge-adapter`, or the base model of a preset, loaded with the settings it was
trained with and `--set` overrides on top.

A run brings its own hkft_config.yaml (an adapter folder on its own: its sidecar's model and data
settings); a merged folder or a bare preset brings hkft's defaults. Either way the settings are a
validated HkftConfig, so `--set` takes the same keys, and gives the same errors, as everywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from hkft.config import HkftConfig, load_config, validate_config
from hkft.config.loading import apply_overrides
from hkft.config.schema import ModelConfig
from hkft.errors import ConfigError, ModelError
from hkft.models.adapters import (
    check_same_base,
    load_adapter_model,
    load_adapter_tokenizer,
)
from hkft.models.loading import (
    check_task_fits_model,
    ensure_pad_token,
    load_base_model,
    load_tokenizer,
    read_model_config,
    resolve_model_path,
    saved_as_causal_lm,
)
from hkft.run.directory import (
    SIDECAR,
    RunDir,
    find_adapter_dir,
    owned,
    read_sidecar,
    run_root_of,
    sidecar_label_names,
)
from hkft.tasks.registry import task_for

# The command for each task, for the error that points from one to the other.
BUSY_HINT = "wait until it has finished: chat and predict load a run only once nothing writes it"
# data.train is required by the schema; chat and predict read no training data.
UNUSED_DATA = "(not read by hkft chat or predict)"
WHAT_TARGETS_ARE = "give a run directory made by hkft train, its adapter/ folder, or a folder written by hkft merge-adapter"


def on_device(model: Any, cfg: HkftConfig) -> Any:
    """On the GPU where there is one (the Trainer does this for eval); a quantized base is placed already."""
    if torch.cuda.is_available() and cfg.model.quantization == "none":
        return model.to("cuda")
    return model


@dataclass(frozen=True)
class Target:
    model: Any  # a PreTrainedModel, or a PeftModel when the target is an adapter
    tokenizer: PreTrainedTokenizerBase
    cfg: HkftConfig
    label_names: list[str] | None
    description: str  # one phrase for the banner: what was loaded

    @property
    def task(self) -> str:
        return self.cfg.model.task

    @property
    def has_adapter(self) -> bool:
        return isinstance(self.model, PeftModel)


def check_task(task: str, target: str, command: str) -> None:
    """chat talks to causal LMs, predict scores classifiers and regressors: point to the other one."""
    if command == ("chat" if task_for(task).language_model else "predict"):
        return
    if command == "chat":
        raise ModelError(f"{target} is a {task} model: hkft chat talks to causal language models",
                         f"score texts with it: hkft predict {target} TEXT...")
    raise ModelError(f"{target} is a causal-lm model: hkft predict scores classifiers and regressors",
                     f"talk to it: hkft chat {target}")


def load_target(target: Path, overrides: list[str], command: str) -> Target:
    """A run, an adapter folder or a merged model folder. A run is locked while it loads: one that a
    training still writes is refused, never half read."""
    target = Path(target)
    if not target.exists():
        raise ModelError(f"{target} does not exist", WHAT_TARGETS_ARE)
    if not target.is_dir():
        raise ModelError(f"{target} is a file, not a run directory or a model folder", WHAT_TARGETS_ARE)
    if looks_like_run(target):
        with owned(run_root_of(target), BUSY_HINT, required=False):
            return _load_run(target, overrides, command)
    if (target / "config.json").is_file():
        return _load_model_folder(target, overrides, command)
    raise ModelError(f"{target} is neither a run directory (no adapter/adapter_config.json) nor a model folder "
                     "(no config.json)", WHAT_TARGETS_ARE)


def looks_like_run(target: Path) -> bool:
    return (target / "adapter_config.json").is_file() or (target / "adapter").is_dir() or RunDir(target).config_path.is_file()


def load_base_target(preset: str, overrides: list[str], command: str) -> Target:
    """The base model of a preset, with its generation settings and chat template (`--base PRESET`)."""
    cfg = load_config(preset, overrides)
    check_task(cfg.model.task, f"--base {preset}", command)
    path = resolve_model_path(cfg.model.name, cfg.model.revision, cfg.model.gguf_file)
    check_task_fits_model(cfg.model, read_model_config(cfg.model, path))
    tokenizer = load_tokenizer(path, cfg.model.task)
    model = load_base_model(cfg.model, path, None)
    ensure_pad_token(model, tokenizer)
    return Target(on_device(model, cfg), tokenizer, cfg, None, f"{cfg.model.name} (the base model of {preset}, no adapter)")


def _load_run(target: Path, overrides: list[str], command: str) -> Target:
    run = RunDir(run_root_of(target))
    if run.config_path.is_file() and not (target / "adapter_config.json").is_file() and not (run.adapter_dir / "adapter_config.json").is_file():
        raise ModelError(f"{run.root} holds no trained adapter: its training has not finished",
                         f"finish it with hkft train {run.config_path} --output-dir {run.root} --resume, or give a finished run")
    adapter_dir = find_adapter_dir(target)
    facts = read_sidecar(adapter_dir)
    cfg = _run_config(adapter_dir, facts, overrides)
    check_task(cfg.model.task, str(target), command)
    label_names = sidecar_label_names(adapter_dir, facts, task_for(cfg.model.task).keeps_label_names)
    path = resolve_model_path(cfg.model.name, cfg.model.revision, cfg.model.gguf_file)
    check_same_base(path, adapter_dir, facts.get("base_fingerprint"))
    tokenizer = load_adapter_tokenizer(adapter_dir, path, cfg.model.task)
    model = load_adapter_model(adapter_dir, cfg.model, facts, path, tokenizer)
    return Target(on_device(model, cfg), tokenizer, cfg, label_names, f"{target} (LoRA adapter on {cfg.model.name})")


def _run_config(adapter_dir: Path, facts: dict, overrides: list[str]) -> HkftConfig:
    """The run's hkft_config.yaml; for an adapter folder on its own, its sidecar's model and data settings."""
    config_path = RunDir(adapter_dir.parent).config_path
    if config_path.is_file():
        return load_config(config_path, overrides)
    if not facts.get("model"):
        raise ConfigError(f"{adapter_dir} has neither an hkft_config.yaml beside it nor a {SIDECAR} naming its base model",
                          "give the run directory the adapter was trained in")
    spec = {"model": facts["model"], "data": {**facts.get("data", {}), "train": UNUSED_DATA}}
    return validate_config(apply_overrides(spec, overrides), source=str(adapter_dir), overrides=overrides)


def _load_model_folder(folder: Path, overrides: list[str], command: str) -> Target:
    """A merged model (or any transformers checkpoint with a causal-LM or sequence-classification head)."""
    config = read_model_config(ModelConfig(name=str(folder)), str(folder))
    spec = {"model": {"name": str(folder), "task": checkpoint_task(config, folder)}, "data": {"train": UNUSED_DATA}}
    cfg = validate_config(apply_overrides(spec, overrides), source=str(folder), overrides=overrides)
    check_task(cfg.model.task, str(folder), command)
    tokenizer = load_tokenizer(str(folder), cfg.model.task)
    model = load_base_model(cfg.model, str(folder), None)
    ensure_pad_token(model, tokenizer)
    labels = [model.config.id2label[index] for index in range(model.config.num_labels)] if task_for(cfg.model.task).keeps_label_names else None
    return Target(on_device(model, cfg), tokenizer, cfg, labels, f"{folder} (a standalone model)")


def checkpoint_task(config: PretrainedConfig, folder: Path) -> str:
    """What a checkpoint's head was saved for: its architectures, and problem_type for regression."""
    if saved_as_causal_lm(config):
        return "causal-lm"
    names = getattr(config, "architectures", None) or []
    if any(name.endswith("ForSequenceClassification") for name in names):
        return "regression" if getattr(config, "problem_type", None) == "regression" else "classification"
    raise ModelError(f"{folder}/config.json names no causal-LM or sequence-classification head "
                     f"(architectures: {', '.join(names) or 'none'})", WHAT_TARGETS_ARE)
