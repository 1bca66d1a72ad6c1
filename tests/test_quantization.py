"""4-bit and 8-bit bases on CPU where bitsandbytes supports them, clear errors where it does not."""

import json

import pytest
import torch
import yaml
from checkpoints import MEMORISE, memorise_texts, save_tiny_model, write_jsonl
from conftest import assert_one_line_error

pytest.importorskip("bitsandbytes")


def preset(tmp_path, model: str, task: str, data, **model_extra):
    spec = {
        "model": {"name": str(model), "task": task, **model_extra},
        "dropout": {"method": "hiddenkey", "rate": 0.1},
        "data": {"train": str(data), "test": str(data), "max_length": 32},
        "train": {"max_steps": 3, "batch_size": 4, "eval_strategy": "no", "logging_steps": 1},
        "eval": {"generate": False},
    }
    path = tmp_path / "preset.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_tiny_llama_trains_on_a_quantized_base_and_merges_in_full_precision(tmp_path, cli, bits):
    # bitsandbytes' CPU 4-bit kernels need layers of at least 64 x 64 (in blocks of 64)
    model_dir = save_tiny_model("llama", tmp_path / "llama", memorise_texts(), hidden_size=128, intermediate_size=256, head_dim=32)
    path = preset(tmp_path, model_dir, "causal-lm", write_jsonl(tmp_path / "d.jsonl", MEMORISE), quantization=bits)
    result = cli("train", path, "--output-dir", tmp_path / "run")
    assert result.exit_code == 0, result.stderr
    events = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in events if "loss" in e)

    merged = cli("merge-adapter", tmp_path / "run", "--output", tmp_path / "merged")
    assert merged.exit_code == 0, merged.stderr
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not any("bnb" in type(m).__module__ or "bitsandbytes" in type(m).__module__ for m in model.modules())
    assert "quantization_config" not in json.loads((tmp_path / "merged/config.json").read_text())


def test_minilm_classifier_on_a_4bit_base_keeps_its_head_in_full_precision(tmp_path, cli):
    rows = [{"text": f"the {w} thing", "label": label} for w, label in [("good", "pos"), ("bad", "neg")] * 8]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    path = preset(tmp_path, "sentence-transformers/all-MiniLM-L6-v2", "classification", data, quantization="4bit")
    result = cli("train", path, "--output-dir", tmp_path / "run")
    assert result.exit_code == 0, result.stderr
    assert json.loads((tmp_path / "run/metrics.json").read_text())["eval"]["accuracy"] >= 0.0
    from safetensors import safe_open

    with safe_open(str(tmp_path / "run/adapter/adapter_model.safetensors"), "pt") as f:
        head = [k for k in f.keys() if "classifier" in k]
        assert head and all(f.get_tensor(k).dtype == torch.float32 for k in head)


def test_gpt2_cannot_be_quantized_and_says_why(tmp_path, cli):
    model_dir = save_tiny_model("gpt2", tmp_path / "gpt2", memorise_texts())
    path = preset(tmp_path, model_dir, "causal-lm", write_jsonl(tmp_path / "d.jsonl", MEMORISE), quantization="4bit")
    result = cli("train", path, "--output-dir", tmp_path / "run")
    assert_one_line_error(result, "Conv1D layers, which bitsandbytes cannot quantize", "model.quantization=none")
    assert not (tmp_path / "run" / "adapter").exists()
