"""The catalogue of bad inputs: each gets one clear line on stderr, a non-zero exit, no traceback,
and leaves nothing half-written."""

import errno
import json
import shutil
from pathlib import Path

import pytest
import yaml
from checkpoints import (
    MEMORISE,
    REVIEWS,
    memorise_texts,
    review_texts,
    save_tiny_model,
    write_jsonl,
)
from conftest import assert_one_line_error


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    save_tiny_model("llama", root / "llama", review_texts() + memorise_texts())
    save_tiny_model("gpt2", root / "gpt2", memorise_texts())
    write_jsonl(root / "reviews.jsonl", REVIEWS)
    write_jsonl(root / "memorise.jsonl", MEMORISE)
    return root


def make_preset(root: Path, name: str = "preset.yaml", **sections) -> Path:
    preset = {
        "model": {"name": str(root / "llama"), "task": "classification"},
        "data": {"train": str(root / "reviews.jsonl"), "test": str(root / "reviews.jsonl")},
        "train": {"max_steps": 2, "batch_size": 4, "eval_strategy": "no"},
    }
    for section, values in sections.items():
        preset[section] = {**preset.get(section, {}), **values}
    path = root / name
    path.write_text(yaml.safe_dump(preset))
    return path


def assert_nothing_written(run: Path) -> None:
    assert not (run / "adapter").exists() and not (run / "metrics.json").exists()
    assert not list(run.glob("checkpoints/checkpoint-*")) if run.exists() else True
    assert not list(run.parent.glob(".tmp-*")) if run.parent.exists() else True


def train_fails(cli, preset, run: Path, *fragments, code=2, extra=()):
    result = cli("train", preset, "--output-dir", run, *extra)
    assert_one_line_error(result, *fragments, code=code)
    assert_nothing_written(run)


# --- the preset itself ---------------------------------------------------------------------------

def test_yaml_syntax_error_names_line_and_column(cli, tmp_path):
    (tmp_path / "p.yaml").write_text("model:\n  name: x\n   task: [\n")
    assert_one_line_error(cli("train", tmp_path / "p.yaml"), "YAML syntax error at line", "column")


def test_unknown_key_with_closest_valid_key(cli, workspace, tmp_path):
    preset = make_preset(tmp_path, lora={"alpah": 16})
    assert_one_line_error(cli("train", preset), "lora.alpah: unknown key (did you mean lora.alpha?)")


def test_wrong_type(cli, workspace, tmp_path):
    assert_one_line_error(cli("train", make_preset(workspace), "--set", "train.batch_size=many"), "train.batch_size")


@pytest.mark.parametrize("override,fragment", [
    ("dropout.rate=1.0", "dropout.rate: Input should be less than 1"),
    ("dropout.rate=-0.5", "dropout.rate: Input should be greater than or equal to 0"),
    ("lora.r=0", "lora.r: Input should be greater than 0"),
    ("train.epochs=-2", "train.epochs: Input should be greater than 0"),
    ("dropout.method=dropblock", "unknown dropout method 'dropblock'"),
    ("dropout.positions.hidden.pattern=stripes", "dropout.positions.hidden.pattern"),
    ("dropout.layers=[0, 40]", "out of range: the model has layers 0..3"),
])
def test_out_of_range_and_unknown_values(cli, workspace, override, fragment):
    run = workspace / f"run-{abs(hash(override))}"
    train_fails(cli, make_preset(workspace), run, fragment, extra=("--set", override))


def test_missing_required_key(cli, tmp_path):
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"data": {"train": "x.jsonl"}}))
    assert_one_line_error(cli("train", tmp_path / "p.yaml"), "model: required key is missing")


def test_preset_that_does_not_exist(cli):
    assert_one_line_error(cli("train", "no/such/preset.yaml"), "no such preset file")


def test_malformed_override(cli, workspace):
    assert_one_line_error(cli("config", make_preset(workspace), "--set", "lora.r"), "not of the form key.sub=value")


def test_non_utf8_preset(cli, tmp_path):
    (tmp_path / "p.yaml").write_bytes(b"model: {name: caf\xe9}\n")
    assert_one_line_error(cli("config", tmp_path / "p.yaml"), "not UTF-8")


# --- data ----------------------------------------------------------------------------------------

def test_missing_data_file(cli, workspace, tmp_path):
    preset = make_preset(tmp_path, data={"train": str(tmp_path / "nope.jsonl")}, model={"name": str(workspace / "llama")})
    train_fails(cli, preset, tmp_path / "run", "data file", "nope.jsonl does not exist")


def test_unreadable_data_path(cli, workspace, tmp_path):
    (tmp_path / "folder.jsonl").mkdir()
    preset = make_preset(tmp_path, data={"train": str(tmp_path / "folder.jsonl")}, model={"name": str(workspace / "llama")})
    train_fails(cli, preset, tmp_path / "run", "folder.jsonl is not a file")


def test_empty_data_file(cli, workspace, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    preset = make_preset(tmp_path, data={"train": str(tmp_path / "empty.jsonl")}, model={"name": str(workspace / "llama")})
    train_fails(cli, preset, tmp_path / "run", "empty.jsonl is empty")


def test_unsupported_data_format(cli, workspace, tmp_path):
    (tmp_path / "data.txt").write_text("hello\n")
    preset = make_preset(tmp_path, data={"train": str(tmp_path / "data.txt")}, model={"name": str(workspace / "llama")})
    train_fails(cli, preset, tmp_path / "run", "unsupported file type '.txt'", ".jsonl")


def test_missing_text_column_lists_available_columns(cli, workspace, tmp_path):
    preset = make_preset(workspace, "p-text.yaml", data={"text_column": "sentence"})
    train_fails(cli, preset, tmp_path / "run", "has no column 'sentence'", "available columns: text, label")


def test_missing_label_column(cli, workspace, tmp_path):
    preset = make_preset(workspace, "p-label.yaml", data={"label_column": "gold"})
    train_fails(cli, preset, tmp_path / "run", "has no column 'gold'")


def test_eval_label_never_seen_in_training(cli, workspace, tmp_path):
    write_jsonl(tmp_path / "test.jsonl", [{"text": "the lamp is fine", "label": "neutral"}])
    preset = make_preset(tmp_path, data={"train": str(workspace / "reviews.jsonl"), "test": str(tmp_path / "test.jsonl")},
                         model={"name": str(workspace / "llama")})
    train_fails(cli, preset, tmp_path / "run", "label 'neutral', which training never saw", "pos")


def test_non_utf8_data(cli, workspace, tmp_path):
    (tmp_path / "latin.jsonl").write_bytes(b'{"text": "caf\xe9 is great", "label": "pos"}\n')
    preset = make_preset(tmp_path, data={"train": str(tmp_path / "latin.jsonl")}, model={"name": str(workspace / "llama")})
    train_fails(cli, preset, tmp_path / "run", "line 1 is not UTF-8", "re-encode")


def test_single_label_training_data(cli, workspace, tmp_path):
    write_jsonl(tmp_path / "one.jsonl", [{"text": "x", "label": "a"}] * 4)
    preset = make_preset(tmp_path, data={"train": str(tmp_path / "one.jsonl"), "test": None},
                         model={"name": str(workspace / "llama")})
    train_fails(cli, preset, tmp_path / "run", "single label")


def test_regression_labels_must_be_numbers(cli, workspace, tmp_path):
    preset = make_preset(workspace, "p-reg.yaml", model={"task": "regression"})
    train_fails(cli, preset, tmp_path / "run", "regression labels must be numbers")


def test_template_with_missing_field(cli, workspace, tmp_path):
    preset = make_preset(workspace, "p-tpl.yaml", model={"task": "causal-lm"},
                         data={"train": str(workspace / "memorise.jsonl"), "test": None, "template": "{question}\n"})
    train_fails(cli, preset, tmp_path / "run", "uses field 'question'")


def test_hub_dataset_while_offline(cli, workspace, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    preset = make_preset(workspace, "p-hub.yaml", data={"train": "hub:nyu-mll/glue:rte:train", "test": None})
    train_fails(cli, preset, tmp_path / "run", "cannot load hub dataset hub:nyu-mll/glue:rte:train:", "needs network once")


# --- model ---------------------------------------------------------------------------------------

def test_model_directory_that_does_not_exist(cli, workspace, tmp_path):
    preset = make_preset(workspace, "p-nomodel.yaml", model={"name": "./models/nothing-here"})
    train_fails(cli, preset, tmp_path / "run", "no such model directory")


def test_hub_model_while_offline(cli, workspace, tmp_path):
    preset = make_preset(workspace, "p-hubmodel.yaml", model={"name": "someone/not-cached-model-xyz"})
    train_fails(cli, preset, tmp_path / "run", "not available offline", "local directory")


def test_target_modules_absent_lists_available(cli, workspace, tmp_path):
    preset = make_preset(workspace, "p-target.yaml", lora={"target_modules": ["query", "value"]})
    train_fails(cli, preset, tmp_path / "run", "query, value not found", "available: down_proj, gate_proj")


def test_quantization_without_bitsandbytes(cli, workspace, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    preset = make_preset(workspace, "p-bnb.yaml", model={"quantization": "4bit"})
    train_fails(cli, preset, tmp_path / "run", "needs bitsandbytes", "pip install 'hkft[gpu]'")


def test_quantizing_a_conv1d_model(cli, workspace, tmp_path):
    preset = make_preset(workspace, "p-gpt2q.yaml", model={"name": str(workspace / "gpt2"), "quantization": "8bit"})
    train_fails(cli, preset, tmp_path / "run", "Conv1D layers, which bitsandbytes cannot quantize")


def test_mixed_precision_without_a_gpu(cli, workspace, tmp_path):
    preset = make_preset(workspace, "p-bf16.yaml", train={"precision": "bf16"})
    train_fails(cli, preset, tmp_path / "run", "train.precision bf16 needs a GPU")


def test_deepspeed_without_its_config(cli, workspace, tmp_path):
    preset = make_preset(workspace, "p-ds.yaml", distributed={"strategy": "deepspeed"})
    train_fails(cli, preset, tmp_path / "run", "needs distributed.deepspeed_config")


# --- run directories, eval and merge -------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(workspace):
    from typer.testing import CliRunner

    from hkft.cli import app

    run = workspace / "trained"
    result = CliRunner().invoke(app, ["train", str(make_preset(workspace, "p-ok.yaml")), "--output-dir", str(run)])
    assert result.exit_code == 0, result.stderr
    return run


def test_existing_run_without_resume_or_overwrite(cli, workspace, trained):
    result = cli("train", workspace / "p-ok.yaml", "--output-dir", trained)
    assert_one_line_error(result, "already holds a run", "--resume", "--overwrite", code=3)
    assert (trained / "adapter" / "adapter_config.json").is_file()


def test_resume_without_checkpoint(cli, workspace, tmp_path):
    assert_one_line_error(cli("train", make_preset(workspace), "--output-dir", tmp_path / "fresh", "--resume"),
                          "has no checkpoint to resume from", code=3)


def test_resume_with_a_changed_config(cli, workspace, trained):
    result = cli("train", workspace / "p-ok.yaml", "--output-dir", trained, "--resume", "--set", "lora.r=4")
    assert_one_line_error(result, "cannot resume: lora.r was 8", "is 4 now", code=3)


def test_merge_on_a_directory_without_adapter(cli, tmp_path):
    assert_one_line_error(cli("merge-adapter", tmp_path, "--output", tmp_path / "out"), "has no LoRA adapter")
    assert not (tmp_path / "out").exists()


def test_merge_with_an_unknown_dtype(cli, trained, tmp_path):
    assert_one_line_error(cli("merge-adapter", trained, "--output", tmp_path / "m", "--dtype", "int4"), "--dtype 'int4'")


def test_eval_with_a_bad_split(cli, trained):
    assert_one_line_error(cli("eval", trained, "--split", "dev"), "--split 'dev'")


def test_eval_when_the_base_model_changed(cli, workspace, trained, tmp_path):
    moved = tmp_path / "llama"
    shutil.copytree(workspace / "llama", moved)
    config = json.loads((moved / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3
    (moved / "config.json").write_text(json.dumps(config))
    result = cli("eval", trained, "--set", f"model.name={moved}")
    assert_one_line_error(result, "is not the one", "was trained on")


def test_disk_full_while_writing_eval_keeps_the_old_file(cli, trained, monkeypatch):
    assert cli("eval", trained).exit_code == 0
    before = (trained / "eval.json").read_text()

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("hkft.run.files.os.replace", no_space)
    result = cli("eval", trained)
    assert_one_line_error(result, "no space left on the device while writing", "eval.json", code=4)
    assert (trained / "eval.json").read_text() == before
    assert not list(trained.glob(".tmp-*"))
