"""`hkft tune STUDY.yaml`: a Bayesian search over preset keys with Optuna, one run directory per trial.

Optuna does the searching: TPE samples the ``search:`` space, a median pruner stops a trial whose
validation metric trails the others' at the same step once the trial is past its warm-up (fed by every
evaluation through a Trainer callback), and the study lives in a database (SQLite in the output folder
by default), so a re-run continues it and several processes, or machines sharing ``tune.storage``, work
on it at once.

A trial is an ordinary run directory, ``trial-<number>`` (``<per key=value>/trial-<number>`` with
``tune.per``), whose ``trial.json`` records how the trial ended. An interrupted trial (Ctrl-C, a killed
process: see `hkft.study.workers`) is queued again with the same values and resumes from its run
directory's last checkpoint; the study is one trial the richer, not one attempt.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import statistics
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import optuna
from filelock import FileLock
from optuna.storages import RDBStorage
from optuna.study import MaxTrialsCallback
from optuna.trial import FrozenTrial, TrialState
from pydantic import JsonValue
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from transformers import TrainerCallback

from hkft.config import config_to_yaml, load_config, resolve_preset_path
from hkft.errors import ConfigError, InterruptedRun, TrainingError
from hkft.recipes.curves import read_curves
from hkft.run.directory import RunDir, holds_run
from hkft.run.files import atomic_write_json, atomic_write_text, check_can_create_dir
from hkft.run.tracking import one_parent_run_per_search
from hkft.study.comparison import compare_runs
from hkft.study.grid import (
    Cell,
    cell_name,
    cell_state,
    expand_cells,
    labels_of,
    make_cell,
    run_fingerprint,
    train_cell,
    train_cells,
)
from hkft.study.plots import (
    figure_metric_vs_param,
    figure_optimization_history,
    figure_param_importances,
    save_figure,
)
from hkft.study.spec import SearchDimension, SearchRange, Study, TuneSettings
from hkft.study.workers import (
    WORKER_ATTR,
    claim_output,
    describe_worker,
    origin_number,
    requeue,
    take_over_abandoned,
    this_worker,
)
from hkft.tasks.metrics import greater_is_better
from hkft.tasks.registry import task_for

TRIAL_RECORD = "trial.json"
DEFAULT_DB = "optuna.db"  # the study's storage in its output folder, without tune.storage
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
ENDED_ATTR = "ended"  # "interrupted" on the attempt that Ctrl-C stopped (Optuna can only call it failed)
# A trial whose process sent no heartbeat for GRACE_PERIOD_S seconds (a machine lost) is failed by Optuna
# and queued again; one whose process on this machine is gone is taken over at once (hkft.study.workers).
HEARTBEAT_INTERVAL_S, GRACE_PERIOD_S = 30, 120
POLL_S = 5.0  # how often a worker with nothing left to start looks at the trials others still run
TOP_TRIALS = 3  # rows per search in the console table
# Plots are drawn only where they can mean something: a history of two trials or more, a metric against
# a parameter that took two values or more in three trials or more, and fANOVA importances (a random
# forest over the trials) from five trials per parameter and at least two parameters (one is 100%).
MIN_HISTORY, MIN_SCATTER, MIN_TRIALS_PER_IMPORTANCE = 2, 3, 5
PLOTS = ("optimization_history.png", "param_importances.png", "metric_vs_param.png")
MAX_CONTEXTS = 64  # combinations of the other choices tried when asking whether a key changes the runs


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
    space: dict[str, SearchDimension]  # the keys some of its runs read
    ignored: tuple[str, ...] = ()  # search keys none of its runs read (dropout.rate for method none)
    conditional: frozenset[str] = frozenset()  # keys read under some choices only: sampled where they are


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

    def reads(self, key: str, dimension: SearchDimension, context: dict[str, JsonValue]) -> bool:
        """Whether a run with ``context`` set changes with ``key`` over its values."""
        return _changes_runs(self.preset, self.overrides, key, json.dumps(_candidates(dimension)),
                             json.dumps(context, sort_keys=True))


def plan_tune(study: Study) -> TunePlan:
    """Everything checked before the first trial: base preset, metric and direction, and every bound and
    choice of the space validated against the preset schema (an unknown key gets a did-you-mean)."""
    if not study.search:
        raise ConfigError("this study has no search: section", "add one (see presets/studies/quickstart-tune.yaml), or run it with hkft sweep")
    if len(study.bases) != 1:
        raise ConfigError("hkft tune takes one base preset", "write one study file per preset")
    preset = resolve_preset_path(study.bases[0])
    base = _load(preset, study.overrides, "study overrides")
    task = task_for(base.model.task)
    metric = study.tune.metric or task.main_metric
    if metric not in task.eval_metrics:
        raise ConfigError(f"tune.metric: {metric!r} is not a {task.name} validation metric",
                          f"choose one of {', '.join(task.eval_metrics)}")
    direction = _direction(study.tune, metric)
    if base.train.eval_strategy == "no":
        raise ConfigError("hkft tune scores trials on the validation split, but train.eval_strategy is no",
                          "set train.eval_strategy to epoch or steps")
    overrides = (*study.overrides, f"train.metric_for_best={metric}")  # the adapter kept is the trial's best
    integer_keys = frozenset(key for key, dimension in study.search.items()
                             if _validate_dimension(preset, overrides, key, dimension))
    plan = TunePlan(study, preset, overrides, metric, direction, integer_keys, (),
                    study.tune.storage or f"sqlite:///{(Path(study.output) / DEFAULT_DB).resolve()}")
    return replace(plan, searches=tuple(_read_keys_only(plan, search) for search in _searches(study, preset)))


def _direction(tune: TuneSettings, metric: str) -> str:
    """The metric's own direction: the other one would pick the worst trial, while each trial keeps the
    checkpoint that is best by the metric."""
    natural = "maximize" if greater_is_better(metric) else "minimize"
    if tune.direction not in (None, natural):
        better = "higher" if natural == "maximize" else "lower"
        raise ConfigError(f"tune.direction: {tune.direction} contradicts tune.metric {metric}, where {better} is better",
                          f"leave tune.direction out (it follows the metric) or set it to {natural}")
    return natural


def _load(preset: Path, overrides: Sequence[str], where: str):
    try:
        return load_config(preset, list(overrides))
    except ConfigError as err:
        raise ConfigError(f"{where}: {err.message}", err.hint) from None


def _override(key: str, value: JsonValue) -> str:
    return f"{key}={json.dumps(value)}"


def _candidates(dimension: SearchDimension) -> list[JsonValue]:
    return dimension if isinstance(dimension, list) else [dimension.low, dimension.high]


def _validate_dimension(preset: Path, overrides: tuple[str, ...], key: str, dimension: SearchDimension) -> bool:
    """Validates every choice, or both bounds, of one key; True when the key holds whole numbers."""
    configs = [_load(preset, [*overrides, _override(key, value)], f"search {key}={value}") for value in _candidates(dimension)]
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


@functools.lru_cache(maxsize=4096)
def _changes_runs(preset: Path, overrides: tuple[str, ...], key: str, values: str, context: str) -> bool:
    """Whether the runs differ (`run_fingerprint`: the dropout plan, not the settings it ignores) between
    the values of ``key`` with the other keys of ``context`` set. A combination the schema refuses
    counts as a difference: the trial that meets it will say so, and the key is never hidden."""
    base = [*overrides, *(_override(other, value) for other, value in json.loads(context).items() if other != key)]
    prints = set()
    for value in json.loads(values):
        try:
            prints.add(run_fingerprint(load_config(preset, [*base, _override(key, value)])))
        except ConfigError:
            return True
    return len(prints) > 1


def _read_keys_only(plan: TunePlan, search: Search) -> Search:
    """Leaves out of a search the keys none of its runs reads (``dropout.rate`` with ``dropout.method``
    none: sampling it would spend trials on a value that changes nothing and draw it as if it did), and
    marks those read under some of the other choices only, sampled where they are read."""
    choices = {key: dimension for key, dimension in search.space.items() if isinstance(dimension, list)}
    ignored, conditional = [], set()
    for key, dimension in search.space.items():
        others = {other: values for other, values in choices.items() if other != key}
        if math.prod(len(values) for values in others.values()) > MAX_CONTEXTS:
            continue
        verdicts = [plan.reads(key, dimension, {**search.fixed, **dict(zip(others, values))})
                    for values in itertools.product(*others.values())]
        if not any(verdicts):
            ignored.append(key)
        elif not all(verdicts):
            conditional.add(key)
    space = {key: dimension for key, dimension in search.space.items() if key not in ignored}
    if not space:
        where = f"search {search.label}" if search.label else "this study"
        raise ConfigError(f"{where}: no run reads any searched key ({', '.join(ignored)}), so there is nothing to tune",
                          "search a key every run reads, such as train.lr")
    return replace(search, space=space, ignored=tuple(ignored), conditional=frozenset(conditional))


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


def suggest(trial: optuna.Trial, plan: TunePlan, search: Search) -> dict[str, JsonValue]:
    """The trial's values: the keys every run reads first, then each conditional key where the values so
    far make the run read it. Returned in the study file's order."""
    values: dict[str, JsonValue] = {}
    order = sorted(search.space, key=lambda key: key in search.conditional)
    for key in order:
        dimension = search.space[key]
        if key in search.conditional and not plan.reads(key, dimension, {**search.fixed, **values}):
            continue
        if isinstance(dimension, list):
            choices = [_choice(value) for value in dimension]
            values[key] = dimension[choices.index(trial.suggest_categorical(key, choices))]
        elif key in plan.integer_keys:
            values[key] = trial.suggest_int(key, int(dimension.low), int(dimension.high),
                                            step=int(dimension.step or 1), log=dimension.log)
        else:
            values[key] = trial.suggest_float(key, dimension.low, dimension.high, step=dimension.step, log=dimension.log)
    return {key: values[key] for key in search.space if key in values}


class ReportToTrial(TrainerCallback):
    """Feeds every evaluation to the Optuna trial and stops training when the pruner says so, but never
    within the first ``warmup`` share of the trial's steps.

    Why a warm-up as a share of the run: early in training, the learning rates that learn fastest lead,
    and they are also the ones that overfit soonest. A median pruner that may stop a trial at its first
    evaluations keeps the fast learners and drops the slow ones that end best, the opposite of what a
    search for the setting that generalises should do. Past half of its steps, a trial that still
    trails the median at the same step is unlikely to end on top, and stopping it there still saves
    up to half of its cost."""

    def __init__(self, trial: optuna.Trial, metric: str, *, warmup: float):
        self.trial = trial
        self.metric = metric
        self.warmup = warmup

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        value = (metrics or {}).get(f"eval_{self.metric}")
        if value is None:
            return control
        self.trial.report(value, state.global_step)
        if state.global_step >= self.warmup * state.max_steps and self.trial.should_prune():
            raise optuna.TrialPruned(f"validation {self.metric} {value:.4g} at step {state.global_step} "
                                     f"of {state.max_steps} trails the other trials")
        return control


def best_validation(run: RunDir, metric: str, direction: str) -> float:
    curve = read_curves(run.metrics_jsonl).get(f"eval_{metric}")
    if not curve:
        raise TrainingError(f"{run.root}: no validation {metric} was logged", "check train.eval_strategy")
    values = [value for _, value in curve]
    return max(values) if direction == "maximize" else min(values)


def _frozen(trial: optuna.Trial) -> FrozenTrial:
    return next(frozen for frozen in trial.study.get_trials(deepcopy=False) if frozen.number == trial.number)


def _record(run: RunDir, search: Search, number: int, values: dict, state: str, **facts) -> None:
    atomic_write_json(run.root / TRIAL_RECORD, {"study": search.name, "trial": number, "state": state,
                                                "values": values, **facts})


def _values_text(values: dict[str, JsonValue]) -> str:
    return ", ".join(f"{key.rsplit('.', 1)[-1]}={value:.3g}" if isinstance(value, float)
                     else f"{key.rsplit('.', 1)[-1]}={value}" for key, value in values.items())


def trial_cells(plan: TunePlan, search: Search, number: int, values: dict[str, JsonValue]) -> list[Cell]:
    """A trial's runs: ``trial-N`` with the base's seed, then ``trial-N-seed-S`` for each further seed
    of ``tune.trial_seeds``.

    Why several seeds a trial: on a small set one seed can decide whether a run leaves a plateau at
    all, and a search that scores each setting on one seed picks the setting that was lucky (often a
    learning rate at the edge of what trains). The mean over seeds is what a user can expect."""
    overrides = (*plan.overrides, *(_override(key, value) for key, value in {**search.fixed, **values}.items()))
    cell, _ = make_cell(plan.preset, f"trial-{number:04d}", overrides, search.folder)
    first = cell.config.train.seed
    return [cell, *(make_cell(plan.preset, f"trial-{number:04d}-seed-{seed}", (*overrides, f"train.seed={seed}"), search.folder)[0]
                    for seed in range(first + 1, first + plan.study.tune.trial_seeds))]


def make_objective(plan: TunePlan, search: Search, console: Console, train_fn: TrialTrainFn):
    def objective(trial: optuna.Trial) -> float:
        number = origin_number(_frozen(trial))  # a retry continues the run directories it retries
        values = suggest(trial, plan, search)
        cells = trial_cells(plan, search, number, values)
        run = RunDir(cells[0].run_dir)
        for cell in cells:
            if number == trial.number and holds_run(RunDir(cell.run_dir)):
                raise TrainingError(f"{cell.run_dir} holds a run that is not trial {number} of study {search.name}",
                                    "move it away, or give the study another output folder")
        worker = this_worker()
        trial.set_user_attr("run_dir", str(run.root))
        trial.set_user_attr(WORKER_ATTR, worker)
        states = [cell_state(cell) for cell in cells]
        head = f"[{search.label + ' ' if search.label else ''}trial {number}] {_values_text(values)}"
        doing = "resuming" if "resume" in states else "training" if "new" in states else "finished"
        console.print(f"{head}: {doing}" + (f" ({len(cells)} seeds)" if len(cells) > 1 else ""), highlight=False, markup=False)
        run.root.mkdir(parents=True, exist_ok=True)
        _record(run, search, number, values, "running", worker=worker)
        try:
            for cell, state in zip(cells, states):
                # The pruner hears the first seed only; a study with several seeds a trial has none.
                callbacks = [ReportToTrial(trial, plan.metric, warmup=plan.study.tune.warmup)] if cell is cells[0] else []
                if state != "finished":
                    train_fn(cell, resume=state == "resume", console=console, callbacks=callbacks)
            seed_values = [best_validation(RunDir(cell.run_dir), plan.metric, plan.direction) for cell in cells]
            value = statistics.fmean(seed_values)
        except optuna.TrialPruned as pruned:
            _record(run, search, number, values, "pruned", reason=str(pruned))
            console.print(f"[yellow]{escape(head)}: pruned ({escape(str(pruned))})[/]", highlight=False)
            raise
        except TrainingError as err:  # a diverging learning rate, say: a failed trial, not a failed search
            _record(run, search, number, values, "failed", reason=str(err))
            console.print(f"[yellow]{escape(head)}: failed ({escape(str(err))})[/]", highlight=False)
            return math.nan  # Optuna's way to fail a trial and go on
        except (InterruptedRun, KeyboardInterrupt):
            _record(run, search, number, values, "interrupted")
            requeue(trial.study, _frozen(trial))
            trial.set_user_attr(ENDED_ATTR, "interrupted")  # after the requeue, which copies the attributes
            raise
        seeds = {"seed_values": seed_values} if len(cells) > 1 else {}
        _record(run, search, number, values, "complete", value=value, **seeds)
        each = f" (the mean of {', '.join(f'{one:.4f}' for one in seed_values)})" if seeds else ""
        console.print(f"{head}: validation {plan.metric} {value:.4f}{each}", highlight=False, markup=False)
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
                              heartbeat_stale_trial_callback=requeue)
        except ImportError:  # Optuna's word for a driver that is not installed
            raise ConfigError(f"tune.storage: cannot open {url}: the driver for this database is not installed",
                              "install it (PostgreSQL: pip install 'hkft[postgres]')") from None
        except Exception as err:  # sqlalchemy reports a bad URL or an unreachable server with many exception types
            failure = err
    raise ConfigError(f"tune.storage: cannot open {url} ({type(failure).__name__}: {str(failure).splitlines()[0]})",
                      "give a database URL such as sqlite:///tune.db or postgresql+psycopg://user@host/db")


def setup_record(plan: TunePlan, search: Search) -> str:
    """What a study's trials must share: a study re-run with a changed base, space or metric is refused."""
    base = _load(plan.preset, [*plan.overrides, *(_override(k, v) for k, v in search.fixed.items())], "study overrides")
    space = {key: dimension if isinstance(dimension, list) else dimension.model_dump()
             for key, dimension in search.space.items()}
    # trial_seeds joins the record only when set, so that studies started before it existed go on.
    seeds = {"trial_seeds": plan.study.tune.trial_seeds} if plan.study.tune.trial_seeds > 1 else {}
    return json.dumps({"base": run_fingerprint(base), "search": space, "metric": plan.metric,
                       "direction": plan.direction, **seeds}, sort_keys=True)


def study_identity(plan: TunePlan) -> dict:
    """What the study that owns the output folder is: its storage (None: the folder's own optuna.db) and
    each search's setup."""
    return {"storage": plan.study.tune.storage,
            "searches": {search.name: json.loads(setup_record(plan, search)) for search in plan.searches}}


def make_pruner(tune: TuneSettings) -> optuna.pruners.BasePruner:
    """The median pruner, never during the first ``startup_trials`` trials; its warm-up, a share of each
    trial's steps, is applied by ReportToTrial, which knows how many steps the trial has."""
    return optuna.pruners.MedianPruner(n_startup_trials=tune.startup_trials) if tune.pruner == "median" else optuna.pruners.NopPruner()


def load_search_study(plan: TunePlan, search: Search, storage: RDBStorage) -> optuna.Study:
    study = optuna.create_study(study_name=search.name, storage=storage, direction=plan.direction, load_if_exists=True)
    setup = setup_record(plan, search)
    recorded = study.user_attrs.get("hkft_setup")
    if recorded is None:
        study.set_user_attr("hkft_setup", setup)
    elif recorded != setup:
        before, now = json.loads(recorded), json.loads(setup)
        changed = ", ".join(key for key in sorted({*before, *now}) if before.get(key) != now.get(key))
        raise ConfigError(f"study {search.name} in {plan.storage_url} was started with another {changed}",
                          "restore the study file, or give the new setup another output folder (or tune.storage)")
    tune = plan.study.tune
    # Seeded by the trials so far: a re-run continues the sequence instead of repeating its first draws.
    study.sampler = optuna.samplers.TPESampler(seed=tune.seed + len(study.trials), constant_liar=True)
    study.pruner = make_pruner(tune)
    return study


def _take_over(study: optuna.Study, search: Search, console: Console) -> None:
    for trial in take_over_abandoned(study):
        console.print(f"search {search.name}: trial {origin_number(trial)} was left running by "
                      f"{describe_worker(trial.user_attrs.get(WORKER_ATTR))}, which is gone; it resumes from its checkpoint",
                      highlight=False, markup=False)


@one_parent_run_per_search
def run_search(plan: TunePlan, search: Search, storage: RDBStorage, console: Console,
               train_fn: TrialTrainFn) -> optuna.Study:
    """Trials until ``tune.trials`` have finished, then the trials queued again (a killed worker's), then
    a wait for the trials other workers still run, so that what this worker writes next is the whole study."""
    study = load_search_study(plan, search, storage)
    budget = plan.study.tune.trials
    objective = make_objective(plan, search, console, train_fn)
    _take_over(study, search, console)
    finished = len(study.get_trials(deepcopy=False, states=FINISHED))
    console.print(f"search {search.name}: {finished}/{budget} trials finished", highlight=False, markup=False)
    if finished < budget:
        _optimize(plan, search, study, objective, budget - finished, console)
    announced: set[int] = set()
    while True:
        _take_over(study, search, console)
        if study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            _optimize(plan, search, study, objective, 1, console)
            continue
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not running:
            return study
        for trial in running:
            if trial.number not in announced:
                announced.add(trial.number)
                console.print(f"search {search.name}: waiting for trial {origin_number(trial)}, running in "
                              f"{describe_worker(trial.user_attrs.get(WORKER_ATTR))}", highlight=False, markup=False)
        time.sleep(POLL_S)


def _optimize(plan: TunePlan, search: Search, study: optuna.Study, objective, n_trials: int, console: Console) -> None:
    """Up to ``n_trials`` trials; never past ``tune.trials`` finished ones except for a trial queued again
    (a requeued trial is asked for first, and it is part of the study already)."""
    budget = plan.study.tune.trials
    waiting = bool(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
    callbacks = [lambda study, _: _take_over(study, search, console)]  # a dead worker's trial comes next
    callbacks += [] if waiting else [MaxTrialsCallback(budget, states=FINISHED)]
    try:
        study.optimize(objective, n_trials=n_trials, timeout=plan.study.tune.timeout, callbacks=callbacks)
    except InterruptedRun as err:
        raise InterruptedRun(f"search {search.name}: {err.message}",
                             "run the same hkft tune command to continue; the trial resumes from its checkpoint") from None


def run_tune(plan: TunePlan, console: Console, *, seeds: int = 0, train_fn: TrialTrainFn | None = None) -> list[optuna.Study]:
    """Every search in turn, then trials.csv, the best trials' table, best.yaml and plots per search;
    with ``seeds``, the best settings trained again with that many new seeds and compared."""
    train_fn = train_fn or train_cell
    check_can_create_dir(plan.output, "study output")
    identity = study_identity(plan)
    # The default storage creates optuna.db in the folder before the folder is claimed (by this worker or
    # by one started beside it): a refused study must not leave a database behind, and a bad storage URL
    # must not claim the folder for a storage that never opened.
    own = () if plan.study.tune.storage else (DEFAULT_DB,)
    claim_output(plan.output, identity, create=False, own_files=own)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # hkft prints each trial; failures are one line
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = open_storage(plan.storage_url)
        claim_output(plan.output, identity, own_files=own)
        studies = [run_search(plan, search, storage, console, train_fn) for search in plan.searches]
        bests = write_results(plan, studies, console)
    if seeds:
        retrain_with_seeds([best for best in bests if best is not None], plan, seeds, console, train_fn)
    return studies


def write_results(plan: TunePlan, studies: list[optuna.Study], console: Console) -> list[Path | None]:
    """trials.csv, the table, best.yaml and the plots, from the study as it is now. Workers sharing the
    output folder take turns (a file lock), so the last one writes from the newest state."""
    with FileLock(plan.output / ".results.lock"):
        write_trials_csv(plan, studies)
        console.print(best_trials_table(plan, studies))
        bests = [write_best_preset(plan, search, study, console) for search, study in zip(plan.searches, studies)]
        for search, study in zip(plan.searches, studies):
            log_keys = {key for key, dim in search.space.items() if isinstance(dim, SearchRange) and dim.log}
            drawn, left_out = plot_search(study, search.folder, plan.metric, log_keys, plan.study.tune.seed)
            console.print(f"plots in {search.folder}: {', '.join(path.name for path in drawn) or 'none yet'}"
                          + (f"; too few completed trials for {', '.join(left_out)}" if left_out else ""),
                          highlight=False, markup=False)
    return bests


def trials_by_run(study: optuna.Study) -> list[list[FrozenTrial]]:
    """The study's trials as the user knows them, one per run directory: each with its attempts (an
    interrupted trial and the retry that resumed it), in trial order."""
    attempts: dict[int, list[FrozenTrial]] = {}
    for trial in study.get_trials(deepcopy=False):
        attempts.setdefault(origin_number(trial), []).append(trial)
    return [sorted(group, key=lambda trial: trial.number) for _, group in sorted(attempts.items())]


def trial_state(attempts: list[FrozenTrial]) -> str:
    """COMPLETE, PRUNED, FAIL (training failed), RUNNING, or INTERRUPTED (stopped, to be resumed)."""
    last = attempts[-1]
    if last.state == TrialState.WAITING and len(attempts) > 1:
        return "INTERRUPTED"
    if last.state == TrialState.FAIL and last.user_attrs.get(ENDED_ATTR) == "interrupted":
        return "INTERRUPTED"
    return last.state.name


def _duration_s(attempts: list[FrozenTrial]) -> float | None:
    spans = [(t.datetime_complete - t.datetime_start).total_seconds() for t in attempts
             if t.datetime_start is not None and t.datetime_complete is not None]
    return round(sum(spans), 1) if spans else None


def write_trials_csv(plan: TunePlan, studies: list[optuna.Study]) -> Path:
    """One row per trial (run directory): its last attempt's state, value and values, and how many
    attempts it took."""
    import pandas as pd

    keys = list(dict.fromkeys(key for search in plan.searches for key in search.space))
    rows = []
    for search, study in zip(plan.searches, studies):
        for attempts in trials_by_run(study):
            last = attempts[-1]
            value = last.value if last.state == TrialState.COMPLETE else None
            rows.append({"search": search.name, "trial": origin_number(last), "state": trial_state(attempts),
                         f"validation_{plan.metric}": value,
                         **{f"params_{key}": last.params.get(key) for key in keys},
                         "attempts": len(attempts), "duration_s": _duration_s(attempts),
                         "run_dir": last.user_attrs.get("run_dir", "")})
    path = plan.output / "trials.csv"
    atomic_write_text(path, pd.DataFrame.from_records(rows).to_csv(index=False))
    return path


def _ranked(study: optuna.Study) -> list[FrozenTrial]:
    """Completed trials, best first; ties go to the lower trial number, as one worker alone would rank them."""
    sign = -1 if study.direction.name == "MAXIMIZE" else 1
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return sorted(complete, key=lambda trial: (sign * trial.value, origin_number(trial)))


def best_trials_table(plan: TunePlan, studies: list[optuna.Study]) -> Table:
    """The best trials of each search, the search named once above its rows. Cells fold rather than
    being cut, and run directories are left to trials.csv, so the table reads at 80 columns."""
    keys = list(dict.fromkeys(key for search in plan.searches for key in search.space))
    labels = labels_of(keys)
    table = Table(title=f"best trials by validation {plan.metric} ({plan.direction})", header_style="bold",
                  caption="trial N: its search's trial-000N folder; all trials: trials.csv")
    table.add_column("search", overflow="fold")
    table.add_column("trial", justify="right")
    table.add_column(plan.metric, justify="right")
    for key in keys:
        table.add_column(labels[key], justify="right", overflow="fold")
    table.add_column("pruned", justify="right")
    for search, study in zip(plan.searches, studies):
        trials = trials_by_run(study)
        pruned = f"{sum(trial_state(attempts) == 'PRUNED' for attempts in trials)}/{len(trials)}"
        ranked = _ranked(study)[:TOP_TRIALS]
        name = search.label or search.name
        if not ranked:
            table.add_row(name, "-", "-", *("-" for _ in keys), pruned)
        for index, trial in enumerate(ranked):
            table.add_row(name if index == 0 else "", str(origin_number(trial)), f"{trial.value:.4f}",
                          *(_param_text(trial.params.get(key)) for key in keys), pruned if index == 0 else "")
        table.add_section()
    return table


def _param_text(value) -> str:
    if value is None:
        return "-"
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
    config.description = (f"best of {len(ranked)} completed trials of {search.name} (trial {origin_number(best)}): "
                          f"validation {plan.metric} {best.value:.4f}")
    path = search.folder / "best.yaml"
    atomic_write_text(path, config_to_yaml(config))
    console.print(f"wrote {path} (`hkft train {path}` trains it)", highlight=False, markup=False)
    return path


def retrain_with_seeds(presets: list[Path], plan: TunePlan, seeds: int, console: Console, train_fn: TrialTrainFn) -> None:
    """Each best setting with ``seeds`` seeds it was not picked with (nor any of its trial's seeds), then
    `hkft compare` over them all: the number to report is a median over seeds, not the luckiest trial.
    The trials were picked on the validation split, so the comparison scores them on the test split
    (each run's final evaluation)."""
    cells: list[Cell] = []
    for preset in presets:
        first = load_config(preset).train.seed + plan.study.tune.trial_seeds
        study = Study(base=str(preset), output=str(preset.parent / "seeds"), grid={"train.seed": list(range(first, first + seeds))})
        cells += expand_cells(study)
    train_cells(cells, console, train_fn)
    compare_runs([cell.run_dir for cell in cells], plan.output / "seeds", console)


def plot_search(study: optuna.Study, folder: Path, metric: str, log_keys: set[str], seed: int) -> tuple[list[Path], list[str]]:
    """optimization_history.png, param_importances.png (Optuna's fANOVA) and metric_vs_param.png (the most
    important parameter, or the first that varied), each only where there are enough completed trials for
    it to mean something (MIN_*); one left out is removed. Returns (drawn, names left out)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    varied = [name for name in dict.fromkeys(name for trial in complete for name in trial.params)
              if len({_choice(trial.params[name]) for trial in complete if name in trial.params}) > 1]
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    figures = {}
    if len(complete) >= MIN_HISTORY:
        figures["optimization_history.png"] = figure_optimization_history(
            [(origin_number(t), t.value) for t in complete], metric, maximize)
    importances = {}
    if len(varied) >= 2 and len(complete) >= MIN_TRIALS_PER_IMPORTANCE * len(varied):
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
        importances = optuna.importance.get_param_importances(study, evaluator=evaluator, params=varied)
        figures["param_importances.png"] = figure_param_importances(importances)
    top = max(importances, key=importances.get) if importances else (varied[0] if varied else None)
    points = [(trial.params[top], trial.value) for trial in complete if top in trial.params]
    if top is not None and len(points) >= MIN_SCATTER:
        figures["metric_vs_param.png"] = figure_metric_vs_param(points, top, metric, top in log_keys)
    folder.mkdir(parents=True, exist_ok=True)
    left_out = [name for name in PLOTS if name not in figures]
    for name in left_out:
        (folder / name).unlink(missing_ok=True)  # drawn from fewer trials by an older hkft
    return [save_figure(figure, folder / name) for name, figure in figures.items()], left_out


def describe_plan(plan: TunePlan, seeds: int) -> list[str]:
    """`hkft tune --dry-run`: the search space and what the command would run, as plain lines; an output
    folder the study could not use is refused as the real run would refuse it."""
    claim_output(plan.output, study_identity(plan), create=False)
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
    pruner = ("none" if tune.pruner == "none" else
              f"{tune.pruner} (never the first {tune.startup_trials} trials, nor before {tune.warmup:.0%} of a trial's steps)")
    for search in plan.searches:
        lines.append(f"search {search.name} in {search.folder}")
        if search.ignored:
            lines.append(f"  not searched: {', '.join(search.ignored)} (no run of this search reads it)")
        if search.conditional:
            lines.append(f"  sampled only where the other choices read it: {', '.join(sorted(search.conditional))}")
    lines += [
        f"trials per search: {tune.trials}; validation {plan.metric} ({plan.direction}); pruner {pruner}"
        + (f"; {tune.trial_seeds} seeds a trial (its value: their mean)" if tune.trial_seeds > 1 else ""),
        f"estimated runs: {len(plan.searches) * (tune.trials * tune.trial_seeds + seeds)} at most "
        f"({len(plan.searches)} x ({tune.trials} trials{f' x {tune.trial_seeds} seeds' if tune.trial_seeds > 1 else ''} "
        f"+ {seeds} seeds); pruned trials stop early)",
        f"storage: {plan.storage_url}",
        "dry run: nothing trained",
    ]
    return lines
