"""Timing and memory probes, interleaved so that every configuration sees the same machine noise."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class Measurement:
    name: str
    seconds: list[float]
    memory_bytes: int
    tokens: int

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.median

    def time_ratio(self, baseline: Measurement) -> tuple[float, float, float]:
        """Median and quartiles of the per-round ratios to ``baseline``: each round's two steps ran
        seconds apart, so a slow stretch of the machine cancels out of their ratio (where a ratio of
        medians taken over the whole run keeps it)."""
        ratios = [mine / theirs for mine, theirs in zip(self.seconds, baseline.seconds, strict=True)]
        if len(ratios) == 1:
            return ratios[0], ratios[0], ratios[0]
        low, _, high = statistics.quantiles(ratios, n=4)
        return statistics.median(ratios), low, high


@contextmanager
def saved_activation_bytes(counter: list[int]):
    """Bytes autograd keeps for the backward pass (distinct storages), the part of training memory
    that dropout methods change; weights and optimizer state are the same in every configuration."""
    seen: set[int] = set()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            counter[0] += storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield


def peak_memory(step: Callable[[], None], device: torch.device) -> int:
    """Peak allocated memory of one step on CUDA; saved-activation bytes on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    counter = [0]
    with saved_activation_bytes(counter):
        step()
    return counter[0]


def weight_bytes(model: torch.nn.Module) -> int:
    """Parameters and buffers: what an inference-only (no_grad) forward holds besides transients."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def run_interleaved(
    steps: dict[str, Callable[[], None]],
    tokens: dict[str, int],
    *,
    warmup: int,
    repeats: int,
    device: torch.device,
    memory: dict[str, int] | None = None,
) -> dict[str, Measurement]:
    """Step times over interleaved rounds, each round in its own shuffled order (seeded) so that no
    configuration always runs right after the same one; memory as measured by `peak_memory` unless given."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    memory = memory or {name: peak_memory(step, device) for name, step in steps.items()}
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps)
    shuffler = random.Random(0)
    for _ in range(repeats):
        shuffler.shuffle(order)
        for name in order:
            step = steps[name]
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds[name].append(time.perf_counter() - start)
    return {name: Measurement(name, seconds[name], memory[name], tokens[name]) for name in steps}
