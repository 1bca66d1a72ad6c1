"""`hkft train`: finetune from a preset into a run directory."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from hkft.commands.common import (
    ExtraOverrides,
    Overrides,
    Preset,
    console,
    print_before_and_after,
    print_overfitting,
    print_table,
    print_yaml,
    quiet_libraries,
    user_errors,
)
from hkft.config import (
    HkftConfig,
    load_config,
    resolve_preset_path,
)
from hkft.run.directory import (
    RunDir,
    check_run_location,
    default_run_dir,
    holds_run,
    is_main_process,
    start_run,
    training_run_dir,
)
from hkft.run.files import check_can_create_dir


def run_facts(cfg: HkftConfig, root: Path) -> dict[str, Any]:
    """What --dry-run adds to the config: derived values a reader would otherwise work out by hand."""
    from hkft.dropout.config import plan_from_config

    plan = plan_from_config(cfg.dropout)
    lora = cfg.lora
    scaling = lora.alpha / lora.r**0.5 if lora.use_rslora else lora.alpha / lora.r
    run = RunDir(root)
    state = "holds a run (needs --resume or --overwrite)" if holds_run(run) else "new"
    compensation = plan.compensation
    if plan.uses_consistency_loss:
        compensation += f" (weight {plan.kl_weight:g}, {plan.branches} branch)"
    return {
        "run directory": f"{root} ({state})",
        "task": cfg.model.task,
        "effective batch size": cfg.train.batch_size * cfg.train.grad_accum,
        "lora scaling": scaling,
        "dropout positions": ", ".join(f"{name}: {drop.pattern} p={drop.rate:g}" for name, drop in plan.active_positions.items())
        or "none",
        "dropout compensation": compensation,
        "dropout layers": plan.layers if plan.layers != "auto" else "auto (latter half of a decoder, all of an encoder)",
        "model's own dropout": plan.model_dropout or 0.0,
        "NEFTune alpha": plan.neftune_alpha or "off",
    }


@user_errors
def train(
    preset: Preset,
    extra: ExtraOverrides = None,
    overrides: Overrides = None,
    output_dir: Annotated[Path | None, typer.Option(help="Run directory (default: output.dir, else runs/<preset name>).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in the run directory from its last checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace the run already in the run directory.")] = False,
    dry_run: Annotated[bool, typer.Option(help="Print the resolved config and derived facts, then exit; loads no model.")] = False,
) -> None:
    """Finetune a model with LoRA and the preset's dropout method; the adapter lands in RUN_DIR/adapter.

    [dim]Example: hkft train quickstart --set lora.r=16 train.epochs=2[/]
    """
    cfg = load_config(preset, [*(overrides or []), *(extra or [])], overrides_from="--set")
    root = output_dir if output_dir is not None else default_run_dir(cfg, resolve_preset_path(preset))
    cfg.output.dir = str(root)
    check_run_location(root)
    check_can_create_dir(root, "--output-dir")
    if dry_run:
        print_yaml(cfg)
        print_table(run_facts(cfg, root), "derived (dry run: nothing loaded, nothing written)", ("fact", "value"))
        return
    quiet_libraries()
    from hkft.recipes.train import train as run_training

    with training_run_dir(root) if is_main_process() else contextlib.nullcontext():
        run = start_run(cfg, root, resume=resume, overwrite=overwrite, argv=sys.argv)
        result = run_training(cfg, run, resume=resume, console=console)
    if not is_main_process():
        return
    if result.base_metrics is not None:
        print_before_and_after(result, f"hkft train: {cfg.model.name}")
    else:
        print_table({**result.metrics, "adapter": str(result.adapter_dir)}, f"hkft train: {cfg.model.name}")
    print_overfitting(result.overfitting)
