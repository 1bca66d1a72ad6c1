"""Attention-position dropout through transformers' attention-function registry.

The model runs with ``attn_implementation="hkft"``. An attention module that carries an
`AttentionDrop` (set by the instrumenter) drops keys while training; every other call, and every
call in eval mode, goes straight to transformers' own SDPA function, so the uninstrumented path
and inference are exactly the stock model.

- DropKey (``attention_logits``) stays on SDPA: dropped keys are removed from the boolean mask
  that SDPA takes, shaped [B, H, 1, K] for column and span patterns (broadcast over queries).
- DropAttention (``attention_weights``) needs the attention matrix: softmax, zero the dropped
  weights, divide each row by the sum of its surviving weights taken without gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from hkft.dropout.masks import attention_drop_mask, causal_mask, guarded_keep_mask
from hkft.dropout.plan import Position, PositionDrop

if TYPE_CHECKING:
    from hkft.dropout.controller import DropoutController

ATTENTION_NAME = "hkft"


@dataclass
class AttentionDrop:
    position: Position
    drop: PositionDrop
    controller: DropoutController

    def active(self, module: torch.nn.Module) -> bool:
        return module.training and self.controller.enabled and self.drop.rate > 0


def register_attention() -> None:
    """Register the attention function and, under the same name, SDPA's mask builder.

    Without the mask builder transformers hands a custom attention function no mask at all, and
    padded keys would silently be attended to.
    """
    AttentionInterface.register(ATTENTION_NAME, hkft_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def as_visibility(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """transformers' mask as boolean True = attend (float masks are additive: 0 = attend)."""
    if attention_mask is None or attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask == 0


def keep_mask(
    site: AttentionDrop, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """The boolean mask (True = attend) after dropping keys, guarded against empty rows."""
    batch, heads, queries, _ = query.shape
    keys = key.shape[2]
    causal = bool(getattr(module, "is_causal", False)) and queries > 1
    visible = as_visibility(attention_mask)
    if visible is None and causal:
        visible = causal_mask(queries, keys, query.device)
    dropped = attention_drop_mask(
        site.controller.sampler, site.drop.pattern, site.drop.rate, batch, heads, queries, keys, query.device
    )
    return guarded_keep_mask(visible, dropped, causal)


def hkft_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    site: AttentionDrop | None = getattr(module, "hkft_attention_drop", None)
    if site is None or not site.active(module):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    keep = keep_mask(site, module, query, key, attention_mask)
    if site.position == "attention_logits":
        kwargs.pop("is_causal", None)  # causality is inside the mask now
        return sdpa_attention_forward(
            module, query, key, value, keep, dropout=dropout, scaling=scaling, is_causal=False, **kwargs
        )
    return drop_attention_forward(module, query, key, value, attention_mask, keep, dropout=dropout, scaling=scaling)


def drop_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    keep: torch.Tensor,
    dropout: float = 0.0,
    scaling: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DropAttention: normalised rescaling of the attention weights with a stop-gradient row sum.

    Same forward values as DropKey with the same mask; the gradient differs because the
    normaliser is a constant to autograd.
    """
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    visible = as_visibility(attention_mask)
    if visible is None and bool(getattr(module, "is_causal", False)) and query.shape[2] > 1:
        visible = causal_mask(query.shape[2], key.shape[2], query.device)
    if visible is not None:
        scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    surviving = weights * keep
    row_sum = surviving.sum(dim=-1, keepdim=True).detach().clamp_min(torch.finfo(weights.dtype).tiny)
    weights = surviving / row_sum
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights
