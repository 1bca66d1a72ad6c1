"""The named methods, one registered entry each: the one list that `dropout.method` in a preset,
`hkft inspect` and `hkft compare` read.

A named method is a point of the framework's three axes (`plan.py`): the positions it drops, each
with its pattern at ``dropout.rate``, and its compensation; or the model's own dropout (`dropout`),
or NEFTune's embedding noise (`neftune`). Adding a method is one `register_method` call, as adding a
tuner to peft is one `register_peft_method` call; the order of registration is the order users see.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from hkft.dropout.plan import (
    NEFTUNE_ALPHA,
    Branches,
    Compensation,
    DropoutPlan,
    LayerSelection,
    Pattern,
    Position,
    PositionDrop,
)


@dataclass(frozen=True)
class DropoutMethod:
    """``positions``: the pattern each dropping position uses (every one at the method's rate);
    ``model_dropout``: the model's own dropout modules at the rate instead; ``neftune``: NEFTune's
    noise at ``dropout.neftune_alpha``."""

    name: str
    positions: Mapping[Position, Pattern] = field(default_factory=dict)
    compensation: Compensation = "rescale"
    model_dropout: bool = False
    neftune: bool = False

    def plan(self, rate: float, kl_weight: float, neftune_alpha: float = NEFTUNE_ALPHA) -> DropoutPlan:
        """The method at ``rate``; the KL weight counts only for a consistency-loss compensation."""
        return DropoutPlan(
            positions={name: PositionDrop(pattern, rate) for name, pattern in self.positions.items()},
            compensation=self.compensation,
            kl_weight=kl_weight if self.compensation in ("kl", "js") else 0.0,
            model_dropout=rate if self.model_dropout else None,
            neftune_alpha=neftune_alpha if self.neftune else 0.0,
        )


# Every registered method by name, in the order of registration.
METHODS: dict[str, DropoutMethod] = {}


def register_method(method: DropoutMethod) -> DropoutMethod:
    """Add ``method`` under its name; its plan is built once here, so a misspelt position or pattern
    fails when the method is registered, not when a user picks it."""
    if method.name in METHODS:
        raise ValueError(f"dropout method {method.name!r} is already registered")
    method.plan(rate=0.0, kl_weight=1.0)
    METHODS[method.name] = method
    return method


def dropout_method(name: str) -> DropoutMethod:
    """The registered method called ``name``."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown dropout method {name!r}; choose one of {', '.join(METHODS)}") from None


# The methods compared in the paper (Wang et al. 2024, the method notes' table of named methods),
# each a point of the three axes, and NEFTune beside them.
_COLUMN_LOGITS: dict[Position, Pattern] = {"attention_logits": "column"}
_ELEMENT_HIDDEN: dict[Position, Pattern] = {"hidden": "element"}
register_method(DropoutMethod("none"))
register_method(DropoutMethod("dropout", model_dropout=True))
register_method(DropoutMethod("dropkey", _COLUMN_LOGITS))
register_method(DropoutMethod("dropattention", {"attention_weights": "column"}))
register_method(DropoutMethod("hiddencut", _ELEMENT_HIDDEN))
register_method(DropoutMethod("hiddenkey-", {**_COLUMN_LOGITS, **_ELEMENT_HIDDEN}))
register_method(DropoutMethod("hiddenkey", {**_COLUMN_LOGITS, **_ELEMENT_HIDDEN}, compensation="kl"))
register_method(DropoutMethod("neftune", neftune=True))


def named_method(name: str, rate: float, kl_weight: float = 1.0, neftune_alpha: float = NEFTUNE_ALPHA) -> DropoutPlan:
    return dropout_method(name).plan(rate, kl_weight, neftune_alpha)


def build_plan(
    method: str,
    rate: float,
    kl_weight: float,
    *,
    compensation: Compensation | None = None,
    branches: Branches = "one",
    layers: LayerSelection = "auto",
    position_overrides: dict[str, tuple[Pattern, float | None] | None] | None = None,
    neftune_alpha: float = NEFTUNE_ALPHA,
) -> DropoutPlan:
    """A named method, then position-by-position overrides (None switches a position off)."""
    plan = named_method(method, rate, kl_weight, neftune_alpha)
    positions = dict(plan.positions)
    for name, override in (position_overrides or {}).items():
        if override is None:
            positions.pop(name, None)  # type: ignore[misc]
        else:
            pattern, own_rate = override
            positions[name] = PositionDrop(pattern, rate if own_rate is None else own_rate)  # type: ignore[index]
    chosen = compensation or plan.compensation
    return replace(
        plan,
        positions=positions,
        compensation=chosen,
        kl_weight=kl_weight if chosen in ("kl", "js") else 0.0,
        branches=branches,
        layers=tuple(layers) if isinstance(layers, list) else layers,
    )
