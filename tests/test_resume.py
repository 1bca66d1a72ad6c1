"""A run killed mid-epoch (SIGKILL) or stopped (SIGTERM) resumes to exactly the uninterrupted result."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from checkpoints import MEMORISE, memorise_texts, save_tiny_model, write_jsonl
from safetensors.torch import load_file

from hkft.run.directory import RunDir, latest_checkpoint

DRIVER = textwrap.dedent(
    """
    import os, signal, sys
    from hkft.run.progress import ProgressCallback
    from hkft.cli import app

    stop_at, how = int(sys.argv[1]), sys.argv[2]
    original = ProgressCallback.on_step_end

    def on_step_end(self, args, state, control, **kwargs):
        original(self, args, state, control, **kwargs)
        if state.global_step == stop_at and how != "none":
            os.kill(os.getpid(), getattr(signal, how))

    ProgressCallback.on_step_end = on_step_end
    app(sys.argv[3:], prog_name="hkft")
    """
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    model = save_tiny_model("llama", root / "model", memorise_texts())
    data = write_jsonl(root / "d.jsonl", MEMORISE)
    preset = {
        "model": {"name": str(model), "task": "causal-lm"},
        "dropout": {"method": "hiddenkey", "rate": 0.2, "layers": "all"},
        "data": {"train": str(data), "validation": str(data), "max_length": 32},
        "train": {"epochs": 3, "batch_size": 2, "lr": 1e-2, "eval_strategy": "steps", "eval_steps": 2,
                  "save_total_limit": 3, "logging_steps": 1},
        "eval": {"generate": False, "split": "validation"},
    }
    (root / "p.yaml").write_text(yaml.safe_dump(preset))
    (root / "driver.py").write_text(DRIVER)
    return root


def drive(setup: Path, run: str, stop_at: int, how: str, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(setup / "driver.py"), str(stop_at), how, "train", str(setup / "p.yaml"),
               "--output-dir", str(setup / run), *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def adapter_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def final_metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())["eval"]


def train_summary(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())["train"]


@pytest.fixture(scope="module")
def uninterrupted(setup):
    result = drive(setup, "straight", 0, "none")
    assert result.returncode == 0, result.stderr
    return setup / "straight"


def assert_same_run(resumed: Path, straight: Path) -> None:
    expected, got = adapter_weights(straight), adapter_weights(resumed)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert final_metrics(resumed) == final_metrics(straight)
    # The training loss is over the whole run, not over the steps after the resume.
    assert train_summary(resumed)["train_loss"] == pytest.approx(train_summary(straight)["train_loss"], rel=1e-9)


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(setup, uninterrupted):
    killed = drive(setup, "killed", 7, "SIGKILL")  # epoch 2 of 3, one step after checkpoint-6
    assert killed.returncode == -signal.SIGKILL
    assert latest_checkpoint(RunDir(setup / "killed")).name == "checkpoint-6"
    assert not (setup / "killed" / "adapter").exists()
    resumed = drive(setup, "killed", 0, "none", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(setup / "killed", uninterrupted)


def test_sigterm_stops_gracefully_with_a_checkpoint_and_resumes(setup, uninterrupted):
    stopped = drive(setup, "stopped", 5, "SIGTERM")
    assert stopped.returncode == 130, stopped.stderr
    lines = [line for line in stopped.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "stopped by SIGTERM at step 5" in lines[0] and "--resume" in lines[0]
    assert latest_checkpoint(RunDir(setup / "stopped")).name == "checkpoint-5"
    resumed = drive(setup, "stopped", 0, "none", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(setup / "stopped", uninterrupted)


def test_resuming_a_finished_run_keeps_its_summary(setup, uninterrupted):
    finished = setup / "finished"
    shutil.copytree(uninterrupted, finished)
    before = train_summary(finished)
    resumed = drive(setup, "finished", 0, "none", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    after = train_summary(finished)
    assert after["train_loss"] == pytest.approx(before["train_loss"], rel=1e-9)
    assert after["train_runtime"] >= 0.5 * before["train_runtime"] and after["train_steps_per_second"] > 0
    assert_same_run(finished, uninterrupted)


def test_same_seed_twice_gives_identical_metrics(setup, uninterrupted):
    again = drive(setup, "again", 0, "none")
    assert again.returncode == 0, again.stderr
    assert_same_run(setup / "again", uninterrupted)


def test_existing_run_is_never_overwritten_silently(setup, uninterrupted):
    before = adapter_weights(uninterrupted)
    refused = drive(setup, "straight", 0, "none")
    assert refused.returncode == 3 and "already holds a run" in refused.stderr
    assert all(torch.equal(before[k], v) for k, v in adapter_weights(uninterrupted).items())


def test_incomplete_checkpoint_is_never_taken_as_latest(tmp_path):
    run = RunDir(tmp_path)
    for step, complete in ((4, True), (8, False)):
        checkpoint = run.checkpoints_dir / f"checkpoint-{step}"
        checkpoint.mkdir(parents=True)
        (checkpoint / "adapter_model.safetensors").write_bytes(b"x")
        if complete:
            (checkpoint / "trainer_state.json").write_text("{}")
        else:
            (checkpoint / "trainer_state.json").write_text('{"global_st')  # cut short while saving
    assert latest_checkpoint(run).name == "checkpoint-4"


def test_saved_config_reproduces_the_run(setup, uninterrupted):
    command = [sys.executable, "-m", "hkft", "train", str(uninterrupted / "hkft_config.yaml"),
               "--output-dir", str(setup / "reproduced")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert_same_run(setup / "reproduced", uninterrupted)
