"""`hkft presets`: the shipped presets."""

from __future__ import annotations

from pathlib import Path

from rich.markup import escape
from rich.table import Table

from hkft.commands.common import print_titled, user_errors
from hkft.config import (
    presets_dir,
)
from hkft.config.loading import preset_files, read_yaml_mapping
from hkft.errors import HkftError


@user_errors
def presets() -> None:
    """List the shipped presets."""
    table = Table(title=f"presets in {presets_dir()}", header_style="bold")
    table.add_column("name")
    table.add_column("description")
    for path in preset_files(presets_dir()):
        table.add_row(escape(path.stem), escape(preset_description(path)))
    print_titled(table)


def preset_description(path: Path) -> str:
    try:
        return str(read_yaml_mapping(path).get("description", ""))
    except HkftError as err:
        return f"(unreadable: {err})"
