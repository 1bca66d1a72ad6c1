"""What a bug report needs: versions, device, and whether bitsandbytes can run here."""

from __future__ import annotations

import importlib.metadata
import platform

import torch

import hkft

PACKAGES = ("transformers", "peft", "accelerate", "datasets", "bitsandbytes")


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def device_summary() -> str:
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        count = torch.cuda.device_count()
        return f"cuda x{count}: {props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
    return "cpu only (no CUDA device visible; in Docker, run with --gpus all)"


def bitsandbytes_support() -> str:
    if package_version("bitsandbytes") == "not installed":
        return "not installed: 4/8-bit bases need pip install 'hkft[gpu]'"
    if torch.cuda.is_available():
        return "CUDA backend: 4-bit and 8-bit bases"
    return "CPU backend: 4-bit and 8-bit Linear layers run, slowly; QLoRA proper needs a GPU"


def environment_report() -> dict[str, str]:
    report = {
        "hkft": hkft.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "device": device_summary(),
        "bf16 on GPU": str(torch.cuda.is_available() and torch.cuda.is_bf16_supported()),
        "attention kernel": "sdpa (torch.nn.functional.scaled_dot_product_attention)",
    }
    report.update({name: package_version(name) for name in PACKAGES})
    report["bitsandbytes support"] = bitsandbytes_support()
    return report
