"""The `hkft` command line: one Typer app, one thin module per command in `hkft/commands/`.

A new command is a module there with one function (wrapped in `user_errors`, so that every user error
ends as one line on stderr and a non-zero exit) and one line in `COMMANDS` below.
"""

from __future__ import annotations

from typing import Annotated

import typer

import hkft
from hkft.commands import (
    chat,
    compare,
    config,
    env,
    evaluate,
    inspect,
    merge_adapter,
    predict,
    presets,
    sweep,
    train,
    tune,
)
from hkft.commands.common import INSPECT_PANEL, RUN_PANEL, STUDY_PANEL, PresetCommand

app = typer.Typer(
    name="hkft",
    help="LoRA and QLoRA finetuning of Hugging Face models with HiddenKey and the unified dropout framework.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

# The commands in the order `hkft --help` lists them: name, function, help panel, and PresetCommand
# where the command takes a preset (it names the --set for a preset key given as an option).
COMMANDS = (
    ("train", train.train, RUN_PANEL, PresetCommand),
    ("eval", evaluate.evaluate, RUN_PANEL, None),
    ("merge-adapter", merge_adapter.merge_adapter, RUN_PANEL, None),
    ("chat", chat.chat, RUN_PANEL, None),
    ("predict", predict.predict, RUN_PANEL, None),
    ("sweep", sweep.sweep, STUDY_PANEL, None),
    ("tune", tune.tune, STUDY_PANEL, None),
    ("compare", compare.compare, STUDY_PANEL, None),
    ("presets", presets.presets, INSPECT_PANEL, None),
    ("config", config.config, INSPECT_PANEL, PresetCommand),
    ("inspect", inspect.inspect_command, INSPECT_PANEL, None),
    ("env", env.env, INSPECT_PANEL, None),
)
for name, function, panel, command_class in COMMANDS:
    app.command(name, rich_help_panel=panel, **({"cls": command_class} if command_class else {}))(function)


def show_version(value: bool) -> None:
    if value:
        typer.echo(f"hkft {hkft.__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=show_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """LoRA and QLoRA finetuning of Hugging Face models with HiddenKey and the unified dropout framework."""
