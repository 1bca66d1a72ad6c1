"""`python -m bench.does_it_help`: the "Does it help?" tables and plots, from the committed study outputs.

The studies are `presets/studies/<dataset>-<method>.yaml`, run with `hkft tune STUDY --seeds 3`
into `runs/does-it-help/<dataset>/<method>/`. `python -m bench.does_it_help collect` copies what
the report needs (every run's config, metrics and trial record, each search's trials.csv, best.yaml
and the process wall time; no checkpoints, no adapters) into `bench/does-it-help/<dataset>/`;
`python -m bench.does_it_help` alone rebuilds, per dataset, `hkft compare`'s table and plots over
the seed runs, plus `summary.md` (one row per method: the tuned values, test score median ± std
over seeds, step time, total time, overfitting flags) and `summary.png`. A folder of plain runs
(`hkft train` with the tuned settings and a longer schedule, say) gets `hkft compare`'s alone.
"""

from __future__ import annotations

import csv
import json
import shutil
import statistics
import sys
from pathlib import Path

from matplotlib.figure import Figure
from rich.console import Console

from hkft.recipes.curves import PANEL, save_figure
from hkft.study.comparison import (
    Row,
    collect_runs,
    compare_runs,
    comparison_table,
    overfit_count,
)
from hkft.study.plots import eval_metric, median_curve

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "does-it-help"
STUDIES = REPO / "runs" / "does-it-help"
RUN_FILES = ("hkft_config.yaml", "metrics.json", "metrics.jsonl", "run_info.json", "trial.json")
SEARCH_FILES = ("trials.csv", "best.yaml")
METHODS = ("none", "lora-dropout", "hiddenkey-", "hiddenkey")  # the study files' suffixes, in table order


def _copy_text(source: Path, target: Path) -> None:
    """Copy a text file with this checkout's absolute path made relative (the data paths in a config)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(source.read_text(encoding="utf-8").replace(f"{REPO}/", ""), encoding="utf-8")


def collect(studies: Path = STUDIES, results: Path = RESULTS) -> None:
    for dataset in sorted(path for path in studies.iterdir() if path.is_dir() and path.name != "logs"):
        for method_dir in sorted(path for path in dataset.iterdir() if path.is_dir()):
            target = results / dataset.name / method_dir.name
            shutil.rmtree(target, ignore_errors=True)
            for name in SEARCH_FILES:
                if (method_dir / name).is_file():
                    _copy_text(method_dir / name, target / name)
            for config in method_dir.rglob("hkft_config.yaml"):
                run = config.parent
                for name in RUN_FILES:
                    if (run / name).is_file():
                        _copy_text(run / name, target / run.relative_to(method_dir) / name)
            phases = sorted([int(start.read_text()), int(start.with_suffix(".end").read_text())]
                            for start in (studies / "logs").glob(f"{method_dir.name}.*start")
                            if start.with_suffix(".end").is_file())  # <method>.start, <method>.more-seeds.start...
            if phases and (method_dir / "trials.csv").is_file():
                (target / "wall_time.json").write_text(json.dumps({"phases": phases}) + "\n", encoding="utf-8")


def _label(row: Row) -> str:
    lora_dropout = dict(row.runs[0].setting).get("lora.lora_dropout", 0.0)
    return f"none + lora_dropout {lora_dropout:g}" if lora_dropout else row.method


def _runtimes(method_dir: Path) -> list[tuple[float, int]]:
    """(train_runtime seconds, steps) of every finished run of one study: its trials and its seeds."""
    found = []
    for path in method_dir.rglob("metrics.json"):
        train = json.loads(path.read_text(encoding="utf-8")).get("train", {})
        found.append((float(train["train_runtime"]), int(train["step"])))
    return found


def _phases(method_dir: Path) -> list[tuple[int, int]]:
    """(start, end) in Unix seconds of each `hkft tune` command the study took."""
    path = method_dir / "wall_time.json"
    return [tuple(phase) for phase in json.loads(path.read_text())["phases"]] if path.is_file() else []


def _trials(method_dir: Path) -> list[dict]:
    with (method_dir / "trials.csv").open(encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _trial_flags(method_dir: Path) -> tuple[int, int]:
    runs = collect_runs(sorted(path.parent for path in method_dir.glob("trial-*/metrics.json")))
    flagged = sum(1 for run in runs if run.overfitting and run.overfitting.get("detected"))
    return flagged, sum(1 for run in runs if run.overfitting is not None)


def _tuned(row: Row) -> str:
    setting = dict(row.runs[0].setting)
    rate = f", rate {row.rate:.3g}" if row.rate is not None else ""
    return f"lr {setting['train.lr']:.2g}{rate}"


def summary_rows(dataset: Path) -> list[tuple[Row, Path]]:
    """One comparison row per method (its seed runs), with the method's study folder."""
    pairs = []
    for name in METHODS:
        method_dir = dataset / name
        if not (method_dir / "seeds").is_dir():
            continue
        rows = comparison_table(collect_runs([method_dir / "seeds"]))
        if len(rows) != 1:
            raise SystemExit(f"{method_dir}/seeds: expected one setting, found {len(rows)}")
        pairs.append((rows[0], method_dir))
    return pairs


def summary_markdown(pairs: list[tuple[Row, Path]]) -> str:
    metric = pairs[0][0].main_metric
    lines = [f"| method | tuned on validation | test {metric} | test macro-F1 | s/step | time | overfit flagged |",
             "|---|---|---|---|---|---|---|"]
    for row, method_dir in pairs:
        runtimes = _runtimes(method_dir)
        step_time = statistics.median(seconds / steps for seconds, steps in runtimes)
        total = sum(seconds for seconds, _ in runtimes)
        seed_flags, seed_watched = overfit_count(row)
        trial_flags, trial_watched = _trial_flags(method_dir)
        scores = [f"{100 * row.median[name]:.1f} ± {100 * row.std.get(name, 0.0):.1f}" for name in (metric, "macro_f1")]
        lines.append(f"| {_label(row)} | {_tuned(row)} ({len(_trials(method_dir))} trials) | {scores[0]} | {scores[1]} "
                     f"| {step_time:.2f} | {total / 60:.0f} min ({len(runtimes)} runs) "
                     f"| {seed_flags}/{seed_watched} seeds, {trial_flags}/{trial_watched} trials |")
    seeds = sorted({seed for row, _ in pairs for seed in row.seeds})
    lines.append("")
    lines.append(f"Median ± sample std over seeds {', '.join(map(str, seeds))} on the test split; s/step is the "
                 "median training time per step, evaluations included; time sums every trial and seed run.")
    phases = [phase for _, method_dir in pairs for phase in _phases(method_dir)]
    if phases:
        wall = max(end for _, end in phases) - min(start for start, _ in phases)
        lines.append(f"Wall time: {wall / 60:.0f} min from the first start to the last end, the studies side by side.")
    return "\n".join(lines) + "\n"


def figure_summary(pairs: list[tuple[Row, Path]], title: str) -> Figure:
    """Left: each seed's test score per method, with the median; right: median validation curve."""
    figure = Figure(figsize=(PANEL[0] * 2, PANEL[1]), layout="constrained")
    scores, curves = figure.subplots(1, 2)
    metric = pairs[0][0].main_metric
    for index, (row, _) in enumerate(pairs):
        values = [100 * run.metrics[metric] for run in row.runs]
        scores.scatter([index] * len(values), values, color=f"C{index}", alpha=0.7)
        scores.hlines(statistics.median(values), index - 0.25, index + 0.25, color=f"C{index}")
        curve = median_curve(row.runs, eval_metric)
        curves.plot([step for step, _ in curve], [100 * value for _, value in curve], color=f"C{index}",
                    label=_label(row))
    scores.set_xticks(range(len(pairs)), [_label(row) for row, _ in pairs], rotation=15)
    scores.set_ylabel(f"test {metric} (%)")
    scores.set_title(f"{title}: test {metric} per seed (bar: median)")
    curves.set_xlabel("step")
    curves.set_ylabel(f"validation {metric} (%)")
    curves.set_title("validation curve, median over seeds")
    curves.legend()
    return figure


def report(results: Path = RESULTS, console: Console | None = None) -> None:
    console = console or Console(width=120)
    for dataset in sorted(path for path in results.iterdir() if path.is_dir()):
        pairs = summary_rows(dataset)
        if not pairs:  # plain runs (hkft train), no tune study: hkft compare's table and plots alone
            compare_runs([dataset], dataset, console)
            continue
        compare_runs([method_dir / "seeds" for _, method_dir in pairs], dataset, console)
        summary = summary_markdown(pairs)
        (dataset / "summary.md").write_text(summary, encoding="utf-8")
        save_figure(figure_summary(pairs, dataset.name), dataset / "summary.png")
        console.print(summary, highlight=False, markup=False)


if __name__ == "__main__":
    if sys.argv[1:] == ["collect"]:
        collect()
    elif sys.argv[1:]:
        raise SystemExit("usage: python -m bench.does_it_help [collect]")
    report()
