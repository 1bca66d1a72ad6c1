"""The three axes of the framework (position x pattern x compensation): the vocabulary every other
part of hkft reads (the preset schema's types among them) and the `DropoutPlan` value.

A `DropoutPlan` is a plain value: which positions drop, with which pattern and rate, how the
train/inference gap is compensated, and in which layers. The named methods are presets of it, one
registered entry each (`methods.py`).

Who checks what: every rule about the dropout settings is owned here (or by the registry, for method
names), not restated by the preset schema. A plan is also built without a preset (`build_plan`,
`named_method`, tests, studies), so it must refuse what it cannot execute; the schema's types are
this module's Literals and its validators call the checks below, so a preset's mistake is still
reported when the preset is loaded, under its key (a plan built from it passes the same checks
again: one rule, asked twice, in the same words). Two rules only a plan asks: attention logits with
attention weights (`plan_from_config` reports it under ``dropout:``) and the layer range (it needs
the model's layer count: `instrument`). Which pattern a position takes depends on the head
(`patterns_for`): the schema asks it from the task, before any model exists; `instrument` asks it
from the model it is given.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal, get_args

Position = Literal["attention_logits", "attention_weights", "hidden", "input", "output"]
Pattern = Literal["element", "column", "span"]
Compensation = Literal["rescale", "kl", "js"]
Branches = Literal["one", "both"]
LayerName = Literal["auto", "all", "latter-half"]
LayerSelection = LayerName | tuple[int, ...]

POSITIONS: tuple[Position, ...] = get_args(Position)
PATTERNS: tuple[Pattern, ...] = get_args(Pattern)
# NEFTune's noise scale alpha, as in its paper (Jain et al. 2024) and TRL.
NEFTUNE_ALPHA = 5.0


def check_position_names(names: Iterable[str]) -> None:
    for name in names:
        if name not in POSITIONS:
            raise ValueError(f"unknown dropout position {name!r}; choose from {', '.join(POSITIONS)}")


def patterns_for(position: str, head_reads_tokens: bool) -> tuple[Pattern, ...]:
    """The patterns ``position`` takes. A token span of the head's input (`output`) exists only where
    the head reads every token (a language model's); a sequence head reads one vector per example
    (pooled, first or last token), so it has no tokens to span."""
    if position == "output" and not head_reads_tokens:
        return tuple(pattern for pattern in PATTERNS if pattern != "span")
    return PATTERNS


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
    branches: Branches = "one"
    layers: LayerSelection = "auto"
    model_dropout: float | None = None
    neftune_alpha: float = 0.0

    def __post_init__(self) -> None:
        if self.neftune_alpha < 0:
            raise ValueError(f"NEFTune alpha must be >= 0, got {self.neftune_alpha}")
        check_position_names(self.positions)
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
