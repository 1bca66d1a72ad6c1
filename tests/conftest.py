"""Shared fixtures: everything runs offline on tiny models built here or on the shipped MiniLM."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
from typer.testing import CliRunner


class Cli:
    """Runs `hkft ...` in-process and exposes exit code, stdout and stderr."""

    def __init__(self):
        self.runner = CliRunner()

    def __call__(self, *args: str):
        from hkft.cli import app

        return self.runner.invoke(app, [str(arg) for arg in args], catch_exceptions=False)


@pytest.fixture
def cli() -> Cli:
    return Cli()


@pytest.fixture
def training_args(tmp_path):
    """``TrainingArguments`` for a Trainer a test builds by hand: on the CPU, reporting nowhere, and
    writing (if at all) into the test's own temporary folder."""
    from transformers import TrainingArguments

    def make(**options) -> TrainingArguments:
        return TrainingArguments(output_dir=str(tmp_path / "trainer"), report_to=[], use_cpu=True, **options)

    return make


def assert_one_line_error(result, *fragments: str, code: int = 2) -> None:
    """A user error: non-zero exit, exactly one line on stderr naming the problem, no traceback."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
