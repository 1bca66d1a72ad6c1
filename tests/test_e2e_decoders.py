"""Causal LM and decoder classification end to end on tiny random LLaMA and GPT-2 checkpoints."""

import json
from pathlib import Path

import pytest
import yaml
from checkpoints import (
    MEMORISE,
    REVIEWS,
    memorise_texts,
    review_texts,
    save_tiny_model,
    write_jsonl,
)


def causal_preset(tmp_path, arch: str, method: str = "hiddenkey", **train) -> "Path":
    model_dir = save_tiny_model(arch, tmp_path / f"{arch}-model", memorise_texts())
    data = write_jsonl(tmp_path / "memorise.jsonl", MEMORISE)
    preset = {
        "model": {"name": str(model_dir), "task": "causal-lm"},
        "lora": {"r": 8, "alpha": 16, "target_modules": "all-linear"},
        "dropout": {"method": method, "rate": 0.1},
        "data": {"train": str(data), "validation": str(data), "test": str(data), "template": "{prompt}", "max_length": 32},
        "train": {"epochs": 60, "lr": 2e-2, "batch_size": 8, "warmup_ratio": 0.0, "logging_steps": 5,
                  "eval_strategy": "no", **train},
        "eval": {"generation": {"max_new_tokens": 8}},
    }
    path = tmp_path / f"{arch}.yaml"
    path.write_text(yaml.safe_dump(preset))
    return path


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mixtral"])
def test_causal_lm_training_memorises_and_scores_generations(tmp_path, cli, arch):
    preset = causal_preset(tmp_path, arch)
    result = cli("train", preset, "--output-dir", tmp_path / "run")
    assert result.exit_code == 0, result.stderr
    events = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    losses = [event["task_loss"] for event in events if "task_loss" in event]
    assert losses[-1] < 0.3 * losses[0], losses
    metrics = json.loads((tmp_path / "run/metrics.json").read_text())["eval"]
    assert metrics["perplexity"] < 3.0
    assert metrics["bleu"] > 50.0 and metrics["rouge_l"] > 50.0, metrics  # memorised: generations match

    evaluated = cli("eval", tmp_path / "run")
    assert evaluated.exit_code == 0, evaluated.stderr
    rows = [json.loads(line) for line in (tmp_path / "run/predictions.jsonl").read_text().splitlines()]
    assert [row["prompt"] for row in rows] == [example["prompt"] for example in MEMORISE]
    assert all(row["prediction"].strip() for row in rows), rows  # trained to reply: never an empty generation
    # memorised: each reply is its completion (the word-level tokenizer decodes "food." as "food .")
    assert ["".join(row["prediction"].split()) for row in rows] == ["".join(row["reference"][0].split()) for row in rows]


def test_gpt2_lora_uses_fan_in_fan_out_and_merges(tmp_path, cli):
    preset = causal_preset(tmp_path, "gpt2", method="none", epochs=2)
    assert cli("train", preset, "--output-dir", tmp_path / "run").exit_code == 0
    config = json.loads((tmp_path / "run/adapter/adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    merged = cli("merge-adapter", tmp_path / "run", "--output", tmp_path / "merged")
    assert merged.exit_code == 0, merged.stderr
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged").config.model_type == "gpt2"


def test_decoder_classifier_without_pad_token_gets_one(tmp_path, cli):
    model_dir = save_tiny_model("llama", tmp_path / "llama", review_texts(), with_pad=False)
    data = write_jsonl(tmp_path / "reviews.jsonl", REVIEWS)
    preset = {
        "model": {"name": str(model_dir), "task": "classification"},
        "data": {"train": str(data), "test": str(data)},
        "train": {"epochs": 1, "batch_size": 8, "eval_strategy": "no"},
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(preset))
    result = cli("train", tmp_path / "p.yaml", "--output-dir", tmp_path / "run")
    assert result.exit_code == 0, result.stderr
    assert "has no pad token; using eos" in result.stdout
    sidecar = json.loads((tmp_path / "run/adapter/hkft_adapter.json").read_text())
    assert sidecar["label_names"] == ["neg", "pos"]
    peft_config = json.loads((tmp_path / "run/adapter/adapter_config.json").read_text())
    assert "score" in peft_config["modules_to_save"]  # the head is saved with the adapter


def test_generation_ignores_token_type_ids_a_decoder_tokenizer_emits(tmp_path):
    """Falcon's tokenizer returns token_type_ids, which generate() rejects for a LLaMA-style model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hkft.config.schema import GenerationConfig
    from hkft.tasks.evaluation import generate

    model_dir = save_tiny_model("llama", tmp_path / "llama", memorise_texts())
    plain = AutoTokenizer.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.model_input_names = ["input_ids", "token_type_ids", "attention_mask"]
    assert "token_type_ids" in tokenizer(["a b"]) and "token_type_ids" not in plain(["a b"])
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    prompts = [row["prompt"] for row in MEMORISE[:3]]
    # An untrained model may end at once; with the special tokens (end of text included) suppressed
    # every new token is a word, so each reply is exactly 3 words, never empty.
    words_only = {"suppress_tokens": tokenizer.all_special_ids}
    texts = generate(model, tokenizer, prompts, GenerationConfig(max_new_tokens=3), batch_size=2, **words_only)
    assert [len(text.split()) for text in texts] == [3, 3, 3], texts
    assert texts == generate(model, plain, prompts, GenerationConfig(max_new_tokens=3), batch_size=2, **words_only)


def test_the_adapter_is_saved_before_the_final_evaluation(tmp_path, cli, monkeypatch):
    """Training is the expensive part: a failure in the final evaluation must not lose it."""
    import hkft.recipes.train

    def failing_evaluation(*args, **kwargs):
        raise RuntimeError("evaluation broke")

    monkeypatch.setattr(hkft.recipes.train, "final_evaluation", failing_evaluation)
    with pytest.raises(RuntimeError, match="evaluation broke"):
        cli("train", causal_preset(tmp_path, "llama", epochs=1), "--output-dir", tmp_path / "run")
    assert (tmp_path / "run/adapter/adapter_model.safetensors").is_file()
    assert not (tmp_path / "run/metrics.json").exists()
