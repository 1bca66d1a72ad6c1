"""Where the dropout positions live in a transformers model, found by structure, not by class name.

Supported out of the box: BERT, RoBERTa (and other BERT-style encoders), GPT-2, LLaMA, Mistral,
Qwen2 (and other LLaMA-style decoders), Mixtral-style mixture-of-experts decoders. To add an
architecture, add its names to the tuples below.
"""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel

from hkft.errors import ModelError

# A layer's attention module is the child that owns one of these projections.
ATTENTION_PROJECTIONS = ("q_proj", "query", "c_attn", "qkv_proj", "Wqkv", "q_lin")
# The projections that read an attention module's input (query, key, value; fused or not).
ATTENTION_INPUT_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "query", "key", "value", "c_attn", "qkv_proj", "Wqkv",
                               "q_lin", "k_lin", "v_lin")
# The FFN's output, relative to a layer (before the residual add): its second linear layer, or last
# a whole `mlp` block, which is how a mixture-of-experts block (Mixtral, Qwen-MoE) is found: its
# output is the routed experts' weighted sum.
FFN_OUTPUT_PATHS = ("mlp.down_proj", "output.dense", "mlp.c_proj", "mlp.fc2", "fc2", "ffn.lin2", "mlp.dense_4h_to_h", "mlp")
# The module fed by the final representation, when the model names no output embeddings.
HEAD_NAMES = ("classifier", "score", "lm_head")
# Float attributes some attention modules read instead of an nn.Dropout module.
DROPOUT_ATTRIBUTES = ("attention_dropout", "dropout")


def transformers_model(model: nn.Module) -> PreTrainedModel:
    """The PreTrainedModel inside a peft (or other) wrapper."""
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            return module
    raise ModelError(f"{type(model).__name__} is not a transformers model: hkft's dropout needs one")


def transformer_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks: the ModuleList with one entry per hidden layer."""
    config = transformers_model(model).config
    count = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count and count:
            return module
    raise ModelError(
        f"cannot find the {count} transformer layers of {type(transformers_model(model)).__name__}",
        "hkft's dropout supports BERT/RoBERTa/GPT-2/LLaMA/Mistral/Qwen2-style models",
    )


def attention_module(layer: nn.Module) -> nn.Module:
    for module in layer.modules():
        if any(hasattr(module, name) for name in ATTENTION_PROJECTIONS) and module is not layer:
            return module
    raise ModelError(
        f"cannot find the attention module in {type(layer).__name__}",
        f"expected a submodule with one of {', '.join(ATTENTION_PROJECTIONS)}",
    )


def attention_input_projections(layer: nn.Module) -> list[nn.Module]:
    attention = attention_module(layer)
    return [getattr(attention, name) for name in ATTENTION_INPUT_PROJECTIONS if isinstance(getattr(attention, name, None), nn.Module)]


def ffn_output_module(layer: nn.Module) -> nn.Module:
    for path in FFN_OUTPUT_PATHS:
        try:
            return layer.get_submodule(path)
        except AttributeError:
            continue
    raise ModelError(
        f"cannot find the FFN output layer in {type(layer).__name__}",
        f"looked for {', '.join(FFN_OUTPUT_PATHS)}",
    )


def head_module(model: nn.Module) -> nn.Module:
    """The output head: a language model's own answer (`get_output_embeddings`, whatever the
    attribute is called, e.g. GPT-NeoX's `embed_out`), else a classifier or regression head by name."""
    base = transformers_model(model)
    output_embeddings = base.get_output_embeddings()
    if isinstance(output_embeddings, nn.Module):
        return output_embeddings
    for name in HEAD_NAMES:
        if isinstance(getattr(base, name, None), nn.Module):
            return getattr(base, name)
    raise ModelError(f"cannot find the output head of {type(base).__name__}", f"expected one of {', '.join(HEAD_NAMES)}")


def is_causal_model(model: nn.Module) -> bool:
    return bool(getattr(attention_module(transformer_layers(model)[0]), "is_causal", False))


def set_builtin_dropout(model: nn.Module, rate: float) -> None:
    """Set every dropout the model itself has (nn.Dropout modules and attention-dropout floats).

    peft's own ``lora_dropout`` is left alone: it is a LoRA setting, not the model's.
    """
    for name, module in model.named_modules():
        if "lora_dropout" in name:
            continue
        if isinstance(module, nn.Dropout):
            module.p = rate
        for attribute in DROPOUT_ATTRIBUTES:
            if isinstance(getattr(module, attribute, None), float):
                setattr(module, attribute, rate)

