"""The task as an object: the registry, a task added from outside in one file and one line, and a
run written before the package's layout changed, resumed by today's code."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hkft.config import load_config, presets_dir
from hkft.config import tasks as task_vocabulary
from hkft.config.schema import ModelConfig
from hkft.config.tasks import task_names
from hkft.models.loading import resolve_model_path
from hkft.tasks.base import Task
from hkft.tasks.registry import task_for

FIXTURE = Path(__file__).parent / "fixtures" / "run-before-layout"
QUICK = ("--set", "train.max_steps=4", "--set", "data.max_samples=32", "--set", "train.eval_strategy=steps",
         "--set", "train.eval_steps=2")
# A task from outside hkft: one module, registered with one line. It is classification whose best
# checkpoint is picked by the Matthews correlation, and whose label map lists the labels in reverse.
TOY_TASK = '''
from hkft.tasks.classification import Classification


class ReversedLabels(Classification):
    name = "reversed-labels"
    main_metric = "mcc"

    def label_map(self, raw, data, label_names):
        names, _, notices = super().label_map(raw, data, label_names)
        names = names if label_names is not None else names[::-1]
        return names, {name: index for index, name in enumerate(names)}, notices


TASK = ReversedLabels()
'''


def test_every_registered_task_is_a_task_under_its_own_name():
    for name in task_names():
        task = task_for(name)
        assert isinstance(task, Task) and task.name == name
        assert task.main_metric in task.eval_metrics or task.main_metric == "loss"


def test_the_config_accepts_exactly_the_registered_tasks():
    for name in task_names():
        assert ModelConfig(name="m", task=name).task == name
    with pytest.raises(ValueError, match="Input should be 'classification', 'regression' or 'causal-lm'"):
        ModelConfig(name="m", task="translation")


@pytest.fixture
def toy_task(tmp_path, monkeypatch):
    (tmp_path / "toy_task.py").write_text(TOY_TASK)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(task_vocabulary.TASK_MODULES, "reversed-labels", "toy_task")  # the one registry line
    yield "reversed-labels"
    sys.modules.pop("toy_task", None)


def test_a_task_registered_from_outside_trains_evaluates_and_predicts(cli, tmp_path, toy_task):
    run = tmp_path / "run"
    result = cli("train", "quickstart", "--output-dir", run, "--set", f"model.task={toy_task}", *QUICK)
    assert result.exit_code == 0, result.stderr
    sidecar = json.loads((run / "adapter/hkft_adapter.json").read_text())
    assert sidecar["task"] == toy_task and sidecar["label_names"] == ["positive", "negative"]  # its own label map
    state = json.loads((run / "checkpoints/checkpoint-4/trainer_state.json").read_text())
    assert state["best_metric"] == max(entry["eval_mcc"] for entry in state["log_history"] if "eval_mcc" in entry)
    evaluated = cli("eval", run)
    assert evaluated.exit_code == 0, evaluated.stderr
    rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert {row["label"] for row in rows} <= {"positive", "negative"}
    predicted = cli("predict", run, "The lamp is great.", "--json")
    assert predicted.exit_code == 0, predicted.stderr
    assert set(json.loads(predicted.stdout.splitlines()[0])["probabilities"]) == {"positive", "negative"}


def test_an_unregistered_task_is_refused_in_one_line(cli, tmp_path):
    result = cli("train", "quickstart", "--output-dir", tmp_path / "run", "--set", "model.task=reversed-labels")
    assert result.exit_code == 2 and "model.task: Input should be 'classification', 'regression' or 'causal-lm'" in result.stderr


def _placed(fixture: Path, run: Path) -> Path:
    """The fixture's run folder at ``run``, its placeholders filled in for this checkout."""
    shutil.copytree(fixture, run, ignore=shutil.ignore_patterns("README.md", "expected-*"))
    minilm = resolve_model_path("sentence-transformers/all-MiniLM-L6-v2")
    for path in (run / "hkft_config.yaml", run / "checkpoints/checkpoint-3/trainer_state.json",
                 run / "checkpoints/checkpoint-3/adapter_config.json"):
        text = path.read_text().replace("{RUN}", str(run)).replace("{PRESETS}", str(presets_dir())).replace("{MINILM}", minilm)
        path.write_text(text)
    return run


def test_a_checkpoint_written_before_the_layout_change_resumes_to_the_same_weights(cli, tmp_path):
    run = _placed(FIXTURE, tmp_path / "run")
    cfg = load_config(run / "hkft_config.yaml")
    assert cfg.train.max_steps == 6
    result = cli("train", "quickstart", "--output-dir", run, "--resume", "--set", "train.max_steps=6", "--set",
                 "train.eval_strategy=steps", "--set", "train.eval_steps=3", "--set", "data.max_samples=64",
                 "--set", "train.save_total_limit=5")
    assert result.exit_code == 0, result.stderr
    resumed = load_file(run / "checkpoints/checkpoint-6/adapter_model.safetensors")
    expected = load_file(FIXTURE / "expected-checkpoint-6-adapter.safetensors")
    at_step_3 = load_file(FIXTURE / "checkpoints/checkpoint-3/adapter_model.safetensors")
    assert resumed.keys() == expected.keys()
    assert max((resumed[k] - at_step_3[k]).abs().max().item() for k in resumed) > 1e-3  # steps 4-6 trained
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], atol=1e-6, rtol=1e-5)
    evaluations = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    at_6 = [entry["eval_loss"] for entry in evaluations if entry["step"] == 6 and "eval_loss" in entry]
    assert at_6 == [pytest.approx(0.7011523842811584, abs=1e-5)]  # what the old code logged at step 6
