"""Attention-position dropout through transformers' attention-function registry, or inside the
attention module's own computation (`EagerAttentionDrop`) where that registry is not used.

A family that computes attention through the registry, run with SDPA, runs with
``attn_implementation="hkft"``. An attention module that carries an `AttentionDrop` (set by the instrumenter) drops keys while training; every other call, and every
call in eval mode, goes straight to transformers' own SDPA function, so the uninstrumented path
and inference are exactly the stock model.

- DropKey (``attention_logits``) stays on SDPA. Column and span patterns drop whole keys: without
  a causal triangle they go into the boolean mask SDPA takes as [B, H, 1, K] (broadcast over
  queries), an encoder's padding mask included (it hides the same keys from every query); otherwise
  that mask would combine with the model's into [B, H, Q, K]
  (which SDPA converts to float and keeps for the backward pass: quadratic in the sequence), so
  they ride on the keys instead (`dropkey_by_key_bias`) and the model's own mask, or SDPA's
  causal flag, is passed through unchanged. On a CPU, a causal batch whose mask is the causal
  triangle alone or with padded keys takes a cheaper carrier: PyTorch's CPU flash kernel applies
  the causal triangle and an additive [B, H, 1, K] mask together (`dropkey_by_causal_kernel`). The
  element pattern needs a [B, H, Q, K] mask.
- DropAttention (``attention_weights``) needs the attention matrix: softmax, zero the dropped
  weights, divide each row by the sum of its surviving weights taken without gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from hkft.dropout.patterns import attention_drop_mask, causal_mask, guarded_keep_mask
from hkft.dropout.plan import Position, PositionDrop
from hkft.errors import ModelError

if TYPE_CHECKING:
    from hkft.dropout.controller import DropoutController

ATTENTION_NAME = "hkft"


@dataclass
class AttentionDrop:
    position: Position
    drop: PositionDrop
    controller: DropoutController
    # Whether the module's current call is a selected layer: always, except for shared blocks (ALBERT),
    # where it depends on which application of the block this is.
    selected: Callable[[], bool] = lambda: True

    def active(self, module: torch.nn.Module) -> bool:
        return module.training and self.drop.rate > 0 and self.selected()


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


def dropped_keys(site: AttentionDrop, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    batch, heads, queries, _ = query.shape
    keys = key.shape[2]
    extent = site.controller.token_extent(batch, keys) if site.drop.pattern == "span" else None
    return attention_drop_mask(
        site.controller.sampler, site.drop.pattern, site.drop.rate, batch, heads, queries, keys, query.device, extent
    )


def keep_mask(
    site: AttentionDrop, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """The boolean mask (True = attend) after dropping keys, guarded against empty rows."""
    causal = _causal(module, query)
    per_key = site.drop.pattern != "element" and not causal and attention_mask is not None
    visible = site.controller.key_only_mask(attention_mask) if per_key else as_visibility(attention_mask)
    if visible is None and causal:
        visible = causal_mask(query.shape[2], key.shape[2], query.device)
    keep_own_position = causal and site.drop.pattern == "element"
    return guarded_keep_mask(visible, dropped_keys(site, query, key), keep_own_position)


def rides_on_keys(site: AttentionDrop, module: torch.nn.Module, query: torch.Tensor, attention_mask: torch.Tensor | None) -> bool:
    """Whole-key DropKey whose mask would otherwise become [B, H, Q, K]: under a causal triangle, or
    a mask that differs between queries. An encoder's padding mask is the same for every query and
    combines with the dropped keys into [B, H, 1, K] (`keep_mask`)."""
    per_key = site.position == "attention_logits" and site.drop.pattern != "element"
    if not per_key:
        return False
    return _causal(module, query) or (attention_mask is not None and site.controller.key_only_mask(attention_mask) is None)


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
    if rides_on_keys(site, module, query, attention_mask):
        dropped = dropped_keys(site, query, key)
        visible_keys = causal_kernel_keys(site, module, query, key, attention_mask, dropout)
        if visible_keys is not None:
            return dropkey_by_causal_kernel(module, query, key, value, visible_keys, dropped, scaling=scaling)
        return dropkey_by_key_bias(module, query, key, value, attention_mask, dropped, dropout=dropout, scaling=scaling)
    keep = keep_mask(site, module, query, key, attention_mask)
    if site.position == "attention_logits":
        kwargs.pop("is_causal", None)  # causality is inside the mask now
        return sdpa_attention_forward(
            module, query, key, value, keep, dropout=dropout, scaling=scaling, is_causal=False, **kwargs
        )
    return drop_attention_forward(module, query, key, value, attention_mask, keep, dropout=dropout, scaling=scaling)


# Added to a dropped key's logit: exp(-1000) is 0 in float32 (below e^-104), and the two factors that
# carry it (about 90 each for a head size of 64) are finite in fp16 and bf16. A larger shift would
# cost precision in the rare rows whose keys are all dropped (float32 logits near -shift).
DROPPED_LOGIT_SHIFT = 1.0e3
# Added to a padded key's logit in `dropkey_by_causal_kernel`: far enough below a dropped key that a
# row whose real keys are all dropped falls back to them, not to padding; finite, so that a padded
# query that sees only padded keys (left padding) gets a finite row, which nothing real reads.
HIDDEN_LOGIT_SHIFT = 1.0e4
# Extra head dimensions that carry the key bias; 8 keeps the head size a multiple of 8 for fused kernels.
BIAS_DIMS = 8


def _causal(module: torch.nn.Module, query: torch.Tensor) -> bool:
    return bool(getattr(module, "is_causal", False)) and query.shape[2] > 1


# PyTorch's CPU flash-attention kernel, which takes the causal flag and an additive mask together;
# the public SDPA function refuses both at once. It has its own backward.
CPU_CAUSAL_KERNEL = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
CPU_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def kernel_dtype(query: torch.Tensor) -> torch.dtype:
    """The dtype SDPA would compute in: autocast's on a CPU under autocast (which casts SDPA's
    inputs, but not the kernel's when called directly; llama's rotary hands it float32 queries and
    keys beside bf16 values), else the query's."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else query.dtype


def causal_kernel_keys(site: AttentionDrop, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float) -> torch.Tensor | None:
    """The keys each query may see below the causal triangle ([B, 1, 1, K], True = attend) when
    `dropkey_by_causal_kernel` can carry the dropped keys: a causal CPU batch with no mask, or the
    causal triangle over padded keys (`causal_key_mask`), a query for every key, no attention
    dropout, a dtype the kernel takes. None otherwise (a GPU, packed rows): the key bias carries them."""
    if (CPU_CAUSAL_KERNEL is None or query.device.type != "cpu" or kernel_dtype(query) not in CPU_KERNEL_DTYPES
            or not _causal(module, query) or query.shape[2] != key.shape[2] or (dropout > 0 and module.training)):
        return None
    if attention_mask is None:
        return torch.ones(query.shape[0], 1, 1, key.shape[2], dtype=torch.bool, device=query.device)
    return site.controller.causal_key_mask(attention_mask)


def dropkey_by_causal_kernel(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    visible_keys: torch.Tensor,
    dropped: torch.Tensor,
    scaling: float | None = None,
) -> tuple[torch.Tensor, None]:
    """Column/span DropKey of a causal CPU batch as an additive [B, H, 1, K] mask beside the causal
    flag, in one call of the CPU flash kernel (``visible_keys``: see `causal_kernel_keys`).

    A dropped key's logit is shifted by ``-DROPPED_LOGIT_SHIFT``, the same numbers as
    `dropkey_by_key_bias` (a row whose visible keys are all dropped falls back to its undropped
    row), without copying queries, keys and values into the key bias's extra head dimensions: the
    kernel adds the mask to each block of logits it computes anyway. A padded key's logit is shifted
    by ``-HIDDEN_LOGIT_SHIFT``: every real query's row is the model's; a padded query's row may
    differ from the model's, and no real token reads it (the causal triangle and the padding hide
    it from them, and its labels are ignored).
    """
    groups = getattr(module, "num_key_value_groups", 1)
    dtype = kernel_dtype(query)
    key, value = repeat_kv(key, groups).to(dtype), repeat_kv(value, groups).to(dtype)  # the mask differs per query head
    query = query.to(dtype)
    batch, heads, _, dim = query.shape
    shift = (dropped.reshape(batch, heads, 1, key.shape[2]).to(dtype) * -DROPPED_LOGIT_SHIFT
             - (~visible_keys).to(dtype) * HIDDEN_LOGIT_SHIFT)
    scale = scaling if scaling is not None else dim**-0.5
    output, _ = CPU_CAUSAL_KERNEL(query, key, value, 0.0, True, attn_mask=shift, scale=scale)
    return output.transpose(1, 2).contiguous(), None


def dropkey_by_key_bias(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropped: torch.Tensor,
    dropout: float = 0.0,
    scaling: float | None = None,
) -> tuple[torch.Tensor, None]:
    """Column/span DropKey as a bias on the keys, so that no [B, H, Q, K] mask exists.

    Each head gets extra dimensions: the query carries a constant ``a`` and a dropped key carries
    ``-DROPPED_LOGIT_SHIFT / (scale * a)``, so the logit of query i and key j becomes
    ``s_ij - DROPPED_LOGIT_SHIFT * dropped_j`` (kept keys exactly ``s_ij``) and softmax gives dropped
    keys weight 0. The model's mask, or SDPA's causal flag, applies unchanged and keeps the fused
    kernels. A row whose visible keys are all dropped has all of them shifted by the same amount,
    and softmax is shift-invariant: it falls back to its undropped row (token 0 of a causal model,
    which sees only itself, or a padded query), never to an empty row or NaN. Values are padded
    with zeros to the same head size and the padding is cut from the output.
    """
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)  # the bias differs per query head
    batch, heads, queries, dim = query.shape
    keys = key.shape[2]
    scale = scaling if scaling is not None else dim**-0.5
    carrier = (DROPPED_LOGIT_SHIFT / scale) ** 0.5  # equal magnitudes on both sides: finite in fp16
    bias = dropped.reshape(batch, heads, keys, 1).to(key.dtype) * -carrier
    query = torch.cat([query, query.new_full((batch, heads, queries, 1), carrier),
                       query.new_zeros(batch, heads, queries, BIAS_DIMS - 1)], dim=-1)
    key = torch.cat([key, bias, key.new_zeros(batch, heads, keys, BIAS_DIMS - 1)], dim=-1)
    value = torch.nn.functional.pad(value, (0, BIAS_DIMS))
    output = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout if module.training else 0.0, scale=scale,
        is_causal=attention_mask is None and _causal(module, query),
    )
    return output[..., :dim].transpose(1, 2).contiguous(), None


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
    weights = renormalised(torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype), keep)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


def renormalised(weights: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """DropAttention's weights: the surviving ones divided by their row sum, taken without gradient."""
    surviving = weights * keep
    return surviving / surviving.sum(dim=-1, keepdim=True).detach().clamp_min(torch.finfo(weights.dtype).tiny)


SOFTMAX_FUNCTIONS = (torch.nn.functional.softmax, torch.softmax, torch.Tensor.softmax)


class EagerAttentionDrop(TorchFunctionMode):
    """Attention-position dropout inside an attention module's own computation, for families whose
    attention does not go through transformers' attention functions (DeBERTa, MPNet, Bloom, Falcon)
    and for models run with ``attn_implementation: eager`` (Gemma 2's logit soft-capping exists only
    there).

    Active only while the module's forward runs in training. The one softmax over the module's
    [B, H, Q, K] logits is intercepted, so the masks apply to the logits exactly as the family has
    computed them, relative-position biases, ALiBi and soft-capping included: DropKey sets dropped
    logits to the dtype's minimum, DropAttention renormalises the weights with a stop-gradient row
    sum. A family that calls SDPA instead (Falcon, StableLM) has that call intercepted: DropKey goes
    into its mask, DropAttention computes the weights. Masked logits (the dtype's minimum, or -inf)
    are what the model hides; the guard of `guarded_keep_mask` keeps every row non-empty.
    """

    def __init__(self, site: AttentionDrop, causal: bool):
        super().__init__()
        self.site, self.causal, self.calls = site, causal, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SOFTMAX_FUNCTIONS and _over_attention_keys(args, kwargs):
            self.calls += 1
            return self._softmax(func, args, kwargs)
        if func is torch.nn.functional.scaled_dot_product_attention:
            self.calls += 1
            return self._sdpa(*args, **kwargs)
        return func(*args, **kwargs)

    def _keep(self, query_shape: tuple[int, ...], keys: int, visible: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        batch, heads, queries = query_shape[:3]
        extent = self.site.controller.token_extent(batch, keys) if self.site.drop.pattern == "span" else None
        dropped = attention_drop_mask(self.site.controller.sampler, self.site.drop.pattern, self.site.drop.rate,
                                      batch, heads, queries, keys, device, extent)
        keep_own = self.causal and self.site.drop.pattern == "element" and visible is not None
        return guarded_keep_mask(visible, dropped, keep_own)

    def _softmax(self, func, args: tuple, kwargs: dict) -> torch.Tensor:
        logits = args[0]
        hidden = torch.finfo(logits.dtype).min
        visible = logits > hidden / 2
        # A row the model hides entirely (DeBERTa's padded queries) stays as the model computes it.
        keep = self._keep(logits.shape, logits.shape[-1], visible, logits.device) | ~visible.any(-1, keepdim=True)
        if self.site.position == "attention_logits":
            return func(logits.masked_fill(~keep, hidden), *args[1:], **kwargs)
        return renormalised(func(*args, **kwargs), keep)

    def _sdpa(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        causal = is_causal and query.shape[2] > 1
        visible = causal_mask(query.shape[2], key.shape[2], query.device) if causal else _visibility(attn_mask)
        keep = self._keep(query.shape, key.shape[2], visible, query.device)
        hidden = torch.finfo(query.dtype).min
        if self.site.position == "attention_logits":
            mask = keep if attn_mask is None or attn_mask.dtype == torch.bool else attn_mask.masked_fill(~keep, hidden)
            return torch.nn.functional.scaled_dot_product_attention(
                query, key, value, attn_mask=mask, dropout_p=dropout_p, scale=scale, enable_gqa=enable_gqa
            )
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        scores = torch.matmul(query, key.transpose(2, 3)) * (scale if scale is not None else query.shape[-1] ** -0.5)
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            scores = scores + attn_mask
        elif visible is not None:
            scores = scores.masked_fill(~visible, hidden)
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        weights = torch.nn.functional.dropout(renormalised(weights, keep), p=dropout_p)
        return torch.matmul(weights, value)


def _over_attention_keys(args: tuple, kwargs: dict) -> bool:
    """A softmax over the last axis of a [B, H, Q, K] tensor."""
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    return isinstance(args[0], torch.Tensor) and args[0].dim() == 4 and dim in (-1, 3)


def _visibility(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """An SDPA mask as boolean True = attend: boolean as is, additive (ALiBi included) where not masked."""
    if attention_mask is None or attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask > torch.finfo(attention_mask.dtype).min / 2


def intercept_attention(module: torch.nn.Module, site: AttentionDrop, causal: bool) -> list[RemovableHandle]:
    """Hooks that run ``module``'s forward under `EagerAttentionDrop` while ``site`` is active, and
    refuse a forward in which no attention softmax (or more than one) could be found."""
    modes: list[EagerAttentionDrop] = []

    def enter(module: torch.nn.Module, args: tuple) -> None:
        if site.active(module):
            modes.append(EagerAttentionDrop(site, causal))
            modes[-1].__enter__()

    def leave(module: torch.nn.Module, args: tuple, output: object) -> None:
        if not modes:
            return
        mode = modes.pop()
        mode.__exit__(None, None, None)
        if output is not None and mode.calls != 1:
            raise ModelError(
                f"cannot place {site.position} dropout in {type(module).__name__}: its forward computed "
                f"{mode.calls} attention softmaxes hkft can see, where it needs exactly one",
                "drop hidden states only (dropout.positions), or use model.attn_implementation: eager",
            )

    return [module.register_forward_pre_hook(enter), module.register_forward_hook(leave, always_call=True)]
