"""hkft under hostile use: every situation below ends in exit 0, or in one `error:` line with the
documented exit code (2 bad input, 3 run state, 4 disk full), never a traceback.

Read it as a table: each test's name is the situation, its assertions the expected outcome.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from checkpoints import MEMORISE, memorise_texts, save_tiny_model, write_jsonl
from conftest import Cli, assert_one_line_error

LONG = "n" * 300  # one path component over the 255 bytes every common file system allows
QUICK = ("--set", "train.max_steps=1", "--set", "data.max_samples=8", "--set", "train.eval_strategy=no")
REPO = Path(__file__).resolve().parents[1]


def hkft_process(*args: str, env: dict[str, str] | None = None, timeout: float = 300, prefix: tuple[str, ...] = ()):
    """`hkft ARGS` in a fresh interpreter (for what in-process runs cannot show: mounts, the network, memory)."""
    environment = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([*prefix, sys.executable, "-m", "hkft", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={k: v for k, v in environment.items() if v is not None})


class ProcessResult:
    """A finished subprocess seen through the CliRunner result's names, for assert_one_line_error."""

    def __init__(self, completed: subprocess.CompletedProcess):
        self.exit_code, self.stdout, self.stderr = completed.returncode, completed.stdout, completed.stderr


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """One quickstart run (a step), copied by each test that damages it."""
    run = tmp_path_factory.mktemp("trained") / "run"
    result = Cli()("train", "quickstart", "--output-dir", run, *QUICK)
    assert result.exit_code == 0, result.stderr
    return run


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


# --- a path component over 255 bytes: every command, before anything is loaded --------------------

@pytest.mark.parametrize("args", [
    ("config", f"{LONG}.yaml"),
    ("config", "quickstart", "--set", f"data.train={LONG}.jsonl"),
    ("train", "quickstart", "--dry-run", "--output-dir", LONG),
    ("train", "quickstart", "--dry-run", "--set", f"output.dir=runs/{LONG}"),
    ("train", "quickstart", "--set", f"model.name={LONG}", *QUICK),
], ids=["preset", "data-file", "output-dir", "output.dir", "model.name"])
def test_a_name_over_255_bytes_is_one_line(cli, tmp_path, monkeypatch, args):
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(cli(*args), "longer than the file system allows" if "--dry-run" not in args else "255")


def test_a_name_over_255_bytes_in_eval_data_and_merge_output(cli, run_copy):
    assert_one_line_error(cli("eval", run_copy, "--data", f"{LONG}.jsonl"), "255")
    assert_one_line_error(cli("merge-adapter", run_copy, "--output", run_copy.parent / LONG), "255")


# --- where a run directory cannot be ----------------------------------------------------------------

def test_a_run_directory_below_a_regular_file_is_refused_even_in_a_dry_run(cli, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    for extra in ((), ("--dry-run",)):
        result = cli("train", "quickstart", "--output-dir", tmp_path / "notes.txt/run", *QUICK, *extra)
        assert_one_line_error(result, "notes.txt is a file")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_study_output_below_a_regular_file_is_refused_before_any_cell(cli, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"base": "quickstart", "output": str(tmp_path / "notes.txt/out"),
                                     "grid": {"train.seed": [1]}}))
    assert_one_line_error(cli("sweep", study), "notes.txt is a file", "study output")


def read_only_prefix(directory: Path) -> tuple[str, ...]:
    """Run a command with ``directory`` read-only: a read-only bind mount in a private mount namespace
    (root ignores permissions), else plain permissions."""
    if os.geteuid() != 0:
        for path in [directory, *directory.rglob("*")]:
            path.chmod(path.stat().st_mode & ~0o222)
        return ()
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True) if shutil.which("unshare") else None
    if probe is None or probe.returncode != 0:
        pytest.skip("root without a private mount namespace: no way to make a folder read-only")
    return ("unshare", "-m", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"', str(directory))


def test_a_read_only_run_directory_is_refused_and_left_alone(run_copy):
    before = sorted(path.name for path in run_copy.rglob("*"))
    result = hkft_process("train", "quickstart", "--output-dir", run_copy, "--overwrite", *QUICK,
                          prefix=read_only_prefix(run_copy), env={"HF_HUB_OFFLINE": "1"})
    assert_one_line_error(ProcessResult(result), "not writable")
    assert sorted(path.name for path in run_copy.rglob("*")) == before


# --- a full disk while the Trainer writes a checkpoint ----------------------------------------------

@pytest.mark.parametrize("failure", [
    Exception("No space left on device (os error 28)"),  # how tokenizers' Rust save reports it
    pytest.param(OSError(errno.ENOSPC, "No space left on device"), marks=pytest.mark.slow),
], ids=["tokenizers", "oserror"])
def test_a_full_disk_during_a_checkpoint_exits_4_and_drops_the_partial_checkpoint(cli, tmp_path, monkeypatch, failure):
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    def full_disk(self, directory, *args, **kwargs):
        if "checkpoint-" in str(directory):
            raise failure
        return saving(self, directory, *args, **kwargs)

    saving = PreTrainedTokenizerBase.save_pretrained
    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", full_disk)
    result = cli("train", "quickstart", "--output-dir", tmp_path / "run", *QUICK)
    assert_one_line_error(result, "no space left on the device", "free some disk space", code=4)
    assert not list((tmp_path / "run/checkpoints").glob("checkpoint-*"))  # the cut-short one is gone
    assert not (tmp_path / "run/adapter").exists()


# --- a damaged adapter ------------------------------------------------------------------------------

def test_truncated_adapter_weights_in_eval_and_merge(cli, run_copy):
    weights = run_copy / "adapter/adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    assert_one_line_error(cli("eval", run_copy), "adapter weights are damaged")
    assert_one_line_error(cli("merge-adapter", run_copy, "--output", run_copy.parent / "merged"), "adapter weights are damaged")
    assert not (run_copy.parent / "merged").exists()


def test_corrupt_adapter_config_without_sidecar_in_merge(cli, run_copy):
    (run_copy / "adapter/hkft_adapter.json").unlink()
    (run_copy / "adapter/adapter_config.json").write_text("{not json")
    assert_one_line_error(cli("merge-adapter", run_copy, "--output", run_copy.parent / "merged"), "adapter_config.json")


def test_deleted_adapter_weights_are_named_as_missing(cli, run_copy):
    (run_copy / "adapter/adapter_model.safetensors").unlink()
    assert_one_line_error(cli("eval", run_copy), "has no adapter weights (adapter_model.safetensors)")


def test_deleted_sidecar_is_named_not_blamed_on_data_train(cli, run_copy):
    (run_copy / "adapter/hkft_adapter.json").unlink()
    result = cli("eval", run_copy)
    assert_one_line_error(result, "hkft_adapter.json is missing")
    assert "data.train" not in result.stderr


@pytest.mark.parametrize("output", [".", ".."])
def test_merge_into_the_current_directory_is_refused_before_merging(cli, run_copy, tmp_path, monkeypatch, output):
    here = tmp_path / "empty"
    here.mkdir()
    monkeypatch.chdir(here)
    assert_one_line_error(cli("merge-adapter", run_copy, "--output", output), "current directory")
    assert list(here.iterdir()) == []


# --- data.max_length past the model's position embeddings -------------------------------------------

LONG_TEXT = {"text": " ".join(memorise_texts() * 4)}  # ~130 tokens, over GPT-2's 64 positions here


@pytest.fixture
def tiny_gpt2_preset(tmp_path) -> Path:
    model = save_tiny_model("gpt2", tmp_path / "gpt2", memorise_texts())
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": row["prompt"] + row["completion"]} for row in MEMORISE])
    preset = {"model": {"name": str(model), "task": "causal-lm"}, "data": {"train": str(data), "max_length": 32},
              "train": {"max_steps": 1, "batch_size": 4, "eval_strategy": "no"}, "eval": {"generate": False}}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(preset))
    return path


def test_max_length_above_the_positions_with_a_long_example_in_train(cli, tiny_gpt2_preset, tmp_path):
    long_data = write_jsonl(tmp_path / "long.jsonl", [LONG_TEXT, *({"text": r["completion"]} for r in MEMORISE)])
    result = cli("train", tiny_gpt2_preset, "--output-dir", tmp_path / "run", "--set", f"data.train={long_data}",
                 "--set", "data.max_length=256")
    assert_one_line_error(result, "64 positions", "set data.max_length=64 or less")
    assert not list((tmp_path / "run").glob("checkpoints/checkpoint-*"))


def test_max_length_above_the_positions_with_a_long_example_in_eval(cli, tiny_gpt2_preset, tmp_path):
    assert cli("train", tiny_gpt2_preset, "--output-dir", tmp_path / "run").exit_code == 0
    long_data = write_jsonl(tmp_path / "long.jsonl", [LONG_TEXT])
    result = cli("eval", tmp_path / "run", "--data", long_data, "--set", "data.max_length=256")
    assert_one_line_error(result, "64 positions", "set data.max_length=64 or less")


# --- YAML that expands without bound ----------------------------------------------------------------

def nested_anchors(levels: int = 9) -> str:
    """Level k lists ten aliases of level k-1: about 700 bytes that expand to 10**levels values."""
    lines = ["  train.seed: &l0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"  z{k}: &l{k} [{', '.join([f'*l{k - 1}'] * 10)}]" for k in range(1, levels)]
    return "\n".join(lines)


def limited_memory() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))


def test_a_700_byte_study_of_nested_anchors_is_refused_quickly(tmp_path):
    study = tmp_path / "bomb.yaml"
    study.write_text(f"base: quickstart\noutput: {tmp_path / 'out'}\ngrid:\n{nested_anchors()}\n")
    assert study.stat().st_size < 800
    started = time.monotonic()
    completed = subprocess.run([sys.executable, "-m", "hkft", "sweep", str(study)], capture_output=True, text=True,
                               timeout=240, preexec_fn=limited_memory, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert_one_line_error(ProcessResult(completed), "aliases expand to more than")
    assert time.monotonic() - started < 200
    assert not (tmp_path / "out").exists()


def test_a_preset_or_override_of_nested_anchors_is_refused(cli, tmp_path):
    preset = tmp_path / "bomb.yaml"
    preset.write_text(f"model: {{name: m}}\ndata: {{train: d.jsonl}}\ndropout:\n{nested_anchors()}\n")
    assert_one_line_error(cli("config", preset), "aliases expand to more than")
    levels = "[&a [1,1,1,1,1,1,1,1,1,1], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]," \
             " &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c], &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d], [*e,*e,*e,*e,*e,*e,*e,*e,*e,*e]]"
    assert_one_line_error(cli("config", "quickstart", "--set", f"lora.target_modules={levels}"),
                          "lora.target_modules", "aliases expand to more than")


# --- an unreachable hub without HF_HUB_OFFLINE ------------------------------------------------------

def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens once the socket closes


@pytest.mark.slow  # a fresh interpreter that imports transformers
def test_an_unreachable_hub_fails_at_once_in_one_line(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text(yaml.safe_dump({"model": {"name": "someone/some-model"},
                                      "data": {"train": str(REPO / "presets/data/quickstart/train.jsonl")}}))
    env = {"HF_HUB_OFFLINE": None, "HF_DATASETS_OFFLINE": None, "TRANSFORMERS_OFFLINE": None,
           "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}", "HF_HOME": str(tmp_path / "hf")}
    result = ProcessResult(hkft_process("train", preset, "--output-dir", tmp_path / "run", env=env))
    assert_one_line_error(result, "someone/some-model is not available offline", "hub is unreachable")
    assert "Retry" not in result.stderr + result.stdout


# --- messages that used to point the wrong way ------------------------------------------------------

def test_a_set_value_that_looks_like_a_mapping_is_text(cli, tmp_path):
    resolved = yaml.safe_load(cli("config", "quickstart", "--set", "data.train=hub:").stdout)
    assert resolved["data"]["train"] == "hub:"
    result = cli("train", "quickstart", "--output-dir", tmp_path / "run", "--set", "data.train=hub:", *QUICK)
    assert_one_line_error(result, "'hub:' is not a hub dataset spec")


def test_an_invalid_set_is_blamed_on_the_set_not_the_preset(cli):
    result = cli("config", "quickstart", "--set", "lora.r=0")
    assert_one_line_error(result, "--set lora.r=0: lora.r")
    assert "quickstart.yaml" not in result.stderr


def test_non_finite_loss_before_any_checkpoint_says_none_was_kept(cli, tmp_path):
    model = save_tiny_model("llama", tmp_path / "llama", memorise_texts())
    data = write_jsonl(tmp_path / "d.jsonl", MEMORISE)
    preset = {"model": {"name": str(model), "task": "causal-lm"}, "data": {"train": str(data)},
              "train": {"epochs": 3, "batch_size": 2, "lr": 1e12, "max_grad_norm": 0.0, "warmup_ratio": 0.0,
                        "eval_strategy": "no"}, "eval": {"generate": False}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(preset))
    result = cli("train", tmp_path / "p.yaml", "--output-dir", tmp_path / "run")
    assert_one_line_error(result, "the loss became", "no checkpoint was saved before it", code=3)
    assert "checkpoint is kept" not in result.stderr


@pytest.mark.parametrize("command", ["config", "train"])
def test_a_study_file_given_as_a_preset_points_to_sweep(cli, tmp_path, command):
    study = REPO / "presets/studies/quickstart-study.yaml"
    assert_one_line_error(cli(command, study, *(("--output-dir", tmp_path / "r") if command == "train" else ())),
                          "is a study file", f"hkft sweep {study}")


@pytest.mark.parametrize("args, suggestion", [(("--lr", "1e-4"), "--set train.lr=1e-4"),
                                              (("--max-steps=3",), "--set train.max_steps=3")])
def test_a_preset_key_given_as_an_option_suggests_set(cli, args, suggestion):
    result = cli("train", "quickstart", *args)
    assert result.exit_code == 2
    assert suggestion in " ".join(result.stderr.replace("│", " ").split())


def test_a_line_break_inside_a_quoted_override_stays_on_one_line(cli):
    """Found by the fuzzing below: U+0085 (NEL) is a line break to every reader of stderr."""
    assert_one_line_error(cli("config", "quickstart", "--set", "description=\x85"), "--set description=\\x85")


def test_a_file_name_in_another_encoding_is_refused_before_anything_is_written(cli, tmp_path):
    """Found by the fuzzing below: a Latin-1 name arrives as surrogates, which the run's UTF-8 files cannot record."""
    run = os.fsdecode(bytes(tmp_path) + b"/caf\xe9")
    assert_one_line_error(cli("train", "quickstart", "--output-dir", run, *QUICK), "is not valid UTF-8")
    assert list(tmp_path.iterdir()) == []


# --- installing on a CPU machine ----------------------------------------------------------------------

def test_the_readme_gives_a_cpu_torch_command_beside_the_first_install():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    first_block = readme.split("```")[1]
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in first_block
    assert first_block.index("whl/cpu") < first_block.index("pip install -e .")


# --- widened: random presets, overrides, data files and paths ---------------------------------------
# The property: exit 0, or exit 2/3 with exactly one `error:` line and no traceback.

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from hkft.config.loading import preset_keys  # noqa: E402

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
KEYS = st.sampled_from(preset_keys()) | st.text(min_size=1, max_size=12).map(lambda key: f"train.{key}")
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                      max_leaves=6)
ODD_NAMES = (st.text(st.characters(exclude_characters="/\x00", codec="utf-8"), min_size=1, max_size=40)
             | st.binary(min_size=1, max_size=300).map(os.fsdecode)  # another system's encoding, or too long
             ).filter(lambda name: name not in (".", "..") and "/" not in name and "\x00" not in name)


def assert_clean(result) -> None:
    """The property every hostile input must keep."""
    assert "Traceback" not in result.stdout + result.stderr
    if result.exit_code == 0:
        return
    assert result.exit_code in (2, 3), (result.exit_code, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr


def quickstart_data() -> dict:
    return yaml.safe_load((REPO / "presets/quickstart.yaml").read_text(encoding="utf-8"))


@FUZZ
@given(st.dictionaries(KEYS, VALUES, min_size=1, max_size=4))
def test_fuzz_preset_values_of_any_type(tmp_path_factory, changes):
    data = quickstart_data()
    for key, value in changes.items():
        node = data
        *sections, last = key.split(".")
        for section in sections:
            node = node.setdefault(section, {}) if isinstance(node.get(section, {}), dict) else {}
        node[last] = value
    preset = tmp_path_factory.mktemp("fuzz") / "p.yaml"
    preset.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    assert_clean(Cli()("config", preset))


@FUZZ
@given(st.text(max_size=200))
def test_fuzz_preset_text_of_any_shape(tmp_path_factory, text):
    preset = tmp_path_factory.mktemp("fuzz") / "p.yaml"
    preset.write_text(text, encoding="utf-8", errors="surrogatepass")
    assert_clean(Cli()("config", preset))


@FUZZ
@given(st.lists(st.tuples(KEYS | st.text(max_size=10), st.text(max_size=30)), min_size=1, max_size=3),
       st.sampled_from(["=", "", "==", ".="]))
def test_fuzz_overrides(pairs, separator):
    overrides = [item for key, value in pairs for item in ("--set", f"{key}{separator}{value}")]
    assert_clean(Cli()("config", "quickstart", *overrides))


@FUZZ
@given(ODD_NAMES)
def test_fuzz_odd_names_for_presets_data_and_run_directories(tmp_path_factory, name):
    folder = tmp_path_factory.mktemp("odd")
    try:
        shutil.copy(REPO / "presets/quickstart.yaml", folder / f"{name}.yaml")
    except OSError as err:  # a name this file system itself refuses (over 255 bytes): hkft must say so too
        assert err.errno == errno.ENAMETOOLONG
    cli = Cli()
    assert_clean(cli("config", folder / f"{name}.yaml"))
    assert_clean(cli("config", "quickstart", "--set", f"data.train={folder / name}.jsonl"))
    assert_clean(cli("train", folder / f"{name}.yaml", "--dry-run", "--output-dir", folder / name / name))


@pytest.fixture(scope="module")
def minilm_tokenizer():
    from hkft.models.loading import load_tokenizer, resolve_model_path

    return load_tokenizer(resolve_model_path("sentence-transformers/all-MiniLM-L6-v2"), "classification")


def damaged(text: str, data: st.DataObject) -> bytes:
    """The file's text cut short, re-encoded, or with random bytes or values spliced in."""
    how = data.draw(st.sampled_from(["truncate", "splice", "encoding", "value"]))
    raw = text.encode("utf-8")
    if how == "truncate":
        return raw[: data.draw(st.integers(0, len(raw)))]
    if how == "splice":
        at = data.draw(st.integers(0, len(raw)))
        return raw[:at] + data.draw(st.binary(min_size=1, max_size=8)) + raw[at:]
    if how == "encoding":
        return text.encode(data.draw(st.sampled_from(["utf-16", "utf-8-sig", "latin-1", "cp1252"])), errors="replace")
    lines = text.splitlines()
    row = data.draw(st.integers(0, len(lines) - 1))
    lines[row] = data.draw(st.sampled_from(['{"text": 5, "label": "positive"}', '{"text": null, "label": 1}',
                                            '{"text": ["a"], "label": {"x": 1}}', "[]", "42", '{"label": "positive"}',
                                            '{"text": "", "label": ""}', "text,label", '"unterminated']))
    return "\n".join(lines).encode("utf-8")


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.sampled_from([".jsonl", ".csv"]), st.data())
def test_fuzz_damaged_data_files(minilm_tokenizer, tmp_path_factory, suffix, data):
    """Loading and tokenising a damaged data file gives examples or a one-line DataError, never anything else."""
    from hkft.config import load_config
    from hkft.errors import HkftError
    from hkft.tasks.base import prepare_data

    rows = [json.loads(line) for line in (REPO / "presets/data/quickstart/train.jsonl").read_text().splitlines()[:6]]
    text = ("\n".join(json.dumps(row) for row in rows) if suffix == ".jsonl"
            else "text,label\n" + "\n".join(f'"{row["text"]}",{row["label"]}' for row in rows))
    path = tmp_path_factory.mktemp("data") / f"train{suffix}"
    path.write_bytes(damaged(text, data))
    cfg = load_config("quickstart", [f"data.train={path}", "data.validation=null", "data.test=null"])
    try:
        prepared = prepare_data(cfg, minilm_tokenizer)
    except HkftError as err:
        assert len(str(err).splitlines()) == 1
    else:
        assert prepared.train is not None


def test_a_tune_study_output_below_a_regular_file_is_one_line(cli, tmp_path):
    """`hkft tune` checks its output folder before the first trial, as `hkft sweep` does."""
    (tmp_path / "file").write_text("not a folder")
    study = tmp_path / "study.yaml"
    study.write_text(f"base: quickstart\noutput: {tmp_path / 'file' / 'study'}\nsearch:\n  train.lr: {{low: 1.0e-4, high: 1.0e-3}}\n"
                     "tune: {trials: 1}\n")
    assert_one_line_error(cli("tune", study), "study output")


def test_merge_into_the_shipped_presets_is_refused_like_a_run_directory(cli, run_copy):
    """`merge-adapter --output` gets the checks of `train --output-dir`: not inside hkft's presets."""
    from hkft.config import presets_dir

    assert_one_line_error(cli("merge-adapter", run_copy, "--output", presets_dir() / "merged"), "shipped presets")
    assert not (presets_dir() / "merged").exists()
