"""The unified dropout framework of Wang et al. 2024 (position x pattern x compensation) and HiddenKey.

No I/O and no CLI in here: a plan is built from values, applied to a model, and the consistency
loss is a pure function of two forward passes. One file per axis: `positions.py` (with
`attention.py`), `patterns.py`, `compensation.py`.
"""

from hkft.dropout.compensation import kl_consistency, squared_consistency
from hkft.dropout.controller import DropoutController, instrument
from hkft.dropout.plan import (
    PATTERNS,
    POSITIONS,
    DropoutPlan,
    PositionDrop,
    build_plan,
    named_method,
)

__all__ = [
    "PATTERNS",
    "POSITIONS",
    "DropoutController",
    "DropoutPlan",
    "PositionDrop",
    "build_plan",
    "kl_consistency",
    "instrument",
    "named_method",
    "squared_consistency",
]
