"""What every command shares: the consoles, the error boundary (one line and an exit code for a user error), option types and table printing."""

from __future__ import annotations

import contextlib
import functools
import signal
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

from hkft.config import (
    HkftConfig,
    config_to_yaml,
)
from hkft.config.loading import preset_keys
from hkft.errors import HkftError
from hkft.run.files import environment_error

if TYPE_CHECKING:
    from hkft.recipes.monitor import Verdict


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


StudyFile = Annotated[str, typer.Argument(metavar="STUDY", help="A study file, or the name of a shipped study (presets/studies).")]


StudyDryRun = Annotated[bool, typer.Option(help="List what would run and the estimated number of runs, then exit; trains nothing.")]


def load_study_with(study: str, overrides: list[str] | None):
    """The study file, with --set overrides applied to every run after the study's own."""
    from hkft.study.spec import load_study

    loaded = load_study(study)
    return loaded.model_copy(update={"overrides": [*loaded.overrides, *(overrides or [])]})
