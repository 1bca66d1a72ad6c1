"""output.report_to mlflow / wandb: real MiniLM runs, read back with MLflow's own client and from
W&B's offline run folder (its own protobuf records), compared with the run directory's files."""

import base64
import hashlib
import json
import sys
from pathlib import Path

import pytest
import yaml
from conftest import assert_one_line_error

pytest.importorskip("mlflow", reason="pip install 'hkft[mlflow]'")
pytest.importorskip("wandb", reason="pip install 'hkft[wandb]'")
from mlflow.tracking import MlflowClient  # noqa: E402
from wandb.proto import wandb_internal_pb2  # noqa: E402

QUICK = ("--set", "train.max_steps=4", "--set", "data.max_samples=32", "--set", "train.eval_strategy=steps",
         "--set", "train.eval_steps=2", "--set", "train.logging_steps=2")
ARTIFACTS = ("metrics.json", "curves.png", "hkft_config.yaml")


def flat(mapping: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in mapping.items():
        name = f"{prefix}.{key}" if prefix else key
        out.update(flat(value, name) if isinstance(value, dict) and value else {name: value})
    return out


def run_files(run: Path) -> dict[str, bytes]:
    """What the trackers must hold as artifacts: the adapter and three files, by their path in the run."""
    files = {f"adapter/{path.name}": path.read_bytes() for path in (run / "adapter").iterdir()}
    return {**files, **{name: (run / name).read_bytes() for name in ARTIFACTS}}


def logged_events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def verdict(run: Path) -> str:
    found = json.loads((run / "metrics.json").read_text())["overfitting"]
    return "not detected" if not found["detected"] else f"detected (best step {found['best_step']})"


# --- MLflow ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlflow_run(tmp_path_factory):
    patch = pytest.MonkeyPatch()
    patch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from conftest import Cli

    run = tmp_path_factory.mktemp("mlflow") / "run"
    result = Cli()("train", "quickstart", "--output-dir", run, "--set", "output.report_to=[tensorboard,mlflow]", *QUICK)
    patch.undo()
    assert result.exit_code == 0, result.stderr
    return run


def only_run(store: Path):
    client = MlflowClient(f"sqlite:///{store}")
    runs = client.search_runs([experiment.experiment_id for experiment in client.search_experiments()])
    return client, runs


def test_mlflow_run_holds_the_preset_metrics_tags_and_artifacts(mlflow_run, tmp_path):
    client, runs = only_run(mlflow_run / "mlflow.db")  # the default store: in the run directory
    assert len(runs) == 1
    found = runs[0]
    assert (found.info.status, found.info.run_name) == ("FINISHED", "run")
    preset = flat(yaml.safe_load((mlflow_run / "hkft_config.yaml").read_text()))
    for key, value in preset.items():
        logged = found.data.params[key]
        assert (logged if isinstance(value, str) else json.loads(logged)) == value, key
    assert found.data.params["learning_rate"] == str(preset["train.lr"])  # the Trainer's own parameters too
    assert found.data.tags["hkft.dropout_method"] == "hiddenkey"
    assert found.data.tags["hkft.overfitting"] == verdict(mlflow_run)

    evaluations = [event for event in logged_events(mlflow_run) if "eval_loss" in event]
    history = client.get_metric_history(found.info.run_id, "eval_loss")
    assert [(point.step, point.value) for point in history] == [(event["step"], event["eval_loss"]) for event in evaluations]
    assert [point.step for point in client.get_metric_history(found.info.run_id, "loss")] == [
        event["step"] for event in logged_events(mlflow_run) if "loss" in event]
    final = json.loads((mlflow_run / "metrics.json").read_text())["eval"]
    for name in ("loss", "accuracy", "macro_f1", "mcc"):
        assert found.data.metrics[f"test_{name}"] == pytest.approx(final[name]), name

    downloaded = Path(client.download_artifacts(found.info.run_id, "", str(tmp_path)))
    for name, content in run_files(mlflow_run).items():
        assert (downloaded / name).read_bytes() == content, name
    assert (mlflow_run / "mlartifacts").is_dir()  # beside the store, not in the current directory


def test_a_resumed_run_continues_its_mlflow_run(mlflow_run, cli):
    resumed = cli("train", "quickstart", "--output-dir", mlflow_run, "--resume", "--set",
                  "output.report_to=[tensorboard,mlflow]", *QUICK)
    assert resumed.exit_code == 0, resumed.stderr
    _, runs = only_run(mlflow_run / "mlflow.db")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert json.loads((mlflow_run / "tracking.json").read_text())["mlflow_run_id"] == runs[0].info.run_id


def test_tracking_uri_and_experiment_come_from_mlflows_own_variables(cli, tmp_path, monkeypatch):
    store = tmp_path / "team.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "dates")
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root for a store it was pointed at
    trained = cli("train", "quickstart", "--output-dir", tmp_path / "run", "--set", "output.report_to=[mlflow]", *QUICK)
    assert trained.exit_code == 0, trained.stderr
    assert not (tmp_path / "run" / "mlflow.db").exists()
    client, runs = only_run(store)
    assert [client.get_experiment(run.info.experiment_id).name for run in runs] == ["dates"]


def test_hkft_tune_logs_each_trial_as_a_child_of_one_parent_run_per_search(cli, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    study = {"base": "quickstart", "output": str(tmp_path / "out"),
             "overrides": ["train.max_steps=2", "data.max_samples=16", "train.eval_strategy=steps", "train.eval_steps=2",
                           "output.report_to=[mlflow]"],
             "search": {"train.lr": [1.0e-3, 3.0e-3]}, "tune": {"trials": 2, "pruner": "none"}}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    tuned = cli("tune", tmp_path / "study.yaml")
    assert tuned.exit_code == 0, tuned.stderr
    client, runs = only_run(tmp_path / "out" / "mlflow.db")
    parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    children = [run for run in runs if "mlflow.parentRunId" in run.data.tags]
    assert len(parents) == 1 and parents[0].data.tags["hkft.search"] and parents[0].info.status == "FINISHED"
    assert len(children) == 2
    assert {run.data.tags["mlflow.parentRunId"] for run in children} == {parents[0].info.run_id}
    trials = sorted(Path(run.data.tags["hkft.run_dir"]).name for run in children)
    assert trials == ["trial-0000", "trial-0001"]
    for run in children:
        config = yaml.safe_load((Path(run.data.tags["hkft.run_dir"]) / "hkft_config.yaml").read_text())
        assert float(run.data.params["train.lr"]) == config["train"]["lr"] and run.info.status == "FINISHED"


def test_a_missing_tracker_package_is_one_line(cli, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if it were not installed
    result = cli("train", "quickstart", "--output-dir", tmp_path / "run", "--set", "output.report_to=[mlflow]", *QUICK)
    assert_one_line_error(result, "output.report_to mlflow needs the mlflow package, which is not installed",
                          "pip install 'hkft[mlflow]'")


# --- W&B, offline ----------------------------------------------------------------------------------

BLOCK, HEADER = 32768, 7  # W&B's transaction log: LevelDB's log format behind a 7-byte header


def wandb_records(path: Path) -> list:
    """The records of a .wandb file, parsed with W&B's own protobuf schema."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, chunks, position = [], [], HEADER
    while position + HEADER <= len(data):
        if BLOCK - position % BLOCK < HEADER:  # a block's tail too short for a header is padding
            position += BLOCK - position % BLOCK
            continue
        length, kind = int.from_bytes(data[position + 4:position + 6], "little"), data[position + 6]
        chunks.append(data[position + HEADER:position + HEADER + length])
        position += HEADER + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            records.append(record)
            chunks = []
    return records


def items(updates) -> dict:
    return {item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in updates}


def test_wandb_offline_run_holds_the_preset_metrics_tags_and_artifacts(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "run"
    trained = cli("train", "quickstart", "--output-dir", run, "--set", "output.report_to=[wandb]", *QUICK)
    assert trained.exit_code == 0, trained.stderr
    (log,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(log)
    kinds = [record.WhichOneof("record_type") for record in records]
    assert kinds.count("exit") == 1 and records[kinds.index("exit")].exit.exit_code == 0

    config = {}
    for record in records:
        if record.WhichOneof("record_type") in ("run", "config"):
            config.update(items(record.run.config.update if record.HasField("run") else record.config.update))
    preset = flat(yaml.safe_load((run / "hkft_config.yaml").read_text()))
    for key, value in preset.items():
        assert (config[key] if isinstance(value, str) else json.loads(config[key])) == value, key
    last_run = [record.run for record in records if record.HasField("run")][-1]
    assert set(last_run.tags) == {"dropout:hiddenkey", f"overfitting:{verdict(run)}"}

    history = [items(record.history.item) for record in records if record.HasField("history")]
    evaluations = [event for event in logged_events(run) if "eval_loss" in event]
    assert [(point["train/global_step"], point["eval/loss"]) for point in history if "eval/loss" in point][
        :len(evaluations)] == [(event["step"], event["eval_loss"]) for event in evaluations]
    summary = {}
    for record in records:
        if record.HasField("summary"):
            summary.update(items(record.summary.update))
    final = json.loads((run / "metrics.json").read_text())["eval"]
    assert summary["test_accuracy"] == pytest.approx(final["accuracy"])

    (artifact,) = [record.artifact for record in records if record.HasField("artifact")]
    digests = {entry.path: entry.digest for entry in artifact.manifest.contents}
    expected = {name: base64.b64encode(hashlib.md5(content).digest()).decode() for name, content in run_files(run).items()}
    assert digests == expected
