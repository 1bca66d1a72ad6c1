"""From the typed `dropout:` settings to the plan that the dropout code executes."""

from __future__ import annotations

from hkft.config.schema import DropoutConfig
from hkft.dropout import DropoutPlan, build_plan
from hkft.errors import ConfigError


def plan_from_config(dropout: DropoutConfig) -> DropoutPlan:
    overrides = {
        name: None if position is None else (position.pattern, position.rate)
        for name, position in dropout.positions.items()
    }
    try:
        return build_plan(
            dropout.method,
            dropout.rate,
            dropout.kl_weight,
            compensation=dropout.compensation,
            branches=dropout.branches,
            layers=dropout.layers,
            position_overrides=overrides,
            neftune_alpha=dropout.neftune_alpha,
        )
    except ValueError as err:
        raise ConfigError(f"dropout: {err}") from None
