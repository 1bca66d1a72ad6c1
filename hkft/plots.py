"""PNG plots of one run's curves and of a comparison between methods.

Figures are built by pure ``figure_*`` functions (plain matplotlib Figures, rendered by Agg without
pyplot, so nothing global is touched) and saved atomically by the ``plot_*`` functions.
"""

from __future__ import annotations

import io
import statistics
from collections.abc import Callable
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from hkft.compare import Curve, RunSummary, Row, comparison_table, read_curves
from hkft.config import load_config
from hkft.io import atomic_write_bytes
from hkft.metrics import MAIN_METRIC
from hkft.rundir import RunDir

PANEL = (5.5, 4.0)


def save_figure(figure: Figure, path: Path) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)


def _plot(axes: Axes, curve: Curve, **style) -> None:
    axes.plot([step for step, _ in curve], [value for _, value in curve], **style)


def _no_data(axes: Axes) -> None:
    axes.text(0.5, 0.5, "no data", ha="center", va="center", transform=axes.transAxes, color="gray")


def figure_run_curves(curves: dict[str, Curve], metric: str, best_step: int | None = None) -> Figure:
    """Left: training and validation loss on one axis, so the generalisation gap shows (kl_loss on its
    own axis, it is orders of magnitude smaller); right: eval metric. Both mark the best step."""
    figure = Figure(figsize=(2 * PANEL[0], PANEL[1]), layout="constrained")
    loss_axes, eval_axes = figure.subplots(1, 2)
    loss_axes.set(title="training and validation loss", xlabel="step", ylabel="loss")
    if "loss" in curves:
        _plot(loss_axes, curves["loss"], label="loss", color="C0")
    else:
        _no_data(loss_axes)
    if "eval_loss" in curves:
        _plot(loss_axes, curves["eval_loss"], label="validation loss", color="C3", marker="o")
    if best_step is not None:
        for axes in (loss_axes, eval_axes):
            axes.axvline(best_step, color="gray", linestyle=":", label=f"best (step {best_step})")
    if "kl_loss" in curves:
        kl_axes = loss_axes.twinx()
        _plot(kl_axes, curves["kl_loss"], label="kl_loss", color="C1")
        kl_axes.set_ylabel("kl_loss", color="C1")
        loss_axes.legend(handles=[*loss_axes.get_lines(), *kl_axes.get_lines()], fontsize="small")
    elif len(loss_axes.get_lines()) > 1:
        loss_axes.legend(fontsize="small")
    key = f"eval_{metric}"
    eval_axes.set(title=f"eval {metric}", xlabel="step", ylabel=metric)
    if key in curves:
        _plot(eval_axes, curves[key], label=key, color="C2", marker="o")
    else:
        _no_data(eval_axes)
    return figure


def plot_run_curves(run_dir: Path, best_step: int | None = None) -> Path:
    run = RunDir(Path(run_dir))
    task = load_config(run.config_path).model.task
    return save_figure(figure_run_curves(read_curves(run.metrics_jsonl), MAIN_METRIC[task], best_step), run.curves_png)


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
            _plot(axes, curve, label=row_label(rows, row), marker="." if len(curve) < 30 else None)
        axes.set(xlabel="step", ylabel=ylabel_of(row))
    for axes in panels.values():
        if axes.get_lines():
            axes.legend(fontsize="small")
        else:
            _no_data(axes)
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
            _no_data(axes)
    return figure


def plot_comparison(runs: list[RunSummary], out_dir: Path) -> list[Path]:
    rows = comparison_table(runs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        save_figure(figure_loss_by_method(rows), out_dir / "loss_by_method.png"),
        save_figure(figure_metric_by_method(rows), out_dir / "metric_by_method.png"),
        save_figure(figure_metric_vs_rate(rows), out_dir / "metric_vs_rate.png"),
    ]
