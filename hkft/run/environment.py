"""What a bug report needs: versions, device, and whether bitsandbytes can run here."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import platform

import torch

import hkft

PACKAGES = ("transformers", "peft", "accelerate", "datasets", "bitsandbytes")


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cuda_report() -> dict[str, str]:
    if not torch.cuda.is_available():
        return {"cuda available": "no (cpu only; in Docker, run with --gpus all)"}
    props = torch.cuda.get_device_properties(0)
    return {
        "cuda available": f"yes, {torch.cuda.device_count()} device(s)",
        "cuda version": str(torch.version.cuda),
        "gpu": f"{props.name}, {props.total_memory / 2**30:.1f} GiB",
        "bf16 supported": "yes" if torch.cuda.is_bf16_supported() else "no",
    }


def bitsandbytes_support() -> str:
    """Quantizes a small tensor with the backend bitsandbytes picked, rather than trusting the install."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return "not installed: 4/8-bit bases need pip install 'hkft[gpu]'"
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # it warns about optional CPU kernels on import
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        import bitsandbytes.functional as bnb_functional

        bnb_functional.quantize_4bit(torch.ones(64, 64, device=device), quant_type="nf4")
    except Exception as err:  # a broken native library surfaces as any exception type
        return f"installed but cannot run on {device}: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
    if device == "cuda":
        return "CUDA backend: 4-bit and 8-bit bases"
    return "CPU backend: 4-bit and 8-bit layers run, slowly; QLoRA proper needs a GPU"


def environment_report() -> dict[str, str]:
    return {
        "hkft": hkft.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        **cuda_report(),
        **{name: package_version(name) for name in PACKAGES},
        "bitsandbytes support": bitsandbytes_support(),
        "attention kernel": "sdpa (model.attn_implementation; attention-weight dropout builds the matrix itself)",
    }
