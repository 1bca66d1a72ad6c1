"""End to end on real MiniLM weights: the quickstart preset, eval, merge, and reloading with
peft and transformers alone."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from hkft.config import load_config
from hkft.models.loading import resolve_model_path


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    from typer.testing import CliRunner

    from hkft.cli import app

    run_dir = tmp_path_factory.mktemp("quickstart") / "run"
    result = CliRunner().invoke(app, ["train", "quickstart", "--output-dir", str(run_dir)], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    return run_dir


def test_quickstart_beats_the_majority_baseline_clearly(quickstart_run):
    test_file = load_config(quickstart_run / "hkft_config.yaml").data.test
    labels = [json.loads(line)["label"] for line in open(test_file)]
    majority = max(labels.count(label) for label in set(labels)) / len(labels)
    metrics = json.loads((quickstart_run / "metrics.json").read_text())["eval"]
    assert metrics["split"] == "test"
    assert metrics["accuracy"] >= majority + 0.2, (metrics, majority)


def test_run_directory_has_every_documented_file(quickstart_run):
    for name in ("hkft_config.yaml", "run_info.json", "metrics.json", "metrics.jsonl", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "adapter/hkft_adapter.json", "adapter/tokenizer.json", "curves.png"):
        assert (quickstart_run / name).is_file(), name
    assert (quickstart_run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any((quickstart_run / "tb").iterdir())
    assert list((quickstart_run / "checkpoints").glob("checkpoint-*"))
    events = [json.loads(line) for line in (quickstart_run / "metrics.jsonl").read_text().splitlines()]
    assert any("kl_loss" in event for event in events) and any("eval_accuracy" in event for event in events)
    throughput = [event for event in events if "train_tokens_per_second" in event]
    assert throughput and all(event["train_tokens_per_second"] > 0 for event in throughput)
    assert throughput[-1]["num_input_tokens_seen"] > throughput[0]["num_input_tokens_seen"]
    summary = json.loads((quickstart_run / "metrics.json").read_text())["train"]
    assert summary["train_tokens_per_second"] == throughput[-1]["train_tokens_per_second"]
    peft_config = json.loads((quickstart_run / "adapter/adapter_config.json").read_text())
    assert "dropout" not in json.dumps(peft_config).replace("lora_dropout", "")  # hkft's settings live in the sidecar
    info = json.loads((quickstart_run / "run_info.json").read_text())
    assert info["seed"] == 42 and info["environment"]["torch"] == torch.__version__


def without_timings(event: dict) -> dict:
    """A logged event less its wall-clock fields, the only ones two identical runs may differ in."""
    return {key: value for key, value in event.items() if not key.endswith(("_runtime", "_per_second"))}


def test_saved_config_reproduces_the_run(cli, tmp_path, monkeypatch):
    """`hkft train RUN/hkft_config.yaml` alone, from another directory, retrains the run: seeded CPU
    training is deterministic, so every logged number and every adapter weight is bit-for-bit the same."""
    first = tmp_path / "first"
    settings = ("train.max_steps=3", "data.max_samples=32", "train.logging_steps=1", "train.seed=7", "lora.r=4",
                "dropout.rate=0.2")
    result = cli("train", "quickstart", "--output-dir", first, *(arg for item in settings for arg in ("--set", item)))
    assert result.exit_code == 0, result.stderr
    monkeypatch.chdir(tmp_path)  # the saved config must not depend on where the first run started
    again = cli("train", first / "hkft_config.yaml", "--output-dir", tmp_path / "again")
    assert again.exit_code == 0, again.stderr

    runs = [first, tmp_path / "again"]
    configs = [load_config(run / "hkft_config.yaml").model_dump(exclude={"output"}) for run in runs]
    assert configs[0] == configs[1]
    metrics = [json.loads((run / "metrics.json").read_text()) for run in runs]
    assert metrics[0]["eval"] == metrics[1]["eval"] and metrics[0]["overfitting"] == metrics[1]["overfitting"]
    assert without_timings(metrics[0]["train"]) == without_timings(metrics[1]["train"])
    events = [[without_timings(json.loads(line)) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in runs]
    assert events[0] == events[1]
    assert [event["step"] for event in events[0] if "loss" in event] == [1, 2, 3]

    weights = [load_file(run / "adapter" / "adapter_model.safetensors") for run in runs]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    lora_b = [tensor for name, tensor in weights[0].items() if "lora_B" in name]
    assert lora_b and all(tensor.shape[1] == 4 and tensor.abs().sum() > 0 for tensor in lora_b)  # trained, at r=4


def test_eval_twice_gives_identical_numbers_equal_to_training(quickstart_run, cli):
    first = cli("eval", quickstart_run)
    assert first.exit_code == 0, first.stderr
    report = json.loads((quickstart_run / "eval.json").read_text())
    second = cli("eval", quickstart_run)
    assert second.exit_code == 0
    assert json.loads((quickstart_run / "eval.json").read_text())["metrics"] == report["metrics"]
    trained = json.loads((quickstart_run / "metrics.json").read_text())["eval"]
    assert report["metrics"]["accuracy"] == trained["accuracy"]
    predictions = (quickstart_run / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 200 and json.loads(predictions[0])["prediction"] in ("positive", "negative")


def _sentences():
    return ["The kettle is great.", "I would not call the tent comfortable.", "The lamp turned out broken.", "Fine phone."]


def test_adapter_reloads_with_peft_alone_and_merged_model_with_transformers_alone(quickstart_run, cli, tmp_path):
    sidecar = json.loads((quickstart_run / "adapter/hkft_adapter.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(quickstart_run / "adapter")
    inputs = tokenizer(_sentences(), return_tensors="pt", padding=True)

    base = AutoModelForSequenceClassification.from_pretrained(resolve_model_path(sidecar["base_model"]), num_labels=2)
    reloaded = PeftModel.from_pretrained(base, quickstart_run / "adapter").eval()
    with torch.no_grad():
        peft_logits = reloaded(**inputs).logits

    result = cli("merge-adapter", quickstart_run, "--output", tmp_path / "merged")
    assert result.exit_code == 0, result.stderr
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        merged_logits = merged(**inputs).logits
    assert torch.allclose(peft_logits, merged_logits, atol=1e-4)
    assert merged.config.id2label[0] in ("negative", "positive")
    # the classifier head travelled with the adapter: the reloaded model is not at chance
    assert not torch.allclose(peft_logits[:, 0], peft_logits[:, 1], atol=1e-3)


def test_reloaded_adapter_has_the_in_memory_accuracy(quickstart_run):
    cfg = load_config(quickstart_run / "hkft_config.yaml")
    rows = [json.loads(line) for line in open(cfg.data.test)]
    sidecar = json.loads((quickstart_run / "adapter/hkft_adapter.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(quickstart_run / "adapter")
    base = AutoModelForSequenceClassification.from_pretrained(resolve_model_path(sidecar["base_model"]), num_labels=2)
    model = PeftModel.from_pretrained(base, quickstart_run / "adapter").eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(rows), 50):
            batch = rows[start : start + 50]
            encoded = tokenizer([row["text"] for row in batch], return_tensors="pt", padding=True, truncation=True, max_length=64)
            predicted = model(**encoded).logits.argmax(-1)
            correct += sum(sidecar["label_names"][int(p)] == row["label"] for p, row in zip(predicted, batch))
    trained = json.loads((quickstart_run / "metrics.json").read_text())["eval"]["accuracy"]
    assert correct / len(rows) == pytest.approx(trained, abs=1e-9)


def test_merge_to_bfloat16_and_refusal_to_overwrite(quickstart_run, cli, tmp_path):
    result = cli("merge-adapter", quickstart_run, "--output", tmp_path / "bf16", "--dtype", "bfloat16")
    assert result.exit_code == 0, result.stderr
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    again = cli("merge-adapter", quickstart_run, "--output", tmp_path / "bf16")
    assert again.exit_code == 2 and "already exists" in again.stderr
