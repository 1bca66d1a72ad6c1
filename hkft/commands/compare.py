"""`hkft compare`: median and spread per method over finished runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hkft.commands.common import console, quiet_libraries, user_errors


@user_errors
def compare(
    run_dirs: Annotated[list[Path], typer.Argument(metavar="RUN_DIRS...", help="Finished runs, or folders of runs (a sweep's output).")],
    output: Annotated[Path | None, typer.Option(help="Where to write comparison.csv/.md and the plots.")] = None,
) -> None:
    """Median +- std per method over seeds (like the paper's Table 1), as a table, CSV, Markdown and plots."""
    quiet_libraries()
    from hkft.study.comparison import compare_runs, default_output_dir

    compare_runs(run_dirs, output or default_output_dir(run_dirs), console)
