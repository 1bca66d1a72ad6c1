"""`hkft inspect`: what hkft will do with a model, from its config alone.

The model is built on the meta device (no weight is read or downloaded), wrapped with LoRA and
instrumented with the dropout plan exactly as `hkft train` does it; whatever would stop training
stops here, as one line. The report is plain data (the CLI draws it, `--json` prints it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypedDict

from peft.tuners.lora import LoraLayer
from torch import nn

from hkft.config import HkftConfig, load_config, validate_config
from hkft.config.loading import apply_overrides, shipped_preset
from hkft.config.tasks import task_names
from hkft.dropout import METHODS, architecture
from hkft.dropout.config import apply_dropout, plan_from_config
from hkft.dropout.plan import patterns_for
from hkft.errors import ConfigError, ModelError
from hkft.models.export import gguf_export_fact
from hkft.models.gguf import gguf_config_source
from hkft.models.loading import (
    model_skeleton,
    read_model_config,
    resolve_model_path,
    saved_as_causal_lm,
)
from hkft.models.lora import build_lora_model, default_target_modules
from hkft.tasks.registry import task_for


class LoraReport(TypedDict):
    targets: list[str] | str
    adapted_modules: int
    r: int
    alpha: float
    init: str
    use_dora: bool
    use_rslora: bool
    loraplus_lr_ratio: float | None
    modules_to_save: list[str]


# What `hkft inspect` shows, as tables or (--json) as this JSON; "class" is a keyword, hence this form.
InspectionReport = TypedDict("InspectionReport", {
    "model": str, "path": str, "model_type": str, "class": str, "task": str, "task_inferred": bool,
    "num_labels": int | None, "kind": str, "layers": int, "layer_stack": str, "attn_implementation": str,
    "quantization": str, "gguf_export": str, "positions": dict[str, dict[str, Any]], "methods": dict[str, dict[str, Any]],
    "dropout": dict[str, Any], "lora": LoraReport, "parameters": dict[str, int],
})
# A bare model has no data to count labels from.
ASSUMED_LABELS = 2


def is_preset(target: str) -> bool:
    """A YAML file or a shipped preset's name; anything else (a directory, a hub id) is a model."""
    path = Path(target)
    if path.is_dir():
        return False
    return path.is_file() or shipped_preset(target) is not None


def inspection_config(target: str, overrides: list[str], task: str | None) -> tuple[HkftConfig, bool]:
    """The preset, or hkft's defaults for a bare model; and whether the task was given (else inferred)."""
    if task is not None and task not in task_names():
        raise ConfigError(f"--task {task!r} is not a task", f"choose one of {', '.join(task_names())}")
    overrides = [*overrides, *([f"model.task={task}"] if task else [])]
    if is_preset(target):
        return load_config(target, overrides, overrides_from="--set"), True
    # data.train is required by the schema; inspect reads no data.
    spec = {"model": {"name": target}, "data": {"train": "(not read by hkft inspect)"}}
    return validate_config(apply_overrides(spec, overrides), source=target, overrides=overrides,
                           overrides_from="--set"), task is not None or any(
        override.startswith("model.task=") for override in overrides
    )


def inspection_path(cfg: HkftConfig) -> str:
    """Where the model's config is read: train's model directory, but for a GGUF base not converted
    yet the GGUF file itself (its metadata), so that inspect dequantizes nothing."""
    if cfg.model.gguf_file:
        return gguf_config_source(cfg.model.name, cfg.model.gguf_file)
    return resolve_model_path(cfg.model.name, cfg.model.revision)


def inferred_task(path: str, cfg: HkftConfig) -> str:
    """A checkpoint saved as a language model is inspected as one; anything else as a classifier."""
    return "causal-lm" if saved_as_causal_lm(read_model_config(cfg.model, path)) else "classification"


def inspect_model(target: str, overrides: list[str], task: str | None = None) -> InspectionReport:
    cfg, task_given = inspection_config(target, overrides, task)
    path = inspection_path(cfg)
    if not task_given:
        cfg.model.task = inferred_task(path, cfg)
    task, spec = cfg.model.task, task_for(cfg.model.task)
    labels = None if spec.language_model else spec.model_kwargs(cfg.model.num_labels or ASSUMED_LABELS)["num_labels"]
    skeleton = model_skeleton(cfg.model, path, **({} if labels is None else {"num_labels": labels}))
    # The count does not depend on the initialisation; PiSSA's SVD cannot run on meta tensors, EVA's needs data.
    targets = lora_targets(skeleton, cfg)  # before peft wraps the skeleton in place
    lora = cfg.lora.model_copy(update={"init": "default"})
    model = build_lora_model(skeleton, lora, task, quantized=False, gradient_checkpointing=False)
    trainable, total = model.get_nb_trainable_parameters()
    try:
        controller = apply_dropout(model, cfg.dropout, seed=0, packed=cfg.data.packing)
    except ModelError as err:
        raise ModelError(
            f"{cfg.model.name} ({skeleton.config.model_type}) is not supported by hkft's dropout, because {err}",
            "see the README's 'Add an architecture'",
        ) from None
    stack = architecture.layer_stack(model)
    decoder = architecture.is_causal_model(model)
    return InspectionReport(**{
        "model": cfg.model.name,
        "path": path,
        "model_type": skeleton.config.model_type,
        "class": type(skeleton).__name__,
        "task": task,
        "task_inferred": not task_given,
        "num_labels": labels,
        "kind": "decoder (causal attention)" if decoder else "encoder",
        "layers": stack.applications,
        "layer_stack": layer_stack_path(architecture.transformers_model(model), stack),
        "attn_implementation": cfg.model.attn_implementation,
        "quantization": cfg.model.quantization,
        "gguf_export": gguf_export_fact(task, type(skeleton).__name__),
        "positions": available_positions(model, dropping_block(stack, controller.layers), task),
        "methods": method_layers(cfg, stack.applications, decoder),
        "dropout": {"method": cfg.dropout.method, **controller.describe()},
        "lora": LoraReport(**{
            "targets": targets,
            "adapted_modules": sum(isinstance(module, LoraLayer) for module in model.modules()),
            "r": cfg.lora.r,
            "alpha": cfg.lora.alpha,
            "init": cfg.lora.init,
            "use_dora": cfg.lora.use_dora,
            "use_rslora": cfg.lora.use_rslora,
            "loraplus_lr_ratio": cfg.lora.loraplus_lr_ratio,
            "modules_to_save": sorted(set(model.peft_config["default"].modules_to_save or [])),
        }),
        "parameters": {"total": total, "trainable": trainable},
    })


def lora_targets(skeleton: nn.Module, cfg: HkftConfig) -> list[str] | str:
    requested = cfg.lora.target_modules
    return requested if requested != "auto" else default_target_modules(skeleton)


def module_path(scope: nn.Module, module: nn.Module) -> str:
    """The module's name inside ``scope``."""
    return next((name for name, candidate in scope.named_modules() if candidate is module), type(module).__name__)


def layer_stack_path(scope: nn.Module, stack: architecture.LayerStack) -> str:
    """Where the blocks live; a shared block says how often one forward runs it (ALBERT)."""
    path = module_path(scope, stack.blocks[0]).rsplit(".", 1)[0]
    if stack.shared:
        return f"{path} ({len(stack.blocks)} shared block(s) run {stack.applications} times)"
    return path


def dropping_block(stack: architecture.LayerStack, applications: tuple[int, ...]) -> nn.Module:
    """The block that runs the first dropping application (shared blocks repeat in order)."""
    first = applications[0] if applications else 0
    return stack.blocks[first % len(stack.blocks)]


def available_positions(model: nn.Module, layer: nn.Module, task: str) -> dict[str, dict[str, Any]]:
    """Where each dropout position would sit, or why it cannot be placed: the layered positions by
    their name inside a (dropping) transformer layer, the others inside the model."""
    base = architecture.transformers_model(model)
    finders = {
        "attention_logits": (layer, lambda: architecture.attention_module(layer)),
        "attention_weights": (layer, lambda: architecture.attention_module(layer)),
        "hidden": (layer, lambda: architecture.ffn_output_module(layer)),
        "input": (base, base.get_input_embeddings),
        "output": (base, lambda: architecture.head_module(model)),
    }
    positions = {}
    for name, (scope, find) in finders.items():
        try:
            module = find()
        except ModelError as err:
            positions[name] = {"error": str(err)}
            continue
        patterns = list(patterns_for(name, head_reads_tokens=task_for(task).language_model))
        positions[name] = {"module": module_path(scope, module), "class": type(module).__name__, "patterns": patterns}
    return positions


def method_layers(cfg: HkftConfig, num_layers: int, decoder: bool) -> dict[str, dict[str, Any]]:
    """Each named method at the preset's rate, KL weight and layer selection."""
    methods = {}
    for method in METHODS:
        plan = plan_from_config(cfg.dropout.model_copy(update={"method": method, "positions": {}}))
        drops = bool(plan.active_positions or plan.model_dropout or plan.neftune_alpha)
        methods[method] = {
            "positions": {name: f"{drop.pattern} p={drop.rate:g}" for name, drop in plan.active_positions.items()},
            "layers": list(plan.layer_indices(num_layers, decoder)) if plan.active_positions or plan.model_dropout else [],
            "compensation": plan.compensation if drops else None,
            "neftune_alpha": plan.neftune_alpha or None,
        }
    return methods


def layer_ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    ranges: list[list[int]] = []
    for index in indices:
        if ranges and index == ranges[-1][1] + 1:
            ranges[-1][1] = index
        else:
            ranges.append([index, index])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges) or "-"
