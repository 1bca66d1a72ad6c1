"""Seeded mask sampling for the three patterns, and the guard that keeps attention rows non-empty.

Masks come from a dedicated `torch.Generator` per device, seeded from (seed, rank): runs are
reproducible, ranks draw different masks, and the generator state is saved with checkpoints, so a
resumed run draws exactly the masks the uninterrupted run would have drawn.
"""

from __future__ import annotations

import math

import torch

from hkft.dropout.plan import Pattern

# (first position, number of tokens) of the examples in each row: [B] for one example per row (its
# real tokens, see `token_extent`), [B, S] for packed rows of up to S examples (see `packed_extent`).
Extent = tuple[torch.Tensor, torch.Tensor]
# Large odd multiplier so that (seed, rank) pairs map to well-separated generator seeds.
_RANK_STRIDE = 1_000_003
# Bernoulli masks compare 16-bit random integers with a threshold, four from each 64-bit draw. On a
# CPU the generator, not the comparison, is the cost of a mask: this is 2.8x faster than comparing
# float draws (a MiniLM hidden mask: 2.3 ms instead of 6.3 ms; masks were 7% of a KL step). The
# rate is quantised to 1/65536: 0.1 becomes 0.100006.
_LEVELS = 1 << 16


class MaskSampler:
    """Uniform noise for dropout masks from a generator that never touches torch's global RNG."""

    def __init__(self, seed: int, rank: int = 0):
        self.seed = seed + rank * _RANK_STRIDE
        self._generators: dict[str, torch.Generator] = {}

    def generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            generator = torch.Generator(device=device)
            generator.manual_seed(self.seed)
            self._generators[key] = generator
        return self._generators[key]

    def uniform(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        return torch.rand(shape, generator=self.generator(device), device=device)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {device: generator.get_state() for device, generator in self._generators.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Devices absent from ``state`` had drawn nothing yet: they restart from the seed."""
        self._generators.clear()
        for device, generator_state in state.items():
            self.generator(torch.device(device)).set_state(generator_state)


def bernoulli(sampler: MaskSampler, shape: tuple[int, ...], rate: float, device: torch.device) -> torch.Tensor:
    """True where dropped, each entry independently with probability ``rate`` (to 1/65536)."""
    threshold = round(rate * _LEVELS)
    if threshold <= 0 or threshold >= _LEVELS:
        return torch.full(shape, threshold > 0, dtype=torch.bool, device=device)
    count = math.prod(shape)
    words = torch.empty((count + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(1 << 63), None, generator=sampler.generator(device))  # all 64 bits random
    return words.view(torch.int16)[:count].view(shape) < threshold - _LEVELS // 2


def span(
    sampler: MaskSampler, rows: tuple[int, ...], length: int, rate: float, device: torch.device, extent: Extent | None = None
) -> torch.Tensor:
    """True on one contiguous run of round(rate * n) positions per row and example, start uniform,
    where n is the example's length: its real tokens when ``extent`` is given, else all ``length``.

    Returns shape ``rows + (length,)``. A padded example's span lies inside its own tokens and
    scales with its own length, so every example loses the same share of its tokens; in a packed
    row each example draws its own span inside its own tokens.
    """
    # float64 throughout: round(p * n) as Python rounds it (float32 moves some .5 cases)
    first, count = (bound.view((bound.shape[0],) + (1,) * (len(rows) - 1) + bound.shape[-1:])
                    for bound in example_bounds(extent, length, device))
    span_length = torch.round(rate * count)
    starts = first + (sampler.uniform(rows + first.shape[-1:], device) * (count - span_length + 1)).floor()
    starts, span_length = (at_positions(values, extent, length) for values in (starts, span_length.expand_as(starts)))
    positions = torch.arange(length, device=device)
    return (positions >= starts) & (positions < starts + span_length)


def example_bounds(extent: Extent | None, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(first position, number of tokens) of each example, float64 [B or 1, S]: one example of
    ``length`` tokens per row without ``extent``."""
    if extent is None:
        return (torch.zeros((1, 1), dtype=torch.float64, device=device),
                torch.full((1, 1), float(length), dtype=torch.float64, device=device))
    first, count = (bound.double() if bound.dim() == 2 else bound.double().unsqueeze(-1) for bound in extent)
    return first, count


def at_positions(values: torch.Tensor, extent: Extent | None, length: int) -> torch.Tensor:
    """Per-example ``values`` [B, ..., S] read at each position of the row, [B, ..., length]: every
    position takes its own example's value. One example per row: ``values`` as they are ([..., 1]
    broadcasts over the positions)."""
    if values.shape[-1] == 1:
        return values
    first = extent[0].contiguous()
    positions = torch.arange(length, device=first.device).expand(first.shape[0], length).contiguous()
    example = (torch.searchsorted(first, positions, right=True) - 1).clamp_(min=0)
    example = example.view((first.shape[0],) + (1,) * (values.dim() - 2) + (length,))
    return values.gather(-1, example.expand(values.shape[:-1] + (length,)))


def token_extent(attention_mask: torch.Tensor) -> Extent:
    """(first real position, number of real tokens) per example of a [B, T] padding mask whose real
    tokens are contiguous (left or right padding, as tokenizers and collators pad)."""
    real = attention_mask.bool()
    return real.int().argmax(dim=-1), real.sum(dim=-1)


def packed_extent(position_ids: torch.Tensor) -> Extent:
    """(first position, number of tokens) [B, S] of the examples packed into each row of a [B, T]
    batch, found as transformers finds them for its attention mask: a new example starts wherever the
    position id does not follow on from the previous one. Rows with fewer than S examples fill their
    last slots with (T, 0)."""
    batch, length = position_ids.shape
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] - position_ids[:, :-1] != 1
    example = starts.long().cumsum(-1) - 1
    count = torch.zeros(batch, int(example.max()) + 1, dtype=torch.long, device=position_ids.device)
    count.scatter_add_(1, example, torch.ones_like(example))
    return count.cumsum(-1) - count, count


def attention_drop_mask(
    sampler: MaskSampler,
    pattern: Pattern,
    rate: float,
    batch: int,
    heads: int,
    queries: int,
    keys: int,
    device: torch.device,
    extent: Extent | None = None,
) -> torch.Tensor:
    """Dropped keys per (example, head): [B, H, Q, K] for element, [B, H, 1, K] for column and span
    (a span of each example's real keys, ``extent``, when the batch is padded)."""
    if pattern == "element":
        return bernoulli(sampler, (batch, heads, queries, keys), rate, device)
    if pattern == "column":
        return bernoulli(sampler, (batch, heads, 1, keys), rate, device)
    return span(sampler, (batch, heads), keys, rate, device, extent).unsqueeze(2)


def feature_keep_mask(
    sampler: MaskSampler, pattern: Pattern, rate: float, hidden: torch.Tensor, extent: Extent | None = None
) -> torch.Tensor:
    """Boolean mask, True = kept, broadcastable to a [B, T, D] (or [B, D]) activation.

    element drops entries ([B, T, D]), column drops feature dimensions for all tokens ([B, 1, D]),
    span drops a contiguous run of tokens, all features ([B, T, 1]), inside each example's real
    tokens (``extent``) when the batch is padded.
    """
    batch, tokens, features = hidden.shape if hidden.dim() == 3 else (hidden.shape[0], 1, hidden.shape[-1])
    device = hidden.device
    if pattern == "span":
        kept = ~span(sampler, (batch,), tokens, rate, device, extent).unsqueeze(-1)
    else:
        shape = (batch, tokens, features) if pattern == "element" else (batch, 1, features)
        kept = ~bernoulli(sampler, shape, rate, device)
    return kept if hidden.dim() == 3 else kept.squeeze(1)


def embedding_noise(sampler: MaskSampler, embeddings: torch.Tensor, alpha: float, extent: Extent | None = None) -> torch.Tensor:
    """NEFTune's noise for [B, T, d] input embeddings: U(-1, 1) scaled by alpha / sqrt(L * d), where
    L is each example's own number of real tokens (``extent``; all T when the batch is unpadded;
    each packed example its own), and zero on padding, so an example's noise does not depend on the
    batch or row it is put into."""
    length, dim = embeddings.shape[1:]
    device = embeddings.device
    first, count = (at_positions(bound, extent, length) for bound in example_bounds(extent, length, device))
    positions = torch.arange(length, device=device)
    real = (positions >= first) & (positions < first + count)
    scale = alpha / torch.sqrt(count.clamp(min=1) * dim)
    noise = sampler.uniform(embeddings.shape, device).mul_(2).sub_(1)
    return (noise * (scale * real)[..., None].float()).to(embeddings.dtype)


def feature_scale(pattern: Pattern, rate: float, rescale: bool) -> float:
    """What kept entries are multiplied by: 1/(1-p) when rescaled, never for span (HiddenCut)."""
    return 1.0 / (1.0 - rate) if rescale and pattern != "span" else 1.0


class _MaskedScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, keep, scale):  # type: ignore[override]
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return _masked_scale(hidden, keep, scale)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (keep,) = ctx.saved_tensors
        return _masked_scale(grad, keep, ctx.scale), None, None


def _masked_scale(x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
    out = x * keep
    return out.mul_(scale) if scale != 1.0 else out


def apply_feature_mask(hidden: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
    """``hidden * keep * scale``. The backward pass keeps the boolean mask (1 byte an entry) where
    ``hidden * multiplier`` would keep a float multiplier as large as the activation (4 bytes in
    float32): for an element mask in every layer that is a layer's worth of activation memory."""
    return _MaskedScale.apply(hidden, keep, scale)


def causal_mask(queries: int, keys: int, device: torch.device) -> torch.Tensor:
    """[1, 1, Q, K], True where query i may see key j (queries are the last Q of K positions)."""
    offset = keys - queries
    return (torch.arange(queries, device=device)[:, None] + offset >= torch.arange(keys, device=device)[None, :]).view(
        1, 1, queries, keys
    )


def own_position(queries: int, keys: int, device: torch.device) -> torch.Tensor:
    """[1, 1, Q, K], True where key j is query i's own position."""
    offset = keys - queries
    return (torch.arange(queries, device=device)[:, None] + offset == torch.arange(keys, device=device)[None, :]).view(
        1, 1, queries, keys
    )


def guarded_keep_mask(visible: torch.Tensor | None, dropped: torch.Tensor, keep_own_position: bool) -> torch.Tensor:
    """Combine what each query may see (``visible``: bool, True = attend, None = every key) with
    the dropped keys, such that no row ends up empty.

    ``keep_own_position`` (the element pattern under causal attention) never drops a query's own
    position: token 0 sees only key 0, and each of its entries is dropped independently, so its row
    would otherwise be empty at the rate p. A causal query that does not see its own position (a
    padded query, whose output no loss reads) keeps its undropped row. Both are decided on the
    visibility mask, which has no head dimension, so the guard costs two passes over the
    [B, H, Q, K] mask and no search for empty rows in it. Callers pass the explicit causal triangle
    as ``visible`` for causal attention.

    Otherwise (whole keys: column and span) a dropped key is dropped for every query, its own
    position included, and a row left empty gets its undropped row back. That is what the key-bias
    DropKey computes (exempting one query per key would take the [B, H, Q, K] mask it avoids), so
    DropKey and DropAttention give the same forward pass. Dropping never re-admits a key the model
    itself masked.
    """
    keep = ~dropped
    if keep_own_position:
        if visible is None:
            raise ValueError("causal attention needs its visibility mask")
        own = own_position(visible.shape[-2], dropped.shape[-1], dropped.device)
        sees_itself = (visible & own).any(dim=-1, keepdim=True)
        return (keep | (own | ~sees_itself)) & visible
    combined = keep if visible is None else keep & visible
    empty_row = ~combined.any(dim=-1, keepdim=True)
    if visible is None:
        return combined | empty_row
    return torch.where(empty_row, visible, combined)
