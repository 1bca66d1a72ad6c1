"""A run's own curves: the series of its metrics.jsonl, drawn into curves.png.

Figures are built by pure ``figure_*`` functions (plain matplotlib Figures, rendered by Agg without
pyplot, so nothing global is touched) and saved atomically by the ``plot_*`` functions.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from hkft.config import load_config
from hkft.errors import HkftError
from hkft.run.directory import RunDir
from hkft.run.files import atomic_write_bytes
from hkft.tasks.registry import task_for

Curve = list[tuple[int, float]]
PANEL = (5.5, 4.0)


def save_figure(figure: Figure, path: Path) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)


def plot_curve(axes: Axes, curve: Curve, **style) -> None:
    axes.plot([step for step, _ in curve], [value for _, value in curve], **style)


def no_data(axes: Axes) -> None:
    axes.text(0.5, 0.5, "no data", ha="center", va="center", transform=axes.transAxes, color="gray")


def read_curves(path: Path) -> dict[str, Curve]:
    """Every numeric key of metrics.jsonl as (step, value) pairs. A resumed run logs again the steps
    after its checkpoint: the later value wins."""
    if not path.is_file():
        return {}
    series: dict[str, dict[int, float]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise HkftError(f"{path}: line {number} is not JSON", "the log is damaged; fix or delete that line") \
                from None
        step = record.get("step")
        if not isinstance(step, int):
            continue
        for key, value in record.items():
            if key not in ("step", "epoch") and isinstance(value, (int, float)) and not isinstance(value, bool):
                series.setdefault(key, {})[step] = float(value)
    return {key: sorted(points.items()) for key, points in series.items()}


def figure_run_curves(curves: dict[str, Curve], metric: str, best_step: int | None = None) -> Figure | None:
    """The loss panel: training and validation loss on one axis, so the generalisation gap shows (a KL
    method's training loss is its task loss, the KL term gets an axis of its own); the metric panel:
    the eval metric (left out for causal LM, whose metric is the validation loss). Both mark the best
    step. A panel without data is left out; None when nothing at all was logged."""
    training = "task_loss" if "task_loss" in curves else "loss" if "loss" in curves else None
    loss_keys = [key for key in (training, "eval_loss") if key in curves]
    metric_key = f"eval_{metric}" if metric != "loss" and f"eval_{metric}" in curves else None
    panels = bool(loss_keys) + bool(metric_key)
    if not panels:
        return None
    figure = Figure(figsize=(panels * PANEL[0], PANEL[1]), layout="constrained")
    axes = list(figure.subplots(1, panels, squeeze=False)[0])
    if loss_keys:
        _draw_losses(axes[0], curves, training, best_step)
    if metric_key:
        metric_axes = axes[-1]
        metric_axes.set(title=f"eval {metric}", xlabel="step", ylabel=metric)
        plot_curve(metric_axes, curves[metric_key], label=metric_key, color="C2", marker="o")
        if best_step is not None:
            metric_axes.axvline(best_step, color="gray", linestyle=":", label=f"best (step {best_step})")
    return figure


def _draw_losses(axes: Axes, curves: dict[str, Curve], training: str | None, best_step: int | None) -> None:
    names = [name for key, name in ((training, "training"), ("eval_loss", "validation")) if key in curves]
    axes.set(title=" and ".join(names) + " loss", xlabel="step", ylabel="loss")
    if training is not None:
        label = "training task loss" if training == "task_loss" else "training loss"
        plot_curve(axes, curves[training], label=label, color="C0")
    if "eval_loss" in curves:
        plot_curve(axes, curves["eval_loss"], label="validation loss", color="C3", marker="o")
    if best_step is not None:
        axes.axvline(best_step, color="gray", linestyle=":", label=f"best (step {best_step})")
    handles = axes.get_lines()
    if "kl_loss" in curves:
        kl_axes = axes.twinx()
        plot_curve(kl_axes, curves["kl_loss"], label="kl_loss", color="C1")
        kl_axes.set_ylabel("kl_loss", color="C1")
        handles = [*handles, *kl_axes.get_lines()]
    if len(handles) > 1:
        axes.legend(handles=handles, fontsize="small")


def plot_run_curves(run_dir: Path, best_step: int | None = None) -> Path | None:
    """curves.png from the run's metrics.jsonl; None (and no file) when nothing was logged."""
    run = RunDir(Path(run_dir))
    task = task_for(load_config(run.config_path).model.task)
    figure = figure_run_curves(read_curves(run.metrics_jsonl), task.main_metric, best_step)
    return None if figure is None else save_figure(figure, run.curves_png)
