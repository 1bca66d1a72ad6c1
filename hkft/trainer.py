"""transformers' Trainer plus the dropout plan's compensation loss and mask-generator checkpoints.

Everything else (optimizer, schedule, accumulation, mixed precision, DDP/FSDP/DeepSpeed,
checkpoints, resume) is the stock Trainer.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import Trainer

from hkft.dropout import DropoutController, consistency_loss
from hkft.errors import TrainingError

DROPOUT_RNG_FILE = "hkft_dropout_rng_{rank}.pt"


class HkftTrainer(Trainer):
    def __init__(self, *args: Any, dropout: DropoutController, task: str, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.dropout = dropout
        self.task = task
        self._logged_terms: dict[str, list[float]] = {"task_loss": [], "kl_loss": []}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        plan = self.dropout.plan
        if not (model.training and plan.uses_consistency_loss):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        forward_inputs = {key: value for key, value in inputs.items() if key != "labels"}
        with self.dropout.shared_prefix() as replay:
            task_loss, outputs = super().compute_loss(model, dict(inputs), True, num_items_in_batch)
            if plan.compensation == "js":
                with torch.no_grad(), self.dropout.paused(), replay():
                    target = model(**forward_inputs).logits
                symmetric = False
            elif plan.branches == "one":
                # The paper's one-branch KL: the second pass is a target only, so it builds no graph.
                with torch.no_grad(), replay():
                    target = model(**forward_inputs).logits
                symmetric = True
            else:
                with replay():
                    second_loss, second = super().compute_loss(model, dict(inputs), True, num_items_in_batch)
                task_loss = 0.5 * (task_loss + second_loss)
                target, symmetric = second.logits, True

        term = consistency_loss(
            self.task,
            outputs.logits,
            target,
            labels=inputs.get("labels"),
            symmetric=symmetric,
            num_items=num_items_in_batch if self.model_accepts_loss_kwargs else None,
        )
        term = term * self._loss_scale(num_items_in_batch)
        self._logged_terms["task_loss"].append(task_loss.detach().item())
        self._logged_terms["kl_loss"].append(term.detach().item())
        loss = task_loss + plan.kl_weight * term
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss):
            step = self.state.global_step + 1
            raise TrainingError(
                f"the loss became {loss.item()} at step {step}; the last good checkpoint is kept",
                "lower train.lr, keep train.max_grad_norm > 0, use bf16 instead of fp16, or check the data for empty or broken examples",
            )
        return loss

    def _loss_scale(self, num_items_in_batch: Any) -> int:
        """The Trainer multiplies a loss normalised by tokens across devices by the device count."""
        if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            return self.accelerator.num_processes
        return 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            for name, values in self._logged_terms.items():
                if values:
                    logs[name] = round(sum(values) / len(values), 6)
                    values.clear()
        super().log(logs, start_time)

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        path = os.path.join(output_dir, DROPOUT_RNG_FILE.format(rank=self.args.process_index))
        torch.save(self.dropout.state_dict(), path + ".tmp")
        os.replace(path + ".tmp", path)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, DROPOUT_RNG_FILE.format(rank=self.args.process_index))
        if os.path.isfile(path):
            self.dropout.load_state_dict(torch.load(path, weights_only=True))
