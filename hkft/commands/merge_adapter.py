"""`hkft merge-adapter`: a standalone model (transformers folder or GGUF file) from a run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hkft.commands.common import Target, print_table, quiet_libraries, user_errors


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
