"""The coverage matrix: every model family of `tiny_models.FAMILIES`, with every head hkft trains it
with, instrumented and checked against the stock model and against attention written out by hand.

The README's "Model families" table is generated from the same list (`families_table`), and a test
keeps the two equal.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from tiny_models import FAMILIES, family_heads, family_model
from torch import nn

import hkft.dropout.attention as attention
from hkft.dropout import build_plan, instrument, named_method
from hkft.dropout.architecture import layer_stack, uses_attention_interface

CASES = [(family, task) for family in FAMILIES for task in family_heads(family)]
CASE_IDS = [f"{family}-{task}" for family, task in CASES]
ATTENTION_POSITIONS = ("attention_logits", "attention_weights")
README = Path(__file__).resolve().parents[1] / "README.md"


def inputs_for(model: nn.Module, padded: bool = True, size: int = 3, length: int = 10) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (size, length), generator=generator)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, length - 3 :] = 0
        mask[2, length // 2 :] = 0
        ids = ids.masked_fill(mask == 0, model.config.pad_token_id)
    return {"input_ids": ids, "attention_mask": mask}


def only(position: str, pattern: str = "column", rate: float = 0.3, layers: str = "all"):
    if position not in ATTENTION_POSITIONS and pattern == "column":
        pattern = "element"
    return build_plan("none", rate, 0.0, layers=layers, position_overrides={position: (pattern, rate)})


def zero_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout", "hidden_dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)


@pytest.mark.parametrize("family,task", CASES, ids=CASE_IDS)
def test_eval_mode_is_the_stock_model_bit_for_bit(family, task):
    stock, model = family_model(family, task), family_model(family, task)
    positions = {"attention_logits": ("column", 0.3), "hidden": ("element", 0.3), "input": ("element", 0.3),
                 "output": ("element", 0.3)}
    instrument(model, build_plan("none", 0.3, 0.0, layers="all", position_overrides=positions), seed=0)
    inputs = inputs_for(model)
    model.eval(), stock.eval()
    assert torch.equal(model(**inputs).logits, stock(**inputs).logits)


@pytest.mark.parametrize("family,task", CASES, ids=CASE_IDS)
def test_each_position_changes_the_training_output(family, task):
    model = family_model(family, task)
    inputs = inputs_for(model)
    controller = instrument(model, named_method("none", 0.0), seed=0)
    model.train()
    clean = model(**inputs).logits
    controller.remove()
    unchanged = []
    for position in ("attention_logits", "attention_weights", "hidden", "input", "output"):
        controller = instrument(model, only(position, rate=0.5), seed=0)
        if torch.equal(model(**inputs).logits, clean):
            unchanged.append(position)
        controller.remove()
    assert not unchanged


def reference_softmax(original, drawn: list[torch.Tensor], selected: tuple[int, ...], position: str):
    """torch's softmax, with the recorded key masks applied by hand to the attention softmaxes of the
    selected layers (one [B, H, Q, K] softmax per layer, in order): DropKey removes the dropped keys
    from the logits, DropAttention renormalises the surviving weights by their stop-gradient sum. A
    row whose visible keys are all dropped keeps its undropped row."""
    calls = iter(range(10**6))

    def softmax(logits, dim=None, *args, **kwargs):
        if not (logits.dim() == 4 and dim in (-1, 3)) or next(calls) not in selected:
            return original(logits, dim, *args, **kwargs)
        visible = logits > torch.finfo(logits.dtype).min / 2
        keep = ~drawn.pop(0) & visible
        keep = torch.where(keep.any(-1, keepdim=True), keep, visible)
        keep |= ~visible.any(-1, keepdim=True)  # a row the model hides entirely is left as it is
        if position == "attention_logits":
            return original(logits.masked_fill(~keep, float("-inf")), dim, *args, **kwargs)
        weights = original(logits, dim, *args, **kwargs) * keep
        return weights / weights.sum(-1, keepdim=True).detach()

    return softmax


@pytest.mark.parametrize("position", ATTENTION_POSITIONS)
@pytest.mark.parametrize("family,task", CASES, ids=CASE_IDS)
def test_recorded_masks_give_the_eager_reference(family, task, position, monkeypatch):
    """The hkft path (SDPA function, or the family's own eager computation) against the stock model
    run eagerly, with the same masks applied by hand at the softmax."""
    check_recorded_masks(family, task, position, monkeypatch)


def check_recorded_masks(family, task, position, monkeypatch, attn: str | None = None):
    model = family_model(family, task, attn=attn)
    reference = family_model(family, task, attn="eager")
    reference.load_state_dict(model.state_dict())
    zero_dropout(reference)
    controller = instrument(model, only(position), seed=3)
    drawn = []
    draw = attention.attention_drop_mask
    monkeypatch.setattr(attention, "attention_drop_mask", lambda *a, **k: drawn.append(draw(*a, **k)) or drawn[-1])
    inputs = inputs_for(model)
    model.train(), reference.train()
    got = model(**inputs).logits
    assert len(drawn) == len(controller.layers)
    monkeypatch.setattr(torch.nn.functional, "softmax",
                        reference_softmax(torch.nn.functional.softmax, list(drawn), controller.layers, position))
    expected = reference(**inputs).logits
    # Rows whose visible keys are all dropped carry ~1e-4 float32 error on the key-bias path.
    assert torch.allclose(got, expected, atol=1e-3, rtol=0)
    return model


@pytest.mark.parametrize("family,task", CASES, ids=CASE_IDS)
def test_no_nan_at_p_0_9_with_padding_and_causal_masks(family, task):
    model = family_model(family, task)
    inputs = inputs_for(model)  # one example unpadded, two padded
    for position, pattern in (("attention_logits", "column"), ("attention_logits", "element"), ("attention_weights", "span")):
        overrides = {position: (pattern, 0.9), "hidden": ("element", 0.9)}
        controller = instrument(model, build_plan("none", 0.9, 0.0, layers="all", position_overrides=overrides), seed=0)
        model.train()
        logits = model(**inputs).logits
        assert torch.isfinite(logits).all(), (position, pattern)
        model.zero_grad()
        logits.sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        controller.remove()


@pytest.mark.parametrize("family,task", CASES, ids=CASE_IDS)
def test_shared_prefix_replay_gives_the_second_pass_computed_in_full(family, task):
    model = family_model(family, task)
    controller = instrument(model, named_method("hiddenkey", 0.3), seed=0)
    assert bool(controller.shared) != layer_stack(model).shared  # ALBERT's one block runs at every layer
    inputs = inputs_for(model)
    model.train()
    state = controller.state_dict()
    with controller.shared_prefix() as replay:
        first = model(**inputs).logits
        with replay():
            second = model(**inputs).logits
    controller.load_state_dict(state)
    assert torch.equal(model(**inputs).logits, first)
    assert torch.allclose(model(**inputs).logits, second, atol=1e-6, rtol=0)


def attention_route(family: str) -> str:
    model = family_model(family, family_heads(family)[0])
    if model.config._attn_implementation == "eager":
        return "its eager softmax"
    return "hkft's SDPA function" if uses_attention_interface(model) else "its own SDPA call"


def families_table() -> str:
    """The README's table of model families, from `FAMILIES`."""
    rows = ["| family | `model_type` | causal LM | sequence classification | attention dropout runs on |",
            "|---|---|---|---|---|"]
    for family, (model_type, _) in FAMILIES.items():
        heads = family_heads(family)
        marks = ["yes" if task in heads else "-" for task in ("causal-lm", "classification")]
        rows.append(f"| {family} | `{model_type}` | {marks[0]} | {marks[1]} | {attention_route(family)} |")
    return "\n".join(rows)


def test_readme_table_of_families_is_the_tested_list():
    text = README.read_text()
    match = re.search(r"<!-- families-table -->\n(.*?)\n<!-- /families-table -->", text, re.S)
    assert match, "README needs the families table between <!-- families-table --> markers"
    assert match.group(1) == families_table(), "regenerate: python -c 'import test_families as t; print(t.families_table())' in tests/"


@pytest.mark.parametrize("family,task", [("LLaMA", "causal-lm"), ("BERT", "classification")])
@pytest.mark.parametrize("position", ATTENTION_POSITIONS)
def test_an_eager_model_stays_eager_and_drops_at_its_softmax(family, task, position, monkeypatch):
    """A user's `eager` is never swapped for SDPA: the masks apply in the eager computation itself."""
    model = check_recorded_masks(family, task, position, monkeypatch, attn="eager")
    assert model.config._attn_implementation == "eager"


# The previously failing families at the hidden and head sizes of a real checkpoint (2 layers, a
# 128-token vocabulary): dimension-specific shapes (relative-position buckets, ALiBi slopes over 16
# or 32 heads, Gemma 2's 256-wide heads, ALBERT's factorised embeddings) that tiny configs miss.
REAL_SIZES = {
    "DeBERTa-v2/v3": ("classification", dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072,
                                              position_buckets=256, max_relative_positions=-1, share_att_key=True,
                                              max_position_embeddings=512, norm_rel_ebd="layer_norm")),
    "ALBERT": ("classification", dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072, embedding_size=128)),
    "MPNet": ("classification", dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072)),
    "GPT-NeoX/Pythia": ("causal-lm", dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072, rotary_pct=0.25)),
    # Run eagerly: transformers' own SDPA and eager ALiBi paths of Falcon differ by 0.2 in the logits here.
    "Falcon": ("causal-lm", dict(hidden_size=2048, num_attention_heads=32, alibi=True, bias=True, multi_query=False,
                                 parallel_attn=False, num_kv_heads=32)),
    "Bloom": ("causal-lm", dict(hidden_size=1024, n_head=16)),
    "Gemma 2": ("causal-lm", dict(hidden_size=2304, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                                  intermediate_size=9216, attn_logit_softcapping=50.0, query_pre_attn_scalar=256,
                                  initializer_range=0.02)),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", REAL_SIZES)
@pytest.mark.parametrize("position", ATTENTION_POSITIONS)
def test_real_size_shapes_give_the_eager_reference_and_no_nan(family, position, monkeypatch):
    task, sizes = REAL_SIZES[family]
    model_type, values = FAMILIES[family]
    monkeypatch.setitem(FAMILIES, family, (model_type, {**values, **sizes}))
    attn = "eager" if sizes.get("alibi") else None
    check_recorded_masks(family, task, position, monkeypatch, attn)
    monkeypatch.undo()
    monkeypatch.setitem(FAMILIES, family, (model_type, {**values, **sizes}))
    model = family_model(family, task, attn=attn)
    instrument(model, build_plan("hiddenkey", 0.9, 1.0, layers="all"), seed=0)
    model.train()
    logits = model(**inputs_for(model, length=16)).logits
    assert torch.isfinite(logits).all()
