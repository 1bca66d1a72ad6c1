"""The `Task` interface, and the data preparation every task shares (load, check, hold out, encode).

A task answers what differs between classification, regression and causal LM; the recipes ask it
instead of comparing `model.task`. `SequenceTask` (sequence.py) serves classification and regression,
`CausalLM` (causal_lm.py) plain text, prompt/completion and chat data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase, Trainer

from hkft.config.schema import DataConfig, GenerationConfig, HkftConfig
from hkft.data.chat import ChatLayout
from hkft.data.files import csv_text_as_written, describe_source
from hkft.data.preparation import (
    SPLITS,
    PreparedData,
    check_room,
    hold_out,
    load_splits,
    require_columns,
    require_some_text,
    require_strings,
    require_values,
)
from hkft.tasks.evaluation import EvalOutcome, Steps
from hkft.tasks.registry import task_for


@dataclass(frozen=True)
class Columns:
    """The columns a task reads from every split: ``texts`` are checked as text, ``needed`` must exist
    with a value in every row, ``as_text`` are read from CSV as written (conversations: their
    message columns). ``layout`` is the chat layout of chat data, ``prompted`` marks prompt/completion data."""

    texts: list[str]
    needed: list[str]
    as_text: list[str]
    layout: ChatLayout | None = None
    prompted: bool = False


class Task:
    name: ClassVar[str]
    peft_task_type: ClassVar[str]  # peft's TaskType: SEQ_CLS or CAUSAL_LM
    main_metric: ClassVar[str]  # picks the best checkpoint unless train.metric_for_best says otherwise
    eval_metrics: ClassVar[tuple[str, ...]]  # what the Trainer's evaluation reports (generation comes after training)
    metric_sources: ClassVar[dict[str, str]]  # each final metric's implementation, written into eval.json
    language_model: ClassVar[bool] = False  # predicts tokens: an LM head, right padding, generation, chunked loss
    keeps_label_names: ClassVar[bool] = False  # its label order lives in the adapter's sidecar (classification)
    min_tokens: ClassVar[int] = 1  # text tokens an example needs beyond the tokenizer's special tokens
    min_tokens_note: ClassVar[str] = ""  # why, when it is more than one

    # --- the model
    def auto_model_class(self) -> type:
        raise NotImplementedError

    def model_kwargs(self, num_labels: int | None) -> dict[str, Any]:
        """What `from_pretrained` needs for this task's head (``num_labels``, ``problem_type``)."""
        return {}

    # --- the data
    def columns(self, raw: dict[str, Dataset], data: DataConfig) -> Columns:
        raise NotImplementedError

    def pairs_texts(self, data: DataConfig) -> bool:
        """Whether the tokenizer joins two text columns as a pair (its special tokens count twice)."""
        return False

    def encode(self, raw: dict[str, Dataset], cfg: HkftConfig, tokenizer: PreTrainedTokenizerBase,
               label_names: list[str] | None, columns: Columns) -> PreparedData:
        raise NotImplementedError

    def collator(self, tokenizer: PreTrainedTokenizerBase) -> Callable:
        raise NotImplementedError

    # --- training
    def metric_hooks(self) -> dict[str, Any]:
        """The Trainer's compute_metrics and preprocess_logits_for_metrics."""
        return {"compute_metrics": None, "preprocess_logits_for_metrics": None}

    def consistency_loss(self, logits: torch.Tensor, target_logits: torch.Tensor, *, labels: torch.Tensor | None = None,
                         symmetric: bool = True, num_items: int | torch.Tensor | None = None) -> torch.Tensor:
        """The compensation term between two passes' outputs (method.md: KL for a distribution, squared
        error for a score)."""
        raise NotImplementedError

    # --- evaluation
    def evaluate(self, trainer: Trainer, dataset: Dataset, *, label_names: list[str] | None = None,
                 raw: Dataset | None = None, generation: GenerationConfig | None = None, tokenizer=None,
                 steps: Steps | None = None) -> EvalOutcome:
        """Metrics and per-example predictions of ``trainer.model`` on a tokenised split."""
        raise NotImplementedError


def prepare_data(
    cfg: HkftConfig,
    tokenizer: PreTrainedTokenizerBase,
    label_names: list[str] | None = None,
    splits: Sequence[str] = SPLITS,
) -> PreparedData:
    """Tokenised splits (unpadded) with ``labels``; ``label_names`` is passed in at eval time (the
    saved label map) and built from the training labels otherwise. What is read and how it is
    encoded is the task's; loading, checking and holding out are the same for every task."""
    data, task = cfg.data, task_for(cfg.model.task)
    # A validation set held out from train is rebuilt the same way (same share, same seed) when
    # validation is asked for alone: `hkft eval` scores the split training selected on.
    held_out = "validation" in splits and data.validation is None
    raw = load_splits(data, [*splits, "train"] if held_out and "train" not in splits else splits)
    columns = task.columns(raw, data)
    for split, dataset in raw.items():
        raw[split] = dataset = csv_text_as_written(dataset, getattr(data, split), columns.as_text, data.max_samples)
        where = f"{describe_source(getattr(data, split))} (data.{split})"
        require_columns(dataset, columns.needed, split)
        require_values(dataset, columns.needed, split)
        require_strings(dataset, columns.texts, where)
        if columns.texts:  # conversations are checked message by message (hkft.data.chat)
            require_some_text(dataset, columns.texts, where)
    check_room(tokenizer, data, pair=task.pairs_texts(data), min_tokens=task.min_tokens, note=task.min_tokens_note)
    if held_out and "train" in raw:
        raw["train"], raw["validation"] = hold_out(raw["train"], data.validation_split, cfg.train.seed)
        if "train" not in splits:
            del raw["train"]
    return task.encode(raw, cfg, tokenizer, label_names, columns)
