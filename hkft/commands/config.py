"""`hkft config`: a preset validated and resolved, printed as YAML."""

from __future__ import annotations

from hkft.commands.common import (
    ExtraOverrides,
    Overrides,
    Preset,
    print_yaml,
    user_errors,
)
from hkft.config import (
    load_config,
)


@user_errors
def config(preset: Preset, extra: ExtraOverrides = None, overrides: Overrides = None) -> None:
    """Validate a preset with its overrides and print the fully resolved YAML (offline, no model load)."""
    print_yaml(load_config(preset, [*(overrides or []), *(extra or [])], overrides_from="--set"))
