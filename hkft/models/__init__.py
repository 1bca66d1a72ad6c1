"""Models: finding and loading a base (hub, local, GGUF, quantized), LoRA wrapping, adapter files, merge and export."""
