"""`hkft sweep STUDY.yaml`: a grid of runs over one or more presets, then `hkft compare` over them.

The study file is described in `hkft.study.spec`. Each cell runs in ``<output>/<key=value,...>``
(``<output>/<preset>/<key=value,...>`` when ``base`` is a list). A re-run skips finished cells
(metrics.json exists) and resumes interrupted ones from their last checkpoint, so a sweep stopped at
any point continues with the same command.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from pydantic import JsonValue
from rich.console import Console

from hkft.config import HkftConfig, load_config, resolve_preset_path
from hkft.errors import ConfigError
from hkft.run.directory import (
    RunDir,
    latest_checkpoint,
    start_run,
    training_run_dir,
)
from hkft.run.files import check_can_create_dir
from hkft.study.comparison import compare_runs, flatten
from hkft.study.spec import STUDY_MARKER, Study

if TYPE_CHECKING:
    from transformers import TrainerCallback


@dataclass(frozen=True)
class Cell:
    name: str  # the run directory relative to the study's output
    preset: Path
    overrides: tuple[str, ...]
    config: HkftConfig
    run_dir: Path


class TrainFn(Protocol):
    def __call__(self, cell: Cell, *, resume: bool, console: Console) -> object: ...


def labels_of(keys: list[str]) -> dict[str, str]:
    """The last part of each dotted key (``dropout.rate`` -> ``rate``), the whole key where two clash."""
    last = [key.rsplit(".", 1)[-1] for key in keys]
    return {key: short if last.count(short) == 1 else key for key, short in zip(keys, last)}


def _value_text(value: JsonValue) -> str:
    if isinstance(value, list):
        text = "-".join(_value_text(item) for item in value)
    else:
        text = re.sub(r"[^A-Za-z0-9.+-]", "_", value if isinstance(value, str) else json.dumps(value, sort_keys=True))
    return text or "_"


def cell_name(assignment: dict[str, JsonValue], labels: dict[str, str]) -> str:
    """``method=hiddenkey,rate=0.1,seed=1``: readable, and safe as a folder name on any file system."""
    return ",".join(f"{labels[key]}={_value_text(value)}" for key, value in assignment.items()) or "run"


def run_fingerprint(cfg: HkftConfig) -> str:
    """What decides a run's outcome: the config less bookkeeping, with the dropout section replaced by
    the plan it builds, so settings a method ignores (kl_weight without KL, rate of `none`) drop out."""
    from hkft.dropout.config import plan_from_config

    plan = plan_from_config(cfg.dropout)
    if not plan.uses_consistency_loss:
        plan = dataclasses.replace(plan, branches="one")
    data = cfg.model_dump(mode="json", exclude={"description", "output", "dropout"})
    data["dropout"] = dataclasses.asdict(plan)
    return json.dumps(data, sort_keys=True, default=str)


def make_cell(preset: Path, name: str, overrides: tuple[str, ...], output: Path) -> tuple[Cell, str]:
    run_dir = output / name
    try:
        config = load_config(preset, list(overrides))
        config.output.dir = str(run_dir)
        fingerprint = run_fingerprint(config)
    except ConfigError as err:
        raise ConfigError(f"study cell {name}: {err.message}", err.hint) from None
    return Cell(name, preset, overrides, config, run_dir), fingerprint


def expand_cells(study: Study) -> list[Cell]:
    """Every cell's config, validated before anything runs; cells that would train the same run are kept once."""
    presets = [resolve_preset_path(base) for base in study.bases]
    stems = [preset.stem for preset in presets]
    if len(set(stems)) < len(stems):
        raise ConfigError(f"study base lists two presets named {sorted(s for s in stems if stems.count(s) > 1)[0]}",
                          "rename one: each preset gets a sub-folder named after it")
    labels = labels_of(list(study.grid))
    cells: dict[str, Cell] = {}
    seen: set[str] = set()
    for preset in presets:
        for values in itertools.product(*study.grid.values()):
            assignment = dict(zip(study.grid, values))
            name = cell_name(assignment, labels)
            name = f"{preset.stem}/{name}" if len(presets) > 1 else name
            overrides = (*study.overrides, *(f"{key}={json.dumps(value)}" for key, value in assignment.items()))
            cell, fingerprint = make_cell(preset, name, overrides, Path(study.output))
            if fingerprint in seen:
                continue
            if name in cells:
                raise ConfigError(f"study grid: two different cells get the folder name {name}",
                                  "use grid values that differ in letters or digits")
            seen.add(fingerprint)
            cells[name] = cell
    return list(cells.values())


def train_cell(cell: Cell, *, resume: bool, console: Console, callbacks: Sequence[TrainerCallback] = ()) -> None:
    """What `hkft train PRESET --set ... --output-dir DIR [--resume]` does for one cell; ``callbacks``
    join the Trainer's (a tuning trial's pruner)."""
    from hkft.recipes.train import train

    # The cell's run is what this command line would train: it is saved as the run's argv.
    argv = ["hkft", "train", str(cell.preset), *(f"--set={item}" for item in cell.overrides),
            f"--output-dir={cell.run_dir}", *(["--resume"] if resume else [])]
    with training_run_dir(cell.run_dir):
        run = start_run(cell.config, cell.run_dir, resume=resume, overwrite=not resume, argv=argv)
        train(cell.config, run, resume=resume, console=console, callbacks=callbacks)


def is_finished(run_dir: Path) -> bool:
    return RunDir(run_dir).metrics_json.is_file()


def grid_size(study: Study) -> int:
    return len(study.bases) * math.prod(len(values) for values in study.grid.values())


def check_same_setting(cell: Cell) -> None:
    """A finished run kept for a cell must be that cell's run: after a changed base or override (or a
    continued `hkft tune` whose best trial changed), the old results would pass for the new setting's."""
    saved = RunDir(cell.run_dir).config_path
    if not saved.is_file():
        return
    old, new = (flatten(json.loads(run_fingerprint(cfg))) for cfg in (load_config(saved), cell.config))
    changed = [key for key in dict.fromkeys([*old, *new]) if old.get(key) != new.get(key)]
    if changed:
        key = changed[0]
        raise ConfigError(f"{cell.run_dir} holds a run of another setting ({key}: {old.get(key)} -> {new.get(key)})",
                          "move that folder away to train the new setting, or give the study another output folder")


def cell_state(cell: Cell) -> str:
    if is_finished(cell.run_dir):
        check_same_setting(cell)
        return "finished"
    return "resume" if latest_checkpoint(RunDir(cell.run_dir)) is not None else "new"


def train_cells(cells: list[Cell], console: Console, train_fn: TrainFn) -> None:
    """Train every unfinished cell in order: finished ones are skipped, interrupted ones resumed."""
    for index, cell in enumerate(cells, 1):
        prefix = f"[{index}/{len(cells)}] {cell.name}"
        state = cell_state(cell)
        if state == "finished":
            console.print(f"{prefix}: finished, skipped", highlight=False, markup=False)
            continue
        console.print(f"{prefix}: {'resuming' if state == 'resume' else 'training'}", highlight=False, markup=False)
        train_fn(cell, resume=state == "resume", console=console)


def run_sweep(study: Study, console: Console, train_fn: TrainFn | None = None) -> list[Path]:
    """Train every unfinished cell in order, then compare them all. Returns the cells' run directories."""
    if not study.grid and study.search:
        raise ConfigError("this study has a search: section and no grid:", "run it with hkft tune")
    check_can_create_dir(Path(study.output), "study output")
    if (Path(study.output) / STUDY_MARKER).exists():
        raise ConfigError(f"study output {study.output} holds an hkft tune study", "give the sweep its own output folder")
    cells = expand_cells(study)
    left_out = grid_size(study) - len(cells)
    repeats = f" ({left_out} grid points repeat another cell's run and are left out)" if left_out else ""
    console.print(f"study: {len(cells)} cells in {study.output}{repeats}", highlight=False, markup=False)
    train_cells(cells, console, train_fn or train_cell)
    run_dirs = [cell.run_dir for cell in cells]
    compare_runs(run_dirs, Path(study.output), console)
    return run_dirs
