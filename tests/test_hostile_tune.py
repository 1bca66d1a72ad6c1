"""hkft tune as a hostile or unlucky user meets it (situation -> expected outcome): two studies in one
folder, a worker killed with kill -9, Ctrl-C, plots of one trial, a rate searched for a method that drops
nothing, a pruner that only rewards fast learners, a direction against the metric, the --seeds table and
the closing table on an 80-column terminal. Training is a stand-in (tests/tune_fakes.py, test_tune's
FakeTrials); the real trainer is exercised in test_tune and the slow suite."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import assert_one_line_error
from rich.console import Console
from test_tune import LR, FakeTrials, quiet, tune, write_study
from tune_fakes import STEPS, SteppedTrials, accuracy

from hkft.config import load_config
from hkft.errors import ConfigError, InterruptedRun
from hkft.study.grid import run_sweep
from hkft.study.search import TRIAL_RECORD, plan_tune, run_tune
from hkft.study.spec import STUDY_MARKER, load_study

REPO = Path(__file__).resolve().parents[1]


def read_csv(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.open()))


# -- 1. one output folder, one study -------------------------------------------------------------------

@pytest.mark.parametrize(("second", "changed"), [
    ({"tune": {"per": "dropout.method"}, "search": {"train.lr": LR, "dropout.method": ["none", "hiddenkey"]}},
     "set of searches (tune.per)"),
    ({"search": {"train.lr": {"low": 1e-4, "high": 1e-2}}}, "search"),
    ({"tune": {"storage": "sqlite:///{tmp}/elsewhere.db"}}, "tune.storage"),
    ({"overrides": ["train.epochs=2"]}, "base"),
    ({"tune": {"metric": "macro_f1"}}, "base, metric"),  # the metric also picks each trial's checkpoint
])
def test_a_second_study_with_the_same_output_is_refused_and_the_first_is_untouched(tmp_path, second, changed):
    first = write_study(tmp_path, {"train.lr": LR}, trials=2)
    tune(first, FakeTrials())
    out = tmp_path / "out"
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}

    study = yaml.safe_load(first.read_text())
    for key, value in second.items():
        study[key] = {**study[key], **value} if isinstance(value, dict) and key == "tune" else value
    study["tune"] = {key: value.format(tmp=tmp_path) if isinstance(value, str) else value
                     for key, value in study["tune"].items()}
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(study))
    trainer = FakeTrials()
    with pytest.raises(ConfigError) as caught:
        tune(other, trainer)
    assert str(caught.value) == (f"study output {out} holds another study (started with another {changed}) "
                                 "(give this study its own output folder, or restore the study file)")
    assert trainer.calls == []
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before


def test_a_folder_holding_something_else_is_refused_and_the_same_study_continues(tmp_path, cli):
    (tmp_path / "out").mkdir()
    (tmp_path / "out/comparison.csv").write_text("a sweep's table\n")
    path = write_study(tmp_path, {"train.lr": LR}, trials=1)
    assert_one_line_error(cli("tune", path, "--dry-run"), f"study output {tmp_path / 'out'} already holds files "
                          "that are not an hkft tune study's (comparison.csv)")
    (tmp_path / "out/comparison.csv").unlink()
    tune(path, FakeTrials())
    assert (tmp_path / "out" / STUDY_MARKER).is_file()
    more = write_study(tmp_path, {"train.lr": LR}, trials=2)  # a bigger budget is the same study, continued
    (study,) = tune(more, FakeTrials())
    assert len(study.trials) == 2

    per = write_study(tmp_path, {"train.lr": LR, "dropout.method": ["none", "hiddenkey"]}, per="dropout.method")
    assert_one_line_error(cli("tune", per, "--dry-run"),
                          "holds another study (started with another set of searches (tune.per))")


def test_a_sweep_into_a_tune_folder_is_refused(tmp_path):
    tune(write_study(tmp_path, {"train.lr": LR}, trials=1), FakeTrials())
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"base": "quickstart", "output": str(tmp_path / "out"),
                                    "grid": {"train.seed": [1, 2]}}))
    trainer = FakeTrials()
    with pytest.raises(ConfigError, match=f"study output {tmp_path / 'out'} holds an hkft tune study"):
        run_sweep(load_study(grid), quiet(), train_fn=trainer)
    assert trainer.calls == []


# -- 2. kill -9, then an immediate re-run ------------------------------------------------------------

def test_a_trial_of_a_killed_worker_is_taken_over_by_an_immediate_rerun(tmp_path):
    """A real `kill -9` of a worker process in trial 1 after its first checkpoint: the re-run, started at
    once (well within Optuna's heartbeat grace), resumes trial 1 from that checkpoint and ends with the
    three trials one uninterrupted worker would have."""
    path = write_study(tmp_path, {"train.lr": LR}, trials=3, pruner="none")
    calls = tmp_path / "calls.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    worker = subprocess.Popen([sys.executable, str(REPO / "tests/tune_fakes.py"), str(path), str(calls), "0.3"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    seen = []
    for line in worker.stdout:
        seen.append(line)
        if line.startswith("trial-0001 step 4/"):
            worker.send_signal(signal.SIGKILL)
            break
    worker.wait(timeout=60)
    assert worker.returncode == -signal.SIGKILL, "".join(seen)
    out = tmp_path / "out"
    assert json.loads((out / "trial-0001" / TRIAL_RECORD).read_text())["state"] == "running"

    console = quiet()
    (study,) = run_tune(plan_tune(load_study(path)), console, train_fn=SteppedTrials(calls))
    log = [json.loads(line) for line in calls.read_text().splitlines()]
    rerun = [call for call in log if call["pid"] == os.getpid()]
    assert rerun[0] == {"pid": os.getpid(), "run_dir": str(out / "trial-0001"), "resume": True, "start": 2}
    assert "trial 1 was left running by" in console.file.getvalue()
    assert [t.state for t in study.trials].count(optuna.trial.TrialState.RUNNING) == 0
    rows = read_csv(out / "trials.csv")
    assert [(row["trial"], row["state"], row["attempts"]) for row in rows] == [
        ("0", "COMPLETE", "1"), ("1", "COMPLETE", "2"), ("3", "COMPLETE", "1")]  # attempt 2 of trial 1 is number 2
    for row in rows:  # each trial's value is what an uninterrupted run of its learning rate scores
        config = load_config(Path(row["run_dir"]) / "hkft_config.yaml")
        assert float(row["validation_accuracy"]) == pytest.approx(accuracy(config.train.lr, STEPS))
        assert json.loads((Path(row["run_dir"]) / TRIAL_RECORD).read_text())["state"] == "complete"


def test_which_workers_count_as_gone():
    """Only a process of this machine that has ended: killed but not yet reaped (a zombie), reaped, or its
    id reused by a newer process. Never this process, a live one, or one of another machine."""
    from hkft.study.workers import is_gone, this_worker

    child = subprocess.Popen(["sleep", "60"])
    worker = {**this_worker(), "pid": child.pid, "started": None}
    assert not is_gone(worker) and not is_gone(this_worker())
    assert is_gone({**this_worker(), "pid": child.pid, "started": "1"})  # the id now names another process
    child.kill()
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # ended, not reaped: a zombie
    assert is_gone(worker)
    child.wait()
    assert is_gone(worker)
    assert not is_gone({**worker, "machine": "elsewhere"}) and not is_gone({"machine": worker["machine"]})


# -- 3. Ctrl-C ---------------------------------------------------------------------------------------

def test_a_trial_stopped_by_ctrl_c_is_one_trial_not_a_failure(tmp_path):
    path = write_study(tmp_path, {"train.lr": LR}, trials=1)
    with pytest.raises(InterruptedRun):
        tune(path, FakeTrials(interrupt=(0,)))
    console = Console(file=io.StringIO(), width=100)
    tune(path, FakeTrials(), console=console)
    rows = read_csv(tmp_path / "out/trials.csv")
    assert [row["state"] for row in rows] == ["COMPLETE"]  # not a FAIL row for the stopped attempt
    assert [(row["trial"], row["attempts"]) for row in rows] == [("0", "2")]
    (row,) = [line for line in console.file.getvalue().splitlines() if line.startswith("│")]
    assert row.split("│")[-2].strip() == "0/1"  # pruned: none of the one trial asked for


# -- 4. plots that mean something; keys a method does not read -----------------------------------------

def test_one_trial_draws_no_plot_and_says_why(tmp_path):
    console = quiet()
    tune(write_study(tmp_path, {"train.lr": LR, "lora.r": [4, 8]}, trials=1), FakeTrials(), console=console)
    assert not list((tmp_path / "out").glob("*.png"))
    said = console.file.getvalue()
    assert (f"plots in {tmp_path / 'out'}: none yet; too few completed trials for optimization_history.png, "
            "param_importances.png, metric_vs_param.png") in " ".join(said.split())


def test_enough_trials_draw_every_plot(tmp_path):
    tune(write_study(tmp_path, {"train.lr": LR, "lora.r": [4, 8]}, trials=10, pruner="none"), FakeTrials())
    for name in ("optimization_history.png", "param_importances.png", "metric_vs_param.png"):
        assert (tmp_path / "out" / name).read_bytes().startswith(b"\x89PNG")


def test_a_rate_is_never_sampled_for_a_method_that_drops_nothing(tmp_path):
    trainer = FakeTrials()
    space = {"dropout.method": ["none", "hiddenkey"], "train.lr": LR, "dropout.rate": {"low": 0.01, "high": 0.3}}
    (study,) = tune(write_study(tmp_path, space, trials=6, pruner="none"), trainer)
    methods = {trial.params["dropout.method"] for trial in study.trials}
    assert methods == {"none", "hiddenkey"}, "seed 0 samples both methods"
    for trial in study.trials:
        assert ("dropout.rate" in trial.params) == (trial.params["dropout.method"] == "hiddenkey"), trial.params
    rows = read_csv(tmp_path / "out/trials.csv")
    assert all((row["params_dropout.rate"] == "") == (row["params_dropout.method"] == "none") for row in rows)


def test_per_method_search_of_none_leaves_the_rate_out(tmp_path, cli):
    space = {"dropout.method": ["none", "hiddenkey"], "train.lr": LR, "dropout.rate": {"low": 0.01, "high": 0.3}}
    path = write_study(tmp_path, space, trials=2, per="dropout.method", pruner="none")
    result = cli("tune", path, "--dry-run")
    assert result.exit_code == 0, result.stderr
    assert "search out:method=none in" in result.stdout
    assert "not searched: dropout.rate (no run of this search reads it)" in result.stdout
    none, hiddenkey = tune(path, FakeTrials())
    assert all(set(trial.params) == {"train.lr"} for trial in none.trials)
    assert all(set(trial.params) == {"train.lr", "dropout.rate"} for trial in hiddenkey.trials)

    (tmp_path / "rate-only").mkdir()
    only_rate = write_study(tmp_path / "rate-only", {"dropout.method": ["none", "hiddenkey"],
                                                     "dropout.rate": {"low": 0.01, "high": 0.3}}, per="dropout.method")
    assert_one_line_error(cli("tune", only_rate, "--dry-run"),
                          "search method=none: no run reads any searched key (dropout.rate)")


# -- 6. the pruner does not favour fast learners ------------------------------------------------------

FAST, SLOW, HOPELESS = 1e-3, 5e-4, 1e-5
EVALS = (32, 64, 96, 128, 160, 192)


def learning_curve(lr: float) -> list[float]:
    """Validation accuracy every 32 of 192 steps, after the runs measured in the overfitting study: a fast
    learning rate leads early and then overfits; a slower one is behind at step 64 and ends best."""
    return {FAST: [0.60, 0.66, 0.69, 0.70, 0.69, 0.68], 8e-4: [0.59, 0.65, 0.68, 0.70, 0.70, 0.69],
            SLOW: [0.50, 0.56, 0.70, 0.73, 0.75, 0.76], 6e-4: [0.50, 0.55, 0.695, 0.72, 0.74, 0.75],
            HOPELESS: [0.50, 0.50, 0.50, 0.51, 0.51, 0.51]}[lr]


class CurveTrials:
    def __init__(self):
        self.trained: dict[float, list[int]] = {}

    def __call__(self, cell, *, resume, console, callbacks=()):
        from types import SimpleNamespace

        from hkft.config import config_to_yaml

        lr = cell.config.train.lr
        cell.run_dir.mkdir(parents=True, exist_ok=True)
        (cell.run_dir / "hkft_config.yaml").write_text(config_to_yaml(cell.config))
        for step, value in zip(EVALS, learning_curve(lr)):
            self.trained.setdefault(lr, []).append(step)
            with (cell.run_dir / "metrics.jsonl").open("a") as log:
                log.write(json.dumps({"step": step, "eval_accuracy": value}) + "\n")
            for callback in callbacks:
                callback.on_evaluate(None, SimpleNamespace(global_step=step, max_steps=EVALS[-1]), None,
                                     metrics={"eval_accuracy": value})
        (cell.run_dir / "metrics.json").write_text(json.dumps({"eval": {"split": "test", "accuracy": value}}))


def test_a_slow_learner_that_ends_best_is_not_pruned_but_a_hopeless_one_is(tmp_path):
    """Two fast learning rates finish first (the pruner's startup trials), then two slower ones that trail
    the median at step 64 of 192 and end best, then one that never learns. Pruning at step 64 (Optuna's
    median pruner without warm-up) would keep the fast ones only; past half of the run the slow ones lead."""
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    path = write_study(tmp_path, {"train.lr": {"low": 1e-6, "high": 1e-2, "log": True}}, trials=5, startup_trials=2,
                       storage=storage)
    plan = plan_tune(load_study(path))
    queued = optuna.create_study(study_name=plan.searches[0].name, storage=storage, direction="maximize")
    for lr in (FAST, 8e-4, SLOW, 6e-4, HOPELESS):
        queued.enqueue_trial({"train.lr": lr})
    trainer = CurveTrials()
    (study,) = run_tune(plan, quiet(), train_fn=trainer)
    states = {trial.params["train.lr"]: trial.state.name for trial in study.trials}
    assert states == {FAST: "COMPLETE", 8e-4: "COMPLETE", SLOW: "COMPLETE", 6e-4: "COMPLETE", HOPELESS: "PRUNED"}
    assert trainer.trained[HOPELESS] == [32, 64, 96]  # stopped at the first evaluation past half of the run
    assert load_config(tmp_path / "out/best.yaml").train.lr == pytest.approx(SLOW)


# -- 7. a direction against the metric ----------------------------------------------------------------

@pytest.mark.parametrize(("settings", "message"), [
    ({"metric": "loss", "direction": "maximize"},
     "tune.direction: maximize contradicts tune.metric loss, where lower is better "
     "(leave tune.direction out (it follows the metric) or set it to minimize)"),
    ({"metric": "accuracy", "direction": "minimize"},
     "tune.direction: minimize contradicts tune.metric accuracy, where higher is better"),
    ({"direction": "minimize"}, "contradicts tune.metric accuracy"),  # the task's default metric
])
def test_a_direction_that_contradicts_the_metric_is_refused(tmp_path, cli, settings, message):
    assert_one_line_error(cli("tune", write_study(tmp_path, {"train.lr": LR}, **settings), "--dry-run"), message)
    assert not (tmp_path / "out").exists()


def test_a_direction_that_agrees_with_the_metric_is_accepted(tmp_path):
    plan = plan_tune(load_study(write_study(tmp_path, {"train.lr": LR}, metric="loss", direction="minimize")))
    assert (plan.metric, plan.direction) == ("loss", "minimize")


# -- 8. the --seeds comparison says which split it scores ------------------------------------------------

def test_the_seeds_comparison_says_it_is_scored_on_the_test_split(tmp_path):
    console = Console(file=io.StringIO(), width=200)
    tune(write_study(tmp_path, {"train.lr": LR}, trials=2), FakeTrials(), seeds=2, console=console)
    said = " ".join(console.file.getvalue().split())  # the title wraps at the table's width
    assert "median ± sample std over seeds, scored on the test split" in said
    assert (tmp_path / "out/seeds/comparison.md").read_text().startswith(
        "Median ± sample standard deviation over seeds, scored on the test split.")


# -- 9. the closing table at 80 columns -----------------------------------------------------------------

def test_the_closing_table_reads_at_80_columns(tmp_path):
    console = Console(file=io.StringIO(), width=80)
    space = {"dropout.method": ["none", "hiddenkey-", "hiddenkey"], "train.lr": LR,
             "dropout.rate": {"low": 0.01, "high": 0.3}, "lora.r": [4, 8]}
    tune(write_study(tmp_path, space, trials=2, per="dropout.method", pruner="none"), FakeTrials(), console=console)
    text = console.file.getvalue()
    table = text[text.index("best trials by validation accuracy"):]
    assert "…" not in table
    assert all(len(line) <= 80 for line in table.splitlines())
    cells = [line.split("│")[1].strip() for line in table.splitlines() if line.startswith("│")]
    assert [cell for cell in cells if cell] == ["method=none", "method=hiddenkey-", "method=hiddenkey"]
