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

from hkft.config.schema import ModelConfig
from hkft.errors import ModelError
from hkft.models import export
from hkft.models.adapters import (
    check_same_base,
    load_adapter_model,
    load_adapter_tokenizer,
)
from hkft.models.loading import DTYPES, read_model_config, resolve_model_path
from hkft.run.directory import (
    READER_BUSY_HINT,
    check_run_location,
    find_adapter_dir,
    owned,
    read_sidecar,
    run_root_of,
)
from hkft.run.files import atomic_dir, atomic_write_json, check_can_create_dir

CHECK_TEXTS = ("The quick brown fox jumps over the lazy dog.", "LoRA adapters merge into their base model.",
               "A third, shorter one.")
# Largest acceptable |logit difference| between the merged and the adapter model, per unit of the
# largest |logit| (at least 1): a 7B model's vocabulary logits of ~20 carry proportionally larger
# rounding differences than a classifier's logits of ~1.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 5e-2}


# Written beside the merged model: what was merged, and which files the merge wrote (what a later
# `--overwrite` replaces; anything else in the folder is the user's and is kept).
MERGE_RECORD = "hkft_merge.json"


@dataclass(frozen=True)
class MergeReport:
    output_dir: Path
    max_abs_diff: float
    dtype: str
    gguf_file: Path | None = None  # --format gguf: the one file llama.cpp loads


def _model_config(adapter_dir: Path, facts: dict) -> ModelConfig:
    """The base model as trained (from hkft's sidecar), or as peft recorded it."""
    if facts.get("model"):
        return ModelConfig.model_validate({**facts["model"], "quantization": "none"})
    path = adapter_dir / "adapter_config.json"
    try:
        peft_config = json.loads(path.read_text(encoding="utf-8"))
        name = facts.get("base_model") or peft_config["base_model_name_or_path"]
    except (ValueError, TypeError, KeyError):
        raise ModelError(f"{path} is not a peft adapter config (no base_model_name_or_path in valid JSON)",
                         "the adapter directory is damaged; restore it or re-run training") from None
    task = "causal-lm" if peft_config.get("task_type") == "CAUSAL_LM" else "classification"
    return ModelConfig(name=name, task=task)


def _check_output_dir(output_dir: Path, overwrite: bool, keep: list[Path]) -> list[str]:
    """Refuses an output that is not ours to replace; returns the names in it that are not an
    earlier merge's (the user's own files), which the new merge keeps."""
    check_run_location(output_dir, "--output", "merge output", "merged")
    check_can_create_dir(output_dir, "--output")
    if output_dir.exists() and not output_dir.is_dir():
        raise ModelError(f"{output_dir} exists and is not a directory", "choose another --output")
    for path in keep:
        if path.resolve().is_relative_to(output_dir.resolve()):
            raise ModelError(f"--output {output_dir} would replace {path}", "choose an output directory outside it")
    present = sorted(entry.name for entry in output_dir.iterdir()) if output_dir.is_dir() else []
    if not present:
        return []
    if not overwrite:
        raise ModelError(f"{output_dir} already exists and is not empty", "choose another --output or pass --overwrite")
    merged = _earlier_merge(output_dir)
    if merged is None:
        raise ModelError(
            f"{output_dir} is not a model merged by hkft (it holds {', '.join(present[:3])}{' ...' if len(present) > 3 else ''}): "
            "--overwrite replaces only an earlier merge",
            "choose a new or empty --output folder",
        )
    return [name for name in present if name not in merged]


def _earlier_merge(output_dir: Path) -> set[str] | None:
    """The files an earlier merge wrote into ``output_dir`` (its MERGE_RECORD included), or None."""
    try:
        record = json.loads((output_dir / MERGE_RECORD).read_text(encoding="utf-8"))
        return {*record["files"], MERGE_RECORD}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def merge_format(fmt: str, gguf_type: str | None) -> str | None:
    """The GGUF type to write (f16 by default), or None for a transformers folder."""
    if fmt not in ("hf", "gguf"):
        raise ModelError(f"--format {fmt!r} is not supported", "choose hf (a transformers folder) or gguf (llama.cpp)")
    if fmt == "hf" and gguf_type is not None:
        raise ModelError("--gguf-type applies to --format gguf", "add --format gguf, or drop --gguf-type")
    return (gguf_type or "f16") if fmt == "gguf" else None


@torch.no_grad()
def _logits(model, encoded) -> torch.Tensor:
    """Classifier logits, or a causal LM's logits at the real (unpadded) positions."""
    model.eval()
    logits = model(**encoded.to(next(model.parameters()).device)).logits.float().cpu()
    return logits[encoded["attention_mask"].bool().cpu()] if logits.dim() == 3 else logits


def merge_adapter(
    adapter_dir: Path,
    output_dir: Path,
    dtype: str = "float32",
    check_inputs: list[str] | None = None,
    tolerance: float | None = None,
    *,
    overwrite: bool = False,
    gguf_type: str | None = None,
) -> MergeReport:
    """``adapter_dir`` may also be a run directory; ``tolerance`` (absolute) replaces the scaled default;
    ``gguf_type`` writes one GGUF file of that type (llama.cpp's converter) instead of a transformers folder.
    The run is locked while it is read: one that a training still writes is refused, never half read."""
    if dtype not in DTYPES:
        raise ModelError(f"--dtype {dtype!r} is not supported", f"choose one of {', '.join(DTYPES)}")
    if gguf_type is not None:
        export.check_gguf_type(gguf_type)
    with owned(run_root_of(Path(adapter_dir)), READER_BUSY_HINT, required=False):
        return _merge(Path(adapter_dir), Path(output_dir), dtype, check_inputs, tolerance, overwrite, gguf_type)


def _merge(
    adapter_dir: Path, output_dir: Path, dtype: str, check_inputs: list[str] | None, tolerance: float | None, overwrite: bool,
    gguf_type: str | None,
) -> MergeReport:
    adapter_dir = find_adapter_dir(adapter_dir)
    facts = read_sidecar(adapter_dir)
    cfg = _model_config(adapter_dir, facts)
    base_path = resolve_model_path(cfg.name, cfg.revision, cfg.gguf_file)
    local_base = [Path(base_path)] if Path(base_path).is_dir() else []
    users_files = _check_output_dir(output_dir, overwrite, [adapter_dir, *local_base])
    check_same_base(base_path, adapter_dir, facts.get("base_fingerprint"))
    converter = export.converter_for(cfg.task, read_model_config(cfg, base_path).model_type) if gguf_type else None

    tokenizer = load_adapter_tokenizer(adapter_dir, base_path, cfg.task)
    model = load_adapter_model(adapter_dir, cfg, facts, base_path, tokenizer, full_precision=True, dtype=torch.float32)
    texts = list(check_inputs or CHECK_TEXTS)
    encoded = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=128)
    expected = _logits(model, encoded)
    merged = model.merge_and_unload(safe_merge=True).to(DTYPES[dtype])
    difference = (_logits(merged, encoded) - expected).abs().max().item()
    limit = tolerance if tolerance is not None else TOLERANCE[DTYPES[dtype]] * max(1.0, expected.abs().max().item())
    if not difference <= limit:
        raise ModelError(
            f"the merged model differs from the adapter model by {difference:.3g} (tolerance {limit:.3g})",
            "nothing was written" + ("; merge with --dtype float32" if dtype != "float32" else ""),
        )

    gguf_file = None
    with atomic_dir(output_dir, keep=users_files) as staging:
        if converter is None:
            merged.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            how = {}
        else:
            gguf_file = output_dir / export.write_gguf(merged, tokenizer, staging, gguf_type, converter).name
            how = {"format": "gguf", "gguf_type": gguf_type, "converter": f"llama-cpp-python {export.LLAMA_CPP_PYTHON}"}
        written = sorted(entry.name for entry in staging.iterdir())
        atomic_write_json(staging / MERGE_RECORD, {"adapter": str(adapter_dir), "dtype": dtype, "max_abs_diff": difference,
                                                   **how, "files": written})
    return MergeReport(output_dir, difference, dtype, gguf_file)
