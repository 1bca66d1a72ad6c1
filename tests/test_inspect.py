"""`hkft inspect`: from the config alone (meta device, no weights), what hkft will do with a model;
parameter counts equal peft's own count on a real build."""

import json

import pytest
import transformers
from conftest import assert_one_line_error
from tiny_models import FAMILIES, HEADS, family_config, family_heads, tiny_config
from transformers import AutoModelForCausalLM, MambaConfig

from hkft.config.schema import LoraConfig, ModelConfig
from hkft.models.loading import load_base_model, resolve_model_path
from hkft.models.lora import build_lora_model

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def inspect_json(cli, *args) -> dict:
    result = cli("inspect", *args, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def real_counts(model, lora: LoraConfig, task: str) -> dict[str, int]:
    peft_model = build_lora_model(model, lora, task, quantized=False, gradient_checkpointing=False)
    trainable, total = peft_model.get_nb_trainable_parameters()
    return {"total": total, "trainable": trainable}


@pytest.fixture
def no_weights(monkeypatch):
    """Reading a checkpoint's weights fails: inspect must not need them."""
    def refuse(*args, **kwargs):
        raise AssertionError("hkft inspect loaded weights")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", refuse)


def test_quickstart_preset_without_loading_a_weight(cli, no_weights):
    report = inspect_json(cli, "quickstart")
    assert (report["model_type"], report["layers"], report["task"], report["kind"]) == ("bert", 6, "classification", "encoder")
    assert report["lora"]["targets"] == ["query", "value"] and report["lora"]["adapted_modules"] == 12
    assert report["dropout"]["layers"] == list(range(6))
    assert set(report["dropout"]["positions"]) == {"attention_logits", "hidden"}
    assert report["positions"]["hidden"]["module"] == "output.dense"
    assert report["positions"]["output"]["patterns"] == ["element", "column"]  # a sequence head has no tokens to span


@pytest.mark.parametrize("task,overrides", [
    ("classification", []),
    ("regression", ["lora.r=4", "lora.target_modules=all-linear"]),
])
def test_minilm_counts_are_peft_counts_on_the_real_model(cli, task, overrides):
    path = resolve_model_path(MINILM)
    report = inspect_json(cli, path, "--task", task, *[arg for o in overrides for arg in ("--set", o)])
    lora = LoraConfig(**{o.split("=")[0].split(".")[1]: o.split("=")[1] for o in overrides})
    real = load_base_model(ModelConfig(name=MINILM, task=task), path, None if task == "regression" else 2)
    assert report["parameters"] == real_counts(real, lora, task)


def tiny_checkpoint_config(tmp_path, arch: str, architectures: list[str]):
    """A config.json alone: no weights, no tokenizer."""
    config = tiny_config(arch)
    config.architectures = architectures
    config.save_pretrained(tmp_path)
    return config


def test_tiny_decoder_config_alone(cli, tmp_path):
    config = tiny_checkpoint_config(tmp_path, "llama", ["LlamaForCausalLM"])
    report = inspect_json(cli, tmp_path, "--set", "lora.r=16")
    assert (report["task"], report["task_inferred"], report["kind"]) == ("causal-lm", True, "decoder (causal attention)")
    assert report["dropout"]["layers"] == [2, 3]  # the latter half of a decoder
    assert report["methods"]["hiddenkey-"]["layers"] == [2, 3] and report["methods"]["none"]["layers"] == []
    assert report["lora"]["targets"] == ["q_proj", "v_proj"]
    assert report["positions"]["hidden"]["module"] == "mlp.down_proj"
    assert report["parameters"] == real_counts(AutoModelForCausalLM.from_config(config), LoraConfig(r=16), "causal-lm")


def test_rich_tables(cli, tmp_path):
    tiny_checkpoint_config(tmp_path, "gpt2", ["GPT2LMHeadModel"])
    result = cli("inspect", tmp_path)
    assert result.exit_code == 0, result.stderr
    for fragment in ("gpt2 (GPT2LMHeadModel)", "dropout positions", "c_attn", "hiddenkey *", "trainable of"):
        assert fragment in result.stdout, fragment


def test_a_family_hkft_cannot_instrument_is_one_line(cli, tmp_path):
    MambaConfig(hidden_size=32, num_hidden_layers=2, vocab_size=64, state_size=4,
                architectures=["MambaForCausalLM"]).save_pretrained(tmp_path)
    result = cli("inspect", tmp_path, "--set", "lora.target_modules=[in_proj]")
    assert_one_line_error(result, "(mamba) is not supported by hkft's dropout, because")


@pytest.mark.parametrize("args,fragment", [
    (["no/such/dir/model"], "no such model directory"),
    (["quickstart", "--set", "lora.rr=4"], "lora.rr: unknown key (did you mean lora.r?)"),
    (["quickstart", "--set", "dropout.layers=[9]"], "dropout: dropout layers [9] out of range"),
    (["quickstart", "--set", "lora.target_modules=[q_proj]"], "lora.target_modules: q_proj not found"),
])
def test_bad_input_is_one_line(cli, args, fragment):
    assert_one_line_error(cli("inspect", *args), fragment)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_of_the_coverage_matrix_inspects(cli, tmp_path, family):
    """Every family hkft trains is described from its config alone; a shared block (ALBERT) counts
    its applications, as `dropout.layers` does."""
    config = family_config(family)
    task = family_heads(family)[0]
    config.architectures = [HEADS[task]._model_mapping[type(config)].__name__]
    config.save_pretrained(tmp_path)
    report = inspect_json(cli, tmp_path, "--task", task)
    assert report["layers"] == config.num_hidden_layers
    assert report["positions"]["attention_logits"]["patterns"], report["positions"]
    assert "tuple" not in report["layer_stack"]
