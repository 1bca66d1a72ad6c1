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
from hkft.io import atomic_write_bytes
from hkft.metrics import MAIN_METRIC
from hkft.rundir import RunDir

Curve = list[tuple[int, float]]
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
