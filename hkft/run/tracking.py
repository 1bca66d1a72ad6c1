"""Experiment trackers (``output.report_to``: mlflow, wandb) carrying what hkft knows about a run.

The Trainer's own integrations (MLflowCallback, WandbCallback) log the losses and evaluation metrics
as training goes, into the tracker's active run. hkft opens that run before them and adds what only
it knows: the resolved preset as parameters, the dropout method and the overfitting verdict as tags,
the final metrics, and the adapter, metrics.json, curves.png and hkft_config.yaml as artifacts.

MLflow writes to ``MLFLOW_TRACKING_URI`` when set, else to a SQLite store in the run directory
(``mlflow.db``, artifacts in ``mlartifacts/``); W&B follows its own settings (``WANDB_MODE=offline``
writes the run under the run directory's ``wandb/``). A resumed run continues its tracker run.
`hkft tune` opens one parent run per search (MLflow) or one group (W&B) around its trials.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from hkft.config import HkftConfig, load_config
from hkft.errors import ConfigError, InterruptedRun
from hkft.run.directory import RunDir, is_main_process
from hkft.run.files import atomic_write_json

EXPERIMENT = "hkft"
MLFLOW_STORE, MLFLOW_ARTIFACTS = "mlflow.db", "mlartifacts"
RECORD = "tracking.json"  # the tracker runs' ids, for --resume and a continued search
INSTALL = {"mlflow": "pip install 'hkft[mlflow]'", "wandb": "pip install 'hkft[wandb]'"}
Result = TypeVar("Result")


def check_installed(report_to: list[str]) -> None:
    for name in report_to:
        try:
            importlib.import_module(name)
        except ImportError:
            raise ConfigError(f"output.report_to {name} needs the {name} package, which is not installed",
                              f"install it with {INSTALL[name]}") from None


def flat_preset(cfg: HkftConfig) -> dict[str, str]:
    """The resolved preset as ``section.key`` parameters: strings as they are, anything else as JSON."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else key, item)
        else:
            flat[prefix] = value if isinstance(value, str) else json.dumps(value)

    walk("", cfg.model_dump(mode="json"))
    return flat


def final_metrics(run: RunDir) -> dict[str, float]:
    """metrics.json's final evaluation as ``<split>_<metric>``, the base model's as ``base_<split>_<metric>``."""
    written = json.loads(run.metrics_json.read_text(encoding="utf-8"))
    metrics = {}
    for section, prefix in (("eval", ""), ("base_eval", "base_")):
        scores = dict(written.get(section) or {})
        split = scores.pop("split", "eval")
        metrics.update({f"{prefix}{split}_{name}": float(value) for name, value in scores.items()
                        if isinstance(value, (int, float))})
    return metrics


def verdict_tag(run: RunDir) -> str:
    found = json.loads(run.metrics_json.read_text(encoding="utf-8")).get("overfitting")
    if found is None:
        return "not evaluated"
    return f"detected (best step {found['best_step']})" if found["detected"] else "not detected"


def artifact_paths(run: RunDir) -> list[Path]:
    return [path for path in (run.metrics_json, run.curves_png, run.config_path) if path.is_file()]


def read_record(folder: Path) -> dict[str, str]:
    try:
        return json.loads((folder / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def write_record(folder: Path, **ids: str) -> None:
    atomic_write_json(folder / RECORD, {**read_record(folder), **ids})


def quiet_mlflow() -> None:
    for name in ("mlflow", "alembic"):  # "Creating initial MLflow database tables..." on every new store
        logging.getLogger(name).setLevel(logging.WARNING)


def use_mlflow_store(folder: Path) -> None:
    """MLFLOW_TRACKING_URI, else a SQLite store in ``folder``; and hkft's experiment in it."""
    import mlflow

    quiet_mlflow()
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri or f"sqlite:///{(folder / MLFLOW_STORE).resolve()}")
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:  # artifacts beside a store of ours, not in the current directory (MLflow's default)
        location = None if uri else (folder / MLFLOW_ARTIFACTS).resolve().as_uri()
        mlflow.set_experiment(experiment_id=mlflow.create_experiment(name, artifact_location=location))
    else:
        mlflow.set_experiment(experiment_id=experiment.experiment_id)


def is_in_store(run_id: str) -> bool:
    """Whether the current store holds this run (not deleted): another store, or a deleted run, starts anew."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.MlflowClient().get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException:
        return False


def start_mlflow_run(folder: Path, name: str, tags: dict[str, str], *, resume: bool):
    """A run continued from ``folder``'s record when resuming, else a new one (a child when a run is active)."""
    import mlflow

    nested = mlflow.active_run() is not None
    if not nested:
        use_mlflow_store(folder)
    previous = read_record(folder).get("mlflow_run_id") if resume else None
    if previous is not None and is_in_store(previous):
        started = mlflow.start_run(run_id=previous, nested=nested)
    else:
        started = mlflow.start_run(run_name=name, nested=nested, tags=tags)
    write_record(folder, mlflow_run_id=started.info.run_id)
    return started


class MlflowTracker:
    def __init__(self, cfg: HkftConfig, run: RunDir, resume: bool):
        self.cfg, self.run, self.resume = cfg, run, resume

    def start(self) -> None:
        import mlflow
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        tags = {"hkft.dropout_method": self.cfg.dropout.method, "hkft.task": self.cfg.model.task,
                "hkft.run_dir": str(self.run.root.resolve())}
        started = start_mlflow_run(self.run.root, self.run.root.name, tags, resume=self.resume)
        logged = started.data.params
        mlflow.log_params({key: value[:MAX_PARAM_VAL_LENGTH] for key, value in flat_preset(self.cfg).items()
                           if key not in logged})

    def record(self) -> None:
        import mlflow

        mlflow.log_metrics(final_metrics(self.run))
        mlflow.set_tag("hkft.overfitting", verdict_tag(self.run))
        mlflow.log_artifacts(str(self.run.adapter_dir), "adapter")
        for path in artifact_paths(self.run):
            mlflow.log_artifact(str(path))

    def end(self, status: str) -> None:
        import mlflow

        mlflow.end_run(status)


class WandbTracker:
    def __init__(self, cfg: HkftConfig, run: RunDir, resume: bool):
        self.cfg, self.run, self.resume = cfg, run, resume
        self.wandb_run = None

    def start(self) -> None:
        import wandb

        previous = read_record(self.run.root).get("wandb_run_id") if self.resume else None
        try:
            self.wandb_run = wandb.init(project=os.environ.get("WANDB_PROJECT") or EXPERIMENT, dir=str(self.run.root),
                                        name=self.run.root.name, id=previous, resume="allow" if previous else None,
                                        config=flat_preset(self.cfg), tags=[f"dropout:{self.cfg.dropout.method}"])
        except wandb.errors.Error as err:
            raise ConfigError(f"output.report_to wandb: W&B cannot start a run: {str(err).strip().splitlines()[0]}",
                              "run `wandb login`, or set WANDB_MODE=offline to keep the run on disk") from None
        write_record(self.run.root, wandb_run_id=self.wandb_run.id)

    def record(self) -> None:
        import wandb

        self.wandb_run.summary.update(final_metrics(self.run))
        self.wandb_run.tags = (*self.wandb_run.tags, f"overfitting:{verdict_tag(self.run)}")
        artifact = wandb.Artifact(f"hkft-{self.wandb_run.id}", type="model")
        artifact.add_dir(str(self.run.adapter_dir), name="adapter")
        for path in artifact_paths(self.run):
            artifact.add_file(str(path))
        self.wandb_run.log_artifact(artifact)

    def end(self, status: str) -> None:
        self.wandb_run.finish(exit_code=0 if status == "FINISHED" else 1)


TRACKERS = {"mlflow": MlflowTracker, "wandb": WandbTracker}


def track_training(cfg: HkftConfig, run: RunDir, resume: bool, train: Callable[[], Result]) -> Result:
    """``train()`` inside the preset's tracker runs; what it wrote is recorded in them once it returns."""
    names = [name for name in TRACKERS if name in cfg.output.report_to]
    if not names or not is_main_process():
        return train()
    check_installed(names)
    trackers = [TRACKERS[name](cfg, run, resume) for name in names]
    with ended_as_outcome(trackers):
        result = train()
        for tracker in trackers:
            tracker.record()
    return result


@contextmanager
def ended_as_outcome(trackers: list) -> Iterator[None]:
    """Started trackers end FINISHED, KILLED (an interruption, a pruned trial) or FAILED, like the block they wrap."""
    started = []
    status = "FAILED"
    try:
        for tracker in trackers:
            tracker.start()
            started.append(tracker)
        yield
        status = "FINISHED"
    except BaseException as err:
        from optuna import TrialPruned  # hkft tune's pruner stopping a trial

        if isinstance(err, (InterruptedRun, KeyboardInterrupt, TrialPruned)):
            status = "KILLED"
        raise
    finally:
        for tracker in reversed(started):
            tracker.end(status)


class SearchRun:
    """The parent run of one search's trials (MLflow), and their W&B group."""

    def __init__(self, report_to: list[str], name: str, store: Path, folder: Path):
        self.report_to, self.name, self.store, self.folder = report_to, name, store, folder
        self.previous_group = None

    def start(self) -> None:
        if "mlflow" in self.report_to:
            use_mlflow_store(self.store)
            self.folder.mkdir(parents=True, exist_ok=True)
            start_mlflow_run(self.folder, self.name, {"hkft.search": self.name}, resume=True)
        if "wandb" in self.report_to:
            self.previous_group = os.environ.get("WANDB_RUN_GROUP")
            os.environ["WANDB_RUN_GROUP"] = self.name

    def end(self, status: str) -> None:
        if "mlflow" in self.report_to:
            import mlflow

            mlflow.end_run(status)
        if "wandb" in self.report_to:
            os.environ.pop("WANDB_RUN_GROUP")
            if self.previous_group is not None:
                os.environ["WANDB_RUN_GROUP"] = self.previous_group


def one_parent_run_per_search(run_search: Callable[..., Result]) -> Callable[..., Result]:
    """Wraps `hkft tune`'s ``run_search(plan, search, ...)``: its trials run inside the search's parent run."""

    @functools.wraps(run_search)
    def wrapper(plan, search, *args, **kwargs) -> Result:
        report_to = [name for name in TRACKERS if name in load_config(plan.preset, list(plan.overrides)).output.report_to]
        if not report_to:
            return run_search(plan, search, *args, **kwargs)
        check_installed(report_to)
        with ended_as_outcome([SearchRun(report_to, search.name, plan.output, search.folder)]):
            return run_search(plan, search, *args, **kwargs)

    return wrapper
