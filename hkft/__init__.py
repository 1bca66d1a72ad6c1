"""hkft: LoRA and QLoRA finetuning with HiddenKey and the unified dropout framework."""

__version__ = "0.1.0"
