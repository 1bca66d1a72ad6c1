"""What classification and regression share: a sequence-level head on one text or a pair of texts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from datasets import Dataset
from transformers import (
    AutoModelForSequenceClassification,
    DataCollatorWithPadding,
    PreTrainedTokenizerBase,
    Trainer,
)

from hkft.config.schema import DataConfig, GenerationConfig, HkftConfig
from hkft.data.preparation import PreparedData, sequence_encoder
from hkft.tasks.base import Columns, Task
from hkft.tasks.evaluation import EvalOutcome, Steps, is_metric


class SequenceTask(Task):
    peft_task_type = "SEQ_CLS"

    def auto_model_class(self) -> type:
        return AutoModelForSequenceClassification

    def columns(self, raw: dict[str, Dataset], data: DataConfig) -> Columns:
        return Columns(texts=data.text_columns, needed=[*data.text_columns, data.label_column], as_text=data.text_columns)

    def pairs_texts(self, data: DataConfig) -> bool:
        return len(data.text_columns) == 2

    def label_map(self, raw: dict[str, Dataset], data: DataConfig,
                  label_names: list[str] | None) -> tuple[list[str] | None, dict[str, int] | None, list[str]]:
        """The label names, the label -> class id map (None: numeric targets) and notices about the labels."""
        raise NotImplementedError

    def encode(self, raw: dict[str, Dataset], cfg: HkftConfig, tokenizer: PreTrainedTokenizerBase,
               label_names: list[str] | None, columns: Columns) -> PreparedData:
        data = cfg.data
        label_names, label_index, notices = self.label_map(raw, data, label_names)
        encode = sequence_encoder(tokenizer, data.text_columns, data.max_length, data.label_column, label_index,
                                  data.group_by_length)
        tokenised = {
            split: dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc=f"tokenising {split}")
            for split, dataset in raw.items()
        }
        texts = {split: raw[split].select_columns(columns.texts) for split in ("validation", "test") if split in raw}
        return PreparedData.of(tokenised, texts, label_names, notices)

    def collator(self, tokenizer: PreTrainedTokenizerBase) -> Callable:
        return DataCollatorWithPadding(tokenizer)

    def metric_hooks(self) -> dict[str, Any]:
        return {"compute_metrics": self.compute_metrics, "preprocess_logits_for_metrics": self.reduce_logits}

    def reduce_logits(self, logits, labels):
        """The Trainer's per-batch reduction, so evaluation keeps one value per example instead of every logit."""
        raise NotImplementedError

    def scores(self, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        raise NotImplementedError

    def compute_metrics(self, eval_prediction) -> dict[str, float]:
        """The Trainer's compute_metrics (predictions arrive already reduced per batch)."""
        return self.scores(np.asarray(eval_prediction.predictions), np.asarray(eval_prediction.label_ids))

    def prediction_row(self, predicted: float, label: float, label_names: list[str] | None) -> dict[str, Any]:
        return {"prediction": float(predicted), "label": float(label)}

    def evaluate(self, trainer: Trainer, dataset: Dataset, *, label_names: list[str] | None = None,
                 raw: Dataset | None = None, generation: GenerationConfig | None = None, tokenizer=None,
                 steps: Steps | None = None) -> EvalOutcome:
        """``raw`` holds the split's text columns, which each prediction row then starts with."""
        output = trainer.predict(dataset, metric_key_prefix="eval")
        metrics = {key.removeprefix("eval_"): float(value) for key, value in output.metrics.items() if is_metric(key)}
        values = np.asarray(output.predictions).reshape(-1)
        labels = np.asarray(output.label_ids).reshape(-1)
        rows = [self.prediction_row(p, t, label_names) for p, t in zip(values, labels)]
        if raw is not None:  # each example's text columns, by name, first
            rows = [{**texts, **row} for texts, row in zip(raw, rows)]
        return EvalOutcome(metrics, rows)
