"""hkft tune: search-space validation, trials as run directories, pruning, resuming after an interruption,
per-method searches, best presets, plots and re-training with seeds. Training is faked (a run directory
written by hand, evaluations fed to the trial's callbacks) except in the MiniLM tests at the end."""

from __future__ import annotations

import io
import json
import math
import statistics
import threading
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import yaml
from conftest import assert_one_line_error
from rich.console import Console

from hkft.config import config_to_yaml, load_config
from hkft.errors import ConfigError, InterruptedRun, TrainingError
from hkft.study.grid import Cell, expand_cells
from hkft.study.search import TRIAL_RECORD, ReportToTrial, plan_tune, run_tune
from hkft.study.spec import load_study
from hkft.study.workers import origin_number

EVAL_STEPS = (2, 4, 6)


def write_study(directory: Path, search: dict, **tune) -> Path:
    path = directory / "study.yaml"
    study = {"base": "quickstart", "output": str(directory / "out"), "overrides": ["train.epochs=1"],
             "search": search, "tune": {"trials": 4, "startup_trials": 1, **tune}}
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def score(cell: Cell) -> float:
    """Validation accuracy of a fake run: best at lr 1e-3, lower for every decade away."""
    return 0.9 - abs(math.log10(cell.config.train.lr) + 3) / 10


class FakeTrials:
    """Trains like hkft train on paper: config, one eval line per evaluation (fed to the callbacks, so the
    pruner sees them), metrics.json at the end. ``interrupt`` names the calls that stop like Ctrl-C."""

    def __init__(self, interrupt: tuple[int, ...] = ()):
        self.calls: list[tuple[str, bool, float]] = []
        self.interrupt = interrupt
        self.lock = threading.Lock()

    def __call__(self, cell: Cell, *, resume: bool, console: Console, callbacks=()) -> None:
        with self.lock:
            self.calls.append((str(cell.run_dir), resume, cell.config.train.lr))
            call = len(self.calls) - 1
        cell.run_dir.mkdir(parents=True, exist_ok=True)
        (cell.run_dir / "hkft_config.yaml").write_text(config_to_yaml(cell.config))
        if call in self.interrupt:
            checkpoint = cell.run_dir / "checkpoints/checkpoint-2"
            checkpoint.mkdir(parents=True)
            (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
            (checkpoint / "adapter_model.safetensors").write_bytes(b"")
            raise InterruptedRun("stopped by SIGINT at step 2", "continue with --resume")
        final = score(cell)
        for step, value in zip(EVAL_STEPS, (final - 0.2, final - 0.1, final)):
            with (cell.run_dir / "metrics.jsonl").open("a") as log:
                log.write(json.dumps({"step": step, "eval_accuracy": value, "eval_loss": 1 - value}) + "\n")
            for callback in callbacks:
                callback.on_evaluate(None, SimpleNamespace(global_step=step, max_steps=EVAL_STEPS[-1]), None,
                                     metrics={"eval_accuracy": value})
        (cell.run_dir / "metrics.json").write_text(json.dumps({"train": {}, "eval": {"split": "test", "accuracy": final}}))


def tune(path: Path, trainer: FakeTrials, *, seeds: int = 0, console: Console | None = None) -> list[optuna.Study]:
    return run_tune(plan_tune(load_study(path)), console or quiet(), seeds=seeds, train_fn=trainer)


LR = {"low": 1e-5, "high": 1e-1, "log": True}


def test_trials_are_run_directories_and_the_best_becomes_a_preset(tmp_path):
    trainer = FakeTrials()
    (study,) = tune(write_study(tmp_path, {"train.lr": LR, "lora.r": [4, 8]}, pruner="none"), trainer)
    out = tmp_path / "out"
    trials = study.trials
    assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))) == 4
    for trial in trials:
        run_dir = out / f"trial-{trial.number:04d}"
        assert trial.user_attrs["run_dir"] == str(run_dir)
        record = json.loads((run_dir / TRIAL_RECORD).read_text())
        assert record["state"] == trial.state.name.lower() and record["trial"] == trial.number
        config = load_config(run_dir / "hkft_config.yaml")
        assert config.train.lr == pytest.approx(trial.params["train.lr"]) and config.lora.r == trial.params["lora.r"]
        assert config.train.metric_for_best == "accuracy"
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    for trial in complete:  # the objective is the best validation score the run logged
        lr = trial.params["train.lr"]
        assert trial.value == pytest.approx(0.9 - abs(math.log10(lr) + 3) / 10)
    best = max(complete, key=lambda t: t.value)
    preset = load_config(out / "best.yaml")
    assert preset.train.lr == pytest.approx(best.params["train.lr"]) and preset.lora.r == best.params["lora.r"]
    assert preset.output.dir == str(out / "best")
    rows = (out / "trials.csv").read_text().splitlines()
    assert len(rows) == 1 + len(trials) and "run_dir" in rows[0] and "validation_accuracy" in rows[0]
    for name in ("optimization_history.png", "metric_vs_param.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG")
    assert not (out / "param_importances.png").exists()  # 4 trials say nothing about 2 parameters' shares


def test_every_pruned_trial_trailed_the_median_when_it_stopped(tmp_path):
    trainer = FakeTrials()
    (study,) = tune(write_study(tmp_path, {"train.lr": LR}, trials=8, seed=3), trainer)
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned, "a search over five decades of learning rate should prune something"
    for trial in pruned:
        step, value = max(trial.intermediate_values.items())
        earlier = [t.intermediate_values[step] for t in study.trials
                   if t.number < trial.number and t.state == optuna.trial.TrialState.COMPLETE]
        assert value < statistics.median(earlier)
        run_dir = Path(trial.user_attrs["run_dir"])
        assert json.loads((run_dir / TRIAL_RECORD).read_text())["state"] == "pruned"
        assert not (run_dir / "metrics.json").exists()  # stopped at that evaluation
        assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == EVAL_STEPS.index(step) + 1


def test_an_interrupted_trial_resumes_in_its_own_run_directory(tmp_path):
    path = write_study(tmp_path, {"train.lr": LR}, trials=3)
    first = FakeTrials(interrupt=(1,))
    with pytest.raises(InterruptedRun, match="run the same hkft tune command to continue"):
        tune(path, first)
    interrupted_dir, _, interrupted_lr = first.calls[1]
    assert json.loads((Path(interrupted_dir) / TRIAL_RECORD).read_text())["state"] == "interrupted"

    again = FakeTrials()
    (study,) = tune(path, again)
    assert again.calls[0] == (interrupted_dir, True, interrupted_lr)  # same values, resumed from its checkpoint
    finished = study.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))
    assert len(finished) == 3
    assert {Path(t.user_attrs["run_dir"]).name for t in finished} == {"trial-0000", "trial-0001", "trial-0003"}

    rerun = FakeTrials()
    tune(path, rerun)
    assert rerun.calls == []  # a finished study trains nothing


def test_per_method_searches_each_get_their_own_best_learning_rate(tmp_path):
    trainer = FakeTrials()
    console = quiet()
    studies = tune(write_study(tmp_path, {"train.lr": LR, "dropout.method": ["none", "hiddenkey"]}, trials=2,
                               per="dropout.method"), trainer, console=console)
    assert [study.study_name for study in studies] == ["out:method=none", "out:method=hiddenkey"]
    for method, study in zip(("none", "hiddenkey"), studies):
        folder = tmp_path / "out" / f"method={method}"
        assert all(Path(t.user_attrs["run_dir"]).parent == folder for t in study.trials)
        assert all("dropout.method" not in t.params for t in study.trials)
        best = load_config(folder / "best.yaml")
        assert best.dropout.method == method and best.train.lr == pytest.approx(study.best_params["train.lr"])
    table = console.file.getvalue()
    assert "method=none" in table and "method=hiddenkey" in table


def test_seeds_retrain_the_best_settings_and_compare_them(tmp_path):
    trainer = FakeTrials()
    tune(write_study(tmp_path, {"train.lr": LR}, trials=2), trainer, seeds=2)
    out = tmp_path / "out"
    seed_runs = [call for call in trainer.calls if "/seeds/" in call[0]]
    best_lr = load_config(out / "best.yaml").train.lr
    assert [Path(run).name for run, _, _ in seed_runs] == ["seed=43", "seed=44"]  # quickstart's seed is 42
    assert all(lr == pytest.approx(best_lr) for _, _, lr in seed_runs)
    assert "| 2 |" in (out / "seeds/comparison.md").read_text()  # one row over two seeds


class SeedLuck(FakeTrials):
    """A setting's score depends on the seed too: seed 42 (the base's) is 0.2 luckier than the others."""

    def __call__(self, cell: Cell, *, resume: bool, console: Console, callbacks=()) -> None:
        luck = 0.2 if cell.config.train.seed == 42 else 0.0
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(__name__ + ".score", lambda cell: 0.9 - abs(math.log10(cell.config.train.lr) + 3) / 10 - 0.2 + luck)
            super().__call__(cell, resume=resume, console=console, callbacks=callbacks)


def test_a_trial_of_several_seeds_scores_their_mean_resumes_each_and_seeds_follow_them(tmp_path):
    path = write_study(tmp_path, {"train.lr": LR}, trials=2, pruner="none", trial_seeds=3)
    trainer = SeedLuck(interrupt=(1,))  # the first trial's second seed is stopped like Ctrl-C
    with pytest.raises(InterruptedRun):
        tune(path, trainer)
    (study,) = tune(path, trainer, seeds=2)
    out = tmp_path / "out"
    runs = [(Path(run).name, resume) for run, resume, _ in trainer.calls]
    assert runs[:4] == [("trial-0000", False), ("trial-0000-seed-43", False), ("trial-0000-seed-43", True),
                        ("trial-0000-seed-44", False)]
    for trial in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        number = origin_number(trial)
        base = 0.9 - abs(math.log10(trial.params["train.lr"]) + 3) / 10 - 0.2
        assert trial.value == pytest.approx(base + 0.2 / 3)  # the mean of one lucky seed and two others
        record = json.loads((Path(trial.user_attrs["run_dir"]) / TRIAL_RECORD).read_text())
        assert record["seed_values"] == pytest.approx([base + 0.2, base, base])
        for seed in (43, 44):
            assert load_config(out / f"trial-{number:04d}-seed-{seed}/hkft_config.yaml").train.seed == seed
    seed_runs = [Path(run).name for run, _, _ in trainer.calls if "/seeds/" in run]
    assert seed_runs == ["seed=45", "seed=46"]  # new seeds: none a trial was scored on
    assert len((out / "trials.csv").read_text().splitlines()) == 1 + 2  # one row a trial


def test_a_changed_number_of_seeds_a_trial_is_refused_on_rerun(tmp_path):
    tune(write_study(tmp_path, {"train.lr": LR}, trials=1, pruner="none", trial_seeds=2), FakeTrials())
    with pytest.raises(ConfigError, match="holds another study"):
        tune(write_study(tmp_path, {"train.lr": LR}, trials=1, pruner="none"), FakeTrials())


def test_two_workers_share_one_study(tmp_path):
    path = write_study(tmp_path, {"train.lr": LR}, trials=4, pruner="none")
    plan = plan_tune(load_study(path))
    trainer = FakeTrials()
    errors = []

    def worker():
        try:
            run_tune(plan, quiet(), train_fn=trainer)
        except Exception as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    run_dirs = [run for run, _, _ in trainer.calls]
    assert len(run_dirs) == len(set(run_dirs)) and 4 <= len(run_dirs) <= 5  # a last trial may start in both


def test_a_changed_search_space_is_refused_on_the_same_storage(tmp_path):
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    tune(write_study(tmp_path / "a", {"train.lr": LR}, trials=1, storage=storage), FakeTrials())
    with pytest.raises(ConfigError, match="study out in .*shared.db was started with another search"):
        tune(write_study(tmp_path / "b", {"train.lr": {"low": 1e-4, "high": 1e-2}}, trials=1, storage=storage),
             FakeTrials())


def test_a_run_directory_left_by_another_study_is_not_overwritten(tmp_path):
    path = write_study(tmp_path, {"train.lr": LR}, trials=1)
    tune(path, FakeTrials())
    (tmp_path / "out/optuna.db").unlink()
    with pytest.raises(TrainingError, match="trial-0000 holds a run that is not trial 0"):
        tune(path, FakeTrials())


@pytest.mark.parametrize(("search", "tune_settings", "fragments"), [
    ({"train.lr": {"low": 1e-2, "high": 1e-5}}, {}, ["search key 'train.lr': low (0.01) must be below high (1e-05)"]),
    ({"train.lr": {"low": 0, "high": 1e-2, "log": True}}, {}, ["log: true needs low > 0"]),
    ({"train.lr": {"low": 1e-5, "hihg": 1e-2}}, {}, ["hihg: unknown range key (did you mean high?)"]),
    ({"train.lr": 0.001}, {}, ["give a list of values or a range"]),
    ({"train.lr": {"low": "x", "high": 1}}, {}, ["search key 'train.lr': low: Input should be a valid number"]),
    ({"train.lrr": [1e-3]}, {}, ["search train.lrr=0.001", "did you mean train.lr?"]),
    ({"dropout.rate": {"low": 0.1, "high": 1.5}}, {}, ["search dropout.rate=1.5", "dropout.rate"]),
    ({"dropout.method": ["none", "hiddenky"]}, {}, ["search dropout.method=hiddenky", "unknown dropout method"]),
    ({"lora.r": {"low": 2.5, "high": 16}}, {}, ["search lora.r=2.5", "lora.r: Input should be a valid integer"]),
    ({"lora.r": {"low": 2, "high": 16, "step": 0.5}}, {}, ["search lora.r: lora.r takes whole numbers"]),
    ({"lora.r": [4, 4]}, {}, ["search lora.r: a value is listed twice"]),
    ({"train.lr": [1e-3]}, {"per": "train.lr"}, ["tune.per: train.lr is the only search key"]),
    ({"train.lr": LR}, {"per": "train.lr"}, ["tune.per: train.lr must be a search key with a list of values"]),
    ({"train.lr": LR}, {"metric": "f1"}, ["tune.metric: 'f1' is not a classification validation metric", "macro_f1"]),
    ({"train.lr": LR}, {"trails": 3}, ["tune.trails: unknown tune key (did you mean trials?)"]),
    ({"train.lr": LR}, {"trial_seeds": 2}, ["tune.trial_seeds: 2 seeds a trial need tune.pruner: none"]),
    ({}, {}, ["this study has no search: section"]),
])
def test_bad_search_specs_fail_in_one_line_before_anything_runs(tmp_path, search, tune_settings, fragments):
    trainer = FakeTrials()
    with pytest.raises(ConfigError) as caught:
        tune(write_study(tmp_path, search, **tune_settings), trainer)
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    assert trainer.calls == [] and not (tmp_path / "out").exists()


def test_cli_errors_and_dry_runs(cli, tmp_path):
    bad = write_study(tmp_path, {"train.lr": {"low": 1e-2, "high": 1e-5}})
    assert_one_line_error(cli("tune", bad), "low (0.01) must be below high")
    assert_one_line_error(cli("sweep", write_study(tmp_path, {"train.lr": LR})), "has a search: section and no grid",
                          "hkft tune")
    assert_one_line_error(cli("tune", write_study(tmp_path, {"train.lr": LR}), "--set", "train.lrr=1"),
                          "did you mean train.lr?")

    study = write_study(tmp_path, {"train.lr": LR, "dropout.method": ["none", "hiddenkey"]}, per="dropout.method")
    result = cli("tune", study, "--dry-run", "--seeds", "2", "--set", "train.batch_size=8")
    assert result.exit_code == 0, result.stderr
    assert "estimated runs: 12 at most (2 x (4 trials + 2 seeds)" in result.stdout and "log scale" in result.stdout
    assert not (tmp_path / "out").exists()

    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"base": "quickstart", "output": str(tmp_path / "g"),
                                    "grid": {"dropout.method": ["none", "hiddenkey"], "train.seed": [1, 2]}}))
    result = cli("sweep", grid, "--dry-run", "--set", "train.epochs=1")
    assert result.exit_code == 0, result.stderr
    assert "4 runs of 4 grid points" in result.stdout and "new       method=hiddenkey,seed=2" in result.stdout
    assert not (tmp_path / "g").exists()


def test_set_overrides_reach_every_sweep_cell(tmp_path):
    from hkft.commands.common import load_study_with

    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"base": "quickstart", "output": str(tmp_path / "g"), "overrides": ["train.epochs=2"],
                                    "grid": {"train.seed": [1]}}))
    (cell,) = expand_cells(load_study_with(str(grid), ["train.epochs=1", "lora.r=4"]))
    assert (cell.config.train.epochs, cell.config.lora.r) == (1, 4)


SMALL_RUN = ["train.max_steps=6", "data.max_samples=48", "train.batch_size=8", "train.eval_strategy=steps",
             "train.eval_steps=2", "train.logging_steps=2", "output.report_to=[]"]


def test_a_pruned_trial_stops_the_real_trainer_at_that_evaluation(tmp_path):
    """MiniLM, one training step: the evaluation reaches the trial, the pruner's verdict stops training."""
    from hkft.study.grid import train_cell
    from hkft.study.spec import Study

    class AlwaysPrune(optuna.pruners.BasePruner):
        def prune(self, study, trial) -> bool:
            return True

    trial = optuna.create_study(direction="maximize", pruner=AlwaysPrune()).ask()
    overrides = [*SMALL_RUN, "train.max_steps=4", "train.eval_steps=1", "data.max_samples=16"]
    (cell,) = expand_cells(Study(base="quickstart", output=str(tmp_path), overrides=overrides, grid={"train.seed": [1]}))
    with pytest.raises(optuna.TrialPruned, match="at step 1"):
        train_cell(cell, resume=False, console=quiet(), callbacks=[ReportToTrial(trial, "accuracy", warmup=0.0)])
    logged = [json.loads(line) for line in (cell.run_dir / "metrics.jsonl").read_text().splitlines()]
    evaluations = [event for event in logged if "eval_accuracy" in event]
    assert [(event["step"], event["eval_accuracy"]) for event in evaluations] == list(
        trial.study.trials[0].intermediate_values.items())
    assert not (cell.run_dir / "metrics.json").exists() and not (cell.run_dir / "adapter").exists()


@pytest.mark.slow
def test_quickstart_tune_prunes_resumes_after_ctrl_c_and_its_best_preset_trains(tmp_path, cli):
    """The whole command on MiniLM, offline: 3 trials, a real SIGINT during the second, a re-run that
    finishes the study, and best.yaml trained by hkft train as is."""
    import os
    import signal
    import subprocess
    import sys

    study = tmp_path / "tune.yaml"
    study.write_text(yaml.safe_dump({
        "base": "quickstart", "output": str(tmp_path / "out"), "overrides": SMALL_RUN,
        "search": {"train.lr": {"low": 1e-5, "high": 1e-1, "log": True}, "lora.r": [4, 8]},
        "tune": {"trials": 3, "startup_trials": 1, "warmup": 0}}))  # six steps: prune from the first evaluation
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "hkft", "tune", str(study)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    in_second_trial = False
    for line in process.stdout:
        in_second_trial = in_second_trial or line.startswith("[trial 1]")
        if in_second_trial and "step 2/6" in line:
            process.send_signal(signal.SIGINT)
            break
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 130, stderr
    errors = [line for line in stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "run the same hkft tune command" in errors[0], stderr
    interrupted = tmp_path / "out/trial-0001"
    assert json.loads((interrupted / TRIAL_RECORD).read_text())["state"] == "interrupted"
    assert any((interrupted / "checkpoints").glob("checkpoint-*"))

    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1200)
    assert again.returncode == 0, again.stderr
    assert "trial-0001" in again.stdout and "resuming" in again.stdout
    storage = f"sqlite:///{tmp_path / 'out/optuna.db'}"
    (summary,) = optuna.get_all_study_summaries(storage)
    trials = optuna.load_study(study_name=summary.study_name, storage=storage).trials
    states = [trial.state for trial in trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) + states.count(optuna.trial.TrialState.PRUNED) == 3
    assert optuna.trial.TrialState.PRUNED in states
    assert json.loads((interrupted / TRIAL_RECORD).read_text())["state"] in ("complete", "pruned")

    best = load_config(tmp_path / "out/best.yaml")
    result = cli("train", tmp_path / "out/best.yaml", "--output-dir", tmp_path / "again")
    assert result.exit_code == 0, result.stderr
    assert json.loads((tmp_path / "again/metrics.json").read_text())["eval"]["split"] == "test"
    assert load_config(tmp_path / "again/hkft_config.yaml").train.lr == best.train.lr


def test_the_shipped_tune_study_plans_one_search_per_method():
    plan = plan_tune(load_study("quickstart-tune"))
    assert [search.fixed for search in plan.searches] == [{"dropout.method": m} for m in ("none", "hiddenkey-", "hiddenkey")]
    assert plan.metric == "accuracy"
    # none drops nothing: its search leaves dropout.rate out rather than spend trials on a value it ignores
    assert [(set(search.space), search.ignored) for search in plan.searches] == [
        ({"train.lr"}, ("dropout.rate",)), ({"train.lr", "dropout.rate"}, ()), ({"train.lr", "dropout.rate"}, ())]
