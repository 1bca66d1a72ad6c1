"""The positions outside attention: hooks that drop entries, feature columns or token spans of the
hidden (FFN output), input (token embeddings) and output (what feeds the head) activations, and
NEFTune's embedding noise. The attention positions (logits: DropKey; weights: DropAttention) live in
the attention function, `attention.py`; `controller.py` attaches both to a model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from hkft.dropout.patterns import (
    apply_feature_mask,
    embedding_noise,
    feature_keep_mask,
    feature_scale,
)
from hkft.dropout.plan import PositionDrop

if TYPE_CHECKING:
    from hkft.dropout.controller import DropoutController


def always() -> bool:
    return True


@dataclass
class FeatureDrop:
    """Drops entries, feature columns or token spans of an activation (hidden, input, output)."""

    drop: PositionDrop
    controller: DropoutController
    rescale: bool
    selected: Callable[[], bool] = always  # see `AttentionDrop.selected`

    def apply(self, module: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        if not (module.training and self.drop.rate > 0 and self.selected()):
            return hidden
        spans = self.drop.pattern == "span" and hidden.dim() == 3
        extent = self.controller.token_extent(hidden.shape[0], hidden.shape[1]) if spans else None
        keep = feature_keep_mask(self.controller.sampler, self.drop.pattern, self.drop.rate, hidden, extent)
        return apply_feature_mask(hidden, keep, feature_scale(self.drop.pattern, self.drop.rate, self.rescale))

    def output_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return self.apply(module, output)

    def input_hook(self, module: nn.Module, args: tuple) -> tuple:
        return (self.apply(module, args[0]), *args[1:])


@dataclass
class EmbeddingNoise:
    """NEFTune: uniform noise added to the input embeddings while training (see `embedding_noise`)."""

    alpha: float
    controller: DropoutController

    def output_hook(self, module: nn.Module, args: tuple, embeddings: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return embeddings
        extent = self.controller.token_extent(embeddings.shape[0], embeddings.shape[1])
        return embeddings + embedding_noise(self.controller.sampler, embeddings, self.alpha, extent)
