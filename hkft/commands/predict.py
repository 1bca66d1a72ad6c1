"""`hkft predict`: labels, probabilities or values for new texts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hkft.commands.common import (
    Overrides,
    console,
    errors,
    quiet_libraries,
    user_errors,
)


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
