"""Preset loading: strict validation, did-you-mean, overrides, and no traceback for any YAML."""

from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from hkft.config import config_to_yaml, load_config, presets_dir
from hkft.config.loading import apply_overrides, parse_override
from hkft.errors import ConfigError

MINIMAL = {"model": {"name": "x"}, "data": {"train": "train.jsonl"}}


def write(tmp_path: Path, data, name: str = "preset.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return path


def test_every_shipped_preset_validates_offline():
    presets = sorted(presets_dir().glob("*.yaml"))
    assert len(presets) >= 10
    for preset in presets:
        config = load_config(preset)
        assert config.model.name and config.description


def test_unknown_key_suggests_the_closest_valid_key(tmp_path):
    path = write(tmp_path, {**MINIMAL, "train": {"epocs": 3}})
    with pytest.raises(ConfigError, match=r"train\.epocs: unknown key \(did you mean train\.epochs\?\)"):
        load_config(path)


@pytest.mark.parametrize("key,message", [
    ("A", r"A: unknown key \(valid keys: description, model"),  # a capitalised key is the user's, not a pydantic union tag
    ("Lora", r"Lora: unknown key \(did you mean lora\?\)"),
])
def test_unknown_top_level_key_is_named_whatever_its_case(tmp_path, key, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, {**MINIMAL, key: 1}))


def test_unknown_section_suggests_the_closest_section(tmp_path):
    with pytest.raises(ConfigError, match=r"dropuot: unknown key \(did you mean dropout\?\)"):
        load_config(write(tmp_path, {**MINIMAL, "dropuot": {}}))


@pytest.mark.parametrize(
    "override,message",
    [
        ("dropout.rate=1.0", "dropout.rate: Input should be less than 1"),
        ("dropout.rate=-0.1", "dropout.rate: Input should be greater than or equal to 0"),
        ("lora.r=0", "lora.r: Input should be greater than 0"),
        ("train.epochs=-1", "train.epochs: Input should be greater than 0"),
        ("train.lr=fast", "train.lr: Input should be a valid number"),
        ("dropout.method=dropconnect", "unknown dropout method 'dropconnect'"),
        ("dropout.positions.hidden.pattern=diagonal", "dropout.positions.hidden.pattern: Input should be"),
        ("dropout.positions.attn.pattern=column", "unknown dropout position 'attn'"),
        ("model.quantization=3bit", "model.quantization: Input should be 'none', '8bit' or '4bit'"),
        ("model.task=translation", "model.task: Input should be"),
        ("data.text_column=[a, b, c]", "give one text column, or two for text pairs"),
        ("dropout.positions.output.pattern=span", "span drops tokens, but a classification or regression head reads one vector"),
        ("train.batch_size=yes", "train.batch_size: must be a number, not true/false (YAML reads yes, no, on and off as booleans"),
        ("lora.r=true", "lora.r: must be a number, not true/false"),
        ("train.lr=on", "train.lr: must be a number, not true/false"),
        ("dropout.rate=false", "dropout.rate: must be a number, not true/false"),
        ("dropout.layers=[0, true]", "dropout.layers.1: must be a number, not true/false"),
        ("data.train={hub: x, splt: test}", "data.train.splt: unknown key (did you mean data.train.split"),
    ],
)
def test_bad_values_are_named_with_their_key(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(write(tmp_path, MINIMAL), [override])


def test_yaml_syntax_error_gives_line_and_column(tmp_path):
    path = write(tmp_path, "model:\n  name: x\n data: [\n")
    with pytest.raises(ConfigError, match=r"YAML syntax error at line \d+, column \d+"):
        load_config(path)


def test_non_utf8_preset_is_a_clear_error(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("model: {name: caf\xe9}\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


def test_overrides_are_typed_and_nested(tmp_path):
    config = load_config(write(tmp_path, MINIMAL), ["lora.r=16", "train.lr=1e-4", "lora.target_modules=[q_proj, v_proj]",
                                                     "dropout.positions.hidden.pattern=span"])
    assert config.lora.r == 16 and config.train.lr == pytest.approx(1e-4)
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.dropout.positions["hidden"].pattern == "span"


def test_zero_max_steps_lets_the_epochs_decide(tmp_path):
    assert load_config(write(tmp_path, MINIMAL), ["train.max_steps=0"]).train.max_steps == -1
    assert load_config(write(tmp_path, MINIMAL), ["train.max_steps=5"]).train.max_steps == 5


@pytest.mark.parametrize("text,message", [
    ("model: {name: x}\ndata: {train: t.jsonl}\nmodel: {name: y}\n", "key 'model' appears twice, at lines 1 and 3"),
    ("model:\n  name: x\n  name: y\ndata: {train: t.jsonl}\n", "key 'name' appears twice, at lines 2 and 3"),
])
def test_a_key_given_twice_is_an_error(tmp_path, text, message):
    with pytest.raises(ConfigError, match=f"preset.yaml: {message} \\(keep one of them\\)"):
        load_config(write(tmp_path, text))


def test_keys_merged_from_an_anchor_may_be_overridden(tmp_path):
    text = "model: {name: x}\ndata: {train: t.jsonl}\ntrain:\n  <<: {seed: 1, epochs: 2}\n  seed: 7\n"
    assert load_config(write(tmp_path, text)).train.model_dump(include={"seed", "epochs"}) == {"seed": 7, "epochs": 2}


def test_malformed_override_is_rejected():
    with pytest.raises(ConfigError, match="not of the form key.sub=value"):
        parse_override("lora.r")
    with pytest.raises(ConfigError, match="is not a section"):
        apply_overrides({"lora": {"r": 8}}, ["lora.r.x=1"])


def test_resolved_config_round_trips(tmp_path):
    config = load_config("quickstart", ["lora.r=4"])
    saved = write(tmp_path, config_to_yaml(config), "resolved.yaml")
    assert load_config(saved) == config


def test_shipped_preset_by_name_and_typo():
    assert load_config("quickstart").model.task == "classification"
    with pytest.raises(ConfigError, match="did you mean quickstart"):
        load_config("quikstart")


def test_relative_data_paths_resolve_next_to_the_preset(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.jsonl").write_text("{}\n")
    config = load_config(write(tmp_path, {"model": {"name": "x"}, "data": {"train": "d/train.jsonl"}}))
    assert config.data.train == str(tmp_path / "d" / "train.jsonl")


yaml_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=8))
yaml_values = st.recursive(
    yaml_scalars,
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(st.text(max_size=8), children, max_size=4)),
    max_leaves=12,
)
section_names = st.sampled_from(["model", "lora", "dropout", "data", "train", "eval", "output", "distributed", "x"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=st.one_of(yaml_values, st.dictionaries(section_names, yaml_values, max_size=5)))
def test_arbitrary_yaml_never_gives_a_traceback(tmp_path, document):
    path = write(tmp_path, yaml.safe_dump(document))
    try:
        load_config(path)
    except ConfigError as err:
        assert "\n" not in str(err)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(overrides=st.lists(st.text(max_size=20), max_size=3))
@example(overrides=["0\n0="])  # a key with a newline once broke the one-line error
def test_arbitrary_overrides_never_give_a_traceback(tmp_path, overrides):
    path = write(tmp_path, MINIMAL)
    try:
        load_config(path, overrides)
    except ConfigError as err:
        assert "\n" not in str(err)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=60))
def test_arbitrary_text_never_gives_a_traceback(tmp_path, text):
    try:
        load_config(write(tmp_path, text))
    except ConfigError as err:
        assert "\n" not in str(err)


@pytest.mark.parametrize("overrides,message", [
    (["dropout.compensation=kl", "dropout.kl_weight=0"], "dropout.compensation kl/js needs dropout.kl_weight > 0"),
    (["train.eval_strategy=steps"], "train: eval_strategy 'steps' needs train.eval_steps"),
])
def test_a_rule_across_keys_is_one_line_without_the_whole_section(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, MINIMAL), overrides, overrides_from="--set")
    assert str(caught.value).endswith(f": {message}")  # no "(got {...})" echo of the preset or section
