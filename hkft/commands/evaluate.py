"""`hkft eval`: score a trained adapter."""

from __future__ import annotations

from typing import Annotated

import typer

from hkft.commands.common import (
    Overrides,
    Target,
    console,
    print_table,
    quiet_libraries,
    user_errors,
)


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
