"""The command shell: presets, config printing, env, run-directory rules, error lines and wiring.

Training itself is tested end to end elsewhere; here pipeline.train / evaluate / merge_adapter are
replaced by recorders, so each test checks what the command hands them and prints back.
"""

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import assert_one_line_error

import hkft.commands.common
from hkft.config import load_config, presets_dir
from hkft.models.inspection import is_preset
from hkft.run.directory import RunDir, save_run_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """Tables wide enough that no path or description is wrapped inside a cell."""
    monkeypatch.setattr(hkft.commands.common.console, "_width", 400)


@pytest.fixture
def preset(tmp_path) -> Path:
    data = {
        "description": "a tiny preset",
        "model": {"name": "tiny/never-loaded", "task": "classification"},
        "data": {"train": "/nowhere/train.jsonl", "test": "/nowhere/test.jsonl"},
        "train": {"batch_size": 4, "grad_accum": 3, "logging_steps": 5},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def calls(monkeypatch) -> list:
    """Replaces the pipeline and the merger with recorders; each call lands in the returned list."""
    import hkft.models.merge
    import hkft.recipes.evaluate
    import hkft.recipes.train

    recorded: list = []

    def train(cfg, run, *, resume, console):
        recorded.append(("train", cfg, run, resume, run.config_path.read_text(), json.loads(run.info_path.read_text())))
        return hkft.recipes.train.TrainResult(run.root, run.adapter_dir, {"accuracy": 0.8333333, "macro_f1": 0.5})

    def evaluate(target, *, data, split, overrides, console):
        recorded.append(("eval", target, data, split, overrides))
        return hkft.recipes.evaluate.EvalResult({"accuracy": 0.625}, target / "eval.json", target / "predictions.jsonl")

    def merge_adapter(target, output, dtype="float32", overwrite=False, gguf_type=None):
        recorded.append(("merge", target, output, dtype, overwrite, gguf_type))
        gguf_file = output / "converted.gguf" if gguf_type else None  # a name only the merger knows
        return hkft.models.merge.MergeReport(output, 3.0517578125e-05, dtype, gguf_file)

    monkeypatch.setattr(hkft.recipes.train, "train", train)
    monkeypatch.setattr(hkft.recipes.evaluate, "evaluate", evaluate)
    monkeypatch.setattr(hkft.models.merge, "merge_adapter", merge_adapter)
    return recorded


def printed_table(stdout: str) -> dict[str, str]:
    """The two-column table a command printed, as {first column: second column}."""
    rows = (line.split("│") for line in stdout.splitlines())
    return {cells[1].strip(): cells[2].strip() for cells in rows if len(cells) == 4}


def make_finished_run(run: RunDir) -> None:
    run.adapter_dir.mkdir(parents=True)
    (run.adapter_dir / "adapter_config.json").write_text("{}")


def make_interrupted_run(run: RunDir, preset: Path, *overrides: str) -> None:
    checkpoint = run.checkpoints_dir / "checkpoint-4"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text('{"global_step": 4}')
    (checkpoint / "adapter_model.safetensors").write_bytes(b"weights")
    save_run_config(run, load_config(preset, list(overrides)), ["hkft", "train", str(preset)])


# --- presets, config, env ------------------------------------------------------------------------

def test_presets_lists_every_shipped_preset_with_its_description(cli):
    result = cli("presets")
    assert result.exit_code == 0, result.stderr
    shipped = sorted(presets_dir().glob("*.yaml"))
    assert len(shipped) >= 2
    rows = [line for line in result.stdout.splitlines() if line.startswith("│")]
    for path in shipped:
        description = yaml.safe_load(path.read_text())["description"]
        assert any(path.stem in row and description in row for row in rows), path.stem


def test_presets_survives_a_broken_preset(cli, tmp_path, monkeypatch):
    (tmp_path / "good.yaml").write_text("description: fine\n")
    (tmp_path / "bad.yaml").write_text("description: [\n")
    monkeypatch.setattr("hkft.commands.presets.presets_dir", lambda: tmp_path)
    result = cli("presets")
    assert result.exit_code == 0
    assert "fine" in result.stdout and "(unreadable:" in result.stdout and "YAML syntax error" in result.stdout


def test_a_yml_preset_is_found_by_name_and_listed(cli, tmp_path, monkeypatch):
    shipped = tmp_path / "presets"
    shipped.mkdir()
    for name in ("mine.yml", "yours.yaml"):
        (shipped / name).write_text(yaml.safe_dump({"description": f"{name} preset", "model": {"name": "x"},
                                                    "data": {"train": "t.jsonl"}}))
    monkeypatch.setattr("hkft.config.loading.presets_dir", lambda: shipped)
    monkeypatch.setattr("hkft.commands.presets.presets_dir", lambda: shipped)
    for name in ("mine", "mine.yml", "yours"):
        result = cli("train", name, "--dry-run", "--output-dir", tmp_path / "run")
        assert result.exit_code == 0, result.stderr
    assert is_preset("mine") and not is_preset("mine.yaml")
    assert_one_line_error(cli("train", "mien"), "mien: no such preset file", "did you mean mine?")
    listed = cli("presets").stdout
    assert "mine.yml preset" in listed and "yours.yaml preset" in listed

def test_config_prints_the_resolved_preset_with_both_override_styles(cli, monkeypatch):
    monkeypatch.setattr(hkft.commands.common.console, "_width", 40)  # a narrow terminal must not wrap YAML lines
    result = cli("config", "quickstart", "lora.r=4", "--set", "train.lr=0.001", "-s", "dropout.rate=0.25")
    assert result.exit_code == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    raw = yaml.safe_load((presets_dir() / "quickstart.yaml").read_text())
    assert printed["description"] == raw["description"]  # a long line, printed unwrapped
    assert printed["lora"]["r"] == 4 and printed["train"]["lr"] == 0.001 and printed["dropout"]["rate"] == 0.25
    assert printed["train"]["epochs"] == raw["train"]["epochs"] and printed["lora"]["alpha"] == raw["lora"]["alpha"]
    assert printed["data"]["train"] == str((presets_dir() / raw["data"]["train"]).resolve())
    assert printed["train"]["weight_decay"] == 0.0  # a default the preset leaves out


def test_printed_config_is_a_preset_that_prints_the_same(cli, tmp_path):
    first = cli("config", "quickstart", "lora.r=4")
    (tmp_path / "resolved.yaml").write_text(first.stdout)
    assert cli("config", tmp_path / "resolved.yaml").stdout == first.stdout


def test_unknown_key_is_one_line_with_a_suggestion(cli, preset):
    assert_one_line_error(cli("config", preset, "--set", "lora.alpah=3"), "lora.alpah: unknown key (did you mean lora.alpha?)")
    assert_one_line_error(cli("train", preset, "trian.lr=3"), "trian: unknown key (did you mean train?)")


def test_yaml_syntax_error_names_the_line_and_column(cli, tmp_path):
    text = "model:\n  name: x\ndata:\n  train: [a, b\n  test: c\n"
    try:
        yaml.safe_load(text)
    except yaml.YAMLError as err:
        expected = f"line {err.problem_mark.line + 1}, column {err.problem_mark.column + 1}"
    (tmp_path / "broken.yaml").write_text(text)
    assert_one_line_error(cli("config", tmp_path / "broken.yaml"), f"YAML syntax error at {expected}")


def test_unknown_shipped_preset_suggests_one(cli):
    assert_one_line_error(cli("config", "quickstrat"), "quickstrat: no such preset file", "did you mean quickstart?")


def test_error_text_is_printed_verbatim(cli):
    """`:train:` is an emoji code to rich, and every hub spec of a training split holds it."""
    assert_one_line_error(cli("config", "hub:nyu-mll/glue:rte:train:"), "error: hub:nyu-mll/glue:rte:train:: no such preset file")


def test_env_reports_the_installed_versions(cli):
    result = cli("env")
    assert result.exit_code == 0, result.stderr
    assert torch.__version__ in result.stdout
    for package in ("transformers", "peft", "accelerate", "datasets", "bitsandbytes"):
        assert importlib.metadata.version(package) in result.stdout, package
    assert "bitsandbytes support" in result.stdout and "sdpa" in result.stdout


def test_env_says_when_bitsandbytes_is_missing_or_broken(monkeypatch):
    from hkft.run.environment import environment_report

    expected = "CUDA backend" if torch.cuda.is_available() else "CPU backend"
    assert environment_report()["bitsandbytes support"].startswith(expected)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    assert environment_report()["bitsandbytes support"].startswith("installed but cannot run on")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    assert environment_report()["bitsandbytes support"].startswith("not installed")


# --- train: run directories ----------------------------------------------------------------------

def test_train_refuses_an_existing_run(cli, preset, tmp_path, calls):
    run = RunDir(tmp_path / "run")
    make_finished_run(run)
    result = cli("train", preset, "--output-dir", run.root)
    assert_one_line_error(result, f"{run.root} already holds a run", "--resume", "--overwrite", code=3)
    assert (run.adapter_dir / "adapter_config.json").is_file() and calls == []


def test_train_overwrite_replaces_the_run(cli, preset, tmp_path, calls):
    run = RunDir(tmp_path / "run")
    make_finished_run(run)
    assert cli("train", preset, "--output-dir", run.root, "--overwrite").exit_code == 0
    assert not run.adapter_dir.exists() and [call[0] for call in calls] == ["train"]


def test_train_resume_with_a_changed_key_is_refused(cli, preset, tmp_path, calls):
    run = RunDir(tmp_path / "run")
    make_interrupted_run(run, preset, "lora.r=8")
    result = cli("train", preset, "--output-dir", run.root, "--resume", "--set", "lora.r=4")
    assert_one_line_error(result, "cannot resume: lora.r was 8 in the interrupted run and is 4 now", code=3)
    assert calls == []


def test_train_resume_with_harmless_changes_continues(cli, preset, tmp_path, calls):
    run = RunDir(tmp_path / "run")
    make_interrupted_run(run, preset)
    result = cli("train", preset, "--output-dir", run.root, "--resume", "train.logging_steps=1", "train.epochs=6")
    assert result.exit_code == 0, result.stderr
    (_, cfg, passed_run, resume, _, _), = calls
    assert resume is True and passed_run == run and cfg.train.epochs == 6
    assert (run.checkpoints_dir / "checkpoint-4").is_dir()


def test_train_resume_without_a_checkpoint(cli, preset, tmp_path, calls):
    assert_one_line_error(cli("train", preset, "--output-dir", tmp_path / "new", "--resume"),
                          "has no checkpoint to resume from", code=3)
    assert calls == []


def test_train_hands_the_resolved_config_to_the_pipeline(cli, preset, tmp_path, calls):
    run_root = tmp_path / "runs" / "first"
    result = cli("train", preset, "lora.r=16", "--set", "train.seed=7", "--output-dir", run_root)
    assert result.exit_code == 0, result.stderr
    (_, cfg, run, resume, saved_yaml, info), = calls
    assert run == RunDir(run_root) and resume is False
    assert cfg == load_config(preset, ["lora.r=16", "train.seed=7", f"output.dir={run_root}"])
    assert yaml.safe_load(saved_yaml) == cfg.model_dump(mode="json")  # written before training starts
    assert info["seed"] == 7 and info["argv"] == sys.argv and info["environment"]["torch"] == torch.__version__
    assert printed_table(result.stdout) == {"accuracy": "0.8333", "macro_f1": "0.5",
                                            "adapter": str(run_root / "adapter")}


def test_saved_config_reproduces_the_run(cli, preset, tmp_path, calls):
    assert cli("train", preset, "lora.r=16", "--output-dir", tmp_path / "a").exit_code == 0
    assert cli("train", tmp_path / "a" / "hkft_config.yaml", "--output-dir", tmp_path / "b").exit_code == 0
    first, second = calls[0][1], calls[1][1]
    assert second.model_dump(exclude={"output"}) == first.model_dump(exclude={"output"})


def test_default_run_dir_is_runs_slash_preset_name(cli, preset, tmp_path, calls, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli("train", preset).exit_code == 0
    assert calls[0][2].root == Path("runs") / "tiny" and (tmp_path / "runs" / "tiny" / "hkft_config.yaml").is_file()


def test_dry_run_prints_config_and_facts_and_touches_nothing(cli, preset, tmp_path, calls):
    run_root = tmp_path / "run"
    result = cli("train", preset, "--dry-run", "--output-dir", run_root, "lora.r=4", "lora.alpha=32")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    table_start = next(i for i, line in enumerate(lines) if "dry run" in line)
    assert yaml.safe_load("\n".join(lines[:table_start])) == load_config(
        preset, ["lora.r=4", "lora.alpha=32", f"output.dir={run_root}"]).model_dump(mode="json")
    facts = {row.split("│")[1].strip(): row.split("│")[2].strip() for row in lines[table_start:] if row.startswith("│")}
    assert facts["effective batch size"] == "12" and facts["lora scaling"] == "8"
    assert facts["run directory"] == f"{run_root} (new)"
    assert not run_root.exists() and calls == []


# --- eval and merge-adapter ----------------------------------------------------------------------

def test_eval_hands_its_options_to_the_pipeline(cli, tmp_path, calls, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "extra.jsonl").write_text('{"text": "x", "label": "a"}\n')
    result = cli("eval", tmp_path, "--data", "extra.jsonl", "--split", "test", "--set", "eval.batch_size=2")
    assert result.exit_code == 0, result.stderr
    assert calls == [("eval", tmp_path, "extra.jsonl", "test", ["eval.batch_size=2"])]
    assert printed_table(result.stdout) == {"accuracy": "0.625", "eval.json": str(tmp_path / "eval.json"),
                                            "predictions": str(tmp_path / "predictions.jsonl")}


def test_eval_data_that_does_not_exist_names_the_option(cli, tmp_path, calls):
    result = cli("eval", tmp_path, "--data", tmp_path / "missing.jsonl")
    assert_one_line_error(result, "missing.jsonl does not exist (check --data)")
    assert calls == []


def test_merge_adapter_prints_the_output_and_the_logit_difference(cli, tmp_path, calls):
    result = cli("merge-adapter", tmp_path, "--output", tmp_path / "merged", "--dtype", "bfloat16", "--overwrite")
    assert result.exit_code == 0, result.stderr
    assert calls == [("merge", tmp_path, tmp_path / "merged", "bfloat16", True, None)]
    assert printed_table(result.stdout) == {"output": str(tmp_path / "merged"), "dtype": "bfloat16",
                                            "max |Δlogit| vs adapter": "3.052e-05"}


@pytest.mark.parametrize("options,gguf_type", [(["--format", "gguf"], "f16"), (["--format", "gguf", "--gguf-type", "q8_0"], "q8_0")])
def test_merge_adapter_format_gguf_prints_the_gguf_file(cli, tmp_path, calls, options, gguf_type):
    """The type reaches the merger; the file printed is the one the merger reports, not a name guessed from the type."""
    result = cli("merge-adapter", tmp_path, "--output", tmp_path / "out", *options)
    assert result.exit_code == 0, result.stderr
    assert calls == [("merge", tmp_path, tmp_path / "out", "float32", False, gguf_type)]
    assert printed_table(result.stdout) == {"output": str(tmp_path / "out" / "converted.gguf"),
                                            "dtype": "float32", "max |Δlogit| vs adapter": "3.052e-05"}


# --- errors that are not HkftErrors --------------------------------------------------------------

def test_ctrl_c_is_one_line_and_exit_130(cli, preset, tmp_path, monkeypatch):
    import hkft.recipes.train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(hkft.recipes.train, "train", interrupted)
    assert_one_line_error(cli("train", preset, "--output-dir", tmp_path / "run"), "interrupted", code=130)


def test_a_bug_keeps_its_traceback(cli, preset, tmp_path, monkeypatch):
    import hkft.recipes.train

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(hkft.recipes.train, "train", broken)
    with pytest.raises(ZeroDivisionError):
        cli("train", preset, "--output-dir", tmp_path / "run")


# --- python -m hkft, in a fresh process ----------------------------------------------------------

def run_module(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "hkft", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=120)


def test_python_dash_m_hkft_version(tmp_path):
    import hkft

    result = run_module("--version", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == f"hkft {hkft.__version__}" and result.stderr == ""


def test_python_dash_m_hkft_error_is_the_only_line_on_stderr(tmp_path, preset):
    """Nothing else on stderr, although train imports every library (some warn on import): no traceback either."""
    result = run_module("train", preset, "--set", "model.name=./no-such-model", "--output-dir", tmp_path / "run", cwd=tmp_path)
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr


def test_python_dash_m_hkft_env_writes_nothing_to_stderr(tmp_path):
    result = run_module("env", cwd=tmp_path)
    assert result.returncode == 0 and result.stderr == "" and torch.__version__ in result.stdout


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_hub_is_probed_before_bitsandbytes_fetches_its_kernel(tmp_path):
    """bitsandbytes reaches for the hub at import (an optional CPU kernel); on a machine where the hub
    is unreachable, hkft must already have switched to offline mode by then, and print nothing."""
    env = {key: value for key, value in os.environ.items() if key != "HF_HUB_OFFLINE"}
    env.update(PYTHONPATH=str(REPO), HF_ENDPOINT="http://127.0.0.1:9")  # the discard port: refused at once
    script = ("import hkft, peft, sys, huggingface_hub.constants as hub;"
              "print('bitsandbytes' in sys.modules, hub.HF_HUB_OFFLINE)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True"] and result.stderr == ""
