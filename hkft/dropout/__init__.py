"""The unified dropout framework of Wang et al. 2024 (position x pattern x compensation) and HiddenKey.

No I/O and no CLI in here: a plan is built from values, applied to a model, and the consistency
loss is a pure function of two forward passes. One file per axis: `positions.py` (with
`attention.py`), `patterns.py`, `compensation.py`; the vocabulary and the plan in `plan.py`, the
named methods in `methods.py`.

The names below are imported on first use: the preset schema reads the vocabulary (`plan.py`,
`methods.py`, no torch in either) on every command, the rest of the package needs torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hkft.dropout.compensation import kl_consistency, squared_consistency
    from hkft.dropout.controller import DropoutController, instrument
    from hkft.dropout.methods import (
        METHODS,
        DropoutMethod,
        build_plan,
        dropout_method,
        named_method,
        register_method,
    )
    from hkft.dropout.plan import PATTERNS, POSITIONS, DropoutPlan, PositionDrop

_HOMES = {
    "kl_consistency": "compensation",
    "squared_consistency": "compensation",
    "DropoutController": "controller",
    "instrument": "controller",
    "METHODS": "methods",
    "DropoutMethod": "methods",
    "build_plan": "methods",
    "dropout_method": "methods",
    "named_method": "methods",
    "register_method": "methods",
    "PATTERNS": "plan",
    "POSITIONS": "plan",
    "DropoutPlan": "plan",
    "PositionDrop": "plan",
}

__all__ = [
    "METHODS",
    "PATTERNS",
    "POSITIONS",
    "DropoutController",
    "DropoutMethod",
    "DropoutPlan",
    "PositionDrop",
    "build_plan",
    "kl_consistency",
    "dropout_method",
    "instrument",
    "named_method",
    "register_method",
    "squared_consistency",
]


def __getattr__(name: str) -> object:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_HOMES[name]}"), name)
