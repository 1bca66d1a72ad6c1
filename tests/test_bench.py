"""The benchmark command runs and reports every configuration against its baseline (no timing
assertions: the benchmark is the check of speed, this only keeps it working)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_bench_reports_every_configuration(tmp_path):
    out = tmp_path / "bench.json"
    command = [sys.executable, "-m", "bench", "--model", "llama", "--repeats", "1", "--warmup", "0",
               "--batch-size", "1", "--vocab", "512", "--output", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr[-2000:]
    (workload,) = json.loads(out.read_text())["workloads"]
    train = {row["configuration"]: row for row in workload["train"]}
    assert len(train) == 7 and train["plain peft LoRA (baseline)"]["time_ratio"] == 1.0
    assert train["hiddenkey KL both branches"]["memory_ratio"] > train["hiddenkey-"]["memory_ratio"]
    assert [row["configuration"] for row in workload["eval"]] == [
        "base + plain adapter (eval)", "hkft adapter (eval)", "merged model (eval)"]
