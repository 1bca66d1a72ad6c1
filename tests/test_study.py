"""hkft sweep: grid expansion, deduplication, up-front validation, skipping finished cells, resuming."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fake_runs import loss_events, write_run
from pydantic import ValidationError
from rich.console import Console

from hkft.config import presets_dir
from hkft.errors import ConfigError
from hkft.study.grid import Cell, expand_cells, run_sweep, train_cell
from hkft.study.spec import Study, load_study


def write_study(directory: Path, **fields) -> Path:
    path = directory / "study.yaml"
    path.write_text(yaml.safe_dump({"base": "quickstart", "output": str(directory / "out"), **fields}, sort_keys=False))
    return path


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


class FakeTrainer:
    """Records each call and leaves a finished run behind, as hkft train does."""

    def __init__(self):
        self.calls: list[tuple[str, bool]] = []

    def __call__(self, cell: Cell, *, resume: bool, console: Console) -> None:
        self.calls.append((cell.name, resume))
        base = {"none": 0.7, "hiddenkey-": 0.75, "hiddenkey": 0.8}[cell.config.dropout.method]
        accuracy = base + cell.config.train.seed / 100
        write_run(cell.run_dir, cell.config, {"accuracy": accuracy}, loss_events([0.9, 0.7], [accuracy]))


def test_grid_is_the_cartesian_product_in_order(tmp_path):
    study = load_study(write_study(tmp_path, overrides=["train.epochs=1"], grid={
        "dropout.method": ["hiddenkey-", "hiddenkey"], "dropout.rate": [0.05, 0.1], "train.seed": [1, 2]}))
    cells = expand_cells(study)
    assert [cell.name for cell in cells] == [
        f"method={method},rate={rate},seed={seed}"
        for method in ("hiddenkey-", "hiddenkey") for rate in (0.05, 0.1) for seed in (1, 2)]
    last = cells[-1]
    assert (last.config.dropout.method, last.config.dropout.rate, last.config.train.seed) == ("hiddenkey", 0.1, 2)
    assert last.config.train.epochs == 1
    assert last.run_dir == tmp_path / "out" / "method=hiddenkey,rate=0.1,seed=2"
    assert last.config.output.dir == str(last.run_dir)
    assert last.preset == presets_dir() / "quickstart.yaml"


def test_identical_runs_are_kept_once(tmp_path):
    study = load_study(write_study(tmp_path, grid={
        "dropout.method": ["none", "hiddenkey-", "hiddenkey"], "dropout.rate": [0.05, 0.1],
        "dropout.kl_weight": [0.5, 1.0], "dropout.branches": ["one", "both"], "train.seed": [1]}))
    names = [cell.name for cell in expand_cells(study)]
    # none ignores rate, kl_weight and branches; hiddenkey- ignores kl_weight and branches
    assert names == [
        "method=none,rate=0.05,kl_weight=0.5,branches=one,seed=1",
        "method=hiddenkey-,rate=0.05,kl_weight=0.5,branches=one,seed=1",
        "method=hiddenkey-,rate=0.1,kl_weight=0.5,branches=one,seed=1",
        *(f"method=hiddenkey,rate={rate},kl_weight={kl},branches={branches},seed=1"
          for rate in (0.05, 0.1) for kl in (0.5, 1.0) for branches in ("one", "both")),
    ]


def test_names_are_filesystem_safe_and_clashing_labels_use_the_whole_key(tmp_path):
    study = load_study(write_study(tmp_path, grid={
        "lora.target_modules": [["query", "value"]], "train.lr": [1e-4], "model.revision": ["a/b c"],
        "output.report_to": [[]], "train.batch_size": [8], "eval.batch_size": [4]}))
    (cell,) = expand_cells(study)
    assert cell.name == "target_modules=query-value,lr=0.0001,revision=a_b_c,report_to=_,train.batch_size=8,eval.batch_size=4"
    assert cell.config.lora.target_modules == ["query", "value"] and cell.config.model.revision == "a/b c"
    assert (cell.config.train.lr, cell.config.train.batch_size, cell.config.eval.batch_size) == (1e-4, 8, 4)


def test_several_bases_get_a_folder_each(tmp_path):
    study = load_study(write_study(tmp_path, base=["glue-rte", "glue-stsb"], grid={"train.seed": [1, 2]}))
    cells = expand_cells(study)
    assert [cell.name for cell in cells] == ["glue-rte/seed=1", "glue-rte/seed=2", "glue-stsb/seed=1", "glue-stsb/seed=2"]
    assert cells[2].config.model.task == "regression"


def test_relative_base_is_found_next_to_the_study_file(tmp_path, monkeypatch):
    preset = yaml.safe_load((presets_dir() / "quickstart.yaml").read_text())
    preset["data"] = {"train": "mine.jsonl"}
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(preset))
    path = write_study(tmp_path, base="mine.yaml", grid={"train.seed": [1]})
    monkeypatch.chdir(tmp_path.parent)
    (cell,) = expand_cells(load_study(path))
    assert cell.preset == tmp_path / "mine.yaml"
    assert cell.config.data.train == str(tmp_path / "mine.jsonl")


def test_shipped_studies_expand():
    quick = expand_cells(load_study("quickstart-study"))
    assert len(quick) == 6 and {cell.config.train.epochs for cell in quick} == {1}
    glue = expand_cells(load_study("glue-roberta-large"))
    # 4 tasks x (none once + dropkey/hiddenkey-/hiddenkey x 2 rates) x 5 seeds
    assert len(glue) == 4 * 7 * 5
    assert {cell.name.split("/")[0] for cell in glue} == {"glue-rte", "glue-mrpc", "glue-stsb", "glue-sst2"}


@pytest.mark.parametrize(("fields", "fragments"), [
    ({"grid": {"dropout.method": ["hiddenkey", "hiddenky"]}},
     ["study cell method=hiddenky", "unknown dropout method 'hiddenky'"]),
    ({"grid": {"dropout.methd": ["none"]}}, ["study cell methd=none", "did you mean dropout.method?"]),
    ({"grid": {"dropout.rate": [0.1, 1.5]}}, ["study cell rate=1.5", "dropout.rate"]),
    ({"grid": {"dropout.rate": 0.1}}, ["grid.dropout.rate", "valid list"]),
    ({"grid": {"dropout.rate": []}}, ["grid", "'dropout.rate' has no values"]),
    ({"grid": {"seed": [1]}}, ["'seed' must be a dotted preset key"]),
    ({"grd": {"train.seed": [1]}}, ["grd: unknown study key (did you mean grid?)"]),
    ({"overrides": ["train.epochs"]}, ["'train.epochs' is not of the form key.sub=value"]),
    ({"base": "quickstrt"}, ["quickstrt: no such preset file", "did you mean quickstart?"]),
])
def test_bad_studies_fail_before_anything_runs(tmp_path, fields, fragments):
    trainer = FakeTrainer()
    with pytest.raises(ConfigError) as caught:
        run_sweep(load_study(write_study(tmp_path, **fields)), quiet(), trainer)
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    assert trainer.calls == []
    assert not (tmp_path / "out").exists()


def test_missing_study_file_suggests_a_shipped_one():
    with pytest.raises(ConfigError, match="did you mean quickstart-study"):
        load_study("quickstart-stdy")


def test_rerun_skips_finished_cells_and_compares(tmp_path):
    study = load_study(write_study(tmp_path, grid={"dropout.method": ["none", "hiddenkey"], "train.seed": [1, 2]}))
    trainer = FakeTrainer()
    run_dirs = run_sweep(study, quiet(), trainer)
    assert trainer.calls == [("method=none,seed=1", False), ("method=none,seed=2", False),
                             ("method=hiddenkey,seed=1", False), ("method=hiddenkey,seed=2", False)]
    assert run_dirs == [tmp_path / "out" / name for name, _ in trainer.calls]
    table = (tmp_path / "out/comparison.md").read_text()
    assert "| hiddenkey | 0.1 | 1 | 2 | 0.8150 ± 0.0071 |" in table  # 0.81, 0.82: sample std 0.01 / sqrt(2)
    for name in ("comparison.csv", "loss_by_method.png", "metric_by_method.png", "metric_vs_rate.png"):
        assert (tmp_path / "out" / name).is_file()

    again = FakeTrainer()
    console = quiet()
    run_sweep(study, console, again)
    assert again.calls == []
    assert console.file.getvalue().count("finished, skipped") == 4


def test_unfinished_cell_with_a_checkpoint_is_resumed(tmp_path):
    study = load_study(write_study(tmp_path, grid={"train.seed": [1, 2, 3]}))
    checkpoint = tmp_path / "out/seed=2/checkpoints/checkpoint-4"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    (checkpoint / "adapter_model.safetensors").write_bytes(b"")
    cut_short = tmp_path / "out/seed=3/checkpoints/checkpoint-2"  # no trainer_state.json: cannot resume
    cut_short.mkdir(parents=True)
    trainer = FakeTrainer()
    run_sweep(study, quiet(), trainer)
    assert trainer.calls == [("seed=1", False), ("seed=2", True), ("seed=3", False)]


def test_train_cell_runs_the_pipeline_like_hkft_train(tmp_path, monkeypatch):
    """The default train_fn: run directory, saved config and run_info, then pipeline.train."""
    import hkft.recipes.train

    seen = {}

    def fake_train(cfg, run, *, resume, console, callbacks):
        seen.update(cfg=cfg, run=run, resume=resume, callbacks=callbacks)

    monkeypatch.setattr(hkft.recipes.train, "train", fake_train)
    (cell,) = expand_cells(load_study(write_study(tmp_path, grid={"train.seed": [7]})))
    train_cell(cell, resume=False, console=quiet())
    assert seen["run"].root == cell.run_dir and seen["resume"] is False and seen["cfg"].train.seed == 7
    assert seen["callbacks"] == ()
    saved = yaml.safe_load((cell.run_dir / "hkft_config.yaml").read_text())
    assert saved["train"]["seed"] == 7 and saved["output"]["dir"] == str(cell.run_dir)
    argv = json.loads((cell.run_dir / "run_info.json").read_text())["argv"]
    assert argv[:3] == ["hkft", "train", str(cell.preset)] and "--set=train.seed=7" in argv


def test_study_model_rejects_unknown_fields():
    """The one error is the misspelt key: pydantic's extra_forbidden (load_study turns it into a suggestion)."""
    with pytest.raises(ValidationError) as caught:
        Study.model_validate({"base": "quickstart", "output": "x", "gird": {}})
    assert caught.value.errors(include_url=False) == [
        {"type": "extra_forbidden", "loc": ("gird",), "msg": "Extra inputs are not permitted", "input": {}}]


def test_real_sweep_on_minilm(tmp_path):
    """Two real (tiny) MiniLM trainings through the default train_fn, then the comparison of both."""
    study = load_study(write_study(
        tmp_path, overrides=["train.max_steps=2", "data.max_samples=16", "train.batch_size=8", "train.eval_strategy=steps",
                             "train.eval_steps=1", "output.report_to=[]"],
        grid={"dropout.method": ["none", "hiddenkey"], "train.seed": [1]}))
    run_dirs = run_sweep(study, quiet())
    for run_dir in run_dirs:
        final = json.loads((run_dir / "metrics.json").read_text())["eval"]
        assert 0.0 <= final["accuracy"] <= 1.0
        assert (run_dir / "adapter/adapter_config.json").is_file()
    records = (tmp_path / "out/comparison.csv").read_text().splitlines()
    assert [line.split(",")[2] for line in records[1:]] == ["none", "hiddenkey"]
    accuracy = json.loads((run_dirs[1] / "metrics.json").read_text())["eval"]["accuracy"]
    assert f"| hiddenkey | 0.1 | 1 | 1 | {accuracy:.4f} |" in (tmp_path / "out/comparison.md").read_text()


def test_the_training_recipe_never_imports_the_study_package():
    """hkft.study calls the recipe; the recipe (and a run's own curves.png) must not depend on studies."""
    code = "import sys, hkft.recipes.train, hkft.cli; print(sorted(m for m in sys.modules if m.startswith('hkft.study')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.stdout.strip() == "[]"


def test_rerun_refuses_a_finished_cell_trained_with_another_setting(tmp_path):
    """A changed base or override must not pass off the old runs as the new setting's (a continued
    `hkft tune` whose best trial changed retrains its seeds into the same seed=N folders)."""
    run_sweep(load_study(write_study(tmp_path, overrides=["train.lr=0.001"], grid={"train.seed": [1, 2]})), quiet(),
              FakeTrainer())
    changed = load_study(write_study(tmp_path, overrides=["train.lr=0.002"], grid={"train.seed": [1, 2]}))
    trainer = FakeTrainer()
    with pytest.raises(ConfigError, match=r"seed=1 holds a run of another setting \(train.lr: 0.001 -> 0.002\)"):
        run_sweep(changed, quiet(), trainer)
    assert trainer.calls == []
    run_sweep(load_study(write_study(tmp_path, overrides=["train.lr=0.001", "description=renamed"],
                                     grid={"train.seed": [1, 2]})), quiet(), trainer)
    assert trainer.calls == []  # bookkeeping (description, output) is not a setting
