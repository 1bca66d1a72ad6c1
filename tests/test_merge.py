"""Merging adapters into standalone models, checked against peft's own loading of the adapter."""

import importlib.util
import json
import shutil

import pytest
import torch
from checkpoints import memorise_texts, save_tiny_model
from peft import PeftModel
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from hkft.config.schema import LoraConfig, ModelConfig
from hkft.errors import ModelError
from hkft.models.adapters import base_fingerprint
from hkft.models.loading import load_base_model, load_tokenizer, resolve_model_path
from hkft.models.lora import build_lora_model
from hkft.models.merge import merge_adapter
from hkft.run.directory import write_sidecar

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
SENTENCES = ["The kettle is great.", "I would not call the tent comfortable.", "Broken lamp.", "A fine phone, really."]
LABELS = ["negative", "positive"]


def randomise_lora(model, std: float = 0.05) -> None:
    """LoRA starts as a no-op (B = 0); random B (and head) makes the merge change the model."""
    torch.manual_seed(1)
    for name, parameter in model.named_parameters():
        if "lora_B" in name or "modules_to_save" in name:
            torch.nn.init.normal_(parameter, std=std)


def save_adapter(model, tokenizer, directory, cfg: ModelConfig, base_path: str, label_names=None):
    """An adapter directory as `hkft train` leaves it: peft files, tokenizer and hkft's sidecar."""
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    write_sidecar(directory, {
        "task": cfg.task,
        "num_labels": len(label_names) if label_names else None,
        "label_names": label_names,
        "base_model": cfg.name,
        "base_fingerprint": base_fingerprint(base_path),
        "model": cfg.model_dump(mode="json"),
    })
    return directory


@pytest.fixture(scope="module")
def minilm_adapter(tmp_path_factory):
    path = resolve_model_path(MINILM)
    cfg = ModelConfig(name=MINILM)
    torch.manual_seed(0)
    model = build_lora_model(load_base_model(cfg, path, 2), LoraConfig(), "classification", quantized=False,
                             gradient_checkpointing=False)
    randomise_lora(model)
    return save_adapter(model, load_tokenizer(path, "classification"), tmp_path_factory.mktemp("minilm") / "adapter",
                        cfg, path, LABELS)


def minilm_classifier():
    return AutoModelForSequenceClassification.from_pretrained(resolve_model_path(MINILM), num_labels=2)


def adapter_logits(base, adapter_dir, inputs, *, disabled: bool = False) -> torch.Tensor:
    """The reference: plain transformers base + PeftModel.from_pretrained, no hkft code."""
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        if disabled:
            with model.disable_adapter():
                return model(**inputs).logits
        return model(**inputs).logits


def test_merged_classifier_loads_with_transformers_alone_and_matches_the_adapter(minilm_adapter, tmp_path):
    report = merge_adapter(minilm_adapter, tmp_path / "merged")
    assert report.output_dir == tmp_path / "merged" and report.dtype == "float32" and report.max_abs_diff <= 1e-4

    inputs = AutoTokenizer.from_pretrained(tmp_path / "merged")(SENTENCES, return_tensors="pt", padding=True)
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        merged_logits = merged(**inputs).logits
    assert torch.allclose(merged_logits, adapter_logits(minilm_classifier(), minilm_adapter, inputs), atol=1e-4)
    without_adapter = adapter_logits(minilm_classifier(), minilm_adapter, inputs, disabled=True)
    assert not torch.allclose(merged_logits, without_adapter, atol=1e-2)

    assert merged.config.id2label == dict(enumerate(LABELS))
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as weights:
        assert not any("lora" in key or "modules_to_save" in key for key in weights.keys())
    assert not any(path.name.startswith(".tmp-") for path in tmp_path.iterdir())


def test_merge_to_bfloat16_casts_once_after_merging(minilm_adapter, tmp_path):
    report = merge_adapter(minilm_adapter, tmp_path / "bf16", dtype="bfloat16")
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "bf16", dtype="auto").eval()
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    inputs = AutoTokenizer.from_pretrained(tmp_path / "bf16")(SENTENCES, return_tensors="pt", padding=True)
    with torch.no_grad():
        merged_logits = merged(**inputs).logits.float()
    difference = (merged_logits - adapter_logits(minilm_classifier(), minilm_adapter, inputs)).abs().max().item()
    assert difference <= 5e-2
    assert report.max_abs_diff == pytest.approx(difference, abs=1e-3)


@pytest.fixture
def llama_dir(tmp_path):
    torch.manual_seed(0)
    return save_tiny_model("llama", tmp_path / "llama", memorise_texts())


def llama_adapter(model_dir, directory, **cfg_extra):
    cfg = ModelConfig(name=str(model_dir), task="causal-lm", **cfg_extra)
    torch.manual_seed(0)
    model = build_lora_model(load_base_model(cfg, str(model_dir), None), LoraConfig(), "causal-lm",
                             quantized=cfg.quantization != "none", gradient_checkpointing=False)
    randomise_lora(model)
    return save_adapter(model, load_tokenizer(str(model_dir), "causal-lm"), directory, cfg, str(model_dir))


def causal_logits_match(merged_dir, model_dir, adapter_dir) -> None:
    ids = AutoTokenizer.from_pretrained(merged_dir)(memorise_texts()[:3], return_tensors="pt", padding=True)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    with torch.no_grad():
        merged_logits = merged(**ids).logits
    expected = adapter_logits(AutoModelForCausalLM.from_pretrained(model_dir), adapter_dir, ids)
    disabled = adapter_logits(AutoModelForCausalLM.from_pretrained(model_dir), adapter_dir, ids, disabled=True)
    real = ids["attention_mask"].bool()
    assert torch.allclose(merged_logits[real], expected[real], atol=1e-4 * expected.abs().max().item())
    assert not torch.allclose(merged_logits[real], disabled[real], atol=1e-2)


def test_merged_causal_lm_matches_the_adapter_and_keeps_its_generation_config(llama_dir, tmp_path):
    adapter = llama_adapter(llama_dir, tmp_path / "adapter")
    merge_adapter(adapter, tmp_path / "merged")
    causal_logits_match(tmp_path / "merged", llama_dir, adapter)
    assert (tmp_path / "merged" / "generation_config.json").is_file()


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_adapter_trained_on_a_4bit_base_merges_into_a_full_precision_model(tmp_path):
    torch.manual_seed(0)
    model_dir = save_tiny_model("llama", tmp_path / "llama", memorise_texts(), hidden_size=128, intermediate_size=256,
                                head_dim=32)
    adapter = llama_adapter(model_dir, tmp_path / "adapter", quantization="4bit")
    merge_adapter(adapter, tmp_path / "merged")

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert {p.dtype for p in merged.parameters()} == {torch.float32}
    assert not any(type(m).__module__.startswith("bitsandbytes") for m in merged.modules())
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    causal_logits_match(tmp_path / "merged", model_dir, adapter)


def test_plain_peft_adapter_without_sidecar_or_tokenizer(llama_dir, tmp_path):
    model = build_lora_model(AutoModelForCausalLM.from_pretrained(llama_dir), LoraConfig(), "causal-lm",
                             quantized=False, gradient_checkpointing=False)
    randomise_lora(model)
    model.save_pretrained(tmp_path / "adapter")
    merge_adapter(tmp_path / "adapter", tmp_path / "merged")
    causal_logits_match(tmp_path / "merged", llama_dir, tmp_path / "adapter")


def test_run_directory_is_accepted(llama_dir, tmp_path):
    llama_adapter(llama_dir, tmp_path / "run" / "adapter")
    assert merge_adapter(tmp_path / "run", tmp_path / "merged").max_abs_diff <= 1e-4


# --- refusals -------------------------------------------------------------------------------------


def test_directory_without_adapter(tmp_path):
    with pytest.raises(ModelError, match="has no LoRA adapter \\(expected adapter_config.json"):
        merge_adapter(tmp_path, tmp_path / "out")


def test_changed_base_model_is_refused(llama_dir, tmp_path):
    adapter = llama_adapter(llama_dir, tmp_path / "adapter")
    config = json.loads((llama_dir / "config.json").read_text())
    (llama_dir / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-3}))
    with pytest.raises(ModelError, match="is not the one .* was trained on"):
        merge_adapter(adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_existing_output_needs_overwrite(llama_dir, tmp_path):
    adapter = llama_adapter(llama_dir, tmp_path / "adapter")
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "old.txt").write_text("keep me")
    with pytest.raises(ModelError, match="already exists and is not empty"):
        merge_adapter(adapter, tmp_path / "merged")
    assert (tmp_path / "merged" / "old.txt").is_file()
    with pytest.raises(ModelError, match="not a model merged by hkft"):  # --overwrite replaces a merge, not the user's files
        merge_adapter(adapter, tmp_path / "merged", overwrite=True)
    assert (tmp_path / "merged" / "old.txt").read_text() == "keep me"
    (tmp_path / "merged" / "old.txt").unlink()
    merge_adapter(adapter, tmp_path / "merged")
    merge_adapter(adapter, tmp_path / "merged", overwrite=True)
    assert (tmp_path / "merged" / "config.json").is_file()


def test_output_that_would_swallow_the_adapter_or_the_base_is_refused(llama_dir, tmp_path):
    adapter = llama_adapter(llama_dir, tmp_path / "run" / "adapter")
    for output in (tmp_path / "run", llama_dir):
        with pytest.raises(ModelError, match="would replace"):
            merge_adapter(adapter, output, overwrite=True)
    assert (adapter / "adapter_config.json").is_file() and (llama_dir / "config.json").is_file()


def test_difference_above_tolerance_writes_nothing(llama_dir, tmp_path):
    adapter = llama_adapter(llama_dir, tmp_path / "adapter")
    with pytest.raises(ModelError, match=r"by .* \(tolerance 0\) \(nothing was written; merge with --dtype float32\)"):
        merge_adapter(adapter, tmp_path / "merged", dtype="bfloat16", tolerance=0.0)
    assert not (tmp_path / "merged").exists()
    assert {p.name for p in tmp_path.iterdir()} == {"llama", "adapter"}  # no staging directory left behind


def test_unknown_dtype(llama_dir, tmp_path):
    with pytest.raises(ModelError, match="--dtype 'int4' is not supported"):
        merge_adapter(llama_adapter(llama_dir, tmp_path / "adapter"), tmp_path / "merged", dtype="int4")


def test_base_moved_away_is_a_clear_error(llama_dir, tmp_path):
    adapter = llama_adapter(llama_dir, tmp_path / "adapter")
    shutil.rmtree(llama_dir)
    with pytest.raises(ModelError, match="no such model directory"):
        merge_adapter(adapter, tmp_path / "merged")
