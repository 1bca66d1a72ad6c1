"""Activation checkpointing recomputes layers in the backward pass: with hkft's masks it must
recompute them with the masks the forward drew, or the gradient belongs to another network."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model

from hkft.config.schema import LoraConfig
from hkft.dropout import build_plan, instrument
from hkft.models.lora import build_lora_model
from hkft.recipes.trainer import HkftTrainer
from hkft.tasks.registry import task_for


def loss_and_gradients(training_args, arch: str, method: str, branches: str, checkpointing: bool):
    task = "causal-lm" if arch == "llama" else "classification"
    model = build_lora_model(tiny_model(arch, task), LoraConfig(), task, quantized=False, gradient_checkpointing=checkpointing)
    torch.manual_seed(1)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # a trained adapter: with B = 0 the LoRA A gradients would all be zero
            torch.nn.init.normal_(parameter, std=0.1)
    controller = instrument(model, build_plan(method, 0.3, 1.0, branches=branches), seed=0)
    args = training_args()
    trainer = HkftTrainer(model=model, args=args, dropout=controller, task=task_for(task))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [9, 8, 7, 6, 5, 4]])
    labels = ids.clone() if task == "causal-lm" else torch.tensor([0, 2])
    model.train()
    loss = trainer.compute_loss(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    loss.backward()
    return loss.item(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("method,branches", [("hiddenkey-", "one"), ("hiddenkey", "one"), ("hiddenkey", "both")])
def test_checkpointed_training_has_the_gradients_of_the_plain_one(arch, method, branches, training_args):
    loss, grads = loss_and_gradients(training_args, arch, method, branches, checkpointing=False)
    checkpointed_loss, checkpointed_grads = loss_and_gradients(training_args, arch, method, branches, checkpointing=True)
    assert checkpointed_loss == pytest.approx(loss, rel=1e-6)
    assert checkpointed_grads.keys() == grads.keys() and grads
    for name, grad in grads.items():
        assert torch.allclose(checkpointed_grads[name], grad, atol=1e-6), name
