"""The `hkft` command line (Typer). Every user error ends as one line on stderr and a non-zero exit."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

import hkft
from hkft.config import (
    HkftConfig,
    config_to_yaml,
    load_config,
    presets_dir,
    resolve_preset_path,
)
from hkft.config.loading import preset_keys, read_yaml_mapping
from hkft.errors import HkftError
from hkft.run.directory import (
    RunDir,
    check_resume_compatible,
    check_run_location,
    default_run_dir,
    holds_run,
    prepare_run_dir,
    save_run_config,
    training_run_dir,
)
from hkft.run.files import check_can_create_dir, environment_error

if TYPE_CHECKING:
    from hkft.recipes.monitor import Verdict


app = typer.Typer(
    name="hkft",
    help="LoRA and QLoRA finetuning of Hugging Face models with HiddenKey and the unified dropout framework.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
# emoji=False: rich would show `hub:nyu-mll/glue:rte:train:` with a train emoji, and escape() does not stop it.
console = Console(emoji=False)
errors = Console(stderr=True, emoji=False)

RUN_PANEL = "Train and use adapters"
INSPECT_PANEL = "Inspect"
STUDY_PANEL = "Dropout study"

Overrides = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a preset key, e.g. [bold]--set lora.r=16[/] (repeatable).", show_default=False),
]
ExtraOverrides = Annotated[
    list[str] | None,
    typer.Argument(metavar="KEY=VALUE", help="More overrides as key=value, e.g. train.lr=1e-4 (torchtune style).", show_default=False),
]
Preset = Annotated[
    str, typer.Argument(metavar="PRESET", help="A preset file, or the name of a shipped preset (see [bold]hkft presets[/]).")
]
Target = Annotated[
    Path, typer.Argument(metavar="RUN_OR_ADAPTER_DIR", help="A run directory made by hkft train, or its adapter/ folder.")
]


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """HkftError -> `error: ...` on stderr and its exit code; Ctrl-C -> exit 130. Bugs keep their traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            check_utf8_arguments([*args, *kwargs.values()])
            with sigterm_as_ctrl_c():
                return command(*args, **kwargs)
        except HkftError as err:
            raise exit_with(err) from None
        except KeyboardInterrupt:
            errors.print("[bold red]error:[/] interrupted", highlight=False)
            raise typer.Exit(130) from None
        except Exception as err:
            # The file system the user chose (full, read-only, a name too long), wherever it is first touched.
            explained = environment_error(err)
            if explained is None:
                raise
            raise exit_with(explained) from None

    return wrapper


def check_utf8_arguments(values: list[Any]) -> None:
    """A file name in another encoding arrives with undecodable bytes as surrogates; the run directory's
    UTF-8 files (config, run_info.json) could not record it, so refuse it before anything is written."""
    for value in values:
        for item in value if isinstance(value, list) else [value]:
            text = str(item) if isinstance(item, str | Path) else ""
            if not text.isascii() and any(0xDC80 <= ord(char) <= 0xDCFF for char in text):
                raise HkftError(f"the argument {text!r} is not valid UTF-8", "rename the file or folder to a UTF-8 name")


def exit_with(err: HkftError) -> typer.Exit:
    errors.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
    return typer.Exit(err.exit_code)


# Click's UsageError, reached through typer's public API (typer vendors its own click since 0.20).
UsageError: type[Exception] = typer.BadParameter.__mro__[1]


class PresetCommand(typer.core.TyperCommand):
    """`hkft train quickstart --lr 1e-4` is a preset key given as an option: name the --set that does it."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        given = list(args)  # the parser consumes args
        try:
            return super().parse_args(ctx, args)
        except UsageError as err:
            option = getattr(err, "option_name", None)  # set on NoSuchOption only
            key = preset_key_for_option(option) if option else None
            if key is None:
                raise
            value = option_value(given, option) or "VALUE"
            raise UsageError(f"No such option: {option}. A preset key is set with --set {key}={value}", ctx) from None


def option_value(args: list[str], option: str) -> str | None:
    """What followed ``option`` on the command line: ``--lr=1e-4`` or ``--lr 1e-4``."""
    for index, arg in enumerate(args):
        if arg.startswith(option + "="):
            return arg.split("=", 1)[1]
        if arg == option and index + 1 < len(args) and not args[index + 1].startswith("--"):
            return args[index + 1]
    return None


def preset_key_for_option(option: str) -> str | None:
    """``--lr`` -> ``train.lr``, ``--max-steps`` -> ``train.max_steps``: the one preset key with that last part."""
    name = option.split("=", 1)[0].lstrip("-").replace("-", "_")
    matches = [key for key in preset_keys() if key == name or key.rsplit(".", 1)[-1] == name]
    return matches[0] if len(matches) == 1 else None


@contextlib.contextmanager
def sigterm_as_ctrl_c() -> Iterator[None]:
    """SIGTERM outside training (loading data, a model, evaluating) ends like Ctrl-C: exit 130 and
    one line, where its default action kills the process without a word (training installs its own)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def quiet_libraries() -> None:
    """hkft draws its own progress; library bars and warnings would bury it (and stderr is for errors)."""
    import datasets
    import transformers

    # transformers 5 deprecates a name that peft and the Trainer still call on every run.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def is_main_process() -> bool:
    """Rank 0 of a torchrun/accelerate launch (or a single process) owns the run directory."""
    return os.environ.get("RANK", "0") == "0"


def print_titled(table: Table) -> None:
    """Rich wraps a title to its table's width: a table narrower than its title would break the model
    name in it mid-word. The table is made as wide as its title, as far as the console allows."""
    if isinstance(table.title, str):
        table.min_width = min(Text.from_markup(table.title).cell_len, console.width)
    console.print(table)


def print_table(rows: dict[str, Any], title: str, columns: tuple[str, str] = ("metric", "value")) -> None:
    # Imported here: hkft.run.progress pulls in transformers (seconds), and `hkft config` / `hkft presets` stay instant.
    from hkft.run.progress import summary_table

    print_titled(summary_table(rows, title, columns=columns))


def print_overfitting(found: Verdict | None) -> None:
    """The overfitting monitor's closing verdict: yellow when it fired."""
    from hkft.recipes.monitor import verdict_line

    if found is not None:
        console.print(escape(verdict_line(found)), style="yellow" if found.detected else None, highlight=False, soft_wrap=True)


def print_before_and_after(result: Any, title: str) -> None:
    """eval.compare_base: the metrics of the base model and of the finetuned one, then sample replies."""
    from hkft.run.progress import format_value

    table = Table(title=title, header_style="bold")
    for column in ("metric", "base model", "finetuned"):
        table.add_column(column)
    for name, value in result.metrics.items():
        table.add_row(escape(name), escape(format_value(result.base_metrics.get(name, ""))), escape(format_value(value)))
    table.add_row("adapter", "", escape(str(result.adapter_dir)))
    print_titled(table)
    for sample in result.samples:
        last = sample["input"][-1]["content"] if isinstance(sample["input"], list) else sample["input"]
        replies = {"base model": sample["base"], "finetuned": sample["finetuned"], "reference": sample["reference"]}
        lines = [f"> {last}", *(f"  {name + ':':<12}{reply!r}" for name, reply in replies.items())]
        console.print(escape("\n".join(lines)), highlight=False)


def print_yaml(cfg: HkftConfig) -> None:
    """Plain stdout, never wrapped, so `hkft config x > resolved.yaml` is a valid preset."""
    typer.echo(config_to_yaml(cfg), nl=False)


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


def start_run(cfg: HkftConfig, root: Path, *, resume: bool, overwrite: bool) -> RunDir:
    if not is_main_process():
        return RunDir(root)
    run = prepare_run_dir(root, resume=resume, overwrite=overwrite)
    if resume and run.config_path.is_file():
        check_resume_compatible(load_config(run.config_path), cfg)
    save_run_config(run, cfg, sys.argv)
    return run


@app.command(rich_help_panel=RUN_PANEL, cls=PresetCommand)
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
        run = start_run(cfg, root, resume=resume, overwrite=overwrite)
        result = run_training(cfg, run, resume=resume, console=console)
    if not is_main_process():
        return
    if result.base_metrics is not None:
        print_before_and_after(result, f"hkft train: {cfg.model.name}")
    else:
        print_table({**result.metrics, "adapter": str(result.adapter_dir)}, f"hkft train: {cfg.model.name}")
    print_overfitting(result.overfitting)


@app.command("eval", rich_help_panel=RUN_PANEL)
@user_errors
def evaluate(
    target: Target,
    data: Annotated[str | None, typer.Option(help="Evaluate on this file or hub:ID[:CONFIG][:SPLIT] instead.")] = None,
    split: Annotated[str | None, typer.Option(help="validation, test or train (default: the run's eval.split).")] = None,
    overrides: Overrides = None,
) -> None:
    """Score a trained adapter; writes eval.json and predictions.jsonl into the run directory."""
    from hkft.data.files import check_local_source
    from hkft.recipes.evaluate import evaluate as run_evaluation

    if data is not None:
        check_local_source(data, "--data")
    quiet_libraries()

    result = run_evaluation(target, data=data, split=split, overrides=overrides or [], console=console)
    rows = {**result.metrics, "eval.json": str(result.eval_path), "predictions": str(result.predictions_path)}
    print_table(rows, f"hkft eval: {target}")


@app.command("merge-adapter", rich_help_panel=RUN_PANEL)
@user_errors
def merge_adapter(
    target: Target,
    output: Annotated[Path, typer.Option(help="Directory for the standalone merged model.", show_default=False)],
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty output directory.")] = False,
    format: Annotated[str, typer.Option("--format", help="hf: a transformers folder; gguf: one .gguf file for llama.cpp.")] = "hf",
    gguf_type: Annotated[str | None, typer.Option(help="--format gguf: f16 (default), bf16 or q8_0.", show_default=False)] = None,
) -> None:
    """Merge the adapter into a full-precision copy of its base model, loadable by plain transformers (or llama.cpp)."""
    quiet_libraries()
    from hkft.models.merge import merge_adapter as merge
    from hkft.models.merge import merge_format

    report = merge(target, output, dtype=dtype, overwrite=overwrite, gguf_type=merge_format(format, gguf_type))
    rows = {"output": str(report.gguf_file or report.output_dir), "dtype": report.dtype,
            "max |Δlogit| vs adapter": report.max_abs_diff}
    print_table(rows, "hkft merge-adapter")


@app.command(rich_help_panel=RUN_PANEL)
@user_errors
def chat(
    target: Annotated[Path | None, typer.Argument(metavar="RUN_OR_MODEL_DIR", help="A run directory, its adapter/ folder, or a folder written by merge-adapter.", show_default=False)] = None,
    base: Annotated[str | None, typer.Option("--base", metavar="PRESET", help="Talk to the base model of this preset instead (no adapter).", show_default=False)] = None,
    system: Annotated[str | None, typer.Option(help="A system message that starts each conversation.", show_default=False)] = None,
    prompt: Annotated[list[str] | None, typer.Option(help="Reply to this prompt as one JSON line, then exit (repeatable).", show_default=False)] = None,
    compare_base: Annotated[bool, typer.Option(help="Reply with the base model too (the adapter switched off), before the finetuned reply.")] = False,
    overrides: Overrides = None,
) -> None:
    """Talk to a finetuned causal LM in its chat template: streamed in a terminal, a JSON line per reply in a pipe.

    [dim]In the terminal: /reset, /save FILE, /exit (or Ctrl-D); Ctrl-C stops a reply. Decoding: --set eval.generation.max_new_tokens=256[/]
    """
    quiet_libraries()
    from hkft.inference.conversation import run_chat

    run_chat(target, base, overrides or [], system=system, prompts=prompt or [], compare_base=compare_base)


@app.command(rich_help_panel=RUN_PANEL)
@user_errors
def predict(
    target: Annotated[Path, typer.Argument(metavar="RUN_OR_MODEL_DIR", help="A run directory, its adapter/ folder, or a folder written by merge-adapter.")],
    texts: Annotated[list[str] | None, typer.Argument(metavar="TEXT", help="Texts to score.", show_default=False)] = None,
    file: Annotated[Path | None, typer.Option("--file", help="A JSONL file: one object per line with the run's text column(s).", show_default=False)] = None,
    output: Annotated[Path | None, typer.Option(help="Write the --file rows with their predictions here (JSONL), else to stdout.", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines instead of a table.")] = False,
    overrides: Overrides = None,
) -> None:
    """Labels and probabilities of a finetuned classifier (values of a regressor) for new texts, in batches."""
    quiet_libraries()
    from hkft.inference.prediction import run_predict

    run_predict(target, texts or [], file, output, overrides or [], as_json=as_json, console=console, progress_console=errors)


StudyFile = Annotated[str, typer.Argument(metavar="STUDY", help="A study file, or the name of a shipped study (presets/studies).")]
StudyDryRun = Annotated[bool, typer.Option(help="List what would run and the estimated number of runs, then exit; trains nothing.")]


def load_study_with(study: str, overrides: list[str] | None):
    """The study file, with --set overrides applied to every run after the study's own."""
    from hkft.study.spec import load_study

    loaded = load_study(study)
    return loaded.model_copy(update={"overrides": [*loaded.overrides, *(overrides or [])]})


@app.command(rich_help_panel=STUDY_PANEL)
@user_errors
def sweep(study: StudyFile, overrides: Overrides = None, dry_run: StudyDryRun = False) -> None:
    """Run a grid of dropout methods x rates x KL weights x seeds; finished cells are skipped on a re-run."""
    from hkft.study.grid import cell_state, expand_cells, grid_size, run_sweep

    loaded = load_study_with(study, overrides)
    if dry_run:
        cells = expand_cells(loaded)
        typer.echo(f"{len(cells)} runs of {grid_size(loaded)} grid points in {loaded.output} (dry run: nothing trained)")
        for cell in cells:
            typer.echo(f"  {cell_state(cell):8}  {cell.name}")
        return
    quiet_libraries()
    run_sweep(loaded, console)


@app.command(rich_help_panel=STUDY_PANEL)
@user_errors
def tune(
    study: StudyFile,
    overrides: Overrides = None,
    seeds: Annotated[int, typer.Option(min=0, help="Train each best setting again with this many new seeds, then compare.")] = 0,
    dry_run: StudyDryRun = False,
) -> None:
    """Search the study's search: space with Optuna (TPE, pruning); re-run the same command to continue it."""
    from hkft.study.search import describe_plan, plan_tune, run_tune

    plan = plan_tune(load_study_with(study, overrides))
    if dry_run:
        typer.echo("\n".join(describe_plan(plan, seeds)))
        return
    quiet_libraries()
    run_tune(plan, console, seeds=seeds)


@app.command(rich_help_panel=STUDY_PANEL)
@user_errors
def compare(
    run_dirs: Annotated[list[Path], typer.Argument(metavar="RUN_DIRS...", help="Finished runs, or folders of runs (a sweep's output).")],
    output: Annotated[Path | None, typer.Option(help="Where to write comparison.csv/.md and the plots.")] = None,
) -> None:
    """Median +- std per method over seeds (like the paper's Table 1), as a table, CSV, Markdown and plots."""
    quiet_libraries()
    from hkft.study.comparison import compare_runs, default_output_dir

    compare_runs(run_dirs, output or default_output_dir(run_dirs), console)


@app.command(rich_help_panel=INSPECT_PANEL)
@user_errors
def presets() -> None:
    """List the shipped presets."""
    table = Table(title=f"presets in {presets_dir()}", header_style="bold")
    table.add_column("name")
    table.add_column("description")
    for path in sorted(presets_dir().glob("*.yaml")):
        table.add_row(escape(path.stem), escape(preset_description(path)))
    print_titled(table)


def preset_description(path: Path) -> str:
    try:
        return str(read_yaml_mapping(path).get("description", ""))
    except HkftError as err:
        return f"(unreadable: {err})"


@app.command(rich_help_panel=INSPECT_PANEL, cls=PresetCommand)
@user_errors
def config(preset: Preset, extra: ExtraOverrides = None, overrides: Overrides = None) -> None:
    """Validate a preset with its overrides and print the fully resolved YAML (offline, no model load)."""
    print_yaml(load_config(preset, [*(overrides or []), *(extra or [])], overrides_from="--set"))


@app.command("inspect", rich_help_panel=INSPECT_PANEL)
@user_errors
def inspect_command(
    target: Annotated[str, typer.Argument(metavar="MODEL_OR_PRESET", help="A model directory or hub id, a preset file or a shipped preset's name.")],
    extra: ExtraOverrides = None,
    overrides: Overrides = None,
    task: Annotated[str | None, typer.Option(help="classification, regression or causal-lm (default: the preset's, else from the checkpoint).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """What hkft will do with a model, from its config alone (no weights): layers, dropout positions, LoRA targets, parameter counts."""
    import json

    quiet_libraries()
    from hkft.models.inspection import inspect_model

    report = inspect_model(target, [*(overrides or []), *(extra or [])], task)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    for table in inspection_tables(report):
        print_titled(table)


def inspection_tables(report: dict[str, Any]) -> list[Table]:
    from hkft.models.inspection import layer_ranges

    lora, params, dropout = report["lora"], report["parameters"], report["dropout"]
    targets = lora["targets"] if isinstance(lora["targets"], str) else ", ".join(lora["targets"])
    task = report["task"] + (" (from the checkpoint; --task to change)" if report["task_inferred"] else "")
    facts = {
        "model": report["model"],
        "architecture": f"{report['model_type']} ({report['class']})",
        "task": task + (f", {report['num_labels']} labels" if report["num_labels"] else ""),
        "kind": report["kind"],
        "layers": f"{report['layers']} ({report['layer_stack']})",
        "attention": report["attn_implementation"],
        "quantization": report["quantization"],
        "GGUF export": report["gguf_export"],
        "LoRA targets": f"{targets} ({lora['adapted_modules']} modules)",
        "LoRA": f"r={lora['r']} alpha={lora['alpha']:g} init={lora['init']}"
        + "".join(f" {name}" for name in ("use_dora", "use_rslora") if lora[name])
        + (f" loraplus_lr_ratio={lora['loraplus_lr_ratio']:g}" if lora["loraplus_lr_ratio"] else ""),
        "modules to save": ", ".join(lora["modules_to_save"]) or "-",
        "parameters": f"{params['trainable']:,} trainable of {params['total']:,} ({100 * params['trainable'] / params['total']:.3f}%)",
        "dropout (this preset)": f"{dropout['method']}: "
        + (", ".join(f"{name} {drop}" for name, drop in dropout["positions"].items()) or "no positions")
        + f"; layers {layer_ranges(dropout['layers'])}",
    }
    summary = Table(title=f"hkft inspect: {escape(report['model'])}", header_style="bold")
    summary.add_column("fact")
    summary.add_column("value")
    for key, value in facts.items():
        summary.add_row(escape(key), escape(str(value)))

    positions = Table(title="dropout positions", header_style="bold")
    for column in ("position", "module (layered positions: inside each dropping layer)", "patterns"):
        positions.add_column(column)
    for name, found in report["positions"].items():
        if "error" in found:
            positions.add_row(name, f"[red]not found[/]: {escape(found['error'])}", "-")
        else:
            positions.add_row(name, escape(f"{found['module']} ({found['class']})"), ", ".join(found["patterns"]))

    methods = Table(title="named methods at this preset's rate and layers", header_style="bold")
    for column in ("method", "positions", "layers", "compensation"):
        methods.add_column(column)
    for name, method in report["methods"].items():
        drops = ", ".join(f"{position} {drop}" for position, drop in method["positions"].items())
        if method["neftune_alpha"]:
            drops = f"input embeddings + noise alpha={method['neftune_alpha']:g}"
        if name == "dropout":
            drops = "the model's own dropout"
        marker = " *" if name == dropout["method"] else ""
        methods.add_row(escape(name + marker), escape(drops or "-"), layer_ranges(method["layers"]), method["compensation"] or "-")
    return [summary, positions, methods]


@app.command(rich_help_panel=INSPECT_PANEL)
@user_errors
def env() -> None:
    """Versions, device and bitsandbytes support, for bug reports."""
    from hkft.run.environment import environment_report

    print_table(environment_report(), "hkft env", ("component", "version / status"))


def show_version(value: bool) -> None:
    if value:
        typer.echo(f"hkft {hkft.__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=show_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """LoRA and QLoRA finetuning of Hugging Face models with HiddenKey and the unified dropout framework."""
