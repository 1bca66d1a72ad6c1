"""DDP through torchrun: 2 CPU processes on gloo give one adapter, metrics logged once, distinct
per-rank dropout masks, and a resumable run."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from checkpoints import MEMORISE, memorise_texts, save_tiny_model, write_jsonl
from conftest import assert_one_line_error
from peft import PeftModel
from transformers import AutoModelForCausalLM


def torchrun(tmp_path, *args):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
               "-m", "hkft", "train", str(tmp_path / "p.yaml"), "--output-dir", str(tmp_path / "run"), *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("ddp")
    model = save_tiny_model("llama", tmp_path / "model", memorise_texts())
    data = write_jsonl(tmp_path / "d.jsonl", MEMORISE * 2)
    preset = {"model": {"name": str(model), "task": "causal-lm"},
              "dropout": {"method": "hiddenkey", "layers": "all"},
              "data": {"train": str(data), "validation": str(data)},
              "train": {"epochs": 2, "batch_size": 2, "eval_strategy": "epoch", "logging_steps": 1},
              "eval": {"generate": False}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(preset))
    result = torchrun(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp_path


def test_one_adapter_in_the_usual_format(ddp_run):
    base = AutoModelForCausalLM.from_pretrained(ddp_run / "model")
    model = PeftModel.from_pretrained(base, ddp_run / "run" / "adapter")
    assert any("lora_A" in name for name, _ in model.named_parameters())
    assert json.loads((ddp_run / "run/metrics.json").read_text())["eval"]["loss"] > 0


def test_metrics_are_logged_once(ddp_run):
    events = [json.loads(line) for line in (ddp_run / "run/metrics.jsonl").read_text().splitlines()]
    train_steps = [event["step"] for event in events if "loss" in event]
    assert train_steps == sorted(set(train_steps)) == list(range(1, 9))  # 16 examples / (2 ranks x 2) x 2 epochs


def test_dropout_masks_differ_across_ranks(ddp_run):
    checkpoint = ddp_run / "run/checkpoints/checkpoint-8"
    states = [torch.load(checkpoint / f"hkft_dropout_rng_{rank}.pt", weights_only=True)["sampler"]["cpu"] for rank in (0, 1)]
    assert not torch.equal(states[0], states[1])


def test_distributed_run_resumes_from_its_checkpoint(ddp_run):
    result = torchrun(ddp_run, "--resume", "--set", "train.epochs=3")
    assert result.returncode == 0, result.stderr[-3000:]
    events = [json.loads(line) for line in (ddp_run / "run/metrics.jsonl").read_text().splitlines()]
    assert max(event["step"] for event in events if "loss" in event) == 12
    assert (ddp_run / "run/checkpoints/checkpoint-12/trainer_state.json").is_file()


def test_fsdp_on_a_cpu_is_refused_in_one_line(cli, tmp_path):
    """accelerate enables FSDP only for multi-accelerator jobs: a 2-process gloo job with an FSDP plugin
    trains with DDP (checked with accelerate 1.15, transformers 5.24), and one process gets a traceback
    from the Trainer. hkft says so before anything runs."""
    model = save_tiny_model("llama", tmp_path / "model", memorise_texts())
    data = write_jsonl(tmp_path / "d.jsonl", MEMORISE)
    preset = {"model": {"name": str(model), "task": "causal-lm"}, "data": {"train": str(data)},
              "distributed": {"strategy": "fsdp"}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(preset))
    result = cli("train", tmp_path / "p.yaml", "--output-dir", tmp_path / "run")
    assert_one_line_error(result, "distributed.strategy fsdp needs GPUs", "use distributed.strategy=ddp on a CPU")
