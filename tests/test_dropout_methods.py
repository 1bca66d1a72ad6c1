"""Named methods on every supported architecture: eval mode is the plain model, `none` and
`dropout` are what they claim, positions and layers land where the paper puts them."""

import pytest
import torch
import yaml
from tiny_models import DECODERS, ENCODERS, batch, tiny_model
from torch import nn
from transformers import AutoModelForCausalLM

from hkft.config import load_config
from hkft.dropout import (
    DropoutMethod,
    build_plan,
    instrument,
    named_method,
    register_method,
)
from hkft.dropout import methods as registry
from hkft.dropout.architecture import (
    attention_module,
    ffn_output_module,
    transformer_layers,
)
from hkft.dropout.config import plan_from_config
from hkft.dropout.plan import PATTERNS, POSITIONS, DropoutPlan
from hkft.errors import ConfigError, ModelError

METHODS = ("none", "dropout", "dropkey", "dropattention", "hiddencut", "hiddenkey-", "hiddenkey")
ARCHS = ENCODERS + DECODERS


def task_for(arch: str) -> str:
    return "classification" if arch in ENCODERS else "causal-lm"


def zero_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_eval_mode_equals_model_with_all_dropout_off(arch, method):
    reference, model = tiny_model(arch, task_for(arch)), tiny_model(arch, task_for(arch))
    zero_dropout(reference)
    reference.eval()
    instrument(model, named_method(method, 0.3), seed=0)
    model.eval()
    inputs = batch(arch, padded=True)
    assert torch.equal(model(**inputs).logits, reference(**inputs).logits)


@pytest.mark.parametrize("arch", ARCHS)
def test_none_equals_plain_model_with_dropout_zero_in_train_mode(arch):
    reference, model = tiny_model(arch, task_for(arch)), tiny_model(arch, task_for(arch))
    zero_dropout(reference)
    instrument(model, named_method("none", 0.3), seed=0)
    reference.train(), model.train()
    inputs = batch(arch, padded=True)
    assert torch.equal(model(**inputs).logits, reference(**inputs).logits)


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_dropout_method_is_the_models_own_dropout(arch):
    """Everywhere the model has dropout for an encoder (all layers); in a decoder's latter half only."""
    rate = 0.2
    reference, model = tiny_model(arch, task_for(arch)), tiny_model(arch, task_for(arch))
    zero_dropout(reference)
    layers = transformer_layers(reference)
    for scope in [reference] if arch in ENCODERS else layers[len(layers) // 2 :]:
        for module in scope.modules():  # the model's own dropout, every rate set to `rate`
            if isinstance(module, nn.Dropout):
                module.p = rate
            if isinstance(getattr(module, "attention_dropout", None), float):
                module.attention_dropout = rate
    instrument(model, named_method("dropout", rate), seed=0)
    reference.train(), model.train()
    inputs = batch(arch, padded=True)
    torch.manual_seed(123)
    expected = reference(**inputs).logits
    torch.manual_seed(123)
    got = model(**inputs).logits
    assert torch.equal(got, expected)
    torch.manual_seed(124)
    assert not torch.equal(model(**inputs).logits, expected)  # it is random


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["hiddenkey", "dropattention"])
def test_train_mode_is_stochastic_and_finite(arch, method):
    model = tiny_model(arch, task_for(arch))
    instrument(model, named_method(method, 0.3), seed=0)
    model.train()
    inputs = batch(arch, padded=True)
    first, second = model(**inputs).logits, model(**inputs).logits
    assert torch.isfinite(first).all() and torch.isfinite(second).all()
    assert not torch.equal(first, second)


def test_every_method_zeroes_the_models_own_dropout():
    model = tiny_model("bert", "classification")
    instrument(model, named_method("hiddenkey", 0.1), seed=0)
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, nn.Dropout))


def test_dropout_positions_sit_where_the_paper_puts_them():
    expectations = {"bert": "output.dense", "gpt2": "mlp.c_proj", "llama": "mlp.down_proj", "qwen2": "mlp.down_proj"}
    for arch, path in expectations.items():
        model = tiny_model(arch, task_for(arch))
        layer = transformer_layers(model)[0]
        assert ffn_output_module(layer) is layer.get_submodule(path)
        assert type(attention_module(layer)).__name__.endswith(("SelfAttention", "Attention"))


def test_hidden_drop_hits_the_ffn_output_at_the_rate():
    model = tiny_model("bert", "classification")
    plan = build_plan("hiddencut", 0.5, 0.0)
    instrument(model, plan, seed=0)
    seen = []
    layer = transformer_layers(model)[1]
    ffn_output_module(layer).register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    model.train()
    model(**batch("bert", padded=False, size=8, length=32))
    fraction = (seen[0] == 0).float().mean().item()
    assert abs(fraction - 0.5) < 0.03


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_hidden_spans_of_a_padded_batch_drop_each_examples_share_of_its_own_tokens(arch):
    """The model's [B, T] padding mask reaches the span draw: 30% of each example's real tokens,
    never a padding position."""
    model = tiny_model(arch, task_for(arch))
    instrument(model, build_plan("hiddencut", 0.3, 0.0, position_overrides={"hidden": ("span", 0.3)}), seed=0)
    seen = []
    ffn_output_module(transformer_layers(model)[-1]).register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    model.train()
    inputs = batch(arch, padded=True, size=3, length=10)  # 10, 7 and 5 real tokens
    model(**inputs)
    dropped_tokens = (seen[0] == 0).all(dim=-1)
    real = inputs["attention_mask"].bool()
    assert not (dropped_tokens & ~real).any()
    assert dropped_tokens.sum(dim=-1).tolist() == [round(0.3 * n) for n in real.sum(dim=-1).tolist()]


@pytest.mark.parametrize("arch,expected", [("llama", (2, 3)), ("gpt2", (2, 3)), ("bert", (0, 1, 2, 3))])
def test_default_layers_latter_half_for_decoders_all_for_encoders(arch, expected):
    controller = instrument(tiny_model(arch, task_for(arch)), named_method("hiddenkey", 0.1), seed=0)
    assert controller.layers == expected


def test_only_selected_layers_are_instrumented():
    model = tiny_model("llama")
    instrument(model, build_plan("dropkey", 0.3, 0.0, layers=[1]), seed=0)
    layers = transformer_layers(model)
    flags = [hasattr(attention_module(layer), "hkft_attention_drop") for layer in layers]
    assert flags == [False, True, False, False]


def test_layer_list_out_of_range_is_a_clear_error():
    with pytest.raises(ValueError, match="out of range"):
        DropoutPlan(layers=(7,)).layer_indices(4, is_decoder=False)


def test_position_override_and_switch_off():
    plan = build_plan("hiddenkey", 0.1, 1.0, position_overrides={"hidden": None, "output": ("span", 0.2)})
    assert set(plan.positions) == {"attention_logits", "output"}
    assert plan.positions["output"].rate == 0.2 and plan.compensation == "kl"


def test_unknown_method_and_pattern_are_rejected():
    with pytest.raises(ValueError, match="unknown dropout method"):
        named_method("dropconnect", 0.1)
    with pytest.raises(ValueError, match="unknown pattern"):
        build_plan("none", 0.1, 0.0, position_overrides={"hidden": ("diagonal", None)})


def test_model_without_transformer_layers_gets_a_clear_error():
    model = tiny_model("bert", "classification")
    model.config.num_hidden_layers = 99  # nothing in the model matches: as for an unknown layout
    with pytest.raises(ModelError, match="cannot find the 99 transformer layers"):
        instrument(model, named_method("hiddenkey", 0.1), seed=0)


def test_output_and_input_positions_change_training_outputs_only():
    model = tiny_model("llama")
    plan = build_plan("none", 0.3, 0.0, position_overrides={"input": ("span", None), "output": ("element", None)})
    instrument(model, plan, seed=0)
    inputs = batch("llama", padded=False)
    model.eval()
    clean = model(**inputs).logits
    model.train()
    assert not torch.equal(model(**inputs).logits, clean)


# The method notes' table of named methods, written out: (attention logits, attention weights,
# hidden, compensation); the `dropout` method keeps the model's own dropout at the rate instead.
PAPER_TABLE = {
    "none": (None, None, None, "rescale"),
    "dropout": (None, None, None, "rescale"),
    "dropkey": ("column", None, None, "rescale"),
    "dropattention": (None, "column", None, "rescale"),
    "hiddencut": (None, None, "element", "rescale"),
    "hiddenkey-": ("column", None, "element", "rescale"),
    "hiddenkey": ("column", None, "element", "kl"),
}


@pytest.mark.parametrize("method", METHODS)
def test_named_methods_are_the_papers_table(method):
    plan = named_method(method, 0.15, kl_weight=0.5)
    logits, weights, hidden, compensation = PAPER_TABLE[method]
    expected = {name: pattern for name, pattern in
                (("attention_logits", logits), ("attention_weights", weights), ("hidden", hidden)) if pattern}
    assert {name: drop.pattern for name, drop in plan.positions.items()} == expected
    assert all(drop.rate == 0.15 for drop in plan.positions.values())
    assert plan.compensation == compensation
    assert plan.kl_weight == (0.5 if compensation == "kl" else 0.0)
    assert plan.model_dropout == (0.15 if method == "dropout" else None)


def test_config_defaults_are_the_papers_defaults():
    """HiddenKey with p = 0.1 at both positions, KL weight 1.0, one branch, auto layers."""
    from hkft.config.schema import DropoutConfig
    from hkft.dropout.config import plan_from_config

    plan = plan_from_config(DropoutConfig())
    assert plan == named_method("hiddenkey", 0.1, kl_weight=1.0)
    assert {name: drop.rate for name, drop in plan.positions.items()} == {"attention_logits": 0.1, "hidden": 0.1}
    assert (plan.compensation, plan.kl_weight, plan.branches, plan.layers) == ("kl", 1.0, "one", "auto")


def second_passes(model, plan, inputs):
    """The KL's second training pass, replaying the shared prefix and computed in full, from the same
    mask-generator and torch RNG states."""
    controller = instrument(model, plan, seed=0)
    model.train()
    state = controller.state_dict()
    torch.manual_seed(1)
    with controller.shared_prefix() as replay:
        model(**inputs)
        with replay():
            replayed = model(**inputs)
    controller.load_state_dict(state)
    torch.manual_seed(1)
    model(**inputs)
    return replayed, model(**inputs)


def test_moe_second_training_pass_keeps_every_layers_router_logits():
    """With both branches trained, the second pass's load-balancing loss is part of the loss: it must
    read the router logits of the prefix layers too, as the pass computed in full does."""
    plan = build_plan("hiddenkey", 0.3, 1.0, branches="both")
    replayed, full = second_passes(tiny_model("mixtral"), plan, batch("mixtral", padded=True))
    assert len(replayed.router_logits) == len(full.router_logits) == 4
    assert torch.allclose(replayed.aux_loss, full.aux_loss, atol=1e-6)


def test_router_jitter_is_random_so_nothing_is_replayed():
    config = tiny_model("mixtral").config
    config.router_jitter_noise = 0.1
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    replayed, full = second_passes(model, named_method("hiddenkey", 0.3), batch("mixtral", padded=False))
    assert torch.equal(replayed.logits, full.logits)


@pytest.mark.parametrize("arch", ["bert", "roberta", "llama"])
def test_output_token_span_on_a_sequence_classifier_is_refused_in_one_line(arch):
    """BERT's head reads the pooled vector and RoBERTa's the first token (and LLaMA's the last): a
    token span there would silently drop nothing, or the whole example."""
    plan = build_plan("none", 0.3, 0.0, position_overrides={"output": ("span", 0.3)})
    with pytest.raises(ValueError, match="span pattern drops a run of tokens") as error:
        instrument(tiny_model(arch, "classification"), plan, seed=0)
    assert "\n" not in str(error.value)


def test_output_token_span_on_a_language_model_drops_tokens():
    model = tiny_model("llama")
    instrument(model, build_plan("none", 0.3, 0.0, position_overrides={"output": ("span", 0.3)}), seed=0)
    seen = []
    model.lm_head.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    model.train()
    model(**batch("llama", padded=False, size=2, length=10))
    assert (seen[0] == 0).all(dim=-1).sum(dim=-1).tolist() == [3, 3]


@pytest.fixture
def toy_method():
    """A method that is not the paper's: token spans of the FFN output and of the embeddings, JS-compensated."""
    method = register_method(DropoutMethod("toy-spans", {"hidden": "span", "input": "span"}, compensation="js"))
    yield method
    del registry.METHODS[method.name]


def test_a_registered_method_is_a_preset_value_and_becomes_its_plan(toy_method, tmp_path):
    preset = tmp_path / "toy.yaml"
    preset.write_text(yaml.safe_dump({"model": {"name": "x", "task": "causal-lm"}, "data": {"train": "t.jsonl"},
                                      "dropout": {"method": "toy-spans", "rate": 0.2, "kl_weight": 0.5}}))
    plan = plan_from_config(load_config(preset).dropout)
    assert {name: (drop.pattern, drop.rate) for name, drop in plan.positions.items()} == {
        "hidden": ("span", 0.2), "input": ("span", 0.2)}
    assert (plan.compensation, plan.kl_weight, plan.model_dropout, plan.neftune_alpha) == ("js", 0.5, None, 0.0)
    with pytest.raises(ConfigError, match="unknown dropout method 'toy-spanz'; choose one of none, .*, neftune, toy-spans"):
        load_config(preset, ["dropout.method=toy-spanz"])

    model = tiny_model("llama")
    instrument(model, plan, seed=0)
    inputs = batch("llama", padded=False)
    model.eval()
    clean = model(**inputs).logits
    model.train()
    assert not torch.equal(model(**inputs).logits, clean)


def test_a_method_with_a_misspelt_position_or_a_taken_name_is_refused_when_registered():
    with pytest.raises(ValueError, match="unknown dropout position"):
        register_method(DropoutMethod("toy-typo", {"hiden": "span"}))  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="'hiddenkey' is already registered"):
        register_method(DropoutMethod("hiddenkey"))
    assert "toy-typo" not in registry.METHODS and registry.METHODS["hiddenkey"].compensation == "kl"


def test_a_plan_refuses_an_unknown_position_in_the_words_a_preset_gets(tmp_path):
    """One rule, one message: the plan's check is the one the preset schema calls."""
    preset = tmp_path / "p.yaml"
    preset.write_text(yaml.safe_dump({"model": {"name": "x"}, "data": {"train": "t.jsonl"}}))
    with pytest.raises(ValueError) as from_plan:
        build_plan("none", 0.1, 0.0, position_overrides={"attn": ("element", None)})
    with pytest.raises(ConfigError) as from_preset:
        load_config(preset, ["dropout.positions.attn.pattern=element"])
    assert str(from_plan.value) == "unknown dropout position 'attn'; choose from " + ", ".join(POSITIONS)
    assert f"dropout.positions: {from_plan.value}" in str(from_preset.value)


@pytest.mark.parametrize("task", ["causal-lm", "classification"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_preset_and_instrumenter_agree_on_the_output_patterns_of_a_head(tmp_path, task, pattern):
    preset = tmp_path / "p.yaml"
    preset.write_text(yaml.safe_dump({"model": {"name": "x", "task": task}, "data": {"train": "t.jsonl"},
                                      "dropout": {"method": "none", "positions": {"output": {"pattern": pattern}}}}))
    try:
        plan_from_config(load_config(preset).dropout)
        preset_accepts = True
    except ConfigError:
        preset_accepts = False
    plan = build_plan("none", 0.1, 0.0, position_overrides={"output": (pattern, None)})
    try:
        instrument(tiny_model("llama", task), plan, seed=0)
        model_accepts = True
    except ValueError:
        model_accepts = False
    assert preset_accepts == model_accepts == (pattern != "span" or task == "causal-lm")
