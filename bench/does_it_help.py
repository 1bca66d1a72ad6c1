"""`python -m bench.does_it_help`: the "Does it help?" tables and plots, from the committed study outputs.

The studies are `presets/studies/<dataset>-<method>.yaml`, run with `hkft tune STUDY --seeds N`
into `runs/does-it-help/<dataset>/<method>/`; `python -m bench.does_it_help run DATASET... [--seeds N]`
runs a dataset's four studies one after the other, each in its own process, and records when each
started and ended and the load average then (`runs/does-it-help/logs/<dataset>/`). `python -m
bench.does_it_help collect` copies what the report needs (every run's config, metrics and trial
record, each search's trials.csv, best.yaml and the wall time; no checkpoints, no adapters) into
`bench/does-it-help/<dataset>/`; `python -m bench.does_it_help` alone rebuilds, per dataset,
`hkft compare`'s table and plots over the seed runs, plus `summary.md` (one row per method: the
tuned values, test score median ± std over seeds, step time, total time, overfitting flags) and
`summary.png`. A folder of plain runs (`hkft train` with the tuned settings and a longer schedule,
say) gets `hkft compare`'s alone. The folder `pruning/` (the same search with and without the
pruner, `presets/studies/rotten-tomatoes-search-{unpruned,pruned}.yaml`) gets `pruning.md` and
`pruning.png`: what the pruner stopped, when, and which trial each search picks.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml
from matplotlib.figure import Figure
from rich.console import Console

from hkft.recipes.curves import PANEL, read_curves, save_figure
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
SECOND_METRIC = {"classification": "macro_f1", "regression": "spearman"}
PRUNING = "pruning"  # the pruning check's folder: searches "unpruned" and "pruned"


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
            logs = studies / "logs" / dataset.name
            marks = sorted((_mark(start), _mark(start.with_suffix(".end")))
                           for start in (logs if logs.is_dir() else studies / "logs").glob(f"{method_dir.name}.*start")
                           if start.with_suffix(".end").is_file())  # <method>.start, <method>.more-seeds.start...
            if marks and (method_dir / "trials.csv").is_file():
                wall_time = {"phases": [[start[0], end[0]] for start, end in marks]}
                if all(start[1] is not None and end[1] is not None for start, end in marks):
                    wall_time["load"] = [[start[1], end[1]] for start, end in marks]
                (target / "wall_time.json").write_text(json.dumps(wall_time) + "\n", encoding="utf-8")


def _mark(path: Path) -> tuple[int, float | None]:
    """(Unix seconds, 1-minute load average or None) from a start or end file: "SECONDS [LOAD]"."""
    fields = path.read_text(encoding="utf-8").split()
    return int(fields[0]), float(fields[1]) if len(fields) > 1 else None


def run_studies(datasets: list[str], seeds: int, methods: tuple[str, ...] = METHODS, studies: Path | None = None) -> None:
    """Each dataset's `hkft tune` studies (all four methods, or ``methods``) in turn, one process each (a
    re-run resumes them), with the time and load average at the start and end of each: one more phase
    per call. Two calls with different ``methods`` run a dataset's studies side by side."""
    for dataset in datasets:
        logs = (studies or STUDIES) / "logs" / dataset
        logs.mkdir(parents=True, exist_ok=True)
        for method in methods:
            phase = 1 + len(list(logs.glob(f"{method}.*start")))
            (logs / f"{method}.{phase}.start").write_text(_now(), encoding="utf-8")
            try:
                finished = subprocess.run(["hkft", "tune", f"{dataset}-{method}", "--seeds", str(seeds)], check=False)
            finally:
                (logs / f"{method}.{phase}.end").write_text(_now(), encoding="utf-8")
            if finished.returncode != 0:  # hkft tune has said why; a re-run resumes the study
                raise SystemExit(f"{dataset}-{method}: hkft tune exited with {finished.returncode}; run the same "
                                 "command again to resume")


def _now() -> str:
    return f"{int(time.time())} {os.getloadavg()[0]:.2f}\n"


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


def _loads(method_dir: Path) -> list[tuple[float, float]]:
    path = method_dir / "wall_time.json"
    return [tuple(load) for load in json.loads(path.read_text()).get("load", [])] if path.is_file() else []


def _trials(method_dir: Path) -> list[dict]:
    with (method_dir / "trials.csv").open(encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _trial_flags(method_dir: Path) -> tuple[int, int]:
    runs = collect_runs(sorted(path.parent for path in method_dir.glob("trial-*/metrics.json")))
    flagged = sum(1 for run in runs if run.overfitting and run.overfitting.get("detected"))
    return flagged, sum(1 for run in runs if run.overfitting is not None)


def _search_budget(method_dir: Path) -> str:
    """"10 trials", or "4 trials of 3 seeds" for a study whose trials each train several seeds."""
    record = method_dir / "trial-0000" / "trial.json"
    seeds = len(json.loads(record.read_text(encoding="utf-8")).get("seed_values", [])) if record.is_file() else 0
    return f"{len(_trials(method_dir))} trials" + (f" of {seeds} seeds" if seeds > 1 else "")


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


def _score(row: Row, name: str) -> str:
    """Accuracy and F1 in percent, correlations as they are."""
    if row.task == "classification":
        return f"{100 * row.median[name]:.1f} ± {100 * row.std.get(name, 0.0):.1f}"
    return f"{row.median[name]:.3f} ± {row.std.get(name, 0.0):.3f}"


def summary_markdown(pairs: list[tuple[Row, Path]]) -> str:
    metric, second = pairs[0][0].main_metric, SECOND_METRIC[pairs[0][0].task]
    second_name = second.replace("_f1", "-F1")
    lines = [f"| method | tuned on validation | test {metric} | test {second_name} | s/step | time | overfit flagged |",
             "|---|---|---|---|---|---|---|"]
    for row, method_dir in pairs:
        runtimes = _runtimes(method_dir)
        step_time = statistics.median(seconds / steps for seconds, steps in runtimes)
        total = sum(seconds for seconds, _ in runtimes)
        seed_flags, seed_watched = overfit_count(row)
        trial_flags, trial_watched = _trial_flags(method_dir)
        scores = [_score(row, name) for name in (metric, second)]
        lines.append(f"| {_label(row)} | {_tuned(row)} ({_search_budget(method_dir)}) | {scores[0]} | {scores[1]} "
                     f"| {step_time:.2f} | {total / 60:.0f} min ({len(runtimes)} runs) "
                     f"| {seed_flags}/{seed_watched} seeds, {trial_flags}/{trial_watched} trial runs |")
    seeds = sorted({seed for row, _ in pairs for seed in row.seeds})
    lines.append("")
    lines.append(f"Median ± sample std over seeds {', '.join(map(str, seeds))} on the test split; s/step is the "
                 "median training time per step, evaluations included; time sums every trial and seed run.")
    phases = [phase for _, method_dir in pairs for phase in _phases(method_dir)]
    if phases:
        wall = max(end for _, end in phases) - min(start for start, _ in phases)
        lines.append(f"Wall time: {wall / 60:.0f} min from the first start to the last end.")
    loads = [(_label(row), load) for row, method_dir in pairs for load in _loads(method_dir)]
    if loads:
        lines.append("Load average (1 min) at the start and end of each study: "
                     + ", ".join(f"{label} {start:.1f} -> {end:.1f}" for label, (start, end) in loads) + ".")
    return "\n".join(lines) + "\n"


def figure_summary(pairs: list[tuple[Row, Path]], title: str) -> Figure:
    """Left: each seed's test score per method, with the median; right: median validation curve."""
    figure = Figure(figsize=(PANEL[0] * 2, PANEL[1]), layout="constrained")
    scores, curves = figure.subplots(1, 2)
    metric = pairs[0][0].main_metric
    scale, unit = (100, " (%)") if pairs[0][0].task == "classification" else (1, "")
    for index, (row, _) in enumerate(pairs):
        values = [scale * run.metrics[metric] for run in row.runs]
        scores.scatter([index] * len(values), values, color=f"C{index}", alpha=0.7)
        scores.hlines(statistics.median(values), index - 0.25, index + 0.25, color=f"C{index}")
        curve = median_curve(row.runs, eval_metric)
        curves.plot([step for step, _ in curve], [scale * value for _, value in curve], color=f"C{index}",
                    label=_label(row))
    scores.set_xticks(range(len(pairs)), [_label(row) for row, _ in pairs], rotation=15)
    scores.set_ylabel(f"test {metric}{unit}")
    scores.set_title(f"{title}: test {metric} per seed (bar: median)")
    curves.set_xlabel("step")
    curves.set_ylabel(f"validation {metric}{unit}")
    curves.set_title("validation curve, median over seeds")
    curves.legend()
    return figure


def search_trials(search: Path) -> list[dict]:
    """Each trial of one search: number, learning rate, state, best validation value, and its validation
    curve (which, for a pruned trial, ends where the pruner stopped it)."""
    found = []
    for trial in _trials(search):
        metric = next(key.removeprefix("validation_") for key in trial if key.startswith("validation_"))
        number = int(trial["trial"])
        curve = read_curves(search / f"trial-{number:04d}" / "metrics.jsonl").get(f"eval_{metric}", [])
        found.append({"number": number, "lr": float(trial["params_train.lr"]), "state": trial["state"],
                      "value": float(trial[f"validation_{metric}"]) if trial[f"validation_{metric}"] else None,
                      "metric": metric, "curve": curve})
    return found


def picked_trial(search: Path, trials: list[dict]) -> dict:
    """The trial whose learning rate best.yaml (hkft tune's pick) holds."""
    lr = yaml.safe_load((search / "best.yaml").read_text(encoding="utf-8"))["train"]["lr"]
    (pick,) = [trial for trial in trials if abs(trial["lr"] - lr) <= 1e-9 * lr]
    return pick


def pruning_markdown(folder: Path) -> str:
    unpruned, pruned = search_trials(folder / "unpruned"), search_trials(folder / "pruned")
    metric = unpruned[0]["metric"]
    total = max(step for trial in unpruned for step, _ in trial["curve"])
    same_lrs = [trial["lr"] for trial in unpruned] == [trial["lr"] for trial in pruned]
    lr_header = "learning rate" if same_lrs else "learning rate (unpruned / pruned)"
    lines = [f"| trial | {lr_header} | unpruned: best validation {metric} | pruned search |", "|---|---|---|---|"]
    for one, other in zip(unpruned, pruned):
        lr = f"{one['lr']:.3g}" if same_lrs else f"{one['lr']:.3g} / {other['lr']:.3g}"
        if other["state"] == "PRUNED":
            step, value = other["curve"][-1]
            outcome = (f"**stopped at step {step} of {total}** ({metric} {value:.3f} then, "
                       f"best so far {max(v for _, v in other['curve']):.3f})")
        else:
            outcome = f"{other['state'].lower()}, {other['value']:.3f}" if other["value"] is not None else other["state"].lower()
        lines.append(f"| {one['number']} | {lr} | {one['value']:.3f} | {outcome} |")
    picks = {name: picked_trial(folder / name, trials) for name, trials in (("unpruned", unpruned), ("pruned", pruned))}
    steps = {name: sum(trial["curve"][-1][0] for trial in trials if trial["curve"])
             for name, trials in (("unpruned", unpruned), ("pruned", pruned))}
    lines.append("")
    lines.append("Picked (best.yaml): " + "; ".join(
        f"{name} search trial {pick['number']} (learning rate {pick['lr']:.3g}, validation {metric} {pick['value']:.3f})"
        for name, pick in picks.items()) + ".")
    stopped = sum(trial["state"] == "PRUNED" for trial in pruned)
    lines.append(f"The pruner stopped {stopped} of {len(pruned)} trials; the pruned search trained "
                 f"{steps['pruned']} steps against {steps['unpruned']} ({1 - steps['pruned'] / steps['unpruned']:.0%} fewer).")
    same = picks["unpruned"]["lr"] == picks["pruned"]["lr"]
    lines.append(f"The same learning rates in both: {'yes' if same_lrs else 'no'}; the same pick: {'yes' if same else 'no'}.")
    return "\n".join(lines) + "\n"


def figure_pruning(folder: Path) -> Figure:
    """Validation curves of every trial, unpruned and pruned side by side; x where the pruner stopped a trial."""
    figure = Figure(figsize=(PANEL[0] * 2, PANEL[1]), layout="constrained")
    axes = figure.subplots(1, 2, sharey=True)
    for ax, name in zip(axes, ("unpruned", "pruned")):
        trials = search_trials(folder / name)
        pick = picked_trial(folder / name, trials)
        for index, trial in enumerate(sorted(trials, key=lambda trial: trial["lr"])):
            steps, values = [step for step, _ in trial["curve"]], [value for _, value in trial["curve"]]
            ax.plot(steps, values, color=f"C{index}", linewidth=3 if trial is pick else 1.2,
                    label=f"lr {trial['lr']:.2g}" + (" (picked)" if trial is pick else ""))
            if trial["state"] == "PRUNED" and steps:
                ax.plot(steps[-1], values[-1], "x", color=f"C{index}", markersize=10, markeredgewidth=2)
        ax.set_title(f"{name} search (x: stopped by the pruner)" if name == "pruned" else f"{name} search")
        ax.set_xlabel("step")
        ax.set_ylabel(f"validation {trials[0]['metric']}")
        ax.legend(fontsize="small")
    return figure


def report(results: Path = RESULTS, console: Console | None = None) -> None:
    console = console or Console(width=120)
    for dataset in sorted(path for path in results.iterdir() if path.is_dir()):
        if dataset.name == PRUNING:
            text = pruning_markdown(dataset)
            (dataset / "pruning.md").write_text(text, encoding="utf-8")
            save_figure(figure_pruning(dataset), dataset / "pruning.png")
            console.print(text, highlight=False, markup=False)
            continue
        pairs = summary_rows(dataset)
        if not pairs and any(dataset.glob("*/trial-*")):
            console.print(f"{dataset.name}: no study has reached its seed runs yet; nothing to report", highlight=False)
            continue
        if not pairs:  # plain runs (hkft train), no tune study: hkft compare's table and plots alone
            compare_runs([dataset], dataset, console)
            continue
        compare_runs([method_dir / "seeds" for _, method_dir in pairs], dataset, console)
        summary = summary_markdown(pairs)
        (dataset / "summary.md").write_text(summary, encoding="utf-8")
        save_figure(figure_summary(pairs, dataset.name), dataset / "summary.png")
        console.print(summary, highlight=False, markup=False)


def main(args: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.does_it_help",
                                     description="Without a command: the tables and plots from bench/does-it-help/.")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("collect", help="copy the study outputs from runs/does-it-help/, then report")
    run = commands.add_parser("run", help="run each dataset's four studies in turn, timed")
    run.add_argument("datasets", nargs="+", help="rotten-tomatoes, vader-movies")
    run.add_argument("--seeds", type=int, default=5, help="seed runs of each best setting (default 5)")
    run.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                     help="only these methods' studies (default: all four, in table order)")
    parsed = parser.parse_args(args)
    if parsed.command == "run":
        run_studies(parsed.datasets, parsed.seeds, tuple(parsed.methods))
        return
    if parsed.command == "collect":
        collect()
    report()


if __name__ == "__main__":
    main(sys.argv[1:])
