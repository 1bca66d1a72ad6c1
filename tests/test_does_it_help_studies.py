"""The "Does it help?" studies as shipped (the same budget per method), the pruning check's report, a
regression dataset's summary, and the timed runner."""

import json
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console

from bench import does_it_help
from bench.does_it_help import collect, report, run_studies
from hkft.config import config_to_yaml, load_config
from hkft.study.search import plan_tune
from hkft.study.spec import load_study

METHODS = ("none", "lora-dropout", "hiddenkey-", "hiddenkey")
QUIET = Console(file=open("/dev/null", "w"))


@pytest.mark.parametrize("dataset", ["rotten-tomatoes", "vader-movies"])
def test_shipped_studies_give_every_method_the_same_trials_range_and_schedule(dataset):
    plans = {method: plan_tune(load_study(f"{dataset}-{method}")) for method in METHODS}
    schedules = set()
    for method, plan in plans.items():
        assert plan.study.tune.trials == 10 and plan.study.tune.pruner == "none"
        assert plan.study.output == f"runs/does-it-help/{dataset}/{method}"
        (search,) = plan.searches
        lr = search.space["train.lr"]
        assert (lr.low, lr.high, lr.log) == (3.0e-4, 1.0e-2, True)
        assert ("dropout.rate" in search.space) == method.startswith("hiddenkey")
        config = load_config(plan.preset, plan.overrides)
        assert config.dropout.method == ("none" if method in ("none", "lora-dropout") else method)
        assert config.lora.lora_dropout == (0.1 if method == "lora-dropout" else 0.0)
        schedules.add((config.train.epochs, config.train.batch_size, config.train.eval_steps, config.data.max_length))
    assert len(schedules) == 1


# --- the pruning check ----------------------------------------------------------------------------

def write_search(folder: Path, trials: list[tuple[float, str, list[float]]], best_lr: float) -> None:
    """trials: (learning rate, state, validation accuracy at steps 20, 40, ...) as hkft tune leaves them."""
    folder.mkdir(parents=True)
    rows = ["search,trial,state,validation_accuracy,params_train.lr,attempts,duration_s,run_dir"]
    for number, (lr, state, curve) in enumerate(trials):
        run = folder / f"trial-{number:04d}"
        run.mkdir()
        (run / "metrics.jsonl").write_text("".join(
            json.dumps({"step": 20 * (index + 1), "eval_accuracy": value}) + "\n" for index, value in enumerate(curve)))
        value = max(curve) if state == "COMPLETE" else ""
        rows.append(f"{folder.name},{number},{state},{value},{lr},1,10.0,{run}")
    (folder / "trials.csv").write_text("\n".join(rows) + "\n")
    (folder / "best.yaml").write_text(f"train:\n  lr: {best_lr!r}\n")


def test_pruning_report_names_what_the_pruner_stopped_and_each_search_pick(tmp_path):
    curves = {1e-3: [0.5, 0.55, 0.6, 0.8], 2e-3: [0.6, 0.7, 0.72, 0.74], 4e-3: [0.7, 0.75, 0.7, 0.7]}
    write_search(tmp_path / "pruning/unpruned", [(lr, "COMPLETE", curve) for lr, curve in curves.items()], best_lr=1e-3)
    write_search(tmp_path / "pruning/pruned", [(1e-3, "PRUNED", curves[1e-3][:3]), (2e-3, "COMPLETE", curves[2e-3]),
                                               (4e-3, "COMPLETE", curves[4e-3])], best_lr=4e-3)
    report(tmp_path, QUIET)
    lines = (tmp_path / "pruning/pruning.md").read_text().splitlines()
    assert lines[0] == "| trial | learning rate | unpruned: best validation accuracy | pruned search |"
    assert lines[2] == "| 0 | 0.001 | 0.800 | **stopped at step 60 of 80** (accuracy 0.600 then, best so far 0.600) |"
    assert lines[3] == "| 1 | 0.002 | 0.740 | complete, 0.740 |"
    assert lines[4] == "| 2 | 0.004 | 0.750 | complete, 0.750 |"
    assert lines[6] == ("Picked (best.yaml): unpruned search trial 0 (learning rate 0.001, validation accuracy 0.800); "
                        "pruned search trial 2 (learning rate 0.004, validation accuracy 0.750).")
    assert lines[7] == "The pruner stopped 1 of 3 trials; the pruned search trained 220 steps against 240 (8% fewer)."
    assert lines[8] == "The same learning rates in both: yes; the same pick: no."
    assert (tmp_path / "pruning/pruning.png").is_file()


def test_pruning_report_shows_both_learning_rates_when_the_searches_drew_different_ones(tmp_path):
    write_search(tmp_path / "pruning/unpruned", [(1e-3, "COMPLETE", [0.6, 0.7]), (2e-3, "COMPLETE", [0.6, 0.8])], 2e-3)
    write_search(tmp_path / "pruning/pruned", [(1e-3, "COMPLETE", [0.6, 0.7]), (3e-3, "COMPLETE", [0.6, 0.8])], 3e-3)
    report(tmp_path, QUIET)
    lines = (tmp_path / "pruning/pruning.md").read_text().splitlines()
    assert "learning rate (unpruned / pruned)" in lines[0]
    assert lines[3].startswith("| 1 | 0.002 / 0.003 | 0.800 |")
    assert lines[-1] == "The same learning rates in both: no; the same pick: no."


# --- a regression dataset -------------------------------------------------------------------------

def write_regression_run(folder: Path, overrides: list[str], pearson: float, detected: bool) -> None:
    folder.mkdir(parents=True)
    (folder / "hkft_config.yaml").write_text(config_to_yaml(load_config("vader-movies", overrides)))
    (folder / "metrics.json").write_text(json.dumps({
        "train": {"train_runtime": 40.0, "step": 200},
        "eval": {"split": "test", "pearson": pearson, "spearman": pearson - 0.1, "mse": 1.0},
        "overfitting": {"detected": detected}}))
    (folder / "metrics.jsonl").write_text(json.dumps({"step": 200, "eval_pearson": pearson}) + "\n")


def test_a_regression_summary_reports_pearson_and_spearman_and_the_load_average(tmp_path):
    study = tmp_path / "vader-movies/hiddenkey"
    (study / "seeds").mkdir(parents=True)
    (study / "trials.csv").write_text("number,state\n0,complete\n")
    write_regression_run(study / "trial-0000", ["dropout.method=hiddenkey", "train.lr=0.002", "dropout.rate=0.2"], 0.5, True)
    for seed, pearson in zip((43, 44, 45), (0.81, 0.75, 0.78)):
        write_regression_run(study / "seeds" / f"seed={seed}", ["dropout.method=hiddenkey", "train.lr=0.002",
                                                                  "dropout.rate=0.2", f"train.seed={seed}"], pearson, False)
    (study / "wall_time.json").write_text(json.dumps({"phases": [[1000, 1600]], "load": [[2.25, 1.5]]}))
    report(tmp_path, QUIET)
    lines = (tmp_path / "vader-movies/summary.md").read_text().splitlines()
    assert lines[0].startswith("| method | tuned on validation | test pearson | test spearman | s/step |")
    std = statistics.stdev([0.81, 0.75, 0.78])
    assert lines[2].startswith(f"| hiddenkey | lr 0.002, rate 0.2 (1 trials) | 0.780 ± {std:.3f} | 0.680 ± {std:.3f} | 0.20 |")
    assert lines[2].endswith("| 0/3 seeds, 1/1 trial runs |")
    assert lines[-1] == "Load average (1 min) at the start and end of each study: hiddenkey 2.2 -> 1.5."

    # A study whose trials each train several seeds (tune.trial_seeds) says so; every run of a trial is watched.
    (study / "trial-0000/trial.json").write_text(json.dumps({"trial": 0, "seed_values": [0.5, 0.52]}))
    write_regression_run(study / "trial-0000-seed-43", ["dropout.method=hiddenkey", "train.lr=0.002", "dropout.rate=0.2",
                                                        "train.seed=43"], 0.52, False)
    report(tmp_path, QUIET)
    row = (tmp_path / "vader-movies/summary.md").read_text().splitlines()[2]
    assert "| lr 0.002, rate 0.2 (1 trials of 2 seeds) |" in row and row.endswith("| 0/3 seeds, 1/2 trial runs |")


# --- the timed runner -----------------------------------------------------------------------------

def test_run_studies_runs_the_four_studies_in_turn_and_times_each_phase(tmp_path, monkeypatch):
    commands = []
    monkeypatch.setattr(does_it_help.subprocess, "run",
                        lambda command, check: commands.append(command) or SimpleNamespace(returncode=0))
    clock = iter(range(1000, 3000, 100))
    monkeypatch.setattr(does_it_help.time, "time", lambda: next(clock))
    monkeypatch.setattr(does_it_help.os, "getloadavg", lambda: (1.25, 0.0, 0.0))
    run_studies(["vader-movies"], 5, studies=tmp_path)
    assert commands == [["hkft", "tune", f"vader-movies-{method}", "--seeds", "5"] for method in METHODS]
    logs = tmp_path / "logs/vader-movies"
    assert (logs / "none.1.start").read_text() == "1000 1.25\n" and (logs / "none.1.end").read_text() == "1100 1.25\n"
    assert (logs / "hiddenkey.1.start").read_text() == "1600 1.25\n"  # after hiddenkey-'s
    monkeypatch.setattr(does_it_help.subprocess, "run", lambda command, check: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        run_studies(["vader-movies"], 5, studies=tmp_path)  # a second call, interrupted: its phase still ends
    assert (logs / "none.2.start").read_text() == "1800 1.25\n" and (logs / "none.2.end").read_text() == "1900 1.25\n"
    # A study that exits non-zero (hkft tune has said why) ends the runner in one line, its phase ended.
    monkeypatch.setattr(does_it_help.subprocess, "run", lambda command, check: SimpleNamespace(returncode=130))
    with pytest.raises(SystemExit, match="vader-movies-none: hkft tune exited with 130; run the same command again"):
        run_studies(["vader-movies"], 5, studies=tmp_path)
    assert (logs / "none.3.end").is_file() and not (logs / "lora-dropout.3.start").exists()

    study = tmp_path / "vader-movies/none"
    study.mkdir(parents=True)
    (study / "trials.csv").write_text("number,state\n")
    collect(tmp_path, tmp_path / "results")
    wall_time = json.loads((tmp_path / "results/vader-movies/none/wall_time.json").read_text())
    assert wall_time == {"phases": [[1000, 1100], [1800, 1900], [2000, 2100]], "load": [[1.25, 1.25]] * 3}


def test_run_studies_runs_only_the_methods_asked_for(tmp_path, monkeypatch):
    """Two runners with different --methods run one dataset's studies side by side."""
    commands = []
    monkeypatch.setattr(does_it_help.subprocess, "run",
                        lambda command, check: commands.append(command) or SimpleNamespace(returncode=0))
    monkeypatch.setattr(does_it_help, "STUDIES", tmp_path)
    does_it_help.main(["run", "vader-movies-long", "--seeds", "3", "--methods", "hiddenkey", "none"])
    assert commands == [["hkft", "tune", f"vader-movies-long-{method}", "--seeds", "3"] for method in ("hiddenkey", "none")]
    assert sorted(path.name for path in (tmp_path / "logs/vader-movies-long").iterdir()) == [
        "hiddenkey.1.end", "hiddenkey.1.start", "none.1.end", "none.1.start"]
    with pytest.raises(SystemExit):
        does_it_help.main(["run", "vader-movies", "--methods", "hiddenkye"])
