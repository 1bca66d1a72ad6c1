"""Adapter files: saving an adapter with its facts, checking it belongs to the base, loading it back."""

from __future__ import annotations

import hashlib
import tempfile
import warnings
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download
from peft import PeftModel, get_peft_model_state_dict
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import (
    PreTrainedTokenizerBase,
)

from hkft.config.schema import ModelConfig
from hkft.errors import ModelError, first_line
from hkft.models.loading import ensure_pad_token, load_base_model, load_tokenizer

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # what peft saves, newest format first


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
        raise ModelError(f"{adapter_dir}: the adapter weights are damaged ({first_line(err)})",
                         "the file was cut short or overwritten; restore it or re-run training") from None
    except (OSError, ValueError, RuntimeError) as err:
        raise ModelError(f"cannot load the adapter in {adapter_dir} onto {cfg.name}: {first_line(err)}") from None
