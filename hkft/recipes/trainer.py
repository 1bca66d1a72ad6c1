"""transformers' Trainer plus what must change its own steps, so cannot be a callback (callbacks.py):

- the loss: the compensation term's second pass, and a causal LM's loss on supervised rows only;
- a non-finite loss stops the run at its step (a callback never sees the loss);
- LoRA+'s optimizer, built on the model as the Trainer wraps it;
- the task and KL terms averaged into each training log (a callback's logs are already recorded);
- the mask generators' state, saved with the Trainer's own RNG states (before trainer_state.json,
  which marks a checkpoint complete) and restored with them; the run's progress across resumes;
- a resumed run that already reached max_steps takes no further step.

Everything else (schedule, accumulation, mixed precision, DDP/FSDP/DeepSpeed, checkpoints, resume)
is the stock Trainer.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from peft.optimizers import create_loraplus_optimizer
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
)
from torch.distributed.fsdp import FSDPModule
from transformers import Trainer

from hkft.dropout import DropoutController
from hkft.dropout.architecture import eval_mode, head_module, transformers_model
from hkft.dropout.compensation import (
    ObjectiveWeights,
    causal_lm_objective,
    supervised_rows,
    supervised_token_count,
)
from hkft.errors import TrainingError
from hkft.run.directory import checkpoint_is_complete
from hkft.run.files import atomic_write_json
from hkft.tasks.base import Task

DROPOUT_RNG_FILE = "hkft_dropout_rng_{rank}.pt"
# What a checkpoint adds for the run's summary: steps, summed training loss and seconds spent so far.
PROGRESS_FILE = "hkft_progress.json"
# Trainer's private names HkftTrainer overrides or reads. They are not transformers' API: pyproject
# caps transformers at the versions tested, and tests/test_trainer_internals.py names any that is gone.
TRAINER_PRIVATE_METHODS = ("_run_epoch", "_save_rng_state", "_load_rng_state")
TRAINER_PRIVATE_ATTRIBUTES = ("_tr_loss", "_total_loss_scalar")


class HkftTrainer(Trainer):
    def __init__(
        self, *args: Any, dropout: DropoutController, task: Task, loraplus_lr_ratio: float | None = None, **kwargs: Any
    ):
        super().__init__(*args, **kwargs)
        self.loraplus_lr_ratio = loraplus_lr_ratio
        if not task.language_model:
            # Sequence-classification and regression heads take **kwargs, so the Trainer assumes they
            # divide their loss by the accumulation window's item count; they return the mean over the
            # micro-batch. Said as it is, the Trainer divides that mean by the accumulation steps (as
            # the KL term is divided) instead of summing micro-batch means: otherwise the update grows
            # with grad_accum and the device count, and the KL weight shrinks by the same factor.
            self.model_accepts_loss_kwargs = False
        self.dropout = dropout
        self.task = task
        self._logged_terms: dict[str, list[float]] = {"task_loss": [], "kl_loss": []}
        self._earlier = {"steps": 0, "loss_sum": 0.0, "runtime": 0.0}  # before this session (a resume)
        self._session_start = time.time()
        self._training = False

    def train(self, resume_from_checkpoint: str | None = None, **kwargs: Any):
        self._session_start = time.time()
        # Read here, not with the RNG states: a finished run resumed at its last step enters no epoch,
        # and the Trainer restores RNG states only when it enters one.
        progress = Path(resume_from_checkpoint or "") / PROGRESS_FILE
        if resume_from_checkpoint and progress.is_file():
            self._earlier = json.loads(progress.read_text())
        self._training = True
        try:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        finally:
            self._training = False

    def _run_epoch(self, *args: Any, **kwargs: Any) -> None:
        """A run that already reached max_steps, resumed from its last checkpoint mid-epoch (a run
        that ended mid-epoch, or was stopped while writing its final checkpoint), enters that epoch
        again, and the Trainer would take a step before it checks the limit."""
        if self.state.global_step >= self.state.max_steps:
            self.control.should_training_stop = True
            return
        super()._run_epoch(*args, **kwargs)

    def whole_run(self, output) -> dict[str, float]:
        """The Trainer's ``output`` covers this session only; after a resume, its mean loss and time
        leave out the steps before the checkpoint. These are over every step of the run."""
        steps = self.state.global_step
        session_steps = steps - self._earlier["steps"]
        runtime = self._earlier["runtime"] + output.metrics["train_runtime"]
        return {
            "train_loss": (self._earlier["loss_sum"] + output.training_loss * session_steps) / max(steps, 1),
            "train_runtime": round(runtime, 4),
            "train_steps_per_second": round(steps / runtime, 3) if runtime > 0 else 0.0,
        }

    def adapter_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The model's full state dict when FSDP2 shards it (gathered to rank 0, as accelerate does for
        the Trainer's checkpoints; every rank must call this); None for an unsharded model, whose own
        state dict is whole. Without it, rank 0 alone would save its shards of the adapter."""
        if not isinstance(self.model, FSDPModule):
            return None
        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def create_optimizer(self, model=None):
        """LoRA+ (``lora.loraplus_lr_ratio``): peft's optimizer, in which the B matrices (and the
        trained vectors) learn at the ratio times the learning rate; the optimizer class and its
        settings stay the Trainer's. Built here, on the model as the Trainer wraps it."""
        if self.loraplus_lr_ratio is None or self.optimizer is not None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = create_loraplus_optimizer(
            opt_model,
            optimizer_cls,
            loraplus_lr_ratio=self.loraplus_lr_ratio,
            loraplus_weight_decay=self.args.weight_decay,
            **optimizer_kwargs,
        )
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        plan = self.dropout.plan
        # A causal LM's training loss is computed in row chunks over the supervised positions only:
        # one log-softmax per chunk and the gradient written in the same pass (with KL, the task loss
        # is folded into the KL pass), where the model's own loss keeps several logit-sized copies.
        # Other tasks have small logits and keep the Trainer's own loss.
        fused = model.training and self.task.language_model and self.compute_loss_func is None and "labels" in inputs
        if not (model.training and plan.uses_consistency_loss):
            if fused:
                return self._chunked_causal_lm_loss(model, inputs, return_outputs, num_items_in_batch)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        forward_inputs = _without_labels(inputs)
        both = plan.compensation == "kl" and plan.branches == "both"
        rows = supervised_rows(inputs["labels"]) if fused else None

        def forward_pass() -> tuple[torch.Tensor | None, Any]:
            if fused:
                return None, model(**forward_inputs)
            return super(HkftTrainer, self).compute_loss(model, dict(inputs), True, num_items_in_batch)

        with self.dropout.shared_prefix() as replay, _head_on_rows(model, rows):
            task_loss, outputs = forward_pass()
            with self._second_pass_context(model, both), replay():
                # Both branches: a second training pass (R-Drop). One branch (the paper's) and js:
                # the second pass is a target only and builds no graph; js's target is the eval-mode model.
                second_loss, second = forward_pass() if both else (None, model(**forward_inputs))

        if fused:
            loss, task_loss, term = self._chunked_objective(model, inputs["labels"], rows, outputs, second, both, num_items_in_batch)
        else:
            if both:
                task_loss = 0.5 * (task_loss + second_loss)
            term = self.task.consistency_loss(
                outputs.logits,
                second.logits,
                labels=inputs.get("labels"),
                symmetric=plan.compensation == "kl",
                num_items=num_items_in_batch if self.model_accepts_loss_kwargs else None,
            )
            term = term * self._loss_scale(num_items_in_batch)
            loss = task_loss + plan.kl_weight * term
        self._logged_terms["task_loss"].append(task_loss.detach().item())
        self._logged_terms["kl_loss"].append(term.detach().item())
        return (loss, outputs) if return_outputs else loss

    def _chunked_causal_lm_loss(self, model, inputs, return_outputs, num_items_in_batch):
        rows = supervised_rows(inputs["labels"])
        with _head_on_rows(model, rows):
            outputs = model(**_without_labels(inputs))
        loss, _, _ = self._chunked_objective(model, inputs["labels"], rows, outputs, None, False, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def _chunked_objective(self, model, labels, rows, outputs, second, both, num_items_in_batch):
        """(total, task, kl) of a causal LM from the logits of the supervised ``rows``: the training
        pass ``outputs`` and, with a compensation term, the ``second`` pass (None without one).
        Sets ``outputs["loss"]``."""
        weights = self._objective_weights(labels, num_items_in_batch, both)
        target_logits = None if second is None else second.logits
        loss, task_loss, term = causal_lm_objective(outputs.logits, target_logits, labels.reshape(-1)[rows + 1], weights)
        router_loss = self._router_aux_loss(model, num_items_in_batch, outputs, *([second] if both else []))
        loss, task_loss = loss + router_loss, task_loss + router_loss
        outputs["loss"] = loss
        return loss, task_loss, term

    def _router_aux_loss(self, model, num_items_in_batch, *passes) -> torch.Tensor | float:
        """A mixture-of-experts model adds its load-balancing loss to its own loss when it is given
        labels; the chunked loss calls it without labels, so the term is added here (the mean over
        the training passes, scaled as the Trainer scales the model's loss)."""
        terms = [outputs.aux_loss for outputs in passes if getattr(outputs, "aux_loss", None) is not None]
        if not terms:
            return 0.0
        coefficient = getattr(transformers_model(model).config, "router_aux_loss_coef", 0.0)
        return coefficient * sum(terms) / len(terms) * self._loss_scale(num_items_in_batch)

    def _second_pass_context(self, model: torch.nn.Module, both: bool) -> ExitStack:
        stack = ExitStack()
        if not both:
            stack.enter_context(torch.no_grad())
        if self.dropout.plan.compensation == "js":
            stack.enter_context(eval_mode(model))
        return stack

    def _objective_weights(self, labels: torch.Tensor, num_items_in_batch: Any, both: bool) -> ObjectiveWeights:
        """The normalisation the Trainer gives the model's loss (or its label smoother) and
        `consistency_loss`, so that the fused objective equals the unfused one."""
        count = max(supervised_token_count(labels), 1)
        smoothing = self.label_smoother.epsilon if self.label_smoother is not None else 0.0
        per_window = num_items_in_batch is not None and (self.model_accepts_loss_kwargs or smoothing)
        task = self._loss_scale(num_items_in_batch) / float(num_items_in_batch if per_window else count)
        kl_per_window = num_items_in_batch is not None and self.model_accepts_loss_kwargs
        kl = self._loss_scale(num_items_in_batch) / float(num_items_in_batch if kl_per_window else count)
        plan = self.dropout.plan
        return ObjectiveWeights(
            kl=kl,
            kl_weight=plan.kl_weight,
            task_a=0.5 * task if both else task,
            task_b=0.5 * task if both else 0.0,
            smoothing=smoothing,
            symmetric=plan.compensation == "kl",
        )

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss):
            step = self.state.global_step + 1
            saved = [path for path in Path(self.args.output_dir).glob("checkpoint-*") if checkpoint_is_complete(path)]
            kept = f"the checkpoints saved before it are kept in {self.args.output_dir}" if saved else "no checkpoint was saved before it"
            raise TrainingError(
                f"the loss became {loss.item()} at step {step}; {kept}",
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
        if self._training and self.args.should_save:
            # Losses since the last log are still in _tr_loss; logged ones were drained into _total_loss_scalar.
            session_loss = self._total_loss_scalar + float(self._tr_loss.item())
            atomic_write_json(Path(output_dir) / PROGRESS_FILE, {
                "steps": self.state.global_step,
                "loss_sum": self._earlier["loss_sum"] + session_loss,
                "runtime": self._earlier["runtime"] + time.time() - self._session_start,
            })

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, DROPOUT_RNG_FILE.format(rank=self.args.process_index))
        if os.path.isfile(path):
            self.dropout.load_state_dict(torch.load(path, weights_only=True))


def _without_labels(inputs: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in inputs.items() if key != "labels"}


@contextmanager
def _head_on_rows(model: torch.nn.Module, rows: torch.Tensor | None) -> Iterator[None]:
    """Run the LM head on the supervised positions only: its input [B, T, D] becomes [R, D] and
    the logits [R, V]. Prompt and padding positions carry no loss, so their logits (and, in the
    training pass, their share of the head's backward) are work the stock model does for nothing:
    in instruction tuning, where prompts are often half the tokens, that is half the head."""
    if rows is None:
        yield
        return

    def select(module: torch.nn.Module, args: tuple) -> tuple:
        hidden = args[0]
        return (hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows), *args[1:])

    handle = head_module(model).register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()
