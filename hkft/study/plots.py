"""PNG plots of a study: methods compared over seeds.

Figures are built by pure ``figure_*`` functions (plain matplotlib Figures, rendered by Agg without
pyplot, so nothing global is touched) and saved atomically by the ``plot_*`` functions.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from hkft.recipes.curves import PANEL, Curve, no_data, plot_curve, save_figure

if TYPE_CHECKING:
    from hkft.study.comparison import Row, RunSummary


def training_loss(run: RunSummary) -> Curve:
    """The task loss: a KL method's ``loss`` also holds the weighted KL term, so it would not compare
    with the loss of a method without one."""
    return run.curves.get("task_loss") or run.curves.get("loss", [])


def eval_metric(run: RunSummary) -> Curve:
    return run.curves.get(f"eval_{run.main_metric}", [])


def median_curve(runs: tuple[RunSummary, ...], series: Callable[[RunSummary], Curve]) -> Curve:
    """Per step, the median over the runs that logged that step (early-stopped seeds end sooner)."""
    by_step: dict[int, list[float]] = {}
    for run in runs:
        for step, value in series(run):
            by_step.setdefault(step, []).append(value)
    return [(step, statistics.median(values)) for step, values in sorted(by_step.items())]


def _varies(rows: list[Row], row: Row, attribute: str) -> bool:
    peers = [other for other in rows if other.dataset == row.dataset and other.method == row.method]
    return len({getattr(other, attribute) for other in peers}) > 1


def row_label(rows: list[Row], row: Row, *, with_rate: bool = True) -> str:
    """The method, plus whichever of rate, KL weight and other varied keys tell its rows apart."""
    parts = [row.method]
    if with_rate and row.rate is not None and _varies(rows, row, "rate"):
        parts.append(f"p={row.rate:g}")
    if row.kl_weight is not None and _varies(rows, row, "kl_weight"):
        parts.append(f"kl={row.kl_weight:g}")
    parts += [f"{key.rsplit('.', 1)[-1]}={value}" for key, value in row.extra]
    return " ".join(parts)


def _dataset_axes(rows: list[Row]) -> tuple[Figure, dict[str, Axes]]:
    datasets = list(dict.fromkeys(row.dataset for row in rows)) or ["(no runs)"]
    figure = Figure(figsize=(PANEL[0] * len(datasets), PANEL[1]), layout="constrained")
    panels = figure.subplots(1, len(datasets), squeeze=False)[0]
    for axes, dataset in zip(panels, datasets):
        axes.set_title(dataset)
    return figure, dict(zip(datasets, panels))


def _figure_curves_by_method(rows: list[Row], series: Callable[[RunSummary], Curve],
                             ylabel_of: Callable[[Row], str]) -> Figure:
    figure, panels = _dataset_axes(rows)
    for row in rows:
        axes = panels[row.dataset]
        curve = median_curve(row.runs, series)
        if curve:
            plot_curve(axes, curve, label=row_label(rows, row), marker="." if len(curve) < 30 else None)
        axes.set(xlabel="step", ylabel=ylabel_of(row))
    for axes in panels.values():
        if axes.get_lines():
            axes.legend(fontsize="small")
        else:
            no_data(axes)
    return figure


def figure_loss_by_method(rows: list[Row]) -> Figure:
    """Training task loss against step, one line per method (median over seeds), one panel per dataset."""
    return _figure_curves_by_method(rows, training_loss, lambda row: "training task loss (median over seeds)")


def figure_metric_by_method(rows: list[Row]) -> Figure:
    """The task's main eval metric against step, one line per method (median over seeds)."""
    return _figure_curves_by_method(rows, eval_metric, lambda row: f"eval {row.main_metric} (median over seeds)")


def figure_metric_vs_rate(rows: list[Row]) -> Figure:
    """Final main metric against dropout rate: median over seeds with sample-std error bars.
    A method that drops nothing (rate None) is a dashed horizontal line."""
    figure, panels = _dataset_axes(rows)
    series: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        if row.main_metric in row.median:
            series.setdefault((row.dataset, row_label(rows, row, with_rate=False)), []).append(row)
    for (dataset, label), members in series.items():
        axes = panels[dataset]
        metric = members[0].main_metric
        axes.set(xlabel="dropout rate", ylabel=f"{metric} (median over seeds)")
        flat = [row for row in members if row.rate is None]
        for row in flat:
            axes.axhline(row.median[metric], linestyle="--", color="gray", label=label)
        rated = sorted((row for row in members if row.rate is not None), key=lambda row: row.rate)
        if rated:
            axes.errorbar([row.rate for row in rated], [row.median[metric] for row in rated],
                          yerr=[row.std[metric] for row in rated], label=label, marker="o", capsize=3)
    for axes in panels.values():
        if axes.get_lines() or axes.containers:
            axes.legend(fontsize="small")
        else:
            no_data(axes)
    return figure


def plot_comparison(rows: list[Row], out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        save_figure(figure_loss_by_method(rows), out_dir / "loss_by_method.png"),
        save_figure(figure_metric_by_method(rows), out_dir / "metric_by_method.png"),
        save_figure(figure_metric_vs_rate(rows), out_dir / "metric_vs_rate.png"),
    ]


def figure_optimization_history(points: list[tuple[int, float]], metric: str, maximize: bool) -> Figure:
    """Each completed trial's validation metric against its number, and the best so far as a step line."""
    figure = Figure(figsize=PANEL, layout="constrained")
    axes = figure.subplots()
    axes.set(title="optimisation history", xlabel="trial", ylabel=f"validation {metric}")
    if not points:
        no_data(axes)
        return figure
    numbers, values = zip(*sorted(points))
    pick = max if maximize else min
    best = [pick(values[: index + 1]) for index in range(len(values))]
    axes.scatter(numbers, values, label="trial", color="C0")
    axes.step(numbers, best, where="post", label="best so far", color="C3")
    axes.legend(fontsize="small")
    return figure


def figure_param_importances(importances: dict[str, float]) -> Figure:
    """fANOVA importances (shares of the metric's variance), the most important on top."""
    figure = Figure(figsize=PANEL, layout="constrained")
    axes = figure.subplots()
    axes.set(title="parameter importances", xlabel="importance")
    if not importances:
        no_data(axes)
        return figure
    ordered = sorted(importances.items(), key=lambda item: item[1])
    axes.barh([name for name, _ in ordered], [value for _, value in ordered], color="C0")
    return figure


def figure_metric_vs_param(points: list[tuple[object, float]], param: str, metric: str, log: bool) -> Figure:
    """The validation metric of every completed trial against one parameter (choices side by side)."""
    figure = Figure(figsize=PANEL, layout="constrained")
    axes = figure.subplots()
    axes.set(title=f"validation {metric} against {param}", xlabel=param, ylabel=f"validation {metric}")
    if not points:
        no_data(axes)
        return figure
    xs = [x for x, _ in points]
    if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs):
        axes.scatter(xs, [y for _, y in points], color="C0")
        if log:
            axes.set_xscale("log")
    else:
        categories = list(dict.fromkeys(str(x) for x in xs))
        axes.scatter([categories.index(str(x)) for x in xs], [y for _, y in points], color="C0")
        axes.set_xticks(range(len(categories)), categories)
    return figure
