"""`hkft tune`: an Optuna search per study, then seeds on the test split."""

from __future__ import annotations

from typing import Annotated

import typer

from hkft.commands.common import (
    Overrides,
    StudyDryRun,
    StudyFile,
    console,
    load_study_with,
    quiet_libraries,
    user_errors,
)


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
