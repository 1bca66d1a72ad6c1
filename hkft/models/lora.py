"""LoRA wrapping: which modules get an adapter (peft's defaults, else the attention's query and value), and the peft model."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from peft import (
    EvaConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    initialize_lora_eva_weights,
    prepare_model_for_kbit_training,
)
from peft import LoraConfig as PeftLoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn
from transformers import (
    PreTrainedModel,
)
from transformers.pytorch_utils import Conv1D

from hkft.config.schema import LoraConfig
from hkft.errors import ModelError, first_line
from hkft.models.loading import classifier_head_names
from hkft.tasks.registry import task_for

# LoRA targets when lora.target_modules is "auto": peft's default for the model type
# (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING), else the attention query and value
# projections, as in the LoRA and HiddenKey papers: a query/value pair (query/value, q_proj/v_proj,
# q_lin/v_lin, query_proj/value_proj, q/v), else a fused QKV projection (GPT-2's c_attn, ...).
QUERY_VALUE_STEMS = (("query", "value"), ("q", "v"))
FUSED_QKV = ("c_attn", "query_key_value", "Wqkv", "qkv_proj", "qkv")
# Model types whose peft default adapts more than the attention's query and value (Phi its MLP's
# fc1/fc2, BTLM its output projection c_proj, Nemotron-H the key and output projections too, RWKV
# its key/receptance/output). hkft keeps the papers' query/value rule for them: "auto" means the same
# kind of adapter in every family, so methods compare alike, and a preset keeps its trainable
# parameters. tests/test_modeling.py fails when peft's table gains such an entry.
BEYOND_QUERY_VALUE = frozenset({"btlm", "nemotron_h", "phi", "rwkv", "rwkv7"})


def adaptable_module_names(model: nn.Module) -> list[str]:
    """Short names of the leaf Linear/Conv1D layers of the body, the layers LoRA can target."""
    heads = set(classifier_head_names(model)) | {"lm_head"}
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, Conv1D)) and name.split(".", 1)[0] not in heads
    }
    return sorted(names)


def default_target_modules(model: nn.Module) -> list[str] | str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    peft_default = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    if peft_default is not None and model_type not in BEYOND_QUERY_VALUE:
        return peft_default if isinstance(peft_default, str) else list(peft_default)
    return query_value_targets(model)


def query_value_targets(model: nn.Module) -> list[str]:
    available = adaptable_module_names(model)
    for name in available:
        for query, value in QUERY_VALUE_STEMS:
            if name == query or name.startswith(query + "_"):
                partner = value + name[len(query):]
                if partner in available:
                    return [name, partner]
    fused = [name for name in FUSED_QKV if name in available]
    if fused:
        return fused[:1]
    raise ModelError(
        f"no default LoRA targets for {type(model).__name__}",
        f"set lora.target_modules to some of: {', '.join(available) or '(no Linear layers found)'}",
    )


def _lora_targets(model: nn.Module, requested: list[str] | str) -> list[str] | str:
    if requested == "auto":
        return default_target_modules(model)
    if requested == "all-linear":
        return requested
    layers = [name for name, module in model.named_modules() if isinstance(module, (nn.Linear, Conv1D))]
    unknown = [key for key in requested if not any(map(adapted_by([key]), layers))]
    if unknown:
        raise ModelError(
            f"lora.target_modules: {', '.join(unknown)} not found among the Linear/Conv1D layers of {type(model).__name__}",
            f"available: {', '.join(adaptable_module_names(model))}",
        )
    return list(requested)


def adapted_by(targets: list[str] | str) -> Callable[[str], bool]:
    """Whether peft adapts the module at a path for ``targets`` (a module name or dotted suffix of its
    path, or a regular expression of the whole path): peft's own matching."""
    config = PeftLoraConfig(target_modules=targets)
    return lambda path: bool(check_target_module_exists(config, path))


def _check_layers(model: nn.Module, layers: list[int] | None) -> None:
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if not layers or not count:
        return
    outside = [index for index in layers if not 0 <= index < count]
    if outside:
        raise ModelError(
            f"lora.layers_to_transform: {', '.join(map(str, outside))} out of range",
            f"{type(model).__name__} has layers 0-{count - 1}",
        )


def _uses_conv1d(model: nn.Module, targets: list[str] | str) -> bool:
    adapted = (lambda path: True) if targets == "all-linear" else adapted_by(targets)
    return any(isinstance(module, Conv1D) and adapted(name) for name, module in model.named_modules())


def build_lora_model(
    model: PreTrainedModel,
    lora: LoraConfig,
    task: str,
    *,
    quantized: bool,
    gradient_checkpointing: bool,
    eva_batches: Iterable[dict] | None = None,
) -> PeftModel:
    """``eva_batches``: the training batches EVA (``lora.init: eva``) computes its SVD over (plain
    dicts, a sized iterable: peft cycles through it until the SVD converges)."""
    targets = _lora_targets(model, lora.target_modules)
    _check_layers(model, lora.layers_to_transform)
    spec = task_for(task)
    heads = [] if spec.language_model else classifier_head_names(model)
    if quantized:
        # checkpointing is switched on below, with transformers 5's name for it (peft calls the deprecated one)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=targets,
        bias=lora.bias,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        init_lora_weights=True if lora.init == "default" else lora.init,
        # A label mask selects tokens: only a causal LM's labels are per token.
        eva_config=EvaConfig(use_label_mask=spec.language_model) if lora.init == "eva" else None,
        layers_to_transform=lora.layers_to_transform,
        modules_to_save=sorted(set(heads) | set(lora.modules_to_save)) or None,
        fan_in_fan_out=_uses_conv1d(model, targets),
        task_type=spec.peft_task_type,
    )
    try:
        peft_model = get_peft_model(model, config, low_cpu_mem_usage=lora.init == "eva")  # EVA initialises A itself
        if lora.init == "eva":
            if eva_batches is None:
                raise ModelError("lora.init eva needs the training data to initialise from")
            initialize_lora_eva_weights(peft_model, eva_batches, show_progress_bar=False)
        return peft_model
    except ValueError as err:
        raise ModelError(f"lora: {first_line(err)}", "check the lora: section") from None


def initial_adapter(model: PeftModel, lora: LoraConfig) -> dict[str, torch.Tensor] | None:
    """The adapter as PiSSA or OLoRA initialised it (None for the other initialisations): what
    `save_lora_adapter` converts the trained adapter against. Rebuilding the model on a resume
    gives the same one (same base, same seed)."""
    if not lora.mutates_base:
        return None
    return {name: tensor.detach().clone() for name, tensor in get_peft_model_state_dict(model).items()}
