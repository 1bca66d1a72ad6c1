"""`hkft chat`: talk to a finetuned causal LM."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hkft.commands.common import Overrides, quiet_libraries, user_errors


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
