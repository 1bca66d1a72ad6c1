"""`hkft sweep`: a grid of dropout settings and seeds."""

from __future__ import annotations

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
