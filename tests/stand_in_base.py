"""A local stand-in for the PyTorch base image, for building the Dockerfile where no image registry
can be reached.

The recipe: a minimal Debian root filesystem (debootstrap) whose Python has this machine's minor
version, a virtual environment at /opt/venv first on PATH (as the PyTorch image's conda environment
is), the CPU build of the torch installed here, a user `ubuntu` holding uid 1000 (as in recent Ubuntu
images), and this machine's pip configuration: network indexes, certificate authorities, constraints.
Local indexes and find-links folders of this machine cannot exist inside a build; the torch wheels
are fetched through them here, with this machine's own pip, and installed offline in the root
filesystem. The image is tagged by the recipe's hash, so a rerun with the same recipe reuses it.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

REPOSITORY = "hkft-stand-in-base"
VENV = "/opt/venv"
PIP_DIR = "/etc/pip"
DEBIAN_MIRROR = os.environ.get("HKFT_DEBIAN_MIRROR", "http://deb.debian.org/debian")
DEBIAN_FOR_PYTHON = {(3, 9): "bullseye", (3, 11): "bookworm", (3, 13): "trixie"}
PACKAGES = ("python3", "python3-venv")
LOCATION_OPTIONS = ("index-url", "extra-index-url", "find-links")
FILE_OPTIONS = ("cert", "client-cert", "constraint")
PLAIN_OPTIONS = ("trusted-host", "proxy", "timeout", "retries")
PATH = f"{VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def effective_pip_options(listing: str) -> dict[str, str]:
    """pip's effective install options from `pip config list`: environment over [install] over [global]."""
    rank = {"global": 0, "install": 1, ":env:": 2}
    chosen: dict[str, tuple[int, str]] = {}
    for line in listing.splitlines():
        key, separator, value = line.partition("=")
        section, _, name = key.rpartition(".")
        if separator and section in rank and rank[section] >= chosen.get(name, (-1, ""))[0]:
            chosen[name] = (rank[section], ast.literal_eval(value))
    return {name: value for name, (_, value) in chosen.items()}


def is_local(location: str) -> bool:
    return urlparse(location).scheme in ("", "file")


def local_path(location: str) -> Path:
    parsed = urlparse(location)
    return Path(url2pathname(parsed.path) if parsed.scheme == "file" else location)


@dataclass(frozen=True)
class PipCarry:
    """What the base's /etc/pip.conf says, and the files it points to (their target name: content)."""

    config: str
    files: dict[str, bytes]


def carried_pip_configuration(options: dict[str, str]) -> PipCarry:
    """This machine's pip configuration as it can hold inside an image: network locations kept,
    local ones dropped (nothing of this machine's disk is there), files copied into /etc/pip."""
    lines, files = ["[global]"], {}
    for name in LOCATION_OPTIONS:
        network = [location for location in options.get(name, "").split() if not is_local(location)]
        if network:
            lines.append(f"{name} = {' '.join(network)}")
    for name in FILE_OPTIONS:
        if name in options and is_local(options[name]) and local_path(options[name]).is_file():
            target = f"{name}{local_path(options[name]).suffix or '.txt'}"
            files[target] = local_path(options[name]).read_bytes()
            lines.append(f"{name} = {PIP_DIR}/{target}")
    lines += [f"{name} = {options[name]}" for name in PLAIN_OPTIONS if name in options]
    return PipCarry("\n".join(lines) + "\n", files)


@dataclass(frozen=True)
class Recipe:
    suite: str
    mirror: str
    torch: str
    pip: PipCarry

    @property
    def tag(self) -> str:
        digest = hashlib.sha256()
        digest.update(json.dumps([self.suite, self.mirror, self.torch, PACKAGES, self.pip.config]).encode())
        for name in sorted(self.pip.files):
            digest.update(name.encode() + hashlib.sha256(self.pip.files[name]).digest())
        digest.update(Path(__file__).read_bytes())  # the recipe's own steps
        return f"{REPOSITORY}:{digest.hexdigest()[:16]}"


def this_machines_recipe() -> Recipe:
    """Raises LookupError when no Debian release ships this machine's Python minor version."""
    import torch

    suite = DEBIAN_FOR_PYTHON.get(sys.version_info[:2])
    if suite is None:
        raise LookupError(f"no Debian release ships Python {platform.python_version()} "
                          f"(known: {sorted(DEBIAN_FOR_PYTHON.values())}): run the slow suite under one of those")
    listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                             check=True).stdout
    return Recipe(suite, DEBIAN_MIRROR, f"torch=={torch.__version__}",
                  carried_pip_configuration(effective_pip_options(listing)))


def checked(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed ({result.returncode}):\n"
                           f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def image_exists(docker: str, tag: str) -> bool:
    return subprocess.run([docker, "image", "inspect", tag], capture_output=True).returncode == 0


def make_root_filesystem(recipe: Recipe, rootfs: Path, wheels: Path) -> None:
    checked(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", recipe.suite, str(rootfs),
             recipe.mirror], timeout=1200)
    # This machine's pip, with its own configuration, fetches the torch wheels for the same Python.
    checked([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--dest", str(wheels),
             recipe.torch], timeout=1200)
    shutil.copytree(wheels, rootfs / "tmp" / "wheels")
    setup = (f"python3 -m venv {VENV}"
             f" && {VENV}/bin/python -m pip install --no-cache-dir --no-index --find-links /tmp/wheels {shlex.quote(recipe.torch)}"
             " && useradd --create-home --uid 1000 ubuntu"
             " && rm -rf /tmp/wheels /var/lib/apt/lists/* /var/cache/apt/*.bin /root/.cache")
    checked(["chroot", str(rootfs), "/bin/sh", "-c", setup], env={"PATH": PATH, "HOME": "/root", "LANG": "C.UTF-8"},
            timeout=1200)
    (rootfs / PIP_DIR.lstrip("/")).mkdir(parents=True, exist_ok=True)
    for name, content in recipe.pip.files.items():
        (rootfs / PIP_DIR.lstrip("/") / name).write_bytes(content)
    (rootfs / "etc" / "pip.conf").write_text(recipe.pip.config)


def import_image(docker: str, rootfs: Path, tag: str) -> None:
    changes = [f"ENV PATH={PATH}", "ENV LANG=C.UTF-8", f"ENV VIRTUAL_ENV={VENV}", 'CMD ["/bin/bash"]']
    archive = subprocess.Popen(["tar", "--numeric-owner", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    try:
        checked([docker, "import", *(f"--change={change}" for change in changes), "-", tag], stdin=archive.stdout,
                timeout=1200)
    finally:
        archive.stdout.close()
        archive.wait()


def ensure_stand_in_base(docker: str, workdir: Path) -> str:
    """The stand-in base's tag, built unless an image of the same recipe exists; older recipes are removed."""
    recipe = this_machines_recipe()
    if image_exists(docker, recipe.tag):
        return recipe.tag
    rootfs, wheels = workdir / "rootfs", workdir / "wheels"
    try:
        make_root_filesystem(recipe, rootfs, wheels)
        import_image(docker, rootfs, recipe.tag)
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)
        shutil.rmtree(wheels, ignore_errors=True)
    stale = checked([docker, "image", "ls", "--format", "{{.Repository}}:{{.Tag}}", REPOSITORY]).stdout.split()
    for tag in set(stale) - {recipe.tag}:
        subprocess.run([docker, "image", "rm", tag], capture_output=True)
    return recipe.tag
