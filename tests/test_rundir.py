"""Run directories: layout, refusal to clobber, resume compatibility, adapters and sidecars."""

import importlib.metadata
import json
import re
import shutil
import time
from pathlib import Path

import pytest
import torch

import hkft.run.directory
from hkft.config import load_config, validate_config
from hkft.errors import ModelError, TrainingError
from hkft.run.directory import (
    RunDir,
    check_resume_compatible,
    default_run_dir,
    find_adapter_dir,
    latest_checkpoint,
    prepare_run_dir,
    read_sidecar,
    save_run_config,
    write_sidecar,
)

PRESET = {
    "description": "tiny",
    "model": {"name": "some/model", "task": "classification"},
    "data": {"train": "/data/train.jsonl", "test": "/data/test.jsonl"},
    "train": {"epochs": 3, "max_steps": -1, "logging_steps": 10},
}


def config(**sections):
    data = json.loads(json.dumps(PRESET))
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values} if isinstance(values, dict) else values
    return validate_config(data)


def add_checkpoint(run: RunDir, step: int, complete: bool = True) -> Path:
    path = run.checkpoints_dir / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(b"weights")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}) if complete else '{"glob')
    return path


def test_layout_matches_the_documented_one(tmp_path):
    run = RunDir(tmp_path)
    files = [run.config_path, run.info_path, run.metrics_jsonl, run.metrics_json, run.eval_json, run.predictions_jsonl]
    folders = [run.adapter_dir, run.checkpoints_dir, run.tb_dir]
    layout = hkft.run.directory.__doc__.split("```")[1]
    documented = set(re.findall(r"[\w.<>-]+/?", layout))
    for path in files + folders:
        assert path.parent == tmp_path
        assert path.name + ("/" if path in folders else "") in documented, f"{path.name} is not in the documented layout"


def test_default_run_dir(tmp_path):
    assert default_run_dir(config(), Path("presets/glue-rte.yaml")) == Path("runs/glue-rte")
    assert default_run_dir(config(output={"dir": str(tmp_path / "mine")}), Path("p.yaml")) == tmp_path / "mine"


def test_fresh_run_dir_is_created(tmp_path):
    run = prepare_run_dir(tmp_path / "a" / "b", resume=False, overwrite=False)
    assert run.root.is_dir() and run == RunDir(tmp_path / "a" / "b")


@pytest.mark.parametrize("made_by", ["adapter", "metrics", "checkpoint"])
def test_existing_run_is_refused_without_a_flag(tmp_path, made_by):
    run = RunDir(tmp_path / "run")
    if made_by == "adapter":
        run.adapter_dir.mkdir(parents=True)
    elif made_by == "metrics":
        run.root.mkdir()
        run.metrics_json.write_text("{}")
    else:
        add_checkpoint(run, 4)
    with pytest.raises(TrainingError) as caught:
        prepare_run_dir(run.root, resume=False, overwrite=False)
    message = str(caught.value)
    assert message.startswith(f"{run.root} already holds a run") and "--resume" in message and "--overwrite" in message
    assert "\n" not in message and caught.value.exit_code == 3


def test_overwrite_removes_hkft_files_and_keeps_others(tmp_path):
    run = RunDir(tmp_path)
    add_checkpoint(run, 2)
    run.adapter_dir.mkdir()
    (run.adapter_dir / "adapter_config.json").write_text("{}")
    for path in (run.config_path, run.info_path, run.metrics_json, run.metrics_jsonl, run.eval_json, run.predictions_jsonl):
        path.write_text("old")
    run.tb_dir.mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    prepare_run_dir(tmp_path, resume=False, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_failed_start_is_reused_without_stale_metrics(tmp_path):
    """A start that died before its first checkpoint left a config and some log lines, no results."""
    run = RunDir(tmp_path)
    run.config_path.write_text("old")
    run.metrics_jsonl.write_text('{"step": 1}\n')
    prepare_run_dir(tmp_path, resume=False, overwrite=False)
    assert not run.metrics_jsonl.exists() and not run.config_path.exists()


def test_a_directory_that_is_not_a_run_keeps_its_files_under_hkft_names(tmp_path):
    """No config of ours: a tb/ or eval.json there is the user's, and is not deleted without --overwrite."""
    (tmp_path / "tb").mkdir()
    (tmp_path / "tb" / "events.important").write_text("x")
    (tmp_path / "eval.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(TrainingError, match=r"is not an hkft run but holds tb, eval\.json, which training would replace"):
        prepare_run_dir(tmp_path, resume=False, overwrite=False)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["eval.json", "events.important", "notes.txt", "tb"]
    (tmp_path / "eval.json").unlink()
    shutil.rmtree(tmp_path / "tb")
    prepare_run_dir(tmp_path, resume=False, overwrite=False)  # other files alone are no obstacle
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_resume_needs_a_complete_checkpoint(tmp_path):
    run = RunDir(tmp_path)
    add_checkpoint(run, 3, complete=False)
    with pytest.raises(TrainingError, match="has no checkpoint to resume from"):
        prepare_run_dir(tmp_path, resume=True, overwrite=False)


def test_resume_keeps_everything(tmp_path):
    run = RunDir(tmp_path)
    add_checkpoint(run, 3)
    run.metrics_jsonl.write_text('{"step": 1}\n')
    prepare_run_dir(tmp_path, resume=True, overwrite=False)
    assert run.metrics_jsonl.read_text() == '{"step": 1}\n' and latest_checkpoint(run).name == "checkpoint-3"


def test_resume_and_overwrite_together_are_refused(tmp_path):
    add_checkpoint(RunDir(tmp_path), 3)
    with pytest.raises(TrainingError, match="contradict"):
        prepare_run_dir(tmp_path, resume=True, overwrite=True)
    assert latest_checkpoint(RunDir(tmp_path)) is not None


def test_a_file_in_place_of_the_run_dir(tmp_path):
    (tmp_path / "run").write_text("x")
    with pytest.raises(TrainingError, match="is a file, not a run directory"):
        prepare_run_dir(tmp_path / "run", resume=False, overwrite=True)


def test_latest_checkpoint_orders_steps_numerically_and_skips_incomplete(tmp_path):
    run = RunDir(tmp_path)
    assert latest_checkpoint(run) is None
    for step in (9, 10, 100):
        add_checkpoint(run, step)
    add_checkpoint(run, 200, complete=False)
    (run.checkpoints_dir / "checkpoint-final").mkdir()
    assert latest_checkpoint(run).name == "checkpoint-100"


def test_saved_config_reproduces_and_run_info_records_the_run(tmp_path):
    cfg = config(lora={"r": 4}, dropout={"method": "dropkey", "rate": 0.2})
    run = prepare_run_dir(tmp_path / "run", resume=False, overwrite=False)
    before = time.time()
    save_run_config(run, cfg, ["hkft", "train", "p.yaml", "--set", "lora.r=4"])
    assert load_config(run.config_path) == cfg
    info = json.loads(run.info_path.read_text())
    assert info["argv"] == ["hkft", "train", "p.yaml", "--set", "lora.r=4"] and info["seed"] == 42
    started = time.mktime(time.strptime(info["started"], "%Y-%m-%dT%H:%M:%S%z"))
    assert before - 2 <= started <= time.time() + 1
    environment = info["environment"]
    assert environment["torch"] == torch.__version__
    for package in ("transformers", "peft", "bitsandbytes"):
        assert environment[package] == importlib.metadata.version(package)
    assert "cuda available" in environment and "bitsandbytes support" in environment


# --- resume compatibility ------------------------------------------------------------------------

@pytest.mark.parametrize("changes", [
    {},
    {"output": {"dir": "elsewhere", "report_to": []}},
    {"eval": {"split": "validation", "batch_size": 64}},
    {"train": {"logging_steps": 1}},
    {"train": {"epochs": 5}},
    {"train": {"epochs": 3.5, "num_workers": 2}, "description": "longer"},
])
def test_harmless_changes_may_resume(changes):
    check_resume_compatible(config(), config(**changes))


def test_max_steps_may_grow_to_unlimited():
    check_resume_compatible(config(train={"max_steps": 100}), config(train={"max_steps": 200}))
    check_resume_compatible(config(train={"max_steps": 100}), config(train={"max_steps": -1}))


@pytest.mark.parametrize("saved,new,key", [
    ({"lora": {"r": 8}}, {"lora": {"r": 4}}, "lora.r"),
    ({}, {"model": {"name": "other/model"}}, "model.name"),
    ({}, {"data": {"train": "/data/other.jsonl"}}, "data.train"),
    ({}, {"dropout": {"method": "dropkey"}}, "dropout.method"),
    ({}, {"train": {"lr": 1e-3}}, "train.lr"),
    ({}, {"train": {"seed": 7}}, "train.seed"),
    ({}, {"dropout": {"positions": {"hidden": None}}}, "dropout.positions"),
    ({"dropout": {"positions": {"hidden": None}}}, {"dropout": {"positions": {"input": None}}}, "dropout.positions.hidden"),
    ({"train": {"epochs": 3}}, {"train": {"epochs": 2}}, "train.epochs"),
    ({"train": {"max_steps": 50}}, {"train": {"max_steps": 20}}, "train.max_steps"),
    ({"train": {"max_steps": -1}}, {"train": {"max_steps": 20}}, "train.max_steps"),
])
def test_other_changes_refuse_to_resume_naming_the_key(saved, new, key):
    with pytest.raises(TrainingError) as caught:
        check_resume_compatible(config(**saved), config(**new))
    message = str(caught.value)
    assert message.startswith(f"cannot resume: {key}") and caught.value.exit_code == 3, message


def test_the_first_difference_in_preset_order_is_named():
    with pytest.raises(TrainingError, match=r"cannot resume: model\.name was 'some/model' .* is 'b/c' now"):
        check_resume_compatible(config(), config(train={"lr": 1.0}, lora={"r": 2}, model={"name": "b/c"}))


# --- adapters and sidecars -----------------------------------------------------------------------

def test_find_adapter_dir_accepts_a_run_or_an_adapter(tmp_path):
    run = RunDir(tmp_path)
    run.adapter_dir.mkdir()
    (run.adapter_dir / "adapter_config.json").write_text("{}")
    assert find_adapter_dir(tmp_path) == run.adapter_dir
    assert find_adapter_dir(run.adapter_dir) == run.adapter_dir


def test_find_adapter_dir_without_adapter(tmp_path):
    with pytest.raises(ModelError) as caught:
        find_adapter_dir(tmp_path)
    assert str(caught.value).startswith(
        f"{tmp_path} has no LoRA adapter (expected adapter_config.json in {tmp_path} or {tmp_path / 'adapter'})"
    )


def test_sidecar_round_trip_and_damage(tmp_path):
    assert read_sidecar(tmp_path) == {}
    facts = {"task": "classification", "label_names": ["neg", "pos"], "num_labels": 2, "base_model": "m"}
    write_sidecar(tmp_path, facts)
    assert read_sidecar(tmp_path) == facts
    assert not (tmp_path / "adapter_config.json").exists()
    (tmp_path / "hkft_adapter.json").write_text("{broken")
    with pytest.raises(ModelError, match="hkft_adapter.json is not valid JSON"):
        read_sidecar(tmp_path)
