"""Regression: one score per text (or text pair), scored by Pearson and Spearman correlation."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from datasets import Dataset

from hkft.config.schema import DataConfig
from hkft.data.preparation import check_numeric_labels
from hkft.dropout.compensation import squared_consistency
from hkft.tasks.metrics import regression_metrics
from hkft.tasks.sequence import SequenceTask


class Regression(SequenceTask):
    name = "regression"
    main_metric = "pearson"
    eval_metrics = ("loss", "pearson", "spearman", "mse")
    metric_sources = {"pearson": "scipy.stats.pearsonr", "spearman": "scipy.stats.spearmanr"}

    def model_kwargs(self, num_labels: int | None) -> dict[str, Any]:
        return {"num_labels": 1, "problem_type": "regression"}

    def label_map(self, raw: dict[str, Dataset], data: DataConfig,
                  label_names: list[str] | None) -> tuple[list[str] | None, dict[str, int] | None, list[str]]:
        for split, dataset in raw.items():
            check_numeric_labels(dataset, data.label_column, split)
        return None, None, []

    def reduce_logits(self, logits, labels):
        logits = logits[0] if isinstance(logits, tuple) else logits
        return logits.squeeze(-1)

    def scores(self, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        return regression_metrics(predictions.reshape(-1), labels.reshape(-1))

    def consistency_loss(self, logits: torch.Tensor, target_logits: torch.Tensor, *, labels: torch.Tensor | None = None,
                         symmetric: bool = True, num_items: int | torch.Tensor | None = None) -> torch.Tensor:
        """A score has no distribution: half the squared difference of the two passes' outputs."""
        return squared_consistency(logits, target_logits, num_items=num_items)


TASK = Regression()
