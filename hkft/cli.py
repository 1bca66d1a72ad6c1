"""The `hkft` command line (Typer). Every user error ends as one line on stderr and a non-zero exit."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from collections.abc import Callable
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from hkft.config import HkftConfig, config_to_yaml, load_config, presets_dir, resolve_preset_path
from hkft.errors import HkftError
from hkft.rundir import RunDir, check_resume_compatible, default_run_dir, prepare_run_dir, save_run_config

app = typer.Typer(
    name="hkft",
    help="LoRA and QLoRA finetuning with HiddenKey and the unified dropout framework.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
console = Console()
errors = Console(stderr=True)

Overrides = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a preset key, e.g. --set lora.r=16 (repeatable).", show_default=False),
]
ExtraOverrides = Annotated[
    list[str] | None, typer.Argument(help="More overrides as key=value (torchtune style).", show_default=False)
]


def quiet_libraries() -> None:
    """hkft draws its own progress; library bars and warnings would bury it (and stderr is for errors)."""
    import logging

    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def user_errors(command: Callable) -> Callable:
    """HkftError -> `error: ...` on stderr and its exit code; Ctrl-C -> exit 130. Bugs keep their traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            quiet_libraries()
            return command(*args, **kwargs)
        except HkftError as err:
            errors.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            errors.print("[bold red]interrupted[/]", markup=True)
            raise typer.Exit(130) from None

    return wrapper


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def describe_plan(cfg: HkftConfig) -> dict[str, Any]:
    from hkft.pipeline import plan_from_config

    plan = plan_from_config(cfg.dropout)
    return {
        "positions": {name: f"{drop.pattern}, p={drop.rate:g}" for name, drop in plan.active_positions.items()} or "none",
        "compensation": plan.compensation + (f" (weight {plan.kl_weight:g}, {plan.branches} branch)" if plan.uses_consistency_loss else ""),
        "layers": plan.layers if plan.layers != "auto" else "auto (latter half of a decoder, all of an encoder)",
        "model's own dropout": plan.model_dropout or 0.0,
    }


@app.command()
@user_errors
def train(
    preset: Annotated[str, typer.Argument(help="A preset file, or the name of a shipped preset (see `hkft presets`).")],
    extra: ExtraOverrides = None,
    overrides: Overrides = None,
    output_dir: Annotated[Path | None, typer.Option(help="Run directory (default: output.dir or runs/<preset>).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in the run directory from its last checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run directory.")] = False,
    dry_run: Annotated[bool, typer.Option(help="Print the resolved config and plan, then exit without loading a model.")] = False,
) -> None:
    """Finetune a model with LoRA and the preset's dropout method."""
    all_overrides = [*(overrides or []), *(extra or [])]
    cfg = load_config(preset, all_overrides)
    if output_dir is not None:
        cfg.output.dir = str(output_dir)
    root = default_run_dir(cfg, resolve_preset_path(preset))
    if dry_run:
        console.print(config_to_yaml(cfg), highlight=False, markup=False, soft_wrap=True)
        console.print(summary({"run directory": root, "effective batch size": cfg.train.batch_size * cfg.train.grad_accum,
                               **{f"dropout {k}": v for k, v in describe_plan(cfg).items()}}, "plan"))
        return
    if resume and RunDir(root).config_path.is_file():
        check_resume_compatible(load_config(RunDir(root).config_path), cfg)
    if is_main_process():
        from hkft.envinfo import environment_report

        run = prepare_run_dir(root, resume=resume, overwrite=overwrite)
        save_run_config(run, cfg, sys.argv, environment_report())
    else:
        run = RunDir(root)

    from hkft.pipeline import train as run_training

    result = run_training(cfg, run, resume=resume, console=console)
    if is_main_process():
        console.print(summary({**result.metrics, "adapter": str(result.adapter_dir)}, f"hkft train: {cfg.model.name}"))


@app.command("eval")
@user_errors
def evaluate(
    target: Annotated[Path, typer.Argument(help="A run directory (or its adapter/ folder).")],
    data: Annotated[str | None, typer.Option(help="Evaluate on this file or hub:ID[:CONFIG][:SPLIT] instead.")] = None,
    split: Annotated[str | None, typer.Option(help="validation or test (default: the preset's eval.split).")] = None,
    overrides: Overrides = None,
) -> None:
    """Metrics of a trained adapter; writes eval.json and predictions.jsonl beside it."""
    from hkft.pipeline import evaluate as run_evaluation

    result = run_evaluation(target, data=data, split=split, overrides=overrides or [], console=console)
    console.print(summary({**result.metrics, "eval.json": str(result.eval_path), "predictions": str(result.predictions_path)},
                          f"hkft eval: {target}"))


@app.command("merge-adapter")
@user_errors
def merge_adapter(
    target: Annotated[Path, typer.Argument(help="A run directory (or its adapter/ folder).")],
    output: Annotated[Path, typer.Option(help="Directory for the standalone merged model.")],
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output directory.")] = False,
) -> None:
    """Merge the adapter into a full-precision copy of its base model and save it for plain transformers."""
    from hkft.merge import merge_adapter as merge

    report = merge(target, output, dtype=dtype, overwrite=overwrite)
    console.print(summary({"output": str(report.output_dir), "dtype": report.dtype,
                           "max |logit difference| vs adapter": report.max_abs_diff}, "hkft merge-adapter"))


@app.command()
@user_errors
def presets() -> None:
    """List the shipped presets."""
    table = Table(title=f"presets in {presets_dir()}")
    table.add_column("name")
    table.add_column("description")
    for path in sorted(presets_dir().glob("*.yaml")):
        description = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("description", "")
        table.add_row(path.stem, description)
    console.print(table)


@app.command()
@user_errors
def config(preset: Annotated[str, typer.Argument(help="A preset file or shipped preset name.")],
           extra: ExtraOverrides = None, overrides: Overrides = None) -> None:
    """Validate a preset and print the fully resolved config (no model is loaded)."""
    cfg = load_config(preset, [*(overrides or []), *(extra or [])])
    console.print(config_to_yaml(cfg), highlight=False, markup=False, soft_wrap=True)


@app.command()
@user_errors
def env() -> None:
    """Versions, device and bitsandbytes support, for bug reports."""
    from hkft.envinfo import environment_report

    console.print(summary(environment_report(), "hkft env"))


def summary(rows: dict[str, Any], title: str) -> Table:
    table = Table(title=title, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in rows.items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    return table
