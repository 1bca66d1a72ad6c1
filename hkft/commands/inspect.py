"""`hkft inspect`: what hkft will do with a model, from its config alone."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from hkft.commands.common import (
    ExtraOverrides,
    Overrides,
    print_titled,
    quiet_libraries,
    user_errors,
)

if TYPE_CHECKING:
    from hkft.models.inspection import InspectionReport


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


def inspection_tables(report: InspectionReport) -> list[Table]:
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
