"""The "Does it help?" report: its numbers come from the study's run files, and the shipped studies plan."""

import json
import statistics
from pathlib import Path

import fake_runs
from rich.console import Console

from bench.does_it_help import REPO, collect, report
from hkft.config import load_config

SEEDS = (43, 44, 45)


def write_run(folder: Path, overrides: list[str], accuracy: float, runtime: float, detected: bool) -> None:
    fake_runs.write_run(folder, load_config("rotten-tomatoes", overrides),
                        {"accuracy": accuracy, "macro_f1": accuracy - 0.05},
                        [{"step": step, "eval_accuracy": accuracy * step / 100} for step in (50, 100)],
                        {"detected": detected}, train={"train_runtime": runtime, "step": 100})


def write_study(root: Path, method_dir: str, overrides: list[str], accuracies: list[float]) -> None:
    study = root / "rotten-tomatoes" / method_dir
    (study / "trials.csv").parent.mkdir(parents=True)
    (study / "trials.csv").write_text("number,state\n0,complete\n1,complete\n")
    write_run(study / "trial-0000", [*overrides, "train.seed=42"], 0.5, 50.0, detected=True)
    write_run(study / "trial-0001", [*overrides, "train.seed=42"], 0.6, 70.0, detected=False)
    for seed, accuracy in zip(SEEDS, accuracies):
        write_run(study / "seeds" / f"seed={seed}", [*overrides, f"train.seed={seed}"], accuracy, 100.0 + seed,
                  detected=seed == SEEDS[0])


def test_summary_reports_the_seed_runs_median_and_std_per_method(tmp_path):
    write_study(tmp_path, "none", ["dropout.method=none", "train.lr=0.002"], [0.70, 0.75, 0.72])
    write_study(tmp_path, "lora-dropout", ["dropout.method=none", "lora.lora_dropout=0.1", "train.lr=0.004"],
                [0.80, 0.74, 0.78])
    (tmp_path / "rotten-tomatoes/none/wall_time.json").write_text(json.dumps({"phases": [[1000, 1600], [1700, 1900]]}))
    (tmp_path / "rotten-tomatoes/lora-dropout/wall_time.json").write_text(json.dumps({"phases": [[1100, 2500]]}))
    report(tmp_path, Console(file=open("/dev/null", "w")))
    lines = (tmp_path / "rotten-tomatoes" / "summary.md").read_text().splitlines()
    none, lora = lines[2], lines[3]
    assert none.startswith("| none | lr 0.002 (2 trials) | ")
    assert lora.startswith("| none + lora_dropout 0.1 | lr 0.004 (2 trials) | ")
    for row, accuracies in ((none, [70, 75, 72]), (lora, [80, 74, 78])):
        median, std = statistics.median(accuracies), statistics.stdev(accuracies)
        assert f"| {median:.1f} ± {std:.1f} | {median - 5:.1f} ± {std:.1f} |" in row
        # s/step: the median over the 5 runs of runtime / 100 steps; time: every run summed
        runtimes = [50.0, 70.0, *(100.0 + seed for seed in SEEDS)]
        assert f"| {statistics.median(runtimes) / 100:.2f} | {sum(runtimes) / 60:.0f} min (5 runs) |" in row
        assert row.endswith("| 1/3 seeds, 1/2 trial runs |")
    assert "seeds 43, 44, 45 on the test split" in lines[-2]
    assert lines[-1].startswith("Wall time: 25 min from the first start to the last end")  # 1000 .. 2500 s
    for name in ("summary.png", "comparison.csv", "metric_by_method.png"):
        assert (tmp_path / "rotten-tomatoes" / name).is_file()


def test_a_folder_of_plain_runs_gets_the_comparison_alone(tmp_path):
    for seed, accuracy in zip(SEEDS, [0.6, 0.7, 0.8]):
        write_run(tmp_path / "longer/none" / f"seed={seed}", ["dropout.method=none", f"train.seed={seed}"], accuracy,
                  100.0, detected=False)
    report(tmp_path, Console(file=open("/dev/null", "w")))
    assert not (tmp_path / "longer/summary.md").exists()
    assert "| none | - | - | 3 | 0.7000 ± 0.1000 |" in (tmp_path / "longer/comparison.md").read_text()


def test_collect_keeps_the_small_files_with_paths_relative_to_the_checkout(tmp_path):
    runs = tmp_path / "runs"
    write_study(runs, "none", ["dropout.method=none"], [0.7, 0.7, 0.7])
    checkpoint = runs / "rotten-tomatoes/none/trial-0000/checkpoints/checkpoint-5"
    checkpoint.mkdir(parents=True)
    (checkpoint / "adapter_model.safetensors").write_bytes(b"\0")
    (runs / "logs").mkdir()
    (runs / "logs/none.start").write_text("1000\n")
    (runs / "logs/none.end").write_text("1600\n")
    (runs / "logs/none.more-seeds.start").write_text("1700\n")
    (runs / "logs/none.more-seeds.end").write_text("1900\n")
    (runs / "logs/none-other.start").write_text("1\n")  # another study's
    (runs / "logs/none-other.end").write_text("2\n")
    collect(runs, tmp_path / "results")
    copied = tmp_path / "results/rotten-tomatoes/none"
    assert not list(copied.rglob("checkpoint*"))
    assert json.loads((copied / "wall_time.json").read_text()) == {"phases": [[1000, 1600], [1700, 1900]]}
    config = (copied / "seeds/seed=44/hkft_config.yaml").read_text()
    assert f"{REPO}/" not in config and "train: presets/data/rotten-tomatoes/train.jsonl" in config
    assert load_config(copied / "seeds/seed=44/hkft_config.yaml").train.seed == 44
