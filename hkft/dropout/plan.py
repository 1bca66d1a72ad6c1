"""The three axes of the framework (position x pattern x compensation) and the named methods.

A `DropoutPlan` is a plain value: which positions drop, with which pattern and rate, how the
train/inference gap is compensated, and in which layers. Named methods are presets of it
(Wang et al. 2024, Table "named methods" in the method notes).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

Position = Literal["attention_logits", "attention_weights", "hidden", "input", "output"]
Pattern = Literal["element", "column", "span"]
Compensation = Literal["rescale", "kl", "js"]
LayerSelection = Literal["auto", "all", "latter-half"] | tuple[int, ...]

POSITIONS: tuple[Position, ...] = ("attention_logits", "attention_weights", "hidden", "input", "output")
PATTERNS: tuple[Pattern, ...] = ("element", "column", "span")
LAYERED_POSITIONS: frozenset[Position] = frozenset({"attention_logits", "attention_weights", "hidden"})
# NEFTune's noise scale alpha, as in its paper (Jain et al. 2024) and TRL.
NEFTUNE_ALPHA = 5.0


@dataclass(frozen=True)
class PositionDrop:
    pattern: Pattern
    rate: float

    def __post_init__(self) -> None:
        if self.pattern not in PATTERNS:
            raise ValueError(f"unknown pattern {self.pattern!r}; choose from {', '.join(PATTERNS)}")
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"dropout rate must be in [0, 1), got {self.rate}")


@dataclass(frozen=True)
class DropoutPlan:
    """What to drop where. ``model_dropout`` keeps the model's own dropout modules (method `dropout`);
    ``neftune_alpha`` > 0 adds NEFTune's uniform noise to the input embeddings (method `neftune`), an
    `input`-position perturbation that adds noise where the positions' masks remove entries."""

    positions: dict[Position, PositionDrop] = field(default_factory=dict)
    compensation: Compensation = "rescale"
    kl_weight: float = 0.0
    branches: Literal["one", "both"] = "one"
    layers: LayerSelection = "auto"
    model_dropout: float | None = None
    neftune_alpha: float = 0.0

    def __post_init__(self) -> None:
        if self.neftune_alpha < 0:
            raise ValueError(f"NEFTune alpha must be >= 0, got {self.neftune_alpha}")
        unknown = set(self.positions) - set(POSITIONS)
        if unknown:
            raise ValueError(f"unknown dropout position(s) {sorted(unknown)}; choose from {', '.join(POSITIONS)}")
        if "attention_logits" in self.positions and "attention_weights" in self.positions:
            raise ValueError("drop attention logits or attention weights, not both (they act on the same matrix)")

    @property
    def active_positions(self) -> dict[Position, PositionDrop]:
        return {name: drop for name, drop in self.positions.items() if drop.rate > 0}

    @property
    def uses_consistency_loss(self) -> bool:
        return self.compensation in ("kl", "js") and self.kl_weight > 0

    def layer_indices(self, num_layers: int, is_decoder: bool) -> tuple[int, ...]:
        """The paper drops in every encoder layer but only the latter half of a decoder's layers."""
        selection = self.layers
        if selection == "auto":
            selection = "latter-half" if is_decoder else "all"
        if selection == "all":
            return tuple(range(num_layers))
        if selection == "latter-half":
            return tuple(range(num_layers // 2, num_layers))
        bad = [i for i in selection if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"dropout layers {bad} out of range: the model has layers 0..{num_layers - 1}")
        return tuple(sorted(set(selection)))


def named_method(name: str, rate: float, kl_weight: float = 1.0, neftune_alpha: float = NEFTUNE_ALPHA) -> DropoutPlan:
    """The methods compared in the paper, each a point of the three axes, and NEFTune beside them."""
    column_logits = {"attention_logits": PositionDrop("column", rate)}
    element_hidden = {"hidden": PositionDrop("element", rate)}
    methods = {
        "none": DropoutPlan(),
        "dropout": DropoutPlan(model_dropout=rate),
        "dropkey": DropoutPlan(positions=column_logits),
        "dropattention": DropoutPlan(positions={"attention_weights": PositionDrop("column", rate)}),
        "hiddencut": DropoutPlan(positions=element_hidden),
        "hiddenkey-": DropoutPlan(positions={**column_logits, **element_hidden}),
        "hiddenkey": DropoutPlan(positions={**column_logits, **element_hidden}, compensation="kl", kl_weight=kl_weight),
        "neftune": DropoutPlan(neftune_alpha=neftune_alpha),
    }
    if name not in methods:
        raise ValueError(f"unknown dropout method {name!r}; choose one of {', '.join(methods)}")
    return methods[name]


def build_plan(
    method: str,
    rate: float,
    kl_weight: float,
    *,
    compensation: Compensation | None = None,
    branches: Literal["one", "both"] = "one",
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
