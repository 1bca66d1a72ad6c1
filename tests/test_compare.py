"""hkft compare: grouping over seeds, median and sample std against hand computations, CSV and Markdown."""

from __future__ import annotations

import csv
import io
import json
import shutil

import pytest
from fake_runs import fake_run, loss_events
from rich.console import Console

from hkft.config.schema import HubSource
from hkft.errors import HkftError
from hkft.recipes.curves import read_curves
from hkft.study.comparison import (
    collect_runs,
    compare_runs,
    comparison_table,
    dataset_name,
    default_output_dir,
    table_markdown,
    write_table,
)


@pytest.fixture
def three_seeds_and_baseline(tmp_path):
    """HiddenKey at p=0.1 over seeds 1-3, and one `none` run."""
    scores = {1: (0.80, 0.5), 2: (0.86, 0.9), 3: (0.83, 0.7)}
    for seed, (accuracy, f1) in scores.items():
        fake_run(tmp_path / f"hk{seed}", seed=seed, metrics={"accuracy": accuracy, "macro_f1": f1, "loss": 0.4})
    fake_run(tmp_path / "none1", method="none", seed=1, metrics={"accuracy": 0.75, "macro_f1": 0.6, "loss": 0.5})
    return tmp_path


def test_median_and_sample_std_over_seeds(three_seeds_and_baseline):
    root = three_seeds_and_baseline
    rows = comparison_table(collect_runs([root / "hk1", root / "hk2", root / "hk3", root / "none1"]))
    assert [(row.method, row.rate, row.kl_weight, row.seeds) for row in rows] == [
        ("none", None, None, (1,)), ("hiddenkey", 0.1, 1.0, (1, 2, 3))]
    none, hiddenkey = rows
    # accuracy 0.80, 0.86, 0.83: median 0.83, mean 0.83, sample variance (0.03^2 + 0.03^2 + 0) / 2 = 0.0009
    assert hiddenkey.median["accuracy"] == pytest.approx(0.83)
    assert hiddenkey.std["accuracy"] == pytest.approx(0.03)
    # macro_f1 0.5, 0.9, 0.7: median 0.7, sample std sqrt((0.04 + 0.04 + 0) / 2) = 0.2
    assert hiddenkey.median["macro_f1"] == pytest.approx(0.7)
    assert hiddenkey.std["macro_f1"] == pytest.approx(0.2)
    assert hiddenkey.std["loss"] == 0.0
    assert none.median == {"accuracy": 0.75, "macro_f1": 0.6, "loss": 0.5}
    assert none.std == {"accuracy": 0.0, "macro_f1": 0.0, "loss": 0.0}  # one seed: 0, not NaN
    assert {row.dataset for row in rows} == {"quickstart/train.jsonl"}
    assert all(row.extra == () for row in rows)


def test_csv_and_markdown(three_seeds_and_baseline, tmp_path):
    rows = comparison_table(collect_runs([three_seeds_and_baseline]))
    csv_path, md_path = write_table(rows, tmp_path / "out")
    records = list(csv.DictReader(io.StringIO(csv_path.read_text())))
    assert [record["method"] for record in records] == ["none", "hiddenkey"]
    hiddenkey = records[1]
    assert hiddenkey["rate"] == "0.1" and hiddenkey["kl_weight"] == "1.0"
    assert hiddenkey["n"] == "3" and hiddenkey["seeds"] == "1 2 3"
    assert float(hiddenkey["accuracy_median"]) == pytest.approx(0.83)
    assert float(hiddenkey["accuracy_std"]) == pytest.approx(0.03)
    assert float(hiddenkey["macro_f1_std"]) == pytest.approx(0.2)
    assert records[0]["rate"] == "" and records[0]["kl_weight"] == ""
    assert list(records[0])[:9] == ["dataset", "task", "method", "rate", "kl_weight", "n", "seeds",
                                    "accuracy_median", "accuracy_std"]  # main metric first

    lines = md_path.read_text().splitlines()
    table = [line for line in lines if line.startswith("|")]
    assert table[0] == "| dataset | method | rate | kl_weight | seeds | accuracy | macro_f1 | loss | overfit | gap |"
    assert table[2] == ("| quickstart/train.jsonl | none | - | - | 1 "
                        "| 0.7500 | 0.6000 | 0.5000 | - | - |")  # one seed: no spread to show; not watched
    assert table[3] == ("| quickstart/train.jsonl | hiddenkey | 0.1 | 1 | 3 "
                        "| 0.8300 ± 0.0300 | 0.7000 ± 0.2000 | 0.4000 ± 0.0000 | - | - |")
    assert not list((tmp_path / "out").glob(".tmp-*"))


def test_rate_of_a_method_that_drops_nothing_does_not_split_it(tmp_path):
    fake_run(tmp_path / "a", method="none", rate=0.05, seed=1, metrics={"accuracy": 0.7})
    fake_run(tmp_path / "b", method="none", rate=0.1, seed=2, metrics={"accuracy": 0.9})
    fake_run(tmp_path / "c", method="hiddenkey-", rate=0.1, kl_weight=0.5, seed=1, metrics={"accuracy": 0.8})
    rows = comparison_table(collect_runs([tmp_path]))
    assert [(row.method, row.rate, row.kl_weight, row.seeds) for row in rows] == [
        ("none", None, None, (1, 2)), ("hiddenkey-", 0.1, None, (1,))]
    assert rows[0].median["accuracy"] == pytest.approx(0.8)
    assert rows[0].std["accuracy"] == pytest.approx(0.1414213562, rel=1e-6)  # sqrt(0.02)


def test_one_setting_twice_with_one_seed_is_refused(tmp_path):
    """A copied run folder is not a second seed: counted twice it would shrink the std."""
    fake_run(tmp_path / "a", seed=42, metrics={"accuracy": 0.7})
    fake_run(tmp_path / "copy", seed=42, metrics={"accuracy": 0.7})
    fake_run(tmp_path / "b", seed=43, metrics={"accuracy": 0.9})
    with pytest.raises(HkftError, match=r"a and .*copy are the same setting with the same seed \(42\)"):
        comparison_table(collect_runs([tmp_path]))
    shutil.rmtree(tmp_path / "copy")
    runs = collect_runs([tmp_path, tmp_path / "a"])  # one run named twice is one run
    assert [row.seeds for row in comparison_table(runs)] == [(42, 43)]


def test_other_differences_are_separate_rows_with_their_own_column(tmp_path):
    for r in (4, 8):
        for seed in (1, 2):
            fake_run(tmp_path / f"r{r}-{seed}", seed=seed, extra=(f"lora.r={r}",), metrics={"accuracy": r / 10 + seed / 100})
    rows = comparison_table(collect_runs([tmp_path]))
    assert [(row.extra, row.seeds) for row in rows] == [((("lora.r", 4),), (1, 2)), ((("lora.r", 8),), (1, 2))]
    assert rows[1].median["accuracy"] == pytest.approx(0.815)
    assert "| lora.r |" in table_markdown(rows).splitlines()[2]


def test_datasets_are_grouped_apart_and_named(tmp_path):
    fake_run(tmp_path / "q", metrics={"accuracy": 0.8})
    fake_run(tmp_path / "s", extra=("model.task=regression", "data.train=/data/stsb/train.jsonl"),
             metrics={"pearson": 0.9, "spearman": 0.88})
    rows = comparison_table(collect_runs([tmp_path]))
    assert [(row.dataset, row.main_metric) for row in rows] == [("quickstart/train.jsonl", "accuracy"),
                                                                ("stsb/train.jsonl", "pearson")]
    assert rows[0].extra == () and rows[1].extra == ()  # lr, task, paths differ between datasets, not within one
    header = table_markdown(rows).splitlines()[2]
    assert header.index("accuracy") < header.index("pearson") < header.index("spearman")


def test_dataset_names():
    assert dataset_name("hub:nyu-mll/glue:rte:train") == "nyu-mll/glue:rte"
    assert dataset_name(HubSource(hub="imdb")) == "imdb"
    assert dataset_name("/x/data/quickstart/train.jsonl") == "quickstart/train.jsonl"


def test_curves_later_lines_win_after_a_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 1, "loss": 0.9}, {"step": 2, "loss": 0.8}, {"step": 2, "eval_accuracy": 0.6},
             {"step": 2, "loss": 0.7}, {"step": 3, "loss": 0.6, "kl_loss": 0.01}]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    curves = read_curves(path)
    assert curves["loss"] == [(1, 0.9), (2, 0.7), (3, 0.6)]
    assert curves["eval_accuracy"] == [(2, 0.6)]
    assert curves["kl_loss"] == [(3, 0.01)]


def test_run_summary_carries_curves(tmp_path):
    fake_run(tmp_path / "r", events=loss_events([1.0, 0.8, 0.6], [0.7], kl=[0.1, 0.2, 0.3]))
    (run,) = collect_runs([tmp_path / "r"])
    assert run.curves["loss"] == [(1, 1.0), (2, 0.8), (3, 0.6)]
    assert run.curves["kl_loss"] == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert run.curves["eval_accuracy"] == [(2, 0.7)]
    assert (run.method, run.rate, run.kl_weight, run.branches, run.seed) == ("hiddenkey", 0.1, 1.0, "one", 1)


def test_damaged_log_is_named(tmp_path):
    fake_run(tmp_path / "r")
    with (tmp_path / "r/metrics.jsonl").open("a") as stream:
        stream.write('{"step": 3, "lo\n')
    with pytest.raises(HkftError, match=r"metrics.jsonl: line 1 is not JSON"):
        collect_runs([tmp_path / "r"])


def test_unfinished_or_foreign_directories_are_named(tmp_path):
    fake_run(tmp_path / "done")
    fake_run(tmp_path / "unfinished")
    (tmp_path / "unfinished/metrics.json").unlink()
    with pytest.raises(HkftError, match=r"unfinished is not a finished run \(no metrics.json\)"):
        collect_runs([tmp_path / "done", tmp_path / "unfinished"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(HkftError, match=r"empty is not an hkft run"):
        collect_runs([tmp_path / "empty"])
    with pytest.raises(HkftError, match=r"missing: no such directory"):
        collect_runs([tmp_path / "missing"])


def test_a_sweep_folder_stands_for_its_runs(tmp_path):
    fake_run(tmp_path / "study/glue-rte/method=none,seed=1", method="none")
    fake_run(tmp_path / "study/glue-rte/method=hiddenkey,seed=1")
    runs = collect_runs([tmp_path / "study"])
    assert sorted(run.run_dir.name for run in runs) == ["method=hiddenkey,seed=1", "method=none,seed=1"]
    assert default_output_dir([tmp_path / "study"]) == (tmp_path / "study").resolve()
    assert default_output_dir([tmp_path / "study/glue-rte/method=none,seed=1"]) == (tmp_path / "study/glue-rte").resolve()


def test_compare_runs_writes_table_and_plots(three_seeds_and_baseline, tmp_path):
    console = Console(file=io.StringIO(), width=200)
    written = compare_runs([three_seeds_and_baseline], tmp_path / "cmp", console)
    assert sorted(path.name for path in written) == ["comparison.csv", "comparison.md", "loss_by_method.png",
                                                     "metric_by_method.png", "metric_vs_rate.png"]
    shown = console.file.getvalue()
    assert "0.8300 ± 0.0300" in shown and "hiddenkey" in shown


def verdict_of(detected: bool, gap: float | None) -> dict:
    return {"detected": detected, "best_step": 10, "best_metric": 0.8, "first_step": 20 if detected else None,
            "gap": gap, "suggestion": "try ..." if detected else None}


def test_each_setting_shows_how_many_runs_overfit_and_the_median_gap(tmp_path):
    for seed, (detected, gap) in {1: (True, 0.9), 2: (False, 0.1), 3: (True, 0.5)}.items():
        fake_run(tmp_path / f"none{seed}", method="none", seed=seed, overfitting=verdict_of(detected, gap))
    fake_run(tmp_path / "hk1", seed=1)  # made before the monitor, or with it off: not counted
    rows = comparison_table(collect_runs([tmp_path]))
    csv_rows = {row["method"]: row for row in csv.DictReader(io.StringIO(write_table(rows, tmp_path)[0].read_text()))}
    assert (csv_rows["none"]["overfit_runs"], csv_rows["none"]["watched_runs"]) == ("2", "3")
    assert float(csv_rows["none"]["gap_median"]) == 0.5
    assert (csv_rows["hiddenkey"]["watched_runs"], csv_rows["hiddenkey"]["gap_median"]) == ("0", "")
    markdown = table_markdown(rows)
    assert "| overfit | gap |" in markdown and "| 2/3 | 0.500 |" in markdown


def test_the_console_table_is_readable_at_80_columns(tmp_path):
    for seed in (1, 2):
        for method in ("none", "hiddenkey-", "hiddenkey"):
            fake_run(tmp_path / "runs" / f"{method}{seed}", method=method, seed=seed,
                     metrics={"accuracy": 0.9 + seed / 100, "macro_f1": 0.89, "mcc": 0.8, "loss": 0.3},
                     overfitting=verdict_of(method == "none", 0.4))
    console = Console(file=io.StringIO(), width=80)
    compare_runs([tmp_path / "runs"], tmp_path / "cmp", console)
    shown = console.file.getvalue().splitlines()
    assert all(len(line) <= 80 for line in shown)
    assert "…" not in "".join(shown)
    methods = [line.split("│")[1].strip() for line in shown if line.startswith("│")]
    assert methods == ["none", "hiddenkey-", "hiddenkey"]
    assert any("0.9150 ± 0.0071" in line and "2/2" in line for line in shown)
    assert any("also in comparison.md: " in line for line in shown)
    assert "| mcc | loss | overfit | gap |" in (tmp_path / "cmp/comparison.md").read_text()  # every metric in the file
