"""Classification: one label per text (or text pair), scored by accuracy, macro-F1 and MCC."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from datasets import Dataset

from hkft.config.schema import DataConfig
from hkft.data.preparation import (
    build_label_names,
    check_known_labels,
    rare_label_warnings,
)
from hkft.dropout.compensation import kl_consistency
from hkft.tasks.metrics import classification_metrics
from hkft.tasks.sequence import SequenceTask


class Classification(SequenceTask):
    name = "classification"
    keeps_label_names = True
    main_metric = "accuracy"
    eval_metrics = ("loss", "accuracy", "macro_f1", "mcc")
    metric_sources = {"accuracy": "sklearn.metrics.accuracy_score", "macro_f1": "sklearn.metrics.f1_score(average='macro')",
                      "mcc": "sklearn.metrics.matthews_corrcoef"}

    def model_kwargs(self, num_labels: int | None) -> dict[str, Any]:
        return {"problem_type": "single_label_classification", **({"num_labels": num_labels} if num_labels else {})}

    def label_map(self, raw: dict[str, Dataset], data: DataConfig,
                  label_names: list[str] | None) -> tuple[list[str] | None, dict[str, int] | None, list[str]]:
        training = label_names is None and "train" in raw
        notices = rare_label_warnings(raw, data.label_column) if training else []
        label_names = label_names if label_names is not None else build_label_names(raw, data.label_column)
        for split, dataset in raw.items():
            check_known_labels(dataset, data.label_column, label_names, split)
        return label_names, {name: index for index, name in enumerate(label_names)}, notices

    def reduce_logits(self, logits, labels):
        logits = logits[0] if isinstance(logits, tuple) else logits
        return logits.argmax(dim=-1)

    def scores(self, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        return classification_metrics(predictions, labels)

    def prediction_row(self, predicted: float, label: float, label_names: list[str] | None) -> dict[str, Any]:
        if not label_names:
            return super().prediction_row(predicted, label, label_names)
        return {"prediction": label_names[int(predicted)], "label": label_names[int(label)]}

    def consistency_loss(self, logits: torch.Tensor, target_logits: torch.Tensor, *, labels: torch.Tensor | None = None,
                         symmetric: bool = True, num_items: int | torch.Tensor | None = None) -> torch.Tensor:
        """KL between the two passes' class distributions, one row per example."""
        rows = torch.arange(logits.shape[0], device=logits.device)
        return kl_consistency(logits, target_logits, rows, symmetric=symmetric, num_items=num_items)


TASK = Classification()
