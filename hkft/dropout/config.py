"""From the typed `dropout:` settings to the plan that the dropout code executes.

The preset schema reads its vocabulary from this package; `DropoutConfig` is named here for typing
only, so the import arrow runs one way (hkft.config to hkft.dropout).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hkft.dropout.controller import DropoutController, instrument
from hkft.dropout.methods import build_plan
from hkft.dropout.plan import DropoutPlan
from hkft.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from hkft.config.schema import DropoutConfig


def plan_from_config(dropout: DropoutConfig) -> DropoutPlan:
    """The plan of a validated ``dropout:`` section. The section has already passed the plan's own
    checks (the schema calls them, see `hkft.dropout.plan`), all but the one only a whole plan asks:
    attention logits and attention weights together, refused here under ``dropout:``."""
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


def apply_dropout(model: nn.Module, dropout: DropoutConfig, *, seed: int, rank: int = 0, packed: bool = False) -> DropoutController:
    """The plan of a validated ``dropout:`` section, applied to ``model``. What only the model can
    refuse (a position it does not have, a pattern its head cannot take) is one ConfigError under ``dropout:``."""
    try:
        return instrument(model, plan_from_config(dropout), seed=seed, rank=rank, packed=packed)
    except ValueError as err:
        raise ConfigError(f"dropout: {err}") from None
