"""GGUF export with llama.cpp's own converter, at a pinned version.

llama.cpp renames and rebuilds its converter (``convert_hf_to_gguf.py`` became a front for the
``conversion`` package), so hkft runs one fixed copy of it: the one vendored in the
``llama-cpp-python`` source distribution below, with the ``gguf-py`` beside it. hkft never
downloads it: the user fetches the file once with pip (the command is in the error), hkft checks its
sha256, extracts the converter into its cache (once per version, whole or not at all) and runs it
as a subprocess on the merged model folder. Which architectures export is the converter's own
registry (``--print-supported-models``), read once at extraction.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from hkft.errors import ModelError
from hkft.models.gguf import cache_root, content_hash
from hkft.run.files import atomic_dir
from hkft.tasks.registry import task_for

LLAMA_CPP_PYTHON = "0.3.36"
SDIST = f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
# What the converter needs from the source distribution's vendor/llama.cpp.
VENDORED = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
CONVERTER_SCRIPT = "convert_hf_to_gguf.py"
REGISTRY = "supported_architectures.json"
GGUF_TYPES = ("f16", "bf16", "q8_0")
EXTRA_INSTALL = "pip install 'hkft[export]'"  # the converter's own requirements beyond hkft's (sentencepiece)


@dataclass(frozen=True)
class Converter:
    script: Path
    architectures: frozenset[str]  # the Hugging Face model classes its text-model registry converts

    @property
    def name(self) -> str:
        return f"llama.cpp's converter from llama-cpp-python {LLAMA_CPP_PYTHON}"


def llama_cpp_dir() -> Path:
    return cache_root() / "llama.cpp"


def fetch_command() -> str:
    return f"pip download --no-deps --no-binary :all: llama-cpp-python=={LLAMA_CPP_PYTHON} -d {llama_cpp_dir()}"


def gguf_file_name(gguf_type: str) -> str:
    return f"model-{gguf_type}.gguf"


def converter_dir() -> Path:
    return llama_cpp_dir() / f"converter-{LLAMA_CPP_PYTHON}"


def find_converter() -> Converter | None:
    """The extracted converter, or None when it has not been extracted yet."""
    folder = converter_dir()
    try:
        names = json.loads((folder / REGISTRY).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return Converter(folder / CONVERTER_SCRIPT, frozenset(names))


def gguf_converter() -> Converter:
    """The converter, extracted from the fetched source distribution on first use."""
    found = find_converter()
    if found is not None:
        return found
    sdist = llama_cpp_dir() / SDIST
    if not sdist.is_file():
        raise ModelError(f"GGUF export needs llama.cpp's converter (llama-cpp-python {LLAMA_CPP_PYTHON}'s source), "
                         f"which is not in {llama_cpp_dir()}", f"fetch it once with `{fetch_command()}`")
    if content_hash(sdist) != SDIST_SHA256:
        raise ModelError(f"{sdist} is not llama-cpp-python {LLAMA_CPP_PYTHON}'s source distribution (its sha256 differs)",
                         f"delete it and fetch it again with `{fetch_command()}`")
    target = converter_dir()
    with FileLock(str(target) + ".lock"):
        found = find_converter()  # another process may have extracted it meanwhile
        if found is None:
            with atomic_dir(target) as staging:
                extract_converter(sdist, staging)
                names = read_registry(staging / CONVERTER_SCRIPT)
                (staging / REGISTRY).write_text(json.dumps(sorted(names), indent=1), encoding="utf-8")
            found = Converter(target / CONVERTER_SCRIPT, frozenset(names))
    return found


def extract_converter(sdist: Path, folder: Path) -> None:
    """Only regular files below vendor/llama.cpp's converter parts; nothing else of the archive."""
    with tarfile.open(sdist, "r:gz") as archive:
        for member in archive:
            relative = member.name.removeprefix(VENDORED)
            if relative == member.name or not member.isfile() or ".." in Path(relative).parts or not is_converter_part(relative):
                continue
            path = folder / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            with archive.extractfile(member) as source, path.open("wb") as sink:
                shutil.copyfileobj(source, sink)


def is_converter_part(relative: str) -> bool:
    return any(relative.startswith(part) if part.endswith("/") else relative == part for part in CONVERTER_PARTS)


def converter_environment() -> dict[str, str]:
    """The converter must import its own gguf-py (NO_LOCAL_GGUF would pick the installed gguf)."""
    return {key: value for key, value in os.environ.items() if key != "NO_LOCAL_GGUF"}


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no message"


def read_registry(script: Path) -> set[str]:
    """The text-model architectures the converter registers, as it prints them."""
    result = subprocess.run([sys.executable, str(script), "--print-supported-models"], capture_output=True, text=True,
                            env=converter_environment(), check=False)
    names, in_text_models = set(), False
    for line in result.stderr.splitlines():
        if line.endswith("models:"):
            in_text_models = line.strip() == "TEXT models:"
        elif in_text_models and line.strip().startswith("- "):
            names.add(line.strip()[2:])
    if result.returncode != 0 or not names:
        raise ModelError(f"llama.cpp's converter does not start: {last_line(result.stderr)}",
                         f"install its requirements with {EXTRA_INSTALL}")
    return names


def causal_lm_class(model_type: str) -> str | None:
    """The class transformers builds (and a merged model's config names) for a causal LM of this type."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)


def task_refusal(task: str) -> str | None:
    return None if task_for(task).language_model else f"GGUF export is for causal language models, and this is a {task} model"


def architecture_refusal(architecture: str | None, converter: Converter) -> str | None:
    if architecture in converter.architectures:
        return None
    return f"{converter.name} does not convert {architecture or 'this architecture'}"


def converter_for(task: str, model_type: str) -> Converter:
    """The converter, once the task and the architecture are known to export (before any weight is read)."""
    hint = "merge with --format hf (the default) and run the model with transformers"
    refusal = task_refusal(task)
    if refusal:
        raise ModelError(refusal, hint)
    converter = gguf_converter()
    refusal = architecture_refusal(causal_lm_class(model_type), converter)
    if refusal:
        raise ModelError(refusal, hint)
    return converter


def check_gguf_type(gguf_type: str) -> None:
    if gguf_type not in GGUF_TYPES:
        raise ModelError(f"--gguf-type {gguf_type!r} is not supported", f"choose one of {', '.join(GGUF_TYPES)}")


def write_gguf(merged, tokenizer, folder: Path, gguf_type: str, converter: Converter) -> Path:
    """The merged model as one GGUF file in ``folder``; its Hugging Face form exists only meanwhile."""
    hf_dir = folder / ".merged-hf"
    merged.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    outfile = folder / gguf_file_name(gguf_type)
    try:
        convert(hf_dir, outfile, gguf_type, converter)
    finally:
        shutil.rmtree(hf_dir, ignore_errors=True)
    return outfile


def convert(hf_dir: Path, outfile: Path, gguf_type: str, converter: Converter) -> None:
    result = subprocess.run(
        [sys.executable, str(converter.script), str(hf_dir), "--outfile", str(outfile), "--outtype", gguf_type],
        capture_output=True, text=True, env=converter_environment(), check=False,
    )
    if result.returncode != 0 or not outfile.is_file():
        reason = last_line(result.stderr)
        missing = "ModuleNotFoundError" in reason
        raise ModelError(f"{converter.name} failed: {reason}",
                         "nothing was written" + (f"; install its requirements with {EXTRA_INSTALL}" if missing else ""))


def gguf_export_fact(task: str, model_class: str) -> str:
    """`hkft inspect`'s line on GGUF export."""
    converter = find_converter()
    if task_refusal(task):
        return f"no: {task_refusal(task)}"
    if converter is None:
        return f"not known until llama.cpp's converter is fetched: `{fetch_command()}`"
    refusal = architecture_refusal(model_class, converter)
    return f"no: {refusal}" if refusal else f"yes, as {model_class} ({converter.name})"
