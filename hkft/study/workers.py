"""Who runs what in an `hkft tune` study: the study that owns an output folder, and the process that runs
each trial, so that a trial left running by a killed process is taken over at once.

Optuna's heartbeat notices a dead worker only after its grace period, and only while some worker is
still asking for trials: a study re-run at once would finish without the killed trial, which then stayed
"running" for good. Each trial therefore records its worker (machine and process); a worker on the same
machine sees that the process is gone and queues the trial again, to resume from its checkpoint. A trial
of another machine is left to the heartbeat.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import uuid
import warnings
from functools import cache
from pathlib import Path

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from hkft.errors import ConfigError
from hkft.study.spec import STUDY_MARKER

WORKER_ATTR = "worker"  # a trial's user attribute: {"machine": ..., "host": ..., "pid": ..., "started": ...}
with warnings.catch_warnings():  # experimental in Optuna, stable in use since 2.8
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    _retry = RetryHeartbeatStaleTrialCallback(inherit_intermediate_values=True)


def requeue(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queues a stopped trial again with its values and evaluations (Optuna's retry, which remembers the
    trial it continues, so its run directory resumes), less the worker that ran it: between the moment a
    worker takes the retry and the moment it records itself, the retry must not look abandoned."""
    trial = copy.deepcopy(trial)
    trial.user_attrs.pop(WORKER_ATTR, None)
    _retry(study, trial)


@cache
def this_machine() -> str:
    """The host name, boot and process namespace: a process id means one process only within them."""
    boot = _read("/proc/sys/kernel/random/boot_id").strip()
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return ":".join(part for part in (socket.gethostname(), boot, namespace) if part)


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError:
        return ""


def _process_facts(pid: int) -> tuple[str, str] | None:
    """(start time, state) of a process from /proc, None when no such process (or no /proc)."""
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # the command name, in parentheses, may hold spaces
    return fields[19], fields[0]


def this_worker() -> dict[str, object]:
    facts = _process_facts(os.getpid())
    return {"machine": this_machine(), "host": socket.gethostname(), "pid": os.getpid(),
            "started": facts[0] if facts else None}


def is_gone(worker: dict) -> bool:
    """True when ``worker`` ran on this machine and its process has ended (killed, crashed). A process of
    another machine is never judged here; nor is this process (another thread's trial)."""
    pid = worker.get("pid")
    if worker.get("machine") != this_machine() or not isinstance(pid, int) or pid == os.getpid():
        return False
    if Path("/proc/self/stat").is_file():
        facts = _process_facts(pid)
        # A zombie has ended; a process with another start time reuses the id of the one that ended.
        return facts is None or facts[1] == "Z" or (worker.get("started") not in (None, facts[0]))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def describe_worker(worker: dict | None) -> str:
    return f"{worker.get('host', '?')}, process {worker.get('pid', '?')}" if worker else "an unknown process"


def take_over_abandoned(study: optuna.Study) -> list[FrozenTrial]:
    """Trials left running by a process of this machine that is gone, failed and queued again now;
    then Optuna's own check for trials whose heartbeat stopped (other machines). Returns the trials taken
    over by the first check, as they were found."""
    taken = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get(WORKER_ATTR)
        if not isinstance(worker, dict) or not is_gone(worker):
            continue
        try:
            if not study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                continue
        except UpdateFinishedTrialError:  # another worker took it over first
            continue
        requeue(study, study._storage.get_trial(trial._trial_id))
        taken.append(trial)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    return taken


def origin_number(trial: FrozenTrial) -> int:
    """The number of the trial whose run directory this one continues (its own when not a retry)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        first = RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)
    return trial.number if first is None else first


def claim_output(folder: Path, identity: dict, *, create: bool = True, own_files: tuple[str, ...] = ()) -> None:
    """Makes ``folder`` this study's, or refuses it in one line: a folder that holds another study (another
    tune.per, storage, base, space or metric) or anything else. Two studies in one folder would overwrite
    each other's trials.csv and best.yaml and mix their trial folders. The claim is an exclusive create,
    so two studies started at once into one new folder cannot both win. Without ``create``, only checks
    (a dry run); ``own_files`` start the names of files the study itself made there before claiming it (its
    SQLite database and journal)."""
    marker = folder / STUDY_MARKER
    text = json.dumps(identity, sort_keys=True, indent=1)
    if not marker.exists():
        others = sorted(path.name for path in folder.iterdir()
                        if not path.name.startswith((".", *own_files))) if folder.is_dir() else []
        if others:
            raise ConfigError(f"study output {folder} already holds files that are not an hkft tune study's ({others[0]})",
                              "give the study a new or empty output folder")
        if not create:
            return
        folder.mkdir(parents=True, exist_ok=True)
        if _create_exclusively(marker, text):
            return
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"study output {folder}: cannot read {STUDY_MARKER} ({err})",
                          "give the study a new output folder") from None
    if recorded != json.loads(text):
        raise ConfigError(f"study output {folder} holds another study (started with another {_changes(recorded, identity)})",
                          "give this study its own output folder, or restore the study file")


def _create_exclusively(path: Path, text: str) -> bool:
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}")
    temp.write_text(text, encoding="utf-8")
    try:
        os.link(temp, path)
        return True
    except FileExistsError:
        return False
    finally:
        temp.unlink()


def _changes(before: dict, now: dict) -> str:
    if before.get("storage") != now.get("storage"):
        return "tune.storage"
    old, new = before.get("searches", {}), now.get("searches", {})
    if set(old) != set(new):
        return "set of searches (tune.per)"
    keys = dict.fromkeys(key for name in new for key in new[name])
    return ", ".join(key for key in keys if any(old[name].get(key) != new[name].get(key) for name in new)) or "setup"
