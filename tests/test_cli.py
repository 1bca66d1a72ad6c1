"""The command line: every named method on the quickstart, listing, config, env, dry runs,
`python -m hkft`, evaluating on other data, and the non-finite-loss stop."""

import json
import subprocess
import sys

import pytest
import yaml

from checkpoints import MEMORISE, memorise_texts, save_tiny_model, write_jsonl
from conftest import assert_one_line_error

METHODS = ("none", "dropout", "dropkey", "dropattention", "hiddencut", "hiddenkey-", "hiddenkey")
QUICK = ("--set", "train.max_steps=3", "--set", "data.max_samples=32", "--set", "train.eval_strategy=no")


@pytest.mark.parametrize("method", METHODS)
def test_quickstart_runs_with_every_named_method(cli, tmp_path, method):
    result = cli("train", "quickstart", "--output-dir", tmp_path / "run", "--set", f"dropout.method={method}", *QUICK)
    assert result.exit_code == 0, result.stderr
    sidecar = json.loads((tmp_path / "run/adapter/hkft_adapter.json").read_text())
    expected_kl = 1.0 if method == "hiddenkey" else 0.0
    assert sidecar["dropout"]["kl_weight"] == expected_kl
    assert bool(sidecar["dropout"]["positions"]) == (method not in ("none", "dropout"))


def test_presets_lists_every_shipped_preset_with_its_description(cli):
    result = cli("presets")
    assert result.exit_code == 0
    for name in ("quickstart", "glue-rte", "glue-stsb", "e2e-gpt2-medium", "rte-llama2-7b-qlora"):
        assert name in result.stdout


def test_config_prints_the_resolved_preset_offline(cli):
    result = cli("config", "glue-rte", "lora.r=16")
    resolved = yaml.safe_load(result.stdout)
    assert resolved["lora"]["r"] == 16 and resolved["model"]["name"] == "FacebookAI/roberta-large"
    assert resolved["train"]["weight_decay"] == 0.1 and resolved["dropout"]["method"] == "hiddenkey"


def test_dry_run_loads_nothing_and_shows_the_plan(cli, tmp_path):
    result = cli("train", "e2e-gpt2-medium", "--dry-run", "--output-dir", tmp_path / "run")
    assert result.exit_code == 0, result.stderr
    assert "latter half of a decoder" in result.stdout and "attention_logits" in result.stdout
    assert not (tmp_path / "run").exists()


def test_env_reports_versions_and_bitsandbytes(cli):
    result = cli("env")
    assert result.exit_code == 0 and "transformers" in result.stdout and "bitsandbytes support" in result.stdout


def test_python_dash_m_is_the_same_command():
    result = subprocess.run([sys.executable, "-m", "hkft", "config", "quickstart", "--set", "lora.r=2"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and yaml.safe_load(result.stdout)["lora"]["r"] == 2
    bad = subprocess.run([sys.executable, "-m", "hkft", "config", "quickstart", "--set", "lora.rr=2"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "did you mean lora.r?" in bad.stderr


def test_eval_on_another_data_file(cli, tmp_path):
    assert cli("train", "quickstart", "--output-dir", tmp_path / "run", *QUICK).exit_code == 0
    other = write_jsonl(tmp_path / "other.jsonl", [{"text": "The lamp is great.", "label": "positive"},
                                                   {"text": "The lamp is awful.", "label": "negative"}])
    result = cli("eval", tmp_path / "run", "--data", other)
    assert result.exit_code == 0, result.stderr
    report = json.loads((tmp_path / "run/eval.json").read_text())
    assert report["data"] == str(other) and report["split"] == "test"
    assert len((tmp_path / "run/predictions.jsonl").read_text().splitlines()) == 2


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(cli, tmp_path):
    model = save_tiny_model("llama", tmp_path / "llama", memorise_texts())
    data = write_jsonl(tmp_path / "d.jsonl", MEMORISE)
    preset = {"model": {"name": str(model), "task": "causal-lm"},
              "data": {"train": str(data), "validation": str(data)},
              "train": {"epochs": 6, "batch_size": 4, "lr": 1e12, "max_grad_norm": 0.0, "warmup_ratio": 0.0,
                        "eval_strategy": "steps", "eval_steps": 1, "save_total_limit": 50},
              "eval": {"generate": False}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(preset))
    result = cli("train", tmp_path / "p.yaml", "--output-dir", tmp_path / "run")
    assert_one_line_error(result, "the loss became", "at step", "lower train.lr", code=3)
    checkpoints = sorted((tmp_path / "run/checkpoints").glob("checkpoint-*"))
    assert checkpoints and not (tmp_path / "run/adapter").exists()
