"""Preset schema and loading."""

from hkft.config.loading import (
    config_to_yaml,
    load_config,
    presets_dir,
    resolve_preset_path,
    validate_config,
)
from hkft.config.schema import HkftConfig

__all__ = ["HkftConfig", "config_to_yaml", "load_config", "presets_dir", "resolve_preset_path", "validate_config"]
