"""Merge a LoRA adapter into a standalone model that plain transformers loads.

Never into 4/8-bit weights: the base is reloaded in full precision from its original checkpoint
(even when training used a quantized base), the merge is computed in float32, and the result is
cast once to the requested dtype. The merged model is then checked against the adapter model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel

from hkft.config.schema import ModelConfig
from hkft.errors import ModelError
from hkft.io import atomic_dir
from hkft.modeling import DTYPES, base_fingerprint, ensure_pad_token, load_base_model, load_tokenizer, resolve_model_path
from hkft.rundir import find_adapter_dir, read_sidecar

CHECK_TEXTS = ("The quick brown fox jumps over the lazy dog.", "LoRA adapters merge into their base model.", "A third, shorter one.")
# Largest acceptable |logit difference| between the merged and the adapter model.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 5e-2}


@dataclass(frozen=True)
class MergeReport:
    output_dir: Path
    max_abs_diff: float
    dtype: str


def _model_config(adapter_dir: Path, facts: dict) -> ModelConfig:
    """The base model as trained (from hkft's sidecar), or as peft recorded it."""
    if facts.get("model"):
        return ModelConfig.model_validate({**facts["model"], "quantization": "none"})
    peft_config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    task = "causal-lm" if peft_config.get("task_type") == "CAUSAL_LM" else "classification"
    return ModelConfig(name=peft_config["base_model_name_or_path"], task=task)


@torch.no_grad()
def _logits(model, tokenizer, texts) -> torch.Tensor:
    model.eval()
    encoded = tokenizer(list(texts), return_tensors="pt", padding=True)
    return model(**encoded.to(next(model.parameters()).device)).logits.float()


def merge_adapter(target: Path, output_dir: Path, dtype: str = "float32", *, overwrite: bool = False) -> MergeReport:
    if dtype not in DTYPES:
        raise ModelError(f"--dtype {dtype!r} is not supported", f"choose one of {', '.join(DTYPES)}")
    adapter_dir = find_adapter_dir(Path(target))
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise ModelError(f"{output_dir} already exists and is not empty", "choose another --output or pass --overwrite")
    facts = read_sidecar(adapter_dir)
    cfg = _model_config(adapter_dir, facts)
    base_path = resolve_model_path(cfg.name, cfg.revision)
    if facts.get("base_fingerprint") and base_fingerprint(base_path) != facts["base_fingerprint"]:
        raise ModelError(f"the base model at {base_path} is not the one {adapter_dir} was trained on (its config.json changed)")

    tokenizer = load_tokenizer(str(adapter_dir), cfg.task)
    base = load_base_model(cfg, base_path, facts.get("num_labels"), full_precision=True, dtype=torch.float32)
    ensure_pad_token(base, tokenizer)
    if facts.get("label_names"):
        base.config.id2label = dict(enumerate(facts["label_names"]))
        base.config.label2id = {name: index for index, name in enumerate(facts["label_names"])}
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    expected = _logits(model, tokenizer, CHECK_TEXTS)
    merged = model.merge_and_unload().to(DTYPES[dtype])
    difference = (_logits(merged, tokenizer, CHECK_TEXTS) - expected).abs().max().item()
    tolerance = TOLERANCE[DTYPES[dtype]]
    if not difference <= tolerance:
        raise ModelError(f"the merged model differs from the adapter model by {difference:.3g} (tolerance {tolerance:g})")

    with atomic_dir(output_dir) as staging:
        merged.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    return MergeReport(output_dir, difference, dtype)
