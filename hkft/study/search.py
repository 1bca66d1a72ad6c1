"""`hkft tune STUDY.yaml`: a Bayesian search over preset keys with Optuna, one run directory per trial.

Optuna does the searching: TPE samples the ``search:`` space, a median pruner stops a trial whose
validation metric trails the others' at the same step (fed by every evaluation through a Trainer
callback), and the study lives in a database (SQLite in the output folder by default), so a re-run
continues it and several processes, or machines sharing ``tune.storage``, work on it at once.

A trial is an ordinary run directory, ``trial-<number>`` (``<per key=value>/trial-<number>`` with
``tune.per``), whose ``trial.json`` records how the trial ended. An interrupted trial (Ctrl-C, or a
process that stopped sending Optuna's heartbeat) is queued again with the same values and resumes
from its run directory's last checkpoint.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.study import MaxTrialsCallback
from optuna.trial import FrozenTrial, TrialState
from pydantic import JsonValue
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from transformers import TrainerCallback

from hkft.config import config_to_yaml, load_config, resolve_preset_path
from hkft.errors import ConfigError, InterruptedRun, TrainingError
from hkft.io import atomic_write_json, atomic_write_text, check_can_create_dir
from hkft.metrics import EVAL_METRICS, MAIN_METRIC, greater_is_better
from hkft.plots import read_curves
from hkft.rundir import RunDir, holds_run
from hkft.tracking import one_parent_run_per_search
from hkft.study.comparison import compare_runs
from hkft.study.grid import Cell, cell_name, cell_state, expand_cells, labels_of, make_cell, run_fingerprint, train_cell, train_cells
from hkft.study.plots import figure_metric_vs_param, figure_optimization_history, figure_param_importances, save_figure
from hkft.study.spec import SearchDimension, SearchRange, Study

TRIAL_RECORD = "trial.json"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# A trial whose process sent no heartbeat for GRACE_PERIOD_S seconds (killed, machine lost) is failed
# by Optuna and queued again.
HEARTBEAT_INTERVAL_S, GRACE_PERIOD_S = 30, 120
TOP_TRIALS = 3  # rows per search in the console table


class TrialTrainFn(Protocol):
    def __call__(self, cell: Cell, *, resume: bool, console: Console, callbacks: Sequence[TrainerCallback] = ()) -> object:
        ...


@dataclass(frozen=True)
class Search:
    """One Optuna study: the whole space, or the space less ``tune.per`` at one of its values."""

    name: str  # the study's name in the storage
    label: str  # "method=hiddenkey" with tune.per, else ""
    folder: Path  # its trials' run directories, best.yaml and plots
    fixed: dict[str, JsonValue]
    space: dict[str, SearchDimension]


@dataclass(frozen=True)
class TunePlan:
    study: Study
    preset: Path
    overrides: tuple[str, ...]
    metric: str
    direction: str
    integer_keys: frozenset[str]
    searches: tuple[Search, ...]
    storage_url: str

    @property
    def output(self) -> Path:
        return Path(self.study.output)


def plan_tune(study: Study) -> TunePlan:
    """Everything checked before the first trial: base preset, metric, and every bound and choice of the
    space validated against the preset schema (an unknown key gets a did-you-mean)."""
    if not study.search:
        raise ConfigError("this study has no search: section", "add one (see presets/studies/quickstart-tune.yaml), or run it with hkft sweep")
    if len(study.bases) != 1:
        raise ConfigError("hkft tune takes one base preset", "write one study file per preset")
    preset = resolve_preset_path(study.bases[0])
    base = _load(preset, study.overrides, "study overrides")
    task = base.model.task
    metric = study.tune.metric or MAIN_METRIC[task]
    if metric not in EVAL_METRICS[task]:
        raise ConfigError(f"tune.metric: {metric!r} is not a {task} validation metric",
                          f"choose one of {', '.join(EVAL_METRICS[task])}")
    if base.train.eval_strategy == "no":
        raise ConfigError("hkft tune scores trials on the validation split, but train.eval_strategy is no",
                          "set train.eval_strategy to epoch or steps")
    overrides = (*study.overrides, f"train.metric_for_best={metric}")  # the adapter kept is the trial's best
    integer_keys = frozenset(key for key, dimension in study.search.items()
                             if _validate_dimension(preset, overrides, key, dimension))
    direction = study.tune.direction or ("maximize" if greater_is_better(metric) else "minimize")
    return TunePlan(study, preset, overrides, metric, direction, integer_keys, tuple(_searches(study, preset)),
                    study.tune.storage or f"sqlite:///{(Path(study.output) / 'optuna.db').resolve()}")


def _load(preset: Path, overrides: Sequence[str], where: str):
    try:
        return load_config(preset, list(overrides))
    except ConfigError as err:
        raise ConfigError(f"{where}: {err.message}", err.hint) from None


def _override(key: str, value: JsonValue) -> str:
    return f"{key}={json.dumps(value)}"


def _validate_dimension(preset: Path, overrides: tuple[str, ...], key: str, dimension: SearchDimension) -> bool:
    """Validates every choice, or both bounds, of one key; True when the key holds whole numbers."""
    values = dimension if isinstance(dimension, list) else [dimension.low, dimension.high]
    configs = [_load(preset, [*overrides, _override(key, value)], f"search {key}={value}") for value in values]
    if isinstance(dimension, list):
        if len({_choice(value) for value in dimension}) < len(dimension):
            raise ConfigError(f"search {key}: a value is listed twice", "list each value once")
        return False
    current = configs[0].model_dump()
    for part in key.split("."):
        current = current[part]
    integer = isinstance(current, int) and not isinstance(current, bool)
    bounds = [dimension.low, dimension.high, dimension.step or 1.0]
    if integer and any(not float(bound).is_integer() for bound in bounds):
        raise ConfigError(f"search {key}: {key} takes whole numbers", "give low, high and step as integers")
    return integer


def _searches(study: Study, preset: Path) -> list[Search]:
    stem = Path(study.output).name or preset.stem
    per = study.tune.per
    if per is None:
        return [Search(stem, "", Path(study.output), {}, dict(study.search))]
    space = {key: dimension for key, dimension in study.search.items() if key != per}
    if not space:
        raise ConfigError(f"tune.per: {per} is the only search key, which leaves nothing to search",
                          "add a key to search (train.lr, for example)")
    searches = []
    for value in study.search[per]:
        label = cell_name({per: value}, labels_of([per]))
        searches.append(Search(f"{stem}:{label}", label, Path(study.output) / label, {per: value}, space))
    return searches


def _choice(value: JsonValue) -> JsonValue:
    """Optuna's choices are scalars: a list or mapping (lora.target_modules) is offered as its JSON text."""
    return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value


def suggest(trial: optuna.Trial, space: dict[str, SearchDimension], integer_keys: frozenset[str]) -> dict[str, JsonValue]:
    values: dict[str, JsonValue] = {}
    for key, dimension in space.items():
        if isinstance(dimension, list):
            choices = [_choice(value) for value in dimension]
            values[key] = dimension[choices.index(trial.suggest_categorical(key, choices))]
        elif key in integer_keys:
            values[key] = trial.suggest_int(key, int(dimension.low), int(dimension.high),
                                            step=int(dimension.step or 1), log=dimension.log)
        else:
            values[key] = trial.suggest_float(key, dimension.low, dimension.high, step=dimension.step, log=dimension.log)
    return values


class ReportToTrial(TrainerCallback):
    """Feeds every evaluation to the Optuna trial and stops training when the pruner says so."""

    def __init__(self, trial: optuna.Trial, metric: str):
        self.trial = trial
        self.metric = metric

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        value = (metrics or {}).get(f"eval_{self.metric}")
        if value is None:
            return control
        self.trial.report(value, state.global_step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"validation {self.metric} {value:.4g} at step {state.global_step} "
                                     "trails the other trials")
        return control


def best_validation(run: RunDir, metric: str, direction: str) -> float:
    curve = read_curves(run.metrics_jsonl).get(f"eval_{metric}")
    if not curve:
        raise TrainingError(f"{run.root}: no validation {metric} was logged", "check train.eval_strategy")
    values = [value for _, value in curve]
    return max(values) if direction == "maximize" else min(values)


def _frozen(trial: optuna.Trial) -> FrozenTrial:
    return next(frozen for frozen in trial.study.get_trials(deepcopy=False) if frozen.number == trial.number)


def _record(run: RunDir, search: Search, trial: optuna.Trial, values: dict, state: str, **facts) -> None:
    atomic_write_json(run.root / TRIAL_RECORD, {"study": search.name, "trial": trial.number, "state": state,
                                                "values": values, **facts})


def _values_text(values: dict[str, JsonValue]) -> str:
    return ", ".join(f"{key.rsplit('.', 1)[-1]}={value:.3g}" if isinstance(value, float)
                     else f"{key.rsplit('.', 1)[-1]}={value}" for key, value in values.items())


def make_objective(plan: TunePlan, search: Search, console: Console, train_fn: TrialTrainFn):
    def objective(trial: optuna.Trial) -> float:
        first = RetryHeartbeatStaleTrialCallback.retried_trial_number(_frozen(trial))
        number = trial.number if first is None else first  # a retry continues the run directory it retries
        values = suggest(trial, search.space, plan.integer_keys)
        overrides = (*plan.overrides, *(_override(key, value) for key, value in {**search.fixed, **values}.items()))
        cell, _ = make_cell(plan.preset, f"trial-{number:04d}", overrides, search.folder)
        run = RunDir(cell.run_dir)
        if first is None and holds_run(run):
            raise TrainingError(f"{run.root} holds a run that is not trial {number} of study {search.name}",
                                "move it away, or give the study another output folder")
        trial.set_user_attr("run_dir", str(run.root))
        state = cell_state(cell)
        head = f"[{search.label + ' ' if search.label else ''}trial {trial.number}] {_values_text(values)}"
        console.print(f"{head}: {'resuming' if state == 'resume' else 'training' if state == 'new' else 'finished'}",
                      highlight=False, markup=False)
        run.root.mkdir(parents=True, exist_ok=True)
        _record(run, search, trial, values, "running")
        try:
            if state != "finished":
                train_fn(cell, resume=state == "resume", console=console, callbacks=[ReportToTrial(trial, plan.metric)])
            value = best_validation(run, plan.metric, plan.direction)
        except optuna.TrialPruned as pruned:
            _record(run, search, trial, values, "pruned", reason=str(pruned))
            console.print(f"[yellow]{escape(head)}: pruned ({escape(str(pruned))})[/]", highlight=False)
            raise
        except TrainingError as err:  # a diverging learning rate, say: a failed trial, not a failed search
            _record(run, search, trial, values, "failed", reason=str(err))
            console.print(f"[yellow]{escape(head)}: failed ({escape(str(err))})[/]", highlight=False)
            return math.nan  # Optuna's way to fail a trial and go on
        except (InterruptedRun, KeyboardInterrupt):
            _record(run, search, trial, values, "interrupted")
            RetryHeartbeatStaleTrialCallback(inherit_intermediate_values=True)(trial.study, _frozen(trial))
            raise
        _record(run, search, trial, values, "complete", value=value)
        console.print(f"{head}: validation {plan.metric} {value:.4f}", highlight=False, markup=False)
        return value

    return objective


def open_storage(url: str) -> RDBStorage:
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    # Workers started together on a new database all create its tables; all but one fail on a table
    # another has just created, and succeed once it has created them all.
    for attempt in range(5):
        time.sleep(attempt * 0.5)
        try:
            return RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None,
                              heartbeat_interval=HEARTBEAT_INTERVAL_S, grace_period=GRACE_PERIOD_S,
                              heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(inherit_intermediate_values=True))
        except Exception as err:  # sqlalchemy reports a bad URL or a missing driver with many exception types
            failure = err
    raise ConfigError(f"tune.storage: cannot open {url} ({type(failure).__name__}: {str(failure).splitlines()[0]})",
                      "give a database URL such as sqlite:///tune.db or postgresql://host/db")


def setup_record(plan: TunePlan, search: Search) -> str:
    """What a study's trials must share: a study re-run with a changed base, space or metric is refused."""
    base = _load(plan.preset, [*plan.overrides, *(_override(k, v) for k, v in search.fixed.items())], "study overrides")
    space = {key: dimension if isinstance(dimension, list) else dimension.model_dump()
             for key, dimension in search.space.items()}
    return json.dumps({"base": run_fingerprint(base), "search": space, "metric": plan.metric,
                       "direction": plan.direction}, sort_keys=True)


def load_search_study(plan: TunePlan, search: Search, storage: RDBStorage) -> optuna.Study:
    study = optuna.create_study(study_name=search.name, storage=storage, direction=plan.direction, load_if_exists=True)
    setup = setup_record(plan, search)
    recorded = study.user_attrs.get("hkft_setup")
    if recorded is None:
        study.set_user_attr("hkft_setup", setup)
    elif recorded != setup:
        before, now = json.loads(recorded), json.loads(setup)
        changed = ", ".join(key for key in now if before.get(key) != now[key])
        raise ConfigError(f"study {search.name} in {plan.storage_url} was started with another {changed}",
                          "restore the study file, or give the new setup another output folder (or tune.storage)")
    tune = plan.study.tune
    # Seeded by the trials so far: a re-run continues the sequence instead of repeating its first draws.
    study.sampler = optuna.samplers.TPESampler(seed=tune.seed + len(study.trials), constant_liar=True)
    study.pruner = (optuna.pruners.MedianPruner(n_startup_trials=tune.startup_trials)
                    if tune.pruner == "median" else optuna.pruners.NopPruner())
    return study


@one_parent_run_per_search
def run_search(plan: TunePlan, search: Search, storage: RDBStorage, console: Console,
               train_fn: TrialTrainFn) -> optuna.Study:
    study = load_search_study(plan, search, storage)
    trials = plan.study.tune.trials
    finished = len(study.get_trials(deepcopy=False, states=FINISHED))
    console.print(f"search {search.name}: {finished}/{trials} trials finished", highlight=False, markup=False)
    if finished < trials:
        try:
            study.optimize(make_objective(plan, search, console, train_fn), n_trials=trials - finished,
                           timeout=plan.study.tune.timeout,
                           callbacks=[MaxTrialsCallback(trials, states=FINISHED)])
        except InterruptedRun as err:
            raise InterruptedRun(f"search {search.name}: {err.message}",
                                 "run the same hkft tune command to continue; the trial resumes from its checkpoint") from None
    return study


def run_tune(plan: TunePlan, console: Console, *, seeds: int = 0, train_fn: TrialTrainFn | None = None) -> list[optuna.Study]:
    """Every search in turn, then trials.csv, the best trials' table, best.yaml and plots per search;
    with ``seeds``, the best settings trained again with that many new seeds and compared."""
    train_fn = train_fn or train_cell
    check_can_create_dir(plan.output, "study output")
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # hkft prints each trial; failures are one line
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = open_storage(plan.storage_url)
        studies = [run_search(plan, search, storage, console, train_fn) for search in plan.searches]
    write_trials_csv(plan, studies)
    console.print(best_trials_table(plan, studies))
    bests = [write_best_preset(plan, search, study, console) for search, study in zip(plan.searches, studies)]
    for search, study in zip(plan.searches, studies):
        log_keys = {key for key, dimension in search.space.items() if isinstance(dimension, SearchRange) and dimension.log}
        plot_search(study, search.folder, plan.metric, log_keys, plan.study.tune.seed)
    if seeds:
        retrain_with_seeds([best for best in bests if best is not None], plan, seeds, console, train_fn)
    return studies


def write_trials_csv(plan: TunePlan, studies: list[optuna.Study]) -> Path:
    import pandas as pd

    frames = []
    for search, study in zip(plan.searches, studies):
        frame = study.trials_dataframe(attrs=("number", "value", "state", "params", "user_attrs", "duration"))
        frame.insert(0, "search", search.name)
        frames.append(frame.rename(columns={"value": f"validation_{plan.metric}", "user_attrs_run_dir": "run_dir"}))
    path = plan.output / "trials.csv"
    atomic_write_text(path, pd.concat(frames, ignore_index=True).to_csv(index=False))
    return path


def _ranked(study: optuna.Study) -> list[FrozenTrial]:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return sorted(complete, key=lambda trial: trial.value, reverse=study.direction.name == "MAXIMIZE")


def best_trials_table(plan: TunePlan, studies: list[optuna.Study]) -> Table:
    keys = list(plan.searches[0].space)
    table = Table(title=f"best trials by validation {plan.metric} ({plan.direction})", header_style="bold")
    for name in ("search", "trial", plan.metric, *(key.rsplit(".", 1)[-1] for key in keys), "pruned", "run"):
        table.add_column(name, justify="right" if name in ("trial", plan.metric, "pruned") else "left")
    for search, study in zip(plan.searches, studies):
        pruned = len(study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)))
        for trial in _ranked(study)[:TOP_TRIALS]:
            params = [_param_text(trial.params.get(key)) for key in keys]
            table.add_row(search.label or search.name, str(trial.number), f"{trial.value:.4f}", *params,
                          f"{pruned}/{len(study.trials)}", _relative(trial.user_attrs.get("run_dir", ""), plan.output))
    return table


def _relative(path: str, output: Path) -> str:
    try:
        return str(Path(path).relative_to(output))
    except ValueError:  # a trial run by a worker with another output path (shared storage)
        return path


def _param_text(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def write_best_preset(plan: TunePlan, search: Search, study: optuna.Study, console: Console) -> Path | None:
    """The best trial's resolved config as a preset that `hkft train` runs as is (output under the study)."""
    ranked = _ranked(study)
    if not ranked:
        console.print(f"[yellow]search {escape(search.name)}: no trial completed, so no best.yaml[/]", highlight=False)
        return None
    best = ranked[0]
    config = load_config(RunDir(Path(best.user_attrs["run_dir"])).config_path)
    config.output.dir = str(search.folder / "best")
    config.description = (f"best of {len(ranked)} completed trials of {search.name} (trial {best.number}): "
                          f"validation {plan.metric} {best.value:.4f}")
    path = search.folder / "best.yaml"
    atomic_write_text(path, config_to_yaml(config))
    console.print(f"wrote {path} (`hkft train {path}` trains it)", highlight=False, markup=False)
    return path


def retrain_with_seeds(presets: list[Path], plan: TunePlan, seeds: int, console: Console, train_fn: TrialTrainFn) -> None:
    """Each best setting with ``seeds`` seeds it was not picked with, then `hkft compare` over them all:
    the number to report is a median over seeds, not the luckiest trial."""
    cells: list[Cell] = []
    for preset in presets:
        first = load_config(preset).train.seed + 1
        study = Study(base=str(preset), output=str(preset.parent / "seeds"), grid={"train.seed": list(range(first, first + seeds))})
        cells += expand_cells(study)
    train_cells(cells, console, train_fn)
    compare_runs([cell.run_dir for cell in cells], plan.output / "seeds", console)


def plot_search(study: optuna.Study, folder: Path, metric: str, log_keys: set[str], seed: int) -> list[Path]:
    """optimization_history.png, param_importances.png (Optuna's fANOVA) and metric_vs_param.png (the most
    important parameter, or the only one)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
        importances = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except (ValueError, RuntimeError):  # fewer than two completed trials, or no parameter that varied
        importances = {}
    names = list(dict.fromkeys(name for trial in complete for name in trial.params))
    top = max(importances, key=importances.get) if importances else (names[0] if names else "")
    points = [(trial.params[top], trial.value) for trial in complete if top in trial.params]
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    folder.mkdir(parents=True, exist_ok=True)
    return [
        save_figure(figure_optimization_history([(t.number, t.value) for t in complete], metric, maximize),
                    folder / "optimization_history.png"),
        save_figure(figure_param_importances(importances), folder / "param_importances.png"),
        save_figure(figure_metric_vs_param(points, top, metric, top in log_keys), folder / "metric_vs_param.png"),
    ]


def describe_plan(plan: TunePlan, seeds: int) -> list[str]:
    """`hkft tune --dry-run`: the search space and what the command would run, as plain lines."""
    lines = ["search space:"]
    for key, dimension in plan.study.search.items():
        if key == plan.study.tune.per:
            values, kind = ", ".join(map(str, dimension)), "one search per value (tune.per)"
        elif isinstance(dimension, list):
            values, kind = ", ".join(map(str, dimension)), "choice"
        else:
            scale = "log scale" if dimension.log else f"step {dimension.step:g}" if dimension.step else "uniform"
            values = f"{dimension.low:g} .. {dimension.high:g}"
            kind = f"{'integer' if key in plan.integer_keys else 'float'}, {scale}"
        lines.append(f"  {key}: {values} ({kind})")
    tune = plan.study.tune
    pruner = "none" if tune.pruner == "none" else f"{tune.pruner} (never the first {tune.startup_trials} trials)"
    lines += [f"search {search.name} in {search.folder}" for search in plan.searches]
    lines += [
        f"trials per search: {tune.trials}; validation {plan.metric} ({plan.direction}); pruner {pruner}",
        f"estimated runs: {len(plan.searches) * (tune.trials + seeds)} at most "
        f"({len(plan.searches)} x ({tune.trials} trials + {seeds} seeds); pruned trials stop early)",
        f"storage: {plan.storage_url}",
        "dry run: nothing trained",
    ]
    return lines
