"""Several workers, one study, on a real PostgreSQL server (slow suite).

A throwaway cluster is made with the server's own initdb and pg_ctl in a temporary folder (as the
`postgres` user when the tests run as root, since the server refuses root), listening on 127.0.0.1 at a
free port, and stopped and removed after. Two `hkft tune` processes share one study through
``tune.storage``, MiniLM trains each trial for real, and one worker is killed with SIGKILL in the middle
of a trial. The survivor must take the trial over and resume it, and the study's results (values,
trials.csv, best.yaml) must be what one worker alone makes of the same trials."""

from __future__ import annotations

import csv
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import optuna
import pytest
import yaml
from test_tune import SMALL_RUN

from hkft.config import load_config

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def server_binaries() -> Path | None:
    """The folder of initdb and pg_ctl: on PATH, or Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda path: int(path.parts[-3]))
    return versions[-1].parent if versions else None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    binaries = server_binaries()
    if binaries is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl): on Debian, apt-get install postgresql")
    pytest.importorskip("psycopg", reason="no PostgreSQL driver for Python: pip install 'hkft[postgres]'")
    as_user: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="hkft-postgres-"))
    if os.geteuid() == 0:  # the server refuses to run as root
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and no postgres user to run the server as")
        os.chown(folder, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = folder / "data", free_port()
    try:
        subprocess.run([*as_user, str(binaries / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
                        "-E", "UTF8", "--no-sync"], check=True, capture_output=True, cwd=folder)
        subprocess.run([*as_user, str(binaries / "pg_ctl"), "-D", str(data), "-l", str(folder / "server.log"), "-w",
                        "-o", f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories='' -c fsync=off",
                        "start"], check=True, capture_output=True, cwd=folder)
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, str(binaries / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                       capture_output=True, cwd=folder)
        shutil.rmtree(folder, ignore_errors=True)


def study_file(folder: Path, output: Path, storage: str, trials: int) -> Path:
    path = folder / f"{output.name}.yaml"
    path.write_text(yaml.safe_dump({
        "base": "quickstart", "output": str(output), "overrides": SMALL_RUN,
        "search": {"train.lr": {"low": 1e-4, "high": 3e-2, "log": True}},
        "tune": {"trials": trials, "pruner": "none", "storage": storage}}))
    return path


def worker(study: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "COLUMNS": "120"}
    return subprocess.Popen([sys.executable, "-m", "hkft", "tune", str(study)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


def comparable_rows(path: Path) -> list[dict[str, str]]:
    """trials.csv less what differs between runs of the same trials: the study's name, where and how long,
    how many attempts, and the trial numbers (two workers number their trials as they start them)."""
    rows = [{key: value for key, value in row.items() if key not in ("search", "trial", "run_dir", "duration_s", "attempts")}
            for row in csv.DictReader(path.open())]
    return sorted(rows, key=lambda row: float(row["params_train.lr"]))


def comparable_best(path: Path) -> dict:
    config = load_config(path).model_dump(mode="json")
    config.pop("output"), config.pop("description")
    return config


def test_two_workers_on_postgresql_one_killed_mid_trial_lose_nothing(postgres_url, tmp_path):
    shared = study_file(tmp_path, tmp_path / "shared", postgres_url, trials=3)
    killed, survivor = worker(shared), worker(shared)
    survivor_lines: list[str] = []
    reader = threading.Thread(target=lambda: survivor_lines.extend(survivor.stdout))
    reader.start()
    killed_lines, trial_dir = [], None
    for line in killed.stdout:
        killed_lines.append(line)
        if line.startswith("[trial ") and line.rstrip().endswith(": training"):
            trial_dir = f"trial-{int(line.split()[1].rstrip(']')):04d}"
        if trial_dir and "step 4/6" in line:  # past the checkpoint of step 2 (logs, evaluations: every 2 steps)
            killed.send_signal(signal.SIGKILL)
            break
    killed.wait(timeout=60)
    assert killed.returncode == -signal.SIGKILL, "".join(killed_lines)
    assert survivor.wait(timeout=1500) == 0, "".join(survivor_lines)
    reader.join()
    said = "".join(survivor_lines)
    trial = int(trial_dir.split("-")[1])
    assert f"trial {trial} was left running by" in said and f"[trial {trial}] " in said
    assert any(line.startswith(f"[trial {trial}]") and "resuming" in line for line in survivor_lines), said

    storage = optuna.storages.RDBStorage(postgres_url)
    study = optuna.load_study(study_name="shared", storage=storage)
    assert {t.state for t in study.trials} == {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL}
    assert [t.state for t in study.trials].count(optuna.trial.TrialState.FAIL) == 1  # the killed attempt, retried
    rows = list(csv.DictReader((tmp_path / "shared/trials.csv").open()))
    assert {row["state"] for row in rows} == {"COMPLETE"} and len(rows) >= 3
    assert [row["attempts"] for row in rows if row["trial"] == str(trial)] == ["2"]
    for row in rows:  # nothing lost: every trial's run finished and kept its adapter
        assert (Path(row["run_dir"]) / "metrics.json").is_file() and (Path(row["run_dir"]) / "adapter").is_dir()

    # One worker alone, on SQLite, trains the same trials (queued with the same values) from scratch.
    alone = study_file(tmp_path, tmp_path / "alone", f"sqlite:///{tmp_path / 'alone.db'}", trials=len(rows))
    queued = optuna.create_study(study_name="alone", storage=f"sqlite:///{tmp_path / 'alone.db'}", direction="maximize")
    for row in sorted(rows, key=lambda row: int(row["trial"])):
        queued.enqueue_trial({"train.lr": float(row["params_train.lr"])})
    one = worker(alone)
    output, _ = one.communicate(timeout=1500)
    assert one.returncode == 0, output
    assert comparable_rows(tmp_path / "shared/trials.csv") == comparable_rows(tmp_path / "alone/trials.csv")
    assert comparable_best(tmp_path / "shared/best.yaml") == comparable_best(tmp_path / "alone/best.yaml")
