"""The study file shared by `hkft sweep` (its ``grid:``) and `hkft tune` (its ``search:`` and ``tune:``).

```yaml
description: ...
base: quickstart              # a preset name or path (relative: next to the study file), or a list
output: runs/study-quickstart # relative to the working directory, like output.dir in a preset
overrides: [train.epochs=1]   # applied to every run
grid:                         # hkft sweep: dotted keys -> values; the cells are their cartesian product
  dropout.method: [none, hiddenkey-, hiddenkey]
  train.seed: [1, 2, 3]
search:                       # hkft tune: a list is a choice, {low, high[, log, step]} a range
  train.lr: {low: 1.0e-5, high: 1.0e-2, log: true}
  dropout.method: [none, hiddenkey-, hiddenkey]
tune: {trials: 20, per: dropout.method}
```
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    ValidationError,
    field_validator,
    model_validator,
)

from hkft.config import presets_dir
from hkft.config.loading import describe_validation_error, read_yaml_mapping
from hkft.errors import ConfigError

STUDIES_SUBDIR = "studies"
STUDY_MARKER = "tune-study.json"  # in an hkft tune study's output folder: which study it holds


class SearchRange(BaseModel):
    """A numeric range; whole numbers when the preset key is an integer (``lora.r``)."""

    model_config = ConfigDict(extra="forbid")

    low: float
    high: float
    log: bool = Field(False, description="Sample on a log scale (learning rates); needs low > 0.")
    step: float | None = Field(None, gt=0, description="Sample only low, low + step, ...")

    @model_validator(mode="after")
    def _sound(self) -> SearchRange:
        if self.low >= self.high:
            raise ValueError(f"low ({self.low:g}) must be below high ({self.high:g})")
        if self.log and self.low <= 0:
            raise ValueError(f"log: true needs low > 0 (got {self.low:g})")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined")
        return self


SearchDimension = list[JsonValue] | SearchRange


class TuneSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    trials: int = Field(20, ge=1, description="Finished (complete or pruned) trials per search.")
    timeout: float | None = Field(None, gt=0, description="Seconds per search and per process.")
    metric: str | None = Field(None, description="Validation metric to optimise; default: the task's main metric.")
    direction: Literal["maximize", "minimize"] | None = Field(None, description="Default: from the metric.")
    seed: int = Field(0, description="Seed of the TPE sampler.")
    per: str | None = Field(None, description="A search key with a list of values: one search per value.")
    pruner: Literal["median", "none"] = Field("median", description="Stop a trial whose evaluations trail the median.")
    startup_trials: int = Field(2, ge=0, description="Trials that are never pruned (the median needs some).")
    warmup: float = Field(0.5, ge=0, lt=1, description="Share of a trial's steps before the pruner may stop it.")
    trial_seeds: int = Field(1, ge=1, description="Seeds each trial trains (train.seed and the next ones); its value is "
                                                   "their mean best validation metric.")
    storage: str | None = Field(None, description="Database URL shared by workers; default: sqlite in output.")


class Study(BaseModel):
    model_config = ConfigDict(extra="forbid")

    description: str = ""
    base: str | list[str] = Field(description="Preset name or path, or a list of them (one sub-folder each).")
    output: str = Field(description="Folder of the runs and of their comparison.")
    overrides: list[str] = Field(default_factory=list, description="key.sub=value applied to every run.")
    grid: dict[str, list[JsonValue]] = Field(default_factory=dict, description="hkft sweep: dotted key -> values.")
    search: dict[str, SearchDimension] = Field(default_factory=dict, description="hkft tune: dotted key -> space.")
    tune: TuneSettings = Field(default_factory=TuneSettings)

    @field_validator("base")
    @classmethod
    def _some_base(cls, value: str | list[str]) -> str | list[str]:
        if not value:
            raise ValueError("name at least one preset")
        return value

    @field_validator("grid", "search", mode="before")
    @classmethod
    def _dotted_keys_with_values(cls, value: Any, info) -> Any:
        if not isinstance(value, dict):
            return value
        for key, values in value.items():
            if not isinstance(key, str) or "." not in key or any(not part for part in key.split(".")):
                raise ValueError(f"{info.field_name} key {key!r} must be a dotted preset key such as dropout.rate")
            if values in ([], {}):
                raise ValueError(f"{info.field_name} key {key!r} has no values")
        if info.field_name == "search":
            return {key: _parse_dimension(key, values) for key, values in value.items()}
        return value

    @model_validator(mode="after")
    def _per_is_a_choice(self) -> Study:
        per = self.tune.per
        if per is not None and not isinstance(self.search.get(per), list):
            raise ValueError(f"tune.per: {per} must be a search key with a list of values")
        return self

    @model_validator(mode="after")
    def _one_run_per_pruned_trial(self) -> Study:
        if self.tune.trial_seeds > 1 and self.tune.pruner != "none":
            raise ValueError(f"tune.trial_seeds: {self.tune.trial_seeds} seeds a trial need tune.pruner: none "
                             "(the pruner would judge a trial by its first seed alone)")
        return self

    @property
    def bases(self) -> list[str]:
        return [self.base] if isinstance(self.base, str) else list(self.base)


def _parse_dimension(key: str, values: Any) -> Any:
    """A choice is a list; a range a mapping of SearchRange's keys, parsed here so that its own problem (a
    misspelt key, low above high) is reported rather than the union's "not a list"."""
    if isinstance(values, list):
        return values
    if not isinstance(values, dict):
        raise ValueError(f"search key {key!r}: give a list of values or a range {{low: ..., high: ...}}")
    for name in values:
        if name not in SearchRange.model_fields:
            raise ValueError(f"search key {key!r}: {name}: unknown range key ({_hint(str(name), SearchRange.model_fields)})")
    try:
        return SearchRange.model_validate(values)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ValueError(f"search key {key!r}: {where + ': ' if where else ''}{first['msg'].removeprefix('Value error, ')}") from None


def _hint(word: str, valid) -> str:
    matches = difflib.get_close_matches(word, list(valid), n=1, cutoff=0.5)
    return f"did you mean {matches[0]}?" if matches else f"valid keys: {', '.join(valid)}"


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
    _reject_unknown_keys(path, data, Study.model_fields, "study key")
    if isinstance(data.get("tune"), dict):
        _reject_unknown_keys(path, data["tune"], TuneSettings.model_fields, "tune key", prefix="tune.")
    try:
        parsed = Study.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{path}: {describe_validation_error(err)}") from None
    bases = [_anchor_base(base, path.resolve().parent) for base in parsed.bases]
    return parsed.model_copy(update={"base": bases if isinstance(parsed.base, list) else bases[0]})


def _reject_unknown_keys(path: Path, data: dict, valid, what: str, prefix: str = "") -> None:
    unknown = [key for key in data if key not in valid]
    if unknown:
        raise ConfigError(f"{path}: {prefix}{unknown[0]}: unknown {what} ({_hint(str(unknown[0]), valid)})")


def _anchor_base(base: str, study_dir: Path) -> str:
    beside = study_dir / base
    return str(beside) if beside.is_file() else base
