"""Where the dropout positions live in a transformers model, found by structure, not by class name.

A transformer block is an entry of a `nn.ModuleList` that holds an attention module; an attention
module is the first submodule of a block that has one of the shapes in `ATTENTION_SHAPES` (how it
projects its input into queries, keys and values). A stack of blocks is either one block per hidden
layer, or a group of shared blocks run ``num_hidden_layers`` times (ALBERT). The FFN output is found
by its path in the block (`FFN_OUTPUT_PATHS`).

To support a new shape of attention, write one function ``module -> its input projections, or
None`` and add it to `ATTENTION_SHAPES`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from torch import nn
from transformers import PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from hkft.errors import ModelError

# Query/key/value projections named stem + common suffix: (q_proj, k_proj, v_proj), (query, key,
# value), (query_proj, key_proj, value_proj), (q_lin, k_lin, v_lin), (q, k, v), ...
PROJECTION_STEMS = (("query", "key", "value"), ("q", "k", "v"))
# One projection computing queries, keys and values together (multi-query or grouped included).
FUSED_PROJECTIONS = ("query_key_value", "c_attn", "qkv_proj", "Wqkv", "qkv")
# The FFN's output, relative to a block (before the residual add): its second linear layer, or last
# a whole `mlp` block, which is how a mixture-of-experts block (Mixtral, Qwen-MoE) is found: its
# output is the routed experts' weighted sum.
FFN_OUTPUT_PATHS = ("mlp.down_proj", "output.dense", "mlp.c_proj", "mlp.fc2", "fc2", "ffn.lin2", "ffn_output",
                    "mlp.dense_4h_to_h", "mlp")
# The module fed by the final representation, when the model names no output embeddings.
HEAD_NAMES = ("classifier", "score", "lm_head")
# Float attributes some modules read instead of an nn.Dropout module.
DROPOUT_ATTRIBUTES = ("attention_dropout", "dropout", "hidden_dropout")
# Float attributes of other training-time noise (a mixture-of-experts router's jitter).
NOISE_ATTRIBUTES = ("jitter_noise",)


def _child(module: nn.Module, name: str) -> nn.Module | None:
    child = getattr(module, name, None)
    return child if isinstance(child, nn.Module) else None


def separate_projections(module: nn.Module) -> list[nn.Module] | None:
    """Three projections named alike: a query child ``<stem><suffix>`` with its key and value partners."""
    for name, _ in module.named_children():
        for query, key, value in PROJECTION_STEMS:
            if name.startswith(query):
                suffix = name[len(query):]
                partners = [_child(module, key + suffix), _child(module, value + suffix)]
                if all(partner is not None for partner in partners):
                    return [getattr(module, name), *partners]
    return None


def fused_projection(module: nn.Module) -> list[nn.Module] | None:
    """One projection for queries, keys and values (GPT-2's c_attn, GPT-NeoX/Falcon/Bloom's query_key_value)."""
    for name in FUSED_PROJECTIONS:
        if _child(module, name) is not None:
            return [getattr(module, name)]
    return None


# The shapes of attention hkft recognises, tried in order.
ATTENTION_SHAPES = (separate_projections, fused_projection)


def input_projections(module: nn.Module) -> list[nn.Module] | None:
    """The projections that read an attention module's input, if ``module`` has a known shape."""
    for shape in ATTENTION_SHAPES:
        projections = shape(module)
        if projections:
            return projections
    return None


def transformers_model(model: nn.Module) -> PreTrainedModel:
    """The PreTrainedModel inside a peft (or other) wrapper."""
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            return module
    raise ModelError(f"{type(model).__name__} is not a transformers model: hkft's dropout needs one")


@dataclass(frozen=True)
class LayerStack:
    """The transformer blocks of a model. ``applications`` counts the blocks one forward runs: one per
    block, or more when blocks are shared (ALBERT runs one block ``num_hidden_layers`` times);
    `dropout.layers` indexes applications."""

    blocks: tuple[nn.Module, ...]
    applications: int

    @property
    def shared(self) -> bool:
        return self.applications != len(self.blocks)


def _holds_attention(module: nn.Module) -> bool:
    return any(input_projections(sub) for sub in module.modules() if sub is not module)


def layer_stack(model: nn.Module) -> LayerStack:
    """The ModuleList with one entry per hidden layer; else shared blocks: ModuleLists of blocks held
    by the entries of an outer ModuleList of groups (ALBERT), a group run per hidden layer."""
    config = transformers_model(model).config
    count = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    lists = [module for module in model.modules() if isinstance(module, nn.ModuleList) and len(module)]
    for module in lists:
        if len(module) == count:
            return LayerStack(tuple(module), count)
    holders = [module for module in lists if all(_holds_attention(block) for block in module)]
    innermost = [group for group in holders if not any(other is not group and _within(other, group) for other in holders)]
    # Shared blocks: groups of blocks (an outer ModuleList whose every entry holds a list of blocks),
    # one group run per hidden layer.
    groups = [outer for outer in holders if outer not in innermost
              and all(any(_within(inner, entry) for inner in innermost) for entry in outer)]
    if count and innermost and groups and count % len(groups[0]) == 0:
        return LayerStack(tuple(block for inner in innermost for block in inner), count * len(innermost[0]))
    raise ModelError(
        f"cannot find the {count} transformer layers of {type(transformers_model(model)).__name__}",
        "hkft's dropout needs a ModuleList of blocks whose attention has query/key/value projections",
    )


def _within(inner: nn.Module, outer: nn.Module) -> bool:
    return any(module is inner for module in outer.modules())


def transformer_layers(model: nn.Module) -> tuple[nn.Module, ...]:
    """The distinct transformer blocks, in order (see `layer_stack` for shared blocks)."""
    return layer_stack(model).blocks


def attention_module(layer: nn.Module) -> nn.Module:
    for module in layer.modules():
        if module is not layer and input_projections(module):
            return module
    raise ModelError(
        f"cannot find the attention module in {type(layer).__name__}",
        f"expected a submodule with {', '.join(shape.__name__.replace('_', ' ') for shape in ATTENTION_SHAPES)}",
    )


def attention_input_projections(layer: nn.Module) -> list[nn.Module]:
    return input_projections(attention_module(layer)) or []


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


def reads_token_sequence(model: nn.Module) -> bool:
    """Whether the head reads every token (a language-model head) rather than one vector per example."""
    return isinstance(transformers_model(model).get_output_embeddings(), nn.Module)


def is_causal_model(model: nn.Module) -> bool:
    """The attention module's own ``is_causal``; a module without one (Bloom) is causal when its family
    is a causal language model."""
    causal = getattr(attention_module(layer_stack(model).blocks[0]), "is_causal", None)
    if causal is not None:
        return bool(causal)
    return getattr(transformers_model(model).config, "model_type", None) in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def uses_attention_interface(model: nn.Module) -> bool:
    """Whether the family computes attention through transformers' attention-function registry."""
    return bool(getattr(transformers_model(model), "_supports_attention_backend", False))


def has_training_noise(model: nn.Module) -> bool:
    """Any randomness of the model's own in training: a dropout module or rate, a router's jitter.
    peft's ``lora_dropout`` counts too."""
    for module in model.modules():
        if isinstance(module, nn.Dropout) and module.p > 0:
            return True
        if any(_positive_float(module, name) for name in NOISE_ATTRIBUTES):
            return True
    return False


def _positive_float(module: nn.Module, name: str) -> bool:
    value = getattr(module, name, None)
    return isinstance(value, float) and value > 0


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


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """The eval-mode model (the `js` target, the packing check): hkft's masks, the model's own
    dropout and peft's lora_dropout all off. Each module's mode is put back afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
