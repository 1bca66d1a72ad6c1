"""Mask statistics, shapes and the empty-row guard."""

import pytest
import torch

from hkft.dropout.patterns import (
    MaskSampler,
    apply_feature_mask,
    attention_drop_mask,
    bernoulli,
    causal_mask,
    feature_keep_mask,
    feature_scale,
    guarded_keep_mask,
    own_position,
    token_extent,
)

CPU = torch.device("cpu")


@pytest.mark.parametrize("pattern", ["element", "column", "span"])
@pytest.mark.parametrize("rate", [0.05, 0.1, 0.3])
def test_attention_drop_fraction_matches_rate(pattern, rate):
    sampler = MaskSampler(seed=1)
    dropped = attention_drop_mask(sampler, pattern, rate, batch=64, heads=8, queries=40, keys=40, device=CPU)
    expected = round(rate * 40) / 40 if pattern == "span" else rate
    # 64*8*40 (column/span) or *40 more (element) Bernoulli draws: 4 standard errors is < 0.01.
    assert abs(dropped.float().mean().item() - expected) < 0.01


@pytest.mark.parametrize("pattern", ["element", "column", "span"])
@pytest.mark.parametrize("rate", [0.1, 0.3])
def test_feature_drop_fraction_and_rescale(pattern, rate):
    sampler = MaskSampler(seed=2)
    hidden = torch.ones(64, 50, 96)
    multiplier = apply_feature_mask(hidden, feature_keep_mask(sampler, pattern, rate, hidden), feature_scale(pattern, rate, True))
    dropped = multiplier == 0
    expected = round(rate * 50) / 50 if pattern == "span" else rate
    independent_draws = {"element": 64 * 50 * 96, "column": 64 * 96, "span": 64}[pattern]
    tolerance = 4 * (rate * (1 - rate) / independent_draws) ** 0.5 if pattern != "span" else 1e-6  # span: exact count
    assert abs(dropped.float().mean().item() - expected) < tolerance
    kept_value = 1.0 if pattern == "span" else 1.0 / (1.0 - rate)
    assert torch.allclose(multiplier[~dropped], torch.tensor(kept_value))


def test_bernoulli_masks_have_the_rate_and_independent_entries():
    sampler = MaskSampler(seed=11)
    masks = torch.stack([bernoulli(sampler, (3, 5, 7), 0.25, CPU) for _ in range(8000)]).float()  # 105 entries each
    assert torch.allclose(masks.mean(0), torch.tensor(0.25), atol=5 * (0.25 * 0.75 / 8000) ** 0.5)
    flat = masks.flatten(1)
    correlation = torch.corrcoef(flat.T)  # neighbouring 16-bit words come from one 64-bit draw
    assert (correlation - torch.eye(flat.shape[1])).abs().max() < 0.08
    assert not bernoulli(sampler, (10,), 0.0, CPU).any() and bernoulli(sampler, (10,), 1.0, CPU).all()


def test_shapes_per_pattern():
    sampler = MaskSampler(seed=3)
    assert attention_drop_mask(sampler, "element", 0.1, 2, 3, 5, 7, CPU).shape == (2, 3, 5, 7)
    assert attention_drop_mask(sampler, "column", 0.1, 2, 3, 5, 7, CPU).shape == (2, 3, 1, 7)
    assert attention_drop_mask(sampler, "span", 0.1, 2, 3, 5, 7, CPU).shape == (2, 3, 1, 7)
    hidden = torch.ones(2, 5, 7)
    assert feature_keep_mask(sampler, "column", 0.5, hidden).shape == (2, 1, 7)
    assert feature_keep_mask(sampler, "span", 0.5, hidden).shape == (2, 5, 1)
    assert feature_keep_mask(sampler, "element", 0.5, torch.ones(2, 7)).shape == (2, 7)


def test_spans_are_contiguous_runs_of_the_right_length():
    sampler = MaskSampler(seed=4)
    dropped = attention_drop_mask(sampler, "span", 0.25, 16, 4, 1, 33, CPU).reshape(-1, 33)
    length = round(0.25 * 33)
    for row in dropped:
        positions = row.nonzero().flatten()
        assert len(positions) == length
        assert (positions.diff() == 1).all()
    starts = dropped.float().argmax(dim=-1)
    assert starts.unique().numel() > 5  # the start is drawn, not fixed


@pytest.mark.parametrize("rate,length", [(0.15, 190), (0.3, 95)])  # where float32 would round 0.5 up
def test_span_length_is_round_of_rate_times_length_with_or_without_padding(rate, length):
    sampler = MaskSampler(seed=3)
    unpadded = attention_drop_mask(sampler, "span", rate, 2, 1, 1, length, CPU)
    padded = attention_drop_mask(sampler, "span", rate, 2, 1, 1, length, CPU, token_extent(torch.ones(2, length)))
    assert unpadded.sum(-1).flatten().tolist() == padded.sum(-1).flatten().tolist() == [round(rate * length)] * 2


def test_spans_of_a_padded_batch_lie_in_each_examples_tokens_and_scale_with_its_length():
    sampler = MaskSampler(seed=9)
    padding = torch.zeros(3, 20, dtype=torch.long)
    padding[0, :] = 1  # full
    padding[1, :10] = 1  # right-padded, 10 tokens
    padding[2, 12:] = 1  # left-padded, 8 tokens
    extent = token_extent(padding)
    assert extent[0].tolist() == [0, 0, 12] and extent[1].tolist() == [20, 10, 8]
    for _ in range(50):
        keys = attention_drop_mask(sampler, "span", 0.3, 3, 2, 1, 20, CPU, extent)[:, :, 0]
        tokens = ~feature_keep_mask(sampler, "span", 0.3, torch.ones(3, 20, 4), extent)[:, :, 0]
        for example, real in enumerate(padding.bool()):
            for row in (*keys[example], tokens[example]):
                assert not (row & ~real).any()  # never on padding
                assert row.sum() == round(0.3 * int(real.sum()))  # 6, 3 and 2 positions


def test_same_seed_same_masks_and_ranks_differ():
    draw = lambda sampler: attention_drop_mask(sampler, "column", 0.3, 4, 2, 1, 50, CPU)
    assert torch.equal(draw(MaskSampler(7)), draw(MaskSampler(7)))
    assert not torch.equal(draw(MaskSampler(7, rank=0)), draw(MaskSampler(7, rank=1)))


def test_state_dict_restores_the_mask_stream():
    sampler = MaskSampler(9)
    draw = lambda: attention_drop_mask(sampler, "element", 0.3, 2, 2, 6, 6, CPU)
    draw()
    state = sampler.state_dict()
    expected = [draw() for _ in range(3)]
    resumed = MaskSampler(9)
    resumed.load_state_dict(state)
    sampler = resumed
    assert all(torch.equal(draw(), mask) for mask in expected)


def test_sampler_leaves_global_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    MaskSampler(1).uniform((100,), CPU)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("pattern", ["column", "element", "span"])
@pytest.mark.parametrize("keep_own_position", [True, False])
def test_causal_guard_never_leaves_an_empty_row_at_high_rate(pattern, keep_own_position):
    sampler = MaskSampler(5)
    visible = causal_mask(24, 24, CPU).expand(8, 1, 24, 24)
    for _ in range(20):
        dropped = attention_drop_mask(sampler, pattern, 0.9, 8, 4, 24, 24, CPU)
        keep = guarded_keep_mask(visible, dropped, keep_own_position)
        assert keep.any(dim=-1).all()
        assert not (keep & ~visible).any()  # never re-admits a future key
        if keep_own_position:
            assert keep.diagonal(dim1=-2, dim2=-1).all()  # a query always sees itself
        else:  # whole keys: a dropped key is gone for every query, unless that empties the row
            for row, (kept, allowed, drop) in enumerate(zip(keep[0, 0], visible[0, 0], dropped[0, 0].expand(24, 24))):
                survivors = allowed & ~drop
                assert torch.equal(kept, survivors if survivors.any() else allowed), row


def test_padded_rows_keep_only_keys_the_model_allowed():
    visible = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    visible[1, :, :, 3:] = False  # keys 3.. are padding in example 1
    dropped = torch.zeros(2, 1, 1, 6, dtype=torch.bool)
    dropped[1, 0, 0, :3] = True  # every real key of example 1 dropped
    keep = guarded_keep_mask(visible, dropped, keep_own_position=False)
    assert torch.equal(keep[1], visible[1])  # the row falls back to what the model allowed
    assert torch.equal(keep[0, 0, 0], torch.ones(6, dtype=torch.bool))


def test_column_mask_is_identical_across_queries_without_padding():
    sampler = MaskSampler(6)
    dropped = attention_drop_mask(sampler, "column", 0.3, 4, 2, 1, 16, CPU)
    keep = guarded_keep_mask(None, dropped, keep_own_position=False)
    assert keep.shape == (4, 2, 1, 16)  # stays a [B, H, 1, K] mask, no [B, H, Q, K] materialised
    assert torch.equal(keep, ~dropped | ~(~dropped).any(-1, keepdim=True))


def test_a_causal_query_that_cannot_see_itself_keeps_its_undropped_row():
    visible = causal_mask(5, 5, CPU).repeat(2, 1, 1, 1)
    visible[1, :, 3:, 3:] = False  # example 1: positions 3, 4 are padding (keys masked)
    dropped = torch.ones(2, 3, 1, 5, dtype=torch.bool)  # every key dropped
    keep = guarded_keep_mask(visible, dropped, keep_own_position=True)
    assert torch.equal(keep[0], own_position(5, 5, CPU)[0].expand(3, 5, 5))  # real queries: only themselves
    assert torch.equal(keep[1, :, 3:], visible[1, :, 3:].expand(3, 2, 5))  # padded queries: undropped
    assert torch.equal(keep[1, :, :3], own_position(5, 5, CPU)[0, :, :3].expand(3, 3, 5))


def test_feature_mask_gradient_is_the_masked_product_and_only_the_boolean_mask_is_saved():
    sampler = MaskSampler(8)
    hidden = torch.randn(3, 5, 16, requires_grad=True)
    keep = feature_keep_mask(sampler, "element", 0.3, hidden)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = apply_feature_mask(hidden, keep, 1 / 0.7)
    out.square().sum().backward()
    reference = hidden.detach().clone().requires_grad_()
    (reference * keep.float() / 0.7).square().sum().backward()
    assert torch.allclose(out, reference * keep.float() / 0.7) and torch.allclose(hidden.grad, reference.grad)
    assert [t.dtype for t in saved] == [torch.bool]  # no float multiplier kept for the backward pass
