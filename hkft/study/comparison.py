"""`hkft compare`: final metrics of finished runs, median and sample std over seeds (paper Table 1 style).

Runs are grouped by everything in their config except the seed (and bookkeeping such as output and
description), so two settings are never pooled as if they were seeds of one. The table names each
group by dataset, method, rate and KL weight; any other config key that varies between the groups
of a dataset gets a column of its own.
"""

from __future__ import annotations

import csv
import io
import json
import os
import statistics
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from hkft.config import HkftConfig, load_config
from hkft.config.schema import DataSource, HubSource
from hkft.dropout.methods import METHODS
from hkft.errors import HkftError
from hkft.recipes.curves import Curve, read_curves
from hkft.run.directory import RunDir
from hkft.run.files import atomic_write_text
from hkft.study.plots import plot_comparison
from hkft.tasks.registry import task_for

# Keys that are not part of a run's setting: the seed is what a group varies over; the rest is
# shown in its own column or does not change the result.
NOT_SETTING = ("description", "output.", "train.seed", "dropout.method", "dropout.rate", "dropout.kl_weight",
               "dropout.branches")


@dataclass(frozen=True)
class RunSummary:
    run_dir: Path
    task: str
    dataset: str
    method: str
    rate: float | None  # None: the method drops nothing, so its rate means nothing
    kl_weight: float | None  # None: no consistency loss
    branches: str | None
    seed: int
    setting: tuple[tuple[str, Any], ...]  # the rest of the config, flattened
    metrics: dict[str, float]
    curves: dict[str, Curve]
    overfitting: dict[str, Any] | None = None  # metrics.json's "overfitting": None if the run was never watched
    split: str | None = None  # the split its final metrics were computed on ("test"), None if not recorded

    @property
    def main_metric(self) -> str:
        return task_for(self.task).main_metric


@dataclass(frozen=True)
class Row:
    dataset: str
    task: str
    method: str
    rate: float | None
    kl_weight: float | None
    extra: tuple[tuple[str, Any], ...]  # setting keys that vary between the groups of this dataset
    seeds: tuple[int, ...]
    median: dict[str, float]
    std: dict[str, float]
    runs: tuple[RunSummary, ...]

    @property
    def main_metric(self) -> str:
        return task_for(self.task).main_metric


def dataset_name(source: DataSource) -> str:
    """``nyu-mll/glue:rte`` for the hub, ``quickstart/train.jsonl`` (folder/file) for a local file."""
    if isinstance(source, str) and source.startswith("hub:"):
        from hkft.data.files import parse_hub_spec

        source = parse_hub_spec(source)
    if isinstance(source, HubSource):
        return source.hub + (f":{source.config}" if source.config else "")
    path = Path(source)
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        flat: dict[str, Any] = {}
        for key, value in data.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix.removesuffix("."): data}


def effective_dropout(cfg: HkftConfig) -> tuple[float | None, float | None, str | None]:
    """(rate, kl_weight, branches) as the built dropout plan uses them, None where a value has no effect."""
    from hkft.dropout.config import plan_from_config

    plan = plan_from_config(cfg.dropout)
    drops = bool(plan.active_positions) or bool(plan.model_dropout)
    kl = plan.uses_consistency_loss
    return (cfg.dropout.rate if drops else None, plan.kl_weight if kl else None, plan.branches if kl else None)


def read_final_metrics(run: RunDir) -> dict[str, float]:
    try:
        data = json.loads(run.metrics_json.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise HkftError(f"{run.metrics_json}: cannot read ({err})", "the run is damaged; train it again") from None
    evaluated = data.get("eval") if isinstance(data, dict) else None
    if not isinstance(evaluated, dict):
        raise HkftError(f"{run.metrics_json}: no \"eval\" section", "the run is damaged; train it again")
    return {key: float(value) for key, value in evaluated.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


def summarize_run(run: RunDir) -> RunSummary:
    if not run.metrics_json.is_file():
        raise HkftError(
            f"{run.root} is not a finished run (no metrics.json)",
            "finish it with `hkft train ... --resume` or by re-running `hkft sweep`, or leave it out",
        )
    cfg = load_config(run.config_path)
    rate, kl_weight, branches = effective_dropout(cfg)
    flat = flatten(cfg.model_dump(mode="json"))
    setting = tuple(sorted((key, value) for key, value in flat.items() if not key.startswith(NOT_SETTING)))
    return RunSummary(
        run_dir=run.root,
        task=cfg.model.task,
        dataset=dataset_name(cfg.data.train),
        method=cfg.dropout.method,
        rate=rate,
        kl_weight=kl_weight,
        branches=branches,
        seed=cfg.train.seed,
        setting=tuple((key, _hashable(value)) for key, value in setting),
        metrics=read_final_metrics(run),
        curves=read_curves(run.metrics_jsonl),
        overfitting=read_overfitting(run),
        split=read_split(run),
    )


def read_split(run: RunDir) -> str | None:
    found = json.loads(run.metrics_json.read_text(encoding="utf-8")).get("eval", {}).get("split")
    return found if isinstance(found, str) else None


def scored_on(rows: list[Row]) -> str:
    """Which split the final metrics come from, as "scored on the test split": a search picks on the
    validation split, and a table that did not say so could be read as the scores it was picked by."""
    splits = sorted({run.split for row in rows for run in row.runs} - {None})
    if not splits:
        return ""
    if len(splits) == 1:
        return f"scored on the {splits[0]} split"
    return f"scored on the {' and '.join(splits)} splits (see each run's metrics.json)"


def read_overfitting(run: RunDir) -> dict[str, Any] | None:
    """The overfitting monitor's verdict (None for a run it did not watch, or made before it existed)."""
    found = json.loads(run.metrics_json.read_text(encoding="utf-8")).get("overfitting")
    return found if isinstance(found, dict) else None


def _hashable(value: Any) -> Any:
    return tuple(_hashable(item) for item in value) if isinstance(value, list) else value


def find_run_dirs(paths: Iterable[Path]) -> Iterator[Path]:
    """Each path is a run directory, or a folder of them (a sweep's output) searched recursively."""
    for path in map(Path, paths):
        if not path.is_dir():
            raise HkftError(f"{path}: no such directory", "pass run directories made by hkft train or hkft sweep")
        if RunDir(path).config_path.is_file():
            yield path
            continue
        nested = sorted(config.parent for config in path.rglob(RunDir(path).config_path.name))
        if not nested:
            raise HkftError(f"{path} is not an hkft run (no hkft_config.yaml in it or below it)",
                            "pass run directories made by hkft train or hkft sweep")
        yield from nested


def collect_runs(dirs: Iterable[Path]) -> list[RunSummary]:
    """A run named twice (on its own and inside a sweep folder given too) counts once."""
    unique = dict.fromkeys(path.resolve() for path in find_run_dirs(dirs))
    return [summarize_run(RunDir(path)) for path in unique]


def _group_key(run: RunSummary) -> tuple:
    return (run.dataset, run.task, run.method, run.rate, run.kl_weight, run.branches, run.setting)


def _none_first(value: float | None) -> tuple[bool, float]:
    return (value is not None, value or 0.0)


def _row_order(row: Row) -> tuple:
    names = list(METHODS)
    method = names.index(row.method) if row.method in names else len(names)
    return (row.dataset, method, _none_first(row.rate), _none_first(row.kl_weight), repr(row.extra))


def _own_setting(run: RunSummary) -> dict[str, Any]:
    return {"dropout.branches": run.branches, **dict(run.setting)}


def _varying_keys(runs: list[RunSummary]) -> list[str]:
    """Setting keys whose value differs between runs; branches only between runs that have a KL loss."""
    owns = [_own_setting(run) for run in runs]
    keys = dict.fromkeys(key for own in owns for key in own)
    values = {key: {own.get(key) for own in owns} - ({None} if key == "dropout.branches" else set()) for key in keys}
    return [key for key in keys if len(values[key]) > 1]


def _summary_stats(runs: list[RunSummary]) -> tuple[dict[str, float], dict[str, float]]:
    names = list(dict.fromkeys(name for run in runs for name in run.metrics))
    median, std = {}, {}
    for name in names:
        values = [run.metrics[name] for run in runs if name in run.metrics]
        median[name] = statistics.median(values)
        std[name] = statistics.stdev(values) if len(values) > 1 else 0.0
    return median, std


def comparison_table(runs: list[RunSummary]) -> list[Row]:
    groups: dict[tuple, list[RunSummary]] = {}
    for run in runs:
        groups.setdefault(_group_key(run), []).append(run)
    by_dataset: dict[str, list[RunSummary]] = {}
    for run in runs:
        by_dataset.setdefault(run.dataset, []).append(run)
    varying = {dataset: _varying_keys(members) for dataset, members in by_dataset.items()}
    rows = []
    for members in groups.values():
        _require_distinct_seeds(members)
        first = members[0]
        own = _own_setting(first)
        median, std = _summary_stats(members)
        rows.append(Row(
            dataset=first.dataset, task=first.task, method=first.method, rate=first.rate, kl_weight=first.kl_weight,
            extra=tuple((key, own.get(key)) for key in varying[first.dataset]),
            seeds=tuple(sorted(run.seed for run in members)), median=median, std=std, runs=tuple(members),
        ))
    return sorted(rows, key=_row_order)


def _require_distinct_seeds(members: list[RunSummary]) -> None:
    """Two runs of one setting with one seed are one measurement twice (a copied or re-run folder):
    counting both would shrink the std and pass the copy off as a seed."""
    first_with: dict[int, Path] = {}
    for run in members:
        if run.seed in first_with:
            raise HkftError(
                f"{first_with[run.seed]} and {run.run_dir} are the same setting with the same seed ({run.seed})",
                "pass each seed of a setting once",
            )
        first_with[run.seed] = run.run_dir


def metric_names(rows: list[Row]) -> list[str]:
    """Main metrics first, then the others in the order they appear."""
    main = [row.main_metric for row in rows if row.main_metric in row.median]
    return list(dict.fromkeys([*main, *(name for row in rows for name in row.median)]))


def extra_names(rows: list[Row]) -> list[str]:
    return list(dict.fromkeys(key for row in rows for key, _ in row.extra))


def _text(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _cells(row: Row, extras: list[str], metrics: list[str]) -> list[str]:
    own = dict(row.extra)
    head = [row.dataset, row.method, _text(row.rate), _text(row.kl_weight), *(_text(own.get(key)) for key in extras)]
    scores = [_score(row, name) if name in row.median else "" for name in metrics]
    return [*head, str(len(row.seeds)), *scores, *_overfit_cells(row)]


def _watched(row: Row) -> list[dict[str, Any]]:
    return [run.overfitting for run in row.runs if run.overfitting is not None]


def overfit_count(row: Row) -> tuple[int, int]:
    """(runs the overfitting monitor flagged, runs it watched)."""
    watched = _watched(row)
    return sum(bool(found["detected"]) for found in watched), len(watched)


def median_gap(row: Row) -> float | None:
    """Median over seeds of the generalisation gap (validation minus training loss at the last evaluation)."""
    gaps = [found["gap"] for found in _watched(row) if found.get("gap") is not None]
    return statistics.median(gaps) if gaps else None


def _overfit_cells(row: Row) -> list[str]:
    flagged, watched = overfit_count(row)
    gap = median_gap(row)
    return [f"{flagged}/{watched}" if watched else "-", "-" if gap is None else f"{gap:.3f}"]


def _score(row: Row, name: str) -> str:
    """One seed has no spread to show: its score alone, not a misleading ± 0."""
    return f"{row.median[name]:.4f}" if len(row.seeds) == 1 else f"{row.median[name]:.4f} ± {row.std[name]:.4f}"


def _header(extras: list[str], metrics: list[str]) -> list[str]:
    return ["dataset", "method", "rate", "kl_weight", *extras, "seeds", *metrics, "overfit", "gap"]


def render_table(rows: list[Row], width: int = 200) -> Table:
    """The console table, readable at ``width`` columns: a single dataset goes into the title, the
    columns that name a setting never shrink, and metrics other than the main one are left out (to
    comparison.md) where they would not fit."""
    extras, metrics = extra_names(rows), metric_names(rows)
    datasets = list(dict.fromkeys(row.dataset for row in rows))
    skip = 1 if len(datasets) == 1 else 0
    table_rows = [_cells(row, extras, metrics)[skip:] for row in rows]
    header = _header(extras, metrics)[skip:]
    main = {row.main_metric for row in rows}
    while _table_width(header, table_rows) > width:
        optional = [index for index, name in enumerate(header) if name in metrics and name not in main]
        if not optional:
            break
        header.pop(optional[-1])
        table_rows = [cells[: optional[-1]] + cells[optional[-1] + 1:] for cells in table_rows]
    title = f"{datasets[0]}: " if skip else ""
    left_out = [name for name in metrics if name not in header]
    caption = f"also in comparison.md: {', '.join(left_out)}" if left_out else None
    scored = scored_on(rows)
    table = Table(title=f"{title}median ± sample std over seeds{', ' + scored if scored else ''}; overfit: runs flagged",
                  caption=caption, header_style="bold")
    naming = 4 + len(extras) - skip
    for index, name in enumerate(header):
        if index < naming:
            table.add_column(name, no_wrap=True, min_width=max(len(name), *(len(cells[index]) for cells in table_rows)))
        else:
            table.add_column(name, justify="right")
    for cells in table_rows:
        table.add_row(*cells)
    return table


def _table_width(header: list[str], rows: list[list[str]]) -> int:
    """Characters a rich table with these cells takes when nothing wraps (a border and two spaces a column)."""
    return 1 + sum(3 + max(len(name), *(len(cells[index]) for cells in rows)) for index, name in enumerate(header))


def table_markdown(rows: list[Row]) -> str:
    extras, metrics = extra_names(rows), metric_names(rows)
    header = _header(extras, metrics)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in _cells(row, extras, metrics)) + " |")
    scored = scored_on(rows)
    return f"Median ± sample standard deviation over seeds{', ' + scored if scored else ''}.\n\n" + "\n".join(lines) + "\n"


def table_csv(rows: list[Row]) -> str:
    extras, metrics = extra_names(rows), metric_names(rows)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["dataset", "task", "method", "rate", "kl_weight", *extras, "n", "seeds",
                     *(f"{name}_{stat}" for name in metrics for stat in ("median", "std")),
                     "overfit_runs", "watched_runs", "gap_median"])
    for row in rows:
        own = dict(row.extra)
        scores = [row_stat.get(name, "") for name in metrics for row_stat in (row.median, row.std)]
        writer.writerow([row.dataset, row.task, row.method, _blank(row.rate), _blank(row.kl_weight),
                         *(_blank(own.get(key)) for key in extras), len(row.seeds), " ".join(map(str, row.seeds)),
                         *scores, *overfit_count(row), _blank(median_gap(row))])
    return buffer.getvalue()


def _blank(value: Any) -> Any:
    return "" if value is None else value


def write_table(rows: list[Row], out_dir: Path) -> tuple[Path, Path]:
    csv_path, md_path = Path(out_dir) / "comparison.csv", Path(out_dir) / "comparison.md"
    atomic_write_text(csv_path, table_csv(rows))
    atomic_write_text(md_path, table_markdown(rows))
    return csv_path, md_path


def default_output_dir(paths: list[Path]) -> Path:
    """Where `hkft compare` writes by default: the folder given (a sweep's output), or the common
    parent of the run directories given."""
    folders = [Path(path).parent if RunDir(Path(path)).config_path.is_file() else Path(path) for path in paths]
    return Path(os.path.commonpath([folder.resolve() for folder in folders]))


def compare_runs(run_dirs: list[Path], out_dir: Path, console: Console) -> list[Path]:
    """`hkft compare`: the table on the console, comparison.csv/.md and the comparison plots in out_dir."""
    runs = collect_runs(run_dirs)
    rows = comparison_table(runs)
    console.print(render_table(rows, console.width))
    written = [*write_table(rows, out_dir), *plot_comparison(rows, out_dir)]
    console.print(f"wrote {', '.join(str(path) for path in written)}", highlight=False, markup=False)
    return written
