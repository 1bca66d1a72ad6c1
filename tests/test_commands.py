"""Commands run for real: every named method on the quickstart, the dry-run plan, evaluating on
other data, the non-finite-loss stop, and a single-process CPU run in a fresh interpreter."""

import json
import shutil
import stat
import subprocess
import sys

import pytest
import torch
import yaml
from checkpoints import MEMORISE, memorise_texts, save_tiny_model, write_jsonl
from conftest import Cli, assert_one_line_error
from safetensors.torch import load_file

METHODS = ("none", "dropout", "dropkey", "dropattention", "hiddencut", "hiddenkey-", "hiddenkey", "neftune")
QUICK = ("--set", "train.max_steps=3", "--set", "data.max_samples=32", "--set", "train.eval_strategy=no")


def train_with_method(cli, root, method: str) -> tuple[dict, float, dict]:
    """A quick quickstart run logging every step: its sidecar, its first step's loss, its adapter weights."""
    result = cli("train", "quickstart", "--output-dir", root, "--set", f"dropout.method={method}",
                 "--set", "train.logging_steps=1", *QUICK)
    assert result.exit_code == 0, result.stderr
    sidecar = json.loads((root / "adapter/hkft_adapter.json").read_text())
    events = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
    first_loss = next(event["loss"] for event in events if event["step"] == 1 and "loss" in event)
    return sidecar, first_loss, load_file(root / "adapter/adapter_model.safetensors")


@pytest.fixture(scope="module")
def without_dropout(tmp_path_factory):
    return train_with_method(Cli(), tmp_path_factory.mktemp("none") / "run", "none")


@pytest.mark.parametrize("method", METHODS)
def test_quickstart_runs_with_every_named_method(cli, tmp_path, method, without_dropout):
    """The sidecar names the method's settings, and the method acted: from the same seed (same data
    order, same initial adapter), the first training step's loss and the trained adapter differ from
    those of `none`, which a second `none` run reproduces bit for bit."""
    sidecar, first_loss, weights = train_with_method(cli, tmp_path / "run", method)
    assert sidecar["dropout"]["kl_weight"] == (1.0 if method == "hiddenkey" else 0.0)
    assert bool(sidecar["dropout"]["positions"]) == (method not in ("none", "dropout", "neftune"))
    assert sidecar["dropout"]["model_dropout"] == (0.1 if method == "dropout" else 0.0)
    assert sidecar["dropout"]["neftune_alpha"] == (5.0 if method == "neftune" else 0.0)
    _, plain_loss, plain_weights = without_dropout
    same_adapter = all(torch.equal(weights[name], plain_weights[name]) for name in plain_weights)
    if method == "none":
        assert first_loss == plain_loss and same_adapter
    else:
        assert first_loss != plain_loss and not same_adapter, "the dropout method changed nothing in training"


def test_dry_run_loads_nothing_and_shows_the_plan(cli, tmp_path):
    result = cli("train", "e2e-gpt2-medium", "--dry-run", "--output-dir", tmp_path / "run")
    assert result.exit_code == 0, result.stderr
    assert "latter half of a decoder" in result.stdout and "attention_logits" in result.stdout
    assert not (tmp_path / "run").exists()


def test_num_labels_that_contradict_the_data_are_an_error(cli, tmp_path):
    result = cli("train", "quickstart", "--output-dir", tmp_path / "run", "--set", "model.num_labels=3", *QUICK)
    assert_one_line_error(result, "model.num_labels is 3, but the training data has 2 labels (negative, positive)")


def test_eval_of_a_run_with_a_held_out_validation_set(cli, tmp_path):
    """No data.validation: training held one out of train, and `hkft eval` scores that same split."""
    run = tmp_path / "run"
    trained = cli("train", "quickstart", "--output-dir", run, "--set", "data.validation=null", "--set", "data.test=null", *QUICK)
    assert trained.exit_code == 0, trained.stderr
    evaluated = cli("eval", run)
    assert evaluated.exit_code == 0, evaluated.stderr
    report = json.loads((run / "eval.json").read_text())
    assert report["split"] == "validation"
    in_training = json.loads((run / "metrics.json").read_text())["eval"]
    assert in_training["split"] == "validation"
    for name, value in report["metrics"].items():  # the split training scored at its end
        assert value == pytest.approx(in_training[name], abs=1e-4), name
    rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4  # data.max_samples=32, validation_split=0.1: datasets rounds the share up


def test_eval_on_another_data_file(cli, tmp_path):
    assert cli("train", "quickstart", "--output-dir", tmp_path / "run", *QUICK).exit_code == 0
    other = write_jsonl(tmp_path / "other.jsonl", [{"text": "The lamp is great.", "label": "positive"},
                                                   {"text": "The lamp is awful.", "label": "negative"}])
    result = cli("eval", tmp_path / "run", "--data", other)
    assert result.exit_code == 0, result.stderr
    report = json.loads((tmp_path / "run/eval.json").read_text())
    assert report["data"] == str(other) and report["split"] == "test"
    predictions = [json.loads(line) for line in (tmp_path / "run/predictions.jsonl").read_text().splitlines()]
    assert [(row["text"], row["label"]) for row in predictions] == [("The lamp is great.", "positive"),
                                                                    ("The lamp is awful.", "negative")]

    # the adapter folder on its own, copied elsewhere: its sidecar rebuilds the config
    shutil.copytree(tmp_path / "run/adapter", tmp_path / "alone")
    alone = cli("eval", tmp_path / "alone", "--data", other)
    assert alone.exit_code == 0, alone.stderr
    assert json.loads((tmp_path / "alone/eval.json").read_text())["metrics"] == report["metrics"]
    assert_one_line_error(cli("eval", tmp_path / "alone"), "has no hkft_config.yaml beside it", "--data")


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


def test_every_file_of_a_run_has_the_usual_permissions(cli, tmp_path):
    """safetensors writes weights 0600: a checkpoint written in a container would be unreadable to the host user."""
    model = save_tiny_model("llama", tmp_path / "llama", memorise_texts())
    data = write_jsonl(tmp_path / "d.jsonl", MEMORISE)
    preset = {"model": {"name": str(model), "task": "causal-lm"}, "data": {"train": str(data)},
              "train": {"epochs": 1, "batch_size": 4}, "eval": {"generate": False}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(preset))
    result = cli("train", tmp_path / "p.yaml", "--output-dir", tmp_path / "run")
    assert result.exit_code == 0, result.stderr
    (tmp_path / "plain.txt").write_text("x")
    usual = stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)
    files = [path for path in (tmp_path / "run").rglob("*") if path.is_file()]
    assert any(path.parent.name.startswith("checkpoint-") for path in files)
    assert [str(path) for path in files if stat.S_IMODE(path.stat().st_mode) != usual] == []


def test_train_in_a_fresh_process_on_the_cpu(tmp_path):
    """In-process tests share accelerate's state; a fresh interpreter is what users run."""
    result = subprocess.run([sys.executable, "-m", "hkft", "train", "quickstart", "--output-dir", str(tmp_path / "run"),
                             "--set", "train.max_steps=2", "--set", "data.max_samples=16", "--set", "train.eval_strategy=no"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "run/adapter/adapter_model.safetensors").is_file()
