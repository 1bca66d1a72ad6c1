"""hkft: LoRA and QLoRA finetuning with HiddenKey and the unified dropout framework."""

import logging

__version__ = "0.1.0"

# peft and accelerate import bitsandbytes, whose CPU backend warns on import about optional kernels
# hkft does not use; stderr is kept for hkft's own one-line errors.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
