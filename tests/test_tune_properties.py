"""Randomised situations over hkft tune's study files (Hypothesis, derandomised so that CI is
reproducible): concurrent workers on one SQLite study, a worker killed at a random point (in a random
trial, at a random step, or after training but before Optuna heard of it), and output folders reused by
other studies. After each situation the study must hold every trial once, each trial's value must be
what an uninterrupted run scores, and trials.csv and best.yaml must agree with the study.

A killed worker is a thread whose trial ends in an exception Optuna does not catch (as a killed process,
its trial stays RUNNING), and whose recorded process id is that of a process that has ended. The fast
suite tries a few situations per property; the slow suite many more."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import tempfile
import threading
from pathlib import Path

import optuna
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console
from tune_fakes import STEPS, SteppedTrials, accuracy

from hkft.config import load_config
from hkft.errors import ConfigError
from hkft.study import search as search_module
from hkft.study.search import TRIAL_RECORD, plan_tune, run_tune, trials_by_run
from hkft.study.spec import load_study

LR = {"low": 1e-5, "high": 1e-1, "log": True}
FAST, SLOW = 4, 25  # situations per property in the fast and the slow suite


class Killed(BaseException):
    """What kill -9 looks like to the study: the trial never ends, nothing is told to Optuna."""


@pytest.fixture(autouse=True)
def quick_polls(monkeypatch):
    monkeypatch.setattr(search_module, "POLL_S", 0.05)


def write(folder: Path, study: dict) -> Path:
    path = folder / f"study-{len(list(folder.glob('study-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def study_file(folder: Path, *, trials: int, pruner: str, per: bool = False, storage: str | None = None,
               high: float = 1e-1) -> dict:
    search = {"train.lr": {**LR, "high": high}}
    if per:
        search["dropout.method"] = ["none", "hiddenkey"]
    tune = {"trials": trials, "pruner": pruner, "startup_trials": 1, **({"per": "dropout.method"} if per else {}),
            **({"storage": storage} if storage else {})}
    return {"base": "quickstart", "output": str(folder / "out"), "overrides": ["train.epochs=1"],
            "search": search, "tune": tune}


def worker_thread(path: Path, calls: Path, name: str, stop=None) -> tuple[threading.Thread, list]:
    outcome: list = []

    def work():
        try:
            run_tune(plan_tune(load_study(path)), Console(file=io.StringIO(), width=120),
                     train_fn=SteppedTrials(calls, stop=stop))
            outcome.append("done")
        except Killed:
            outcome.append("killed")
        except BaseException as err:  # noqa: BLE001 - reported by the property check
            outcome.append(err)

    return threading.Thread(target=work, name=name), outcome


def check_study(path: Path, calls: Path, killed_at: dict[str, int] | None = None) -> None:
    """The study as one uninterrupted worker would leave it, given the trials it ran."""
    plan = plan_tune(load_study(path))
    storage = optuna.storages.RDBStorage(plan.storage_url)
    (search,) = plan.searches
    study = optuna.load_study(study_name=search.name, storage=storage)
    states = [trial.state for trial in study.trials]
    assert optuna.trial.TrialState.RUNNING not in states and optuna.trial.TrialState.WAITING not in states
    runs = trials_by_run(study)
    finished = [attempts[-1] for attempts in runs if attempts[-1].state.is_finished()
                and attempts[-1].state != optuna.trial.TrialState.FAIL]
    assert plan.study.tune.trials <= len(finished) == len(runs)
    log = [json.loads(line) for line in calls.read_text().splitlines()]
    rows = {row["trial"]: row for row in csv.DictReader((plan.output / "trials.csv").open())}
    assert len(rows) == len(runs)
    for attempts in runs:
        last = attempts[-1]
        run_dir = Path(last.user_attrs["run_dir"])
        lr = load_config(run_dir / "hkft_config.yaml").train.lr
        record = json.loads((run_dir / TRIAL_RECORD).read_text())
        row = rows[str(attempts[0].number)]
        assert record["state"] == last.state.name.lower() == row["state"].lower()
        assert int(row["attempts"]) == len(attempts) and row["run_dir"] == str(run_dir)
        if last.state == optuna.trial.TrialState.COMPLETE:
            assert last.value == pytest.approx(accuracy(lr, STEPS)) == float(row["validation_accuracy"])
        trained = [call for call in log if call["run_dir"] == str(run_dir)]
        fresh = [call for call in trained if not call["resume"]]
        assert fresh == trained[:1] or (killed_at or {}).get(str(run_dir), STEPS) <= 2, trained  # resumed, not redone
    complete = [attempts[-1] for attempts in runs if attempts[-1].state == optuna.trial.TrialState.COMPLETE]
    best = min(complete, key=lambda trial: (-trial.value, trial.number))
    assert load_config(plan.output / "best.yaml").train.lr == pytest.approx(best.params["train.lr"])


# -- concurrent workers, one of them killed at a random point --------------------------------------------

situation = st.fixed_dictionaries({
    "trials": st.integers(2, 4),
    "workers": st.integers(1, 3),
    "pruner": st.sampled_from(["none", "median"]),
    "kill": st.none() | st.tuples(st.integers(0, 2), st.integers(1, STEPS + 1)),  # (its n-th trial, before step)
})


def kill_point(nth: int, step: int, stand_in: subprocess.Popen, killed_at: dict[str, int]):
    """The doomed worker dies before ``step`` of the ``nth`` trial it trains (if it gets that far)."""
    seen: list[Path] = []

    def stop(run: Path, at: int):
        if threading.current_thread().name != "doomed":
            return None
        if run not in seen:
            seen.append(run)
        if seen.index(run) != nth or at != step:
            return None
        killed_at[str(run)] = step
        stand_in.kill()
        stand_in.wait()
        return Killed()

    return stop


def run_situation(case: dict) -> None:
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        path = write(folder, study_file(folder, trials=case["trials"], pruner=case["pruner"]))
        calls = folder / "calls.jsonl"
        calls.touch()
        # The doomed worker's trials are recorded as run by this stand-in process, killed at the kill point.
        stand_in = subprocess.Popen(["sleep", "600"])
        killed_at: dict[str, int] = {}
        stop = kill_point(*case["kill"], stand_in, killed_at) if case["kill"] else None
        threads = [worker_thread(path, calls, "doomed" if index == 0 and stop else f"worker-{index}", stop)
                   for index in range(case["workers"])]
        real_worker = search_module.this_worker
        try:
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(search_module, "this_worker", lambda: {**real_worker(), "pid": stand_in.pid, "started": None}
                              if threading.current_thread().name == "doomed" else real_worker())
                for thread, _ in threads:
                    thread.start()
                for thread, _ in threads:
                    thread.join(timeout=300)
        finally:
            stand_in.kill()
            stand_in.wait()
        outcomes = [outcome for _, outcome in threads]
        assert all(outcome in (["done"], ["killed"]) for outcome in outcomes), outcomes
        if ["done"] not in outcomes:  # nobody left: the re-run takes the killed trial over
            run_tune(plan_tune(load_study(path)), Console(file=io.StringIO()), train_fn=SteppedTrials(calls))
        check_study(path, calls, killed_at)


@settings(max_examples=FAST, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(situation)
def test_workers_and_kills_leave_a_whole_study(case):
    run_situation(case)


@pytest.mark.slow
@settings(max_examples=SLOW, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(situation)
def test_workers_and_kills_leave_a_whole_study_many(case):
    run_situation(case)


# -- output folders reused by other studies ------------------------------------------------------------

variant = st.fixed_dictionaries({
    "trials": st.integers(1, 3),
    "per": st.booleans(),
    "high": st.sampled_from([1e-1, 1e-2]),
    "own_storage": st.booleans(),
})


def run_reuse(variants: list[dict]) -> None:
    """Studies run one after the other into one output folder: each is refused in one line, leaving the
    folder as it was, unless it is the first study again (perhaps with more trials), which continues."""
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        out = folder / "out"

        def identity(case):
            return case["per"], case["high"], case["own_storage"]

        first = variants[0]
        for case in variants:
            storage = f"sqlite:///{folder / 'own.db'}" if case["own_storage"] else None
            path = write(folder, study_file(folder, trials=case["trials"], pruner="none", per=case["per"],
                                            storage=storage, high=case["high"]))
            before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} if out.exists() else {}
            calls = folder / "calls.jsonl"
            try:
                run_tune(plan_tune(load_study(path)), Console(file=io.StringIO()), train_fn=SteppedTrials(calls))
            except ConfigError as err:
                assert identity(case) != identity(first), err
                assert "\n" not in str(err) and "holds another study" in str(err)
                assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
                continue
            assert identity(case) == identity(first)
        if not first["per"]:
            path = write(folder, study_file(folder, trials=max(c["trials"] for c in variants if identity(c) == identity(first)),
                                            pruner="none", storage=f"sqlite:///{folder / 'own.db'}" if first["own_storage"] else None,
                                            high=first["high"]))
            check_study(path, folder / "calls.jsonl")


@settings(max_examples=FAST, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.lists(variant, min_size=2, max_size=3))
def test_reused_output_folders_hold_one_study(variants):
    run_reuse(variants)


@pytest.mark.slow
@settings(max_examples=SLOW, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.lists(variant, min_size=2, max_size=4))
def test_reused_output_folders_hold_one_study_many(variants):
    run_reuse(variants)


# -- races the randomised situations found, pinned down ---------------------------------------------------

def test_a_worker_started_beside_another_accepts_the_database_the_other_just_made(tmp_path):
    """Two workers start together: one has opened the default storage (optuna.db exists) but not yet
    claimed the folder when the other looks at it. That is the same study, not someone else's files."""
    path = write(tmp_path, study_file(tmp_path, trials=1, pruner="none"))
    plan = plan_tune(load_study(path))
    search_module.open_storage(plan.storage_url)  # the other worker, paused right after opening
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["optuna.db"]
    run_tune(plan, Console(file=io.StringIO()), train_fn=SteppedTrials(tmp_path / "calls.jsonl"))
    check_study(path, tmp_path / "calls.jsonl")


def test_a_requeued_trial_is_nobody_s_until_a_worker_takes_it(tmp_path):
    """The retry of a dead worker's trial must not carry that worker: a worker that has just taken the
    retry, and not yet recorded itself, would otherwise see its own trial failed under it."""
    from hkft.study.workers import WORKER_ATTR, take_over_abandoned, this_worker

    stand_in = subprocess.Popen(["sleep", "60"])
    study = optuna.create_study(direction="maximize")
    trial = study.ask({"train.lr": optuna.distributions.FloatDistribution(1e-5, 1e-1, log=True)})
    trial.set_user_attr("run_dir", "trial-0000")
    trial.set_user_attr(WORKER_ATTR, {**this_worker(), "pid": stand_in.pid, "started": None})
    assert take_over_abandoned(study) == []  # alive
    stand_in.kill()
    stand_in.wait()
    (taken,) = take_over_abandoned(study)
    assert taken.number == 0
    (retry,) = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert retry.user_attrs == {"run_dir": "trial-0000"} and retry.params == trial.params
    assert take_over_abandoned(study) == []  # once
