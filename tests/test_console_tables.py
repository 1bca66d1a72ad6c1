"""The closing tables at a narrow console: a title never breaks the model name in it mid-word."""

import pytest

import hkft.commands.common
from hkft.commands.common import print_before_and_after, print_table

WIDTH = 60
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture
def narrow(monkeypatch):
    monkeypatch.setattr(hkft.commands.common.console, "_width", WIDTH)


def printed_lines(capsys) -> list[str]:
    return capsys.readouterr().out.splitlines()


def test_a_summary_title_keeps_the_model_name_whole(narrow, capsys):
    print_table({"loss": 0.2232, "accuracy": 0.94, "adapter": "runs/x/adapter"}, f"hkft train: {MODEL}")
    lines = printed_lines(capsys)
    assert lines[0].strip() == f"hkft train: {MODEL}"
    assert all(len(line) <= WIDTH for line in lines)


def test_a_title_wider_than_the_console_wraps_between_words(narrow, capsys):
    path = "/home/someone/models/a-very-long-local-model-folder-name"
    print_table({"loss": 0.5}, f"hkft eval: {path}")
    lines = printed_lines(capsys)
    assert [lines[0].strip(), lines[1].strip()] == ["hkft eval:", path]
    assert all(len(line) <= WIDTH for line in lines)


def test_the_before_and_after_table_keeps_the_model_name_whole(narrow, capsys):
    class Result:
        metrics, base_metrics, adapter_dir, samples = {"loss": 1.2}, {"loss": 2.0}, "runs/chat/adapter", []

    print_before_and_after(Result(), f"hkft train: {MODEL}")
    assert printed_lines(capsys)[0].strip() == f"hkft train: {MODEL}"
