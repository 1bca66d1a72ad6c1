"""The benchmark command runs and reports every configuration against its baseline (no timing
assertions: the benchmark is the check of speed, this only keeps it working)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["none", "4bit"])  # 4-bit: the path a GPU run takes, on bitsandbytes' CPU kernels
def test_bench_reports_every_configuration(tmp_path, quantization):
    out = tmp_path / "bench.json"
    command = [sys.executable, "-m", "bench", "--model", "llama", "--repeats", "1", "--warmup", "0", "--device", "cpu",
               "--batch-size", "1", "--vocab", "512", "--quantization", quantization, "--output", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr[-2000:]
    (workload,) = json.loads(out.read_text())["workloads"]
    assert ("4-bit base" in workload["name"]) == (quantization == "4bit")
    train = {row["configuration"]: row for row in workload["train"]}
    assert len(train) == 7 and train["plain peft LoRA (baseline)"]["time_ratio"] == 1.0
    assert train["hiddenkey KL both branches"]["memory_ratio"] > train["hiddenkey-"]["memory_ratio"]
    assert [row["configuration"] for row in workload["eval"]] == [
        "base + plain adapter (eval)", "hkft adapter (eval)", "merged model (eval)"]


def test_time_ratio_pairs_each_round_with_the_baseline_of_the_same_round():
    from bench.measure import Measurement

    # Round 2 ran on a machine twice as slow: both steps doubled, their ratio did not.
    baseline = Measurement("baseline", [1.0, 2.0, 1.0, 1.0, 1.0], 0, 1)
    config = Measurement("config", [1.2, 2.4, 1.2, 1.3, 1.1], 0, 1)
    ratio, low, high = config.time_ratio(baseline)
    assert ratio == pytest.approx(1.2)
    assert low <= ratio <= high and high <= 1.3
    assert baseline.time_ratio(baseline) == (1.0, 1.0, 1.0)
