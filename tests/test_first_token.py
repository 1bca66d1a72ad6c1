"""The last layer computed for the first token only: same logits and gradients as the stock model."""

from __future__ import annotations

import pytest
import torch

from hkft.config.schema import LoraConfig
from hkft.dropout import build_plan, instrument
from hkft.dropout.architecture import transformer_layers
from hkft.dropout.first_token import compute_first_token_only
from hkft.models.lora import build_lora_model
from tests.tiny_models import batch, tiny_model


def lora_classifier(arch: str):
    model = tiny_model(arch, task="classification")
    lora = LoraConfig(target_modules=["query", "value", "dense"])  # "dense" covers the sliced projections
    model = build_lora_model(model, lora, "classification", quantized=False, gradient_checkpointing=False)
    torch.manual_seed(1)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # a trained adapter: B is zero at initialisation, which hides gradient errors
            torch.nn.init.normal_(parameter, std=0.1)
    controller = instrument(model, build_plan("none", 0.0, 0.0), seed=0)  # the model's own dropout off
    return model, controller


def logits_and_gradients(model, inputs):
    model.zero_grad()
    model.train()
    output = model(**inputs)
    output.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return output.logits.detach(), grads


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_first_token_only_gives_the_stock_logits_and_gradients(arch):
    model, controller = lora_classifier(arch)
    inputs = {**batch(arch, padded=True), "labels": torch.tensor([0, 2, 1])}
    logits, grads = logits_and_gradients(model, inputs)

    handle = compute_first_token_only(model, True, controller)
    assert handle is not None
    feed_forward_tokens = []
    transformer_layers(model)[-1].intermediate.register_forward_hook(lambda module, args, out: feed_forward_tokens.append(out.shape[1]))
    sliced_logits, sliced_grads = logits_and_gradients(model, inputs)

    assert feed_forward_tokens == [1]
    assert torch.allclose(sliced_logits, logits, atol=1e-6)
    assert sliced_grads.keys() == grads.keys()
    for name, grad in grads.items():
        assert torch.allclose(sliced_grads[name], grad, atol=1e-6), name

    handle.remove()
    assert model(**inputs).logits.shape == logits.shape and feed_forward_tokens == [1, 10]


@pytest.mark.parametrize("arch,task", [("llama", "classification"), ("gpt2", "classification"), ("bert", "causal-lm")])
def test_models_whose_head_reads_other_tokens_are_left_alone(arch, task):
    model = tiny_model(arch, task=task if task != "causal-lm" else "classification")
    controller = instrument(model, build_plan("hiddenkey", 0.1, 1.0), seed=0)
    assert compute_first_token_only(model, task != "causal-lm", controller) is None


@pytest.mark.parametrize("pattern,layers,sliced", [("element", "all", True), ("column", "all", True), ("span", "all", False), ("span", [0], True)])
def test_a_hidden_token_span_in_the_last_layer_keeps_the_layer_whole(pattern, layers, sliced):
    """A span is drawn over the layer's tokens: on the first token alone its length would round to
    0 and nothing would be dropped. Element and column masks of the first token are unchanged."""
    model = tiny_model("bert", task="classification")
    plan = build_plan("hiddencut", 0.3, 0.0, layers=layers, position_overrides={"hidden": (pattern, 0.3)})
    controller = instrument(model, plan, seed=0)
    assert (compute_first_token_only(model, True, controller) is not None) == sliced
