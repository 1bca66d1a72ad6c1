"""`hkft sweep STUDY.yaml`: a grid of runs over one or more presets, then `hkft compare` over them.

```yaml
description: ...
base: quickstart              # a preset name or path (relative: next to the study file), or a list
output: runs/study-quickstart # relative to the working directory, like output.dir in a preset
overrides: [train.epochs=1]   # applied to every cell
grid:                         # dotted keys -> values; the cells are their cartesian product
  dropout.method: [none, hiddenkey-, hiddenkey]
  train.seed: [1, 2, 3]
```

Each cell runs in ``<output>/<key=value,...>`` (``<output>/<preset>/<key=value,...>`` when ``base``
is a list). A re-run skips finished cells (metrics.json exists) and resumes interrupted ones from
their last checkpoint, so a sweep stopped at any point continues with the same command.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError, field_validator
from rich.console import Console

from hkft.compare import compare_runs
from hkft.config import HkftConfig, load_config, presets_dir, resolve_preset_path
from hkft.config.loading import describe_validation_error, read_yaml_mapping
from hkft.errors import ConfigError
from hkft.rundir import RunDir, check_resume_compatible, latest_checkpoint, prepare_run_dir, save_run_config, training_run_dir

STUDIES_SUBDIR = "studies"


class Study(BaseModel):
    model_config = ConfigDict(extra="forbid")

    description: str = ""
    base: str | list[str] = Field(description="Preset name or path, or a list of them (one sub-folder each).")
    output: str = Field(description="Folder of the cells' run directories and of the comparison.")
    overrides: list[str] = Field(default_factory=list, description="key.sub=value applied to every cell.")
    grid: dict[str, list[JsonValue]] = Field(default_factory=dict, description="Dotted key -> values to sweep.")

    @field_validator("base")
    @classmethod
    def _some_base(cls, value: str | list[str]) -> str | list[str]:
        if not value:
            raise ValueError("name at least one preset")
        return value

    @field_validator("grid")
    @classmethod
    def _dotted_keys_with_values(cls, value: dict[str, list]) -> dict[str, list]:
        for key, values in value.items():
            if "." not in key or any(not part for part in key.split(".")):
                raise ValueError(f"grid key {key!r} must be a dotted preset key such as dropout.rate")
            if not values:
                raise ValueError(f"grid key {key!r} has no values")
        return value

    @property
    def bases(self) -> list[str]:
        return [self.base] if isinstance(self.base, str) else list(self.base)


@dataclass(frozen=True)
class Cell:
    name: str  # the run directory relative to the study's output
    preset: Path
    overrides: tuple[str, ...]
    config: HkftConfig
    run_dir: Path


class TrainFn(Protocol):
    def __call__(self, cell: Cell, *, resume: bool, console: Console) -> object: ...


def resolve_study_path(study: str) -> Path:
    """A path to a study file, or the name of a shipped one (presets/studies)."""
    path = Path(study)
    if path.is_file():
        return path
    shipped_dir = presets_dir() / STUDIES_SUBDIR
    shipped = shipped_dir / f"{study.removesuffix('.yaml')}.yaml"
    if shipped.is_file():
        return shipped
    names = [p.stem for p in sorted(shipped_dir.glob("*.yaml"))]
    matches = difflib.get_close_matches(path.stem, names, n=1, cutoff=0.5)
    raise ConfigError(f"{study}: no such study file",
                      f"did you mean {matches[0]}?" if matches else f"shipped studies: {', '.join(names)}")


def load_study(study: str | Path) -> Study:
    path = resolve_study_path(str(study))
    data = read_yaml_mapping(path)
    unknown = [key for key in data if key not in Study.model_fields]
    if unknown:
        matches = difflib.get_close_matches(str(unknown[0]), list(Study.model_fields), n=1, cutoff=0.5)
        hint = f"did you mean {matches[0]}?" if matches else f"valid keys: {', '.join(Study.model_fields)}"
        raise ConfigError(f"{path}: {unknown[0]}: unknown study key ({hint})")
    try:
        parsed = Study.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{path}: {describe_validation_error(err)}") from None
    bases = [_anchor_base(base, path.resolve().parent) for base in parsed.bases]
    return parsed.model_copy(update={"base": bases if isinstance(parsed.base, list) else bases[0]})


def _anchor_base(base: str, study_dir: Path) -> str:
    beside = study_dir / base
    return str(beside) if beside.is_file() else base


def _labels(keys: list[str]) -> dict[str, str]:
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
    from hkft.pipeline import plan_from_config

    plan = plan_from_config(cfg.dropout)
    if not plan.uses_consistency_loss:
        plan = dataclasses.replace(plan, branches="one")
    data = cfg.model_dump(mode="json", exclude={"description", "output", "dropout"})
    data["dropout"] = dataclasses.asdict(plan)
    return json.dumps(data, sort_keys=True, default=str)


def _cell(preset: Path, name: str, overrides: tuple[str, ...], output: Path) -> tuple[Cell, str]:
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
    labels = _labels(list(study.grid))
    cells: dict[str, Cell] = {}
    seen: set[str] = set()
    for preset in presets:
        for values in itertools.product(*study.grid.values()):
            assignment = dict(zip(study.grid, values))
            name = cell_name(assignment, labels)
            name = f"{preset.stem}/{name}" if len(presets) > 1 else name
            overrides = (*study.overrides, *(f"{key}={json.dumps(value)}" for key, value in assignment.items()))
            cell, fingerprint = _cell(preset, name, overrides, Path(study.output))
            if fingerprint in seen:
                continue
            if name in cells:
                raise ConfigError(f"study grid: two different cells get the folder name {name}",
                                  "use grid values that differ in letters or digits")
            seen.add(fingerprint)
            cells[name] = cell
    return list(cells.values())


def train_cell(cell: Cell, *, resume: bool, console: Console) -> None:
    """What `hkft train PRESET --set ... --output-dir DIR [--resume]` does for one cell."""
    from hkft.pipeline import train

    with training_run_dir(cell.run_dir):
        run = prepare_run_dir(cell.run_dir, resume=resume, overwrite=not resume)
        if resume:
            check_resume_compatible(load_config(run.config_path), cell.config)
        argv = ["hkft", "train", str(cell.preset), *(f"--set={item}" for item in cell.overrides),
                f"--output-dir={cell.run_dir}", *(["--resume"] if resume else [])]
        save_run_config(run, cell.config, argv)
        train(cell.config, run, resume=resume, console=console)


def is_finished(run_dir: Path) -> bool:
    return RunDir(run_dir).metrics_json.is_file()


def run_sweep(study: Study, console: Console, train_fn: TrainFn | None = None) -> list[Path]:
    """Train every unfinished cell in order, then compare them all. Returns the cells' run directories."""
    train_fn = train_fn or train_cell
    cells = expand_cells(study)
    total = len(study.bases) * math.prod(len(values) for values in study.grid.values())
    left_out = total - len(cells)
    repeats = f" ({left_out} grid points repeat another cell's run and are left out)" if left_out else ""
    console.print(f"study: {len(cells)} cells in {study.output}{repeats}", highlight=False, markup=False)
    for index, cell in enumerate(cells, 1):
        prefix = f"[{index}/{len(cells)}] {cell.name}"
        if is_finished(cell.run_dir):
            console.print(f"{prefix}: finished, skipped", highlight=False, markup=False)
            continue
        resume = latest_checkpoint(RunDir(cell.run_dir)) is not None
        console.print(f"{prefix}: {'resuming' if resume else 'training'}", highlight=False, markup=False)
        train_fn(cell, resume=resume, console=console)
    run_dirs = [cell.run_dir for cell in cells]
    compare_runs(run_dirs, Path(study.output), console)
    return run_dirs

