"""The run directory: everything a run wrote, enough to evaluate, merge, resume or reproduce it.

```
runs/<name>/
  hkft_config.yaml    resolved config; `hkft train runs/<name>/hkft_config.yaml --output-dir DIR` reproduces the run
  run_info.json       command line, seed, start time, versions and device (`hkft env`)
  adapter/            peft adapter (adapter_config.json, adapter_model.safetensors), tokenizer,
                      hkft_adapter.json (hkft's sidecar: task, labels, base model, dropout)
  checkpoints/checkpoint-<step>/   Trainer checkpoints (optimizer, scheduler, RNG, mask generator)
  metrics.jsonl       one JSON object per log or eval event
  metrics.json        final metrics
  curves.png          training loss and eval metric against steps
  tb/                 TensorBoard event files
  eval.json, predictions.jsonl   written by `hkft eval`
  .hkft.lock          locked by the one process that uses the run (released by the OS when it ends)
```

A directory is a run once it holds results or checkpoints; one left by a start that failed earlier
(say, on a missing data file) holds only its config and is silently reused.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from hkft.config import HkftConfig, config_to_yaml, load_config, presets_dir
from hkft.errors import ConfigError, ModelError, TrainingError
from hkft.run.files import TEMP_PREFIX, atomic_write_json, atomic_write_text

SIDECAR = "hkft_adapter.json"
LOCK_FILE = ".hkft.lock"
READER_BUSY_HINT = "wait until it has finished: eval and merge-adapter read a run only once nothing writes it"
# Keys that may change freely between an interrupted run and its resumption.
HARMLESS_CHANGES = ("description", "output.", "eval.", "train.logging_steps", "train.num_workers",
                    "train.save_total_limit", "train.early_stopping_patience", "train.overfitting.")
# Keys that may only grow: a run can be extended, not cut short behind its own checkpoints.
MAY_GROW = ("train.epochs", "train.max_steps")
_ABSENT = object()


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def config_path(self) -> Path:
        return self.root / "hkft_config.yaml"

    @property
    def info_path(self) -> Path:
        return self.root / "run_info.json"

    @property
    def adapter_dir(self) -> Path:
        return self.root / "adapter"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics_jsonl(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def metrics_json(self) -> Path:
        return self.root / "metrics.json"

    @property
    def curves_png(self) -> Path:
        return self.root / "curves.png"

    @property
    def tb_dir(self) -> Path:
        return self.root / "tb"

    @property
    def eval_json(self) -> Path:
        return self.root / "eval.json"

    @property
    def predictions_jsonl(self) -> Path:
        return self.root / "predictions.jsonl"


def default_run_dir(cfg: HkftConfig, preset_path: Path) -> Path:
    return Path(cfg.output.dir) if cfg.output.dir else Path("runs") / preset_path.stem


def check_run_location(root: Path, setting: str = "--output-dir", what: str = "run directory",
                       example: str = "runs/NAME") -> None:
    """A run (or a merged model) needs a folder of its own. Refused: the file system root, the current
    directory or one above it (an empty --output-dir, say an unset shell variable, is the current
    directory), the home directory or above, and the shipped presets (`hkft presets` would list the
    run's config)."""
    where = Path(root).expanduser().resolve()
    presets = presets_dir().resolve()
    if where == Path(where.anchor):
        problem = "is the file system root"
    elif Path.cwd().resolve().is_relative_to(where):
        problem = "is the current directory" if where == Path.cwd().resolve() else "holds the current directory"
    elif Path.home().resolve().is_relative_to(where):
        problem = "is the home directory" if where == Path.home().resolve() else "holds the home directory"
    elif where.is_relative_to(presets) or presets.is_relative_to(where):
        problem = f"{'is in' if where.is_relative_to(presets) else 'holds'} hkft's shipped presets ({presets})"
    else:
        return
    raise ConfigError(f"{what} {str(root)!r} {problem}", f"give it a folder of its own, e.g. {setting} {example}")


def run_root_of(target: Path) -> Path:
    """The run directory that ``target`` (a run, or its adapter/ folder) belongs to; a standalone
    adapter folder is its own."""
    target = Path(target)
    if not (target / "hkft_config.yaml").is_file() and (target.parent / "hkft_config.yaml").is_file():
        return target.parent
    return target


@contextmanager
def owned(root: Path, busy_hint: str, *, required: bool = True) -> Iterator[None]:
    """Hold the run directory's lock while a command uses it: one process at a time. The lock is an
    OS file lock on ``.hkft.lock``, released when the process ends however it ends (SIGKILL
    included), so it can never go stale. Without ``required``, a folder where no lock file can be
    created (read-only: nobody writes there either) or that does not exist is used unlocked."""
    if not required and not Path(root).is_dir():
        yield  # the command's own checks report what is missing
        return
    lock = FileLock(Path(root) / LOCK_FILE, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise TrainingError(f"{root} is in use by another hkft process", busy_hint) from None
    except OSError as err:
        if required:
            raise TrainingError(f"cannot lock the run directory {root} ({err.strerror or err})",
                                "check that it is writable, or choose another --output-dir") from None
        yield
        return
    try:
        yield
    finally:
        lock.release()


@contextmanager
def training_run_dir(root: Path) -> Iterator[None]:
    """`hkft train`'s hold on its run directory, from before anything in it is read or replaced
    until the last result is written; staging folders that a killed process left are removed."""
    check_run_location(root)
    if Path(root).exists() and not Path(root).is_dir():
        raise TrainingError(f"{root} is a file, not a run directory", "choose another --output-dir")
    _make_dir(Path(root))
    with owned(root, "wait for it to finish, or choose another --output-dir"):
        remove_stale_staging(RunDir(Path(root)))
        yield


def remove_stale_staging(run: RunDir) -> None:
    """`.tmp-<name>-*` folders and files beside hkft's outputs are what a process killed mid-write
    left (see hkft.run.files); only the run's owner calls this, so none of them is still being written."""
    names = tuple(f"{TEMP_PREFIX}{path.name}-" for path in written_paths(run))
    for path in run.root.glob(f"{TEMP_PREFIX}*"):
        if path.name.startswith(names):
            _remove(path)


def _make_dir(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise TrainingError(f"cannot create the run directory {root} ({err.strerror})", "choose another --output-dir") from None


def holds_run(run: RunDir) -> bool:
    return run.adapter_dir.exists() or run.metrics_json.exists() or any(run.checkpoints_dir.glob("checkpoint-*"))


def prepare_run_dir(root: Path, *, resume: bool, overwrite: bool) -> RunDir:
    run = RunDir(Path(root))
    if resume and overwrite:
        raise TrainingError("--resume and --overwrite contradict each other", "pass one of them")
    if run.root.exists() and not run.root.is_dir():
        raise TrainingError(f"{run.root} is a file, not a run directory", "choose another --output-dir")
    if resume:
        if latest_checkpoint(run) is None:
            raise TrainingError(f"{run.root} has no checkpoint to resume from", "drop --resume to start a new run")
        return run
    if holds_run(run) and not overwrite:
        raise TrainingError(
            f"{run.root} already holds a run", "use --resume to continue it, --overwrite to replace it, or another --output-dir"
        )
    # Without a config of ours beside them, files under hkft's names are somebody else's.
    clashes = [path.name for path in written_paths(run) if path.exists()]
    if clashes and not overwrite and not run.config_path.exists():
        raise TrainingError(
            f"{run.root} is not an hkft run but holds {', '.join(clashes)}, which training would replace",
            "choose another --output-dir, or pass --overwrite to replace them",
        )
    remove_run_files(run)
    _make_dir(run.root)
    return run


def written_paths(run: RunDir) -> tuple[Path, ...]:
    """Everything hkft writes in a run directory."""
    return (run.adapter_dir, run.checkpoints_dir, run.tb_dir, run.config_path, run.info_path, run.metrics_json,
            run.metrics_jsonl, run.curves_png, run.eval_json, run.predictions_jsonl)


def remove_run_files(run: RunDir) -> None:
    """Only what hkft writes: --overwrite on a directory that holds other files keeps them."""
    for path in written_paths(run):
        _remove(path)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def checkpoint_is_complete(path: Path) -> bool:
    """The Trainer writes trainer_state.json last: a checkpoint without a readable one was cut short."""
    try:
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return (path / "adapter_model.safetensors").is_file()


def latest_checkpoint(run: RunDir) -> Path | None:
    candidates = sorted(
        (p for p in run.checkpoints_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    complete = [p for p in candidates if checkpoint_is_complete(p)]
    return complete[-1] if complete else None


def save_run_config(run: RunDir, cfg: HkftConfig, argv: list[str]) -> None:
    from hkft.run.environment import (
        environment_report,  # imports torch: keeps `import hkft.run.directory` (and the CLI) light
    )

    atomic_write_text(run.config_path, config_to_yaml(cfg))
    info = {
        "argv": list(argv),
        "seed": cfg.train.seed,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "environment": environment_report(),
    }
    atomic_write_json(run.info_path, info)


def check_resume_compatible(saved: HkftConfig, new: HkftConfig) -> None:
    """Resuming with a different model, data or method would silently mix two runs: refuse,
    naming the first key (in preset order) that differs."""
    old_flat, new_flat = _flatten(saved.model_dump(mode="json")), _flatten(new.model_dump(mode="json"))
    for key in [*old_flat, *(k for k in new_flat if k not in old_flat)]:
        old, now = old_flat.get(key, _ABSENT), new_flat.get(key, _ABSENT)
        if old == now or key.startswith(HARMLESS_CHANGES) or (key in MAY_GROW and _grows(old, now)):
            continue
        hint = f"{key} may only grow when resuming" if key in MAY_GROW else "resume with the run's own hkft_config.yaml"
        raise TrainingError(
            f"cannot resume: {key} was {_show(old)} in the interrupted run and is {_show(now)} now",
            f"{hint}; or start a new run with --overwrite",
        )


def _grows(old: Any, new: Any) -> bool:
    """max_steps -1 means "no step limit" (epochs decide), i.e. more than any number of steps."""
    def rank(value: Any) -> float:
        return float("inf") if value == -1 else float(value)

    return isinstance(old, int | float) and isinstance(new, int | float) and rank(new) >= rank(old)


def _show(value: Any) -> str:
    return "absent" if value is _ABSENT else repr(value)


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        flat: dict[str, Any] = {}
        for key, value in data.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): data}


def find_adapter_dir(target: Path) -> Path:
    target = Path(target)
    for candidate in (target, target / "adapter"):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    raise ModelError(
        f"{target} has no LoRA adapter (expected adapter_config.json in {target} or {target / 'adapter'})",
        "point at a run directory made by hkft train, or at its adapter/ folder",
    )


def read_sidecar(adapter_dir: Path) -> dict[str, Any]:
    path = adapter_dir / SIDECAR
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise ModelError(f"{path} is not valid JSON", "the adapter directory is damaged; re-run training") from None


def sidecar_label_names(adapter_dir: Path, facts: dict[str, Any], required: bool) -> list[str] | None:
    """A classifier's label order, which only its sidecar keeps (``required``: the task has one)."""
    if not required:
        return facts.get("label_names")
    if not facts.get("label_names"):
        raise ModelError(f"{adapter_dir / SIDECAR} is missing or names no labels: the classifier's label order is in it",
                         "restore the file from the run, or re-run training")
    return facts["label_names"]


def write_sidecar(adapter_dir: Path, data: dict[str, Any]) -> None:
    atomic_write_json(adapter_dir / SIDECAR, data)


def is_main_process() -> bool:
    """Rank 0 of a torchrun/accelerate launch (or a single process) owns the run directory."""
    return int(os.environ.get("RANK", "0")) == 0


def start_run(cfg: HkftConfig, root: Path, *, resume: bool, overwrite: bool, argv: list[str]) -> RunDir:
    """The one way a run starts, for `hkft train`, a sweep's cell and a tuning trial alike: the run
    directory made (or kept, to resume), a resumed run's settings checked against its saved ones, and
    the config saved with the command line that reproduces the run (``argv``)."""
    if not is_main_process():
        return RunDir(root)
    run = prepare_run_dir(root, resume=resume, overwrite=overwrite)
    if resume and run.config_path.is_file():
        check_resume_compatible(load_config(run.config_path), cfg)
    save_run_config(run, cfg, argv)
    return run
