"""`python -m bench`: time and memory of every dropout configuration relative to plain peft LoRA."""

from __future__ import annotations

import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.table import Table

from bench.cli import FLOOR, PLAIN
from bench.measure import Measurement
from bench.run import (
    DECODER_ONE_BRANCH_TARGET,
    EVAL_TARGETS,
    PACKING_EXAMPLES,
    TRAIN_TARGETS,
    benchmark,
    llama_workload,
    minilm_workload,
    packing_benchmark,
    smollm2_chat_workload,
)
from hkft.run.files import atomic_write_json

app = typer.Typer(add_completion=False, help=__doc__)

# glibc hands large freed buffers back to the OS, so every step page-faults its activations in
# again, and configurations that hold more activations pay for it twice. CUDA's caching allocator
# never does this; keeping freed memory (as it does) makes CPU numbers measure compute.
CACHING_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(1 << 40), "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def ensure_caching_malloc() -> None:
    if any(os.environ.get(key) != value for key, value in CACHING_MALLOC.items()):
        os.execve(sys.executable, [sys.executable, "-m", "bench", *sys.argv[1:]], {**os.environ, **CACHING_MALLOC})
console = Console(width=150)
DECODER_LENGTH = 256


def verdict(ratio: float, target: float | None) -> str:
    if target is None:
        return ""
    return f"[green]<= {target:.2f}[/]" if ratio <= target else f"[red]> {target:.2f}[/]"


def report(title: str, measurements: dict[str, Measurement], targets: dict, memory_label: str) -> tuple[Table, list[dict]]:
    baseline_name = next(iter(measurements))
    baseline = measurements[baseline_name]
    table = Table(title=title)
    columns = ("configuration", "step ms (median)", "time ratio", "quartiles", "target", f"{memory_label} ratio", "target", "tokens/s")
    for column in columns:
        table.add_column(column, justify="left" if column == "configuration" else "right")
    rows = []
    for name, measured in measurements.items():
        time_ratio, low, high = measured.time_ratio(baseline)
        memory_ratio = measured.memory_bytes / baseline.memory_bytes if baseline.memory_bytes else float("nan")
        time_target, memory_target = targets.get(name, (None, None))
        table.add_row(
            name, f"{measured.median * 1000:.1f}", f"{time_ratio:.2f}x", f"{low:.2f}-{high:.2f}", verdict(time_ratio, time_target),
            f"{memory_ratio:.2f}x", verdict(memory_ratio, memory_target), f"{measured.tokens_per_second:,.0f}",
        )
        rows.append({
            "configuration": name, "median_seconds": measured.median, "seconds": measured.seconds,
            "time_ratio": time_ratio, "time_ratio_quartiles": [low, high], "memory_bytes": measured.memory_bytes, "memory_ratio": memory_ratio,
            "tokens_per_second": measured.tokens_per_second, "time_target": time_target, "memory_target": memory_target,
        })
    return table, rows


def packing_report(measured: dict[str, Measurement], shapes: dict[str, dict[str, int]]) -> tuple[Table, list[dict]]:
    """Tokens per second (non-padding tokens) of each layout, and its throughput as a ratio to the
    first (padded batches): the median of per-round ratios, with quartiles."""
    baseline = next(iter(measured.values()))
    table = Table(title="LLaMA-style decoder, variable-length examples, hiddenkey-: padded batches against packed rows")
    columns = ("layout", "batches", "token slots", "real tokens", "ms per pass (median)", "tokens/s", "throughput ratio")
    for column in columns:
        table.add_column(column, justify="left" if column == "layout" else "right")
    rows = []
    for name, measurement in measured.items():
        ratio, low, high = baseline.time_ratio(measurement)  # baseline time / this time = this throughput / baseline's
        slots = shapes[name]["token_slots"]
        table.add_row(name, str(shapes[name]["batches"]), f"{slots:,}", f"{measurement.tokens / slots:.0%}",
                      f"{measurement.median * 1000:.0f}", f"{measurement.tokens_per_second:,.0f}",
                      f"{ratio:.2f}x ({low:.2f}-{high:.2f})")
        rows.append({"layout": name, **shapes[name], "tokens": measurement.tokens, "median_seconds": measurement.median,
                     "seconds": measurement.seconds, "tokens_per_second": measurement.tokens_per_second,
                     "throughput_ratio": ratio, "throughput_ratio_quartiles": [low, high]})
    return table, rows


@app.command()
def main(
    model: Annotated[str, typer.Option(help="minilm, llama, packing (padded against packed decoder batches) or all; smollm2 (the chat quickstart's "
                                             "base and data, as shipped and at 512 tokens) on its own; "
                                             "generation (the chat quickstart's replies) or cli (hkft train end to end) on its own")] = "all",
    device: Annotated[str, typer.Option(help="cpu or cuda (default: cuda when available)")] = "",
    quantization: Annotated[str, typer.Option(help="none or 4bit (decoder, CUDA)")] = "none",
    warmup: Annotated[int, typer.Option(min=0)] = 2,
    repeats: Annotated[int, typer.Option(min=1)] = 10,
    vocab: Annotated[int, typer.Option(min=16, help="decoder vocabulary (sets the LM head's share of compute)")] = 8192,
    batch_size: Annotated[int, typer.Option(min=0, help="0 = 32 for MiniLM, 4 for the decoder")] = 0,
    dtype: Annotated[str, typer.Option(help="float32 or bfloat16: the weights' dtype, LoRA's included")] = "float32",
    layers: Annotated[int, typer.Option(min=1, help="decoder layers")] = 4,
    hidden: Annotated[int, typer.Option(min=64, help="decoder hidden size")] = 512,
    heads: Annotated[int, typer.Option(min=1, help="decoder attention heads")] = 8,
    length: Annotated[int, typer.Option(min=8, help="decoder sequence length")] = 256,
    steps: Annotated[str, typer.Option(help="cli: the steps timed, FIRST-LAST (the clock reads at the end of each)")] = "10-25",
    shapes: Annotated[str, typer.Option(help="cli: minilm (the quickstart at 64 and 128 tokens), chat (SmolLM2's chat "
                                             "quickstart as shipped and at 512 tokens), all, or single shapes "
                                             "(minilm-64, minilm-128, chat-128, chat-512), comma-separated")] = "minilm",
    output: Annotated[Path, typer.Option(help="where to write the JSON results")] = Path("bench/results.json"),
) -> None:
    ensure_caching_malloc()
    if model == "generation":
        generation_main(warmup, repeats, output)
        return
    if model == "cli":
        cli_main(repeats, steps, shapes, output)
        return
    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    weights_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(dtype)
    if weights_dtype is None:
        raise typer.BadParameter(f"{dtype!r}: choose float32 or bfloat16", param_hint="--dtype")
    memory_label = "peak memory" if torch_device.type == "cuda" else "activations/weights"
    workloads = []
    if model in ("minilm", "all"):
        workloads.append(minilm_workload(batch_size or 32, 128, weights_dtype))
    if model in ("llama", "all"):
        workloads.append(llama_workload(batch_size or 4, length, quantization, vocab, weights_dtype, layers, hidden, heads))
    if model == "smollm2":  # on its own: each of its steps takes seconds on a CPU
        workloads += [smollm2_chat_workload(128, batch_size or 8, fill=False), smollm2_chat_workload(512, batch_size or 2, fill=True)]
    results = {"device": str(torch_device), "dtype": dtype, "torch": torch.__version__, "platform": platform.platform(),
               "threads": torch.get_num_threads(), "warmup": warmup, "repeats": repeats, "workloads": []}
    for workload in workloads:
        console.print(f"[bold]{workload.name}[/]: measuring ({warmup} warm-up + {repeats} interleaved rounds)...")
        measured = benchmark(workload, torch_device, warmup, repeats)
        train_targets = dict(TRAIN_TARGETS)
        if workload.task == "causal-lm":
            train_targets["hiddenkey KL one branch"] = (DECODER_ONE_BRANCH_TARGET, TRAIN_TARGETS["hiddenkey KL one branch"][1])
        train_table, train_rows = report(f"{workload.name}: training step", measured["train"], train_targets, memory_label)
        eval_table, eval_rows = report(f"{workload.name}: eval forward", measured["eval"], EVAL_TARGETS, memory_label)
        console.print(train_table, eval_table)
        results["workloads"].append({"name": workload.name, "batch": {k: list(v.shape) for k, v in workload.batch.items()},
                                     "train": train_rows, "eval": eval_rows})
        atomic_write_json(output, results)  # after each workload: a long run stopped later keeps what it measured
    if model in ("packing", "all"):
        console.print(f"[bold]sequence packing[/]: {PACKING_EXAMPLES} examples, measuring ({warmup} warm-up + {repeats} interleaved rounds)...")
        measured, shapes = packing_benchmark(PACKING_EXAMPLES, batch_size or 4, DECODER_LENGTH, vocab, torch_device, warmup, repeats)
        table, rows = packing_report(measured, shapes)
        console.print(table)
        results["packing"] = {"examples": PACKING_EXAMPLES, "max_length": DECODER_LENGTH, "batch_size": batch_size or 4, "rows": rows}
    atomic_write_json(output, results)
    console.print(f"results written to {output}")


def generation_report(measured: dict[str, Measurement], identical: dict[str, bool], title: str) -> tuple[Table, list[dict]]:
    """Tokens per second of each configuration and its time ratio to the group's baseline (median of
    per-round ratios, quartiles), and whether its replies are token for token the baseline's."""
    baseline = next(iter(measured.values()))
    table = Table(title=title)
    for column in ("configuration", "s per pass (median)", "tokens/s", "time ratio", "quartiles", "same tokens"):
        table.add_column(column, justify="left" if column == "configuration" else "right")
    rows = []
    for name, measurement in measured.items():
        ratio, low, high = measurement.time_ratio(baseline)
        table.add_row(name, f"{measurement.median:.2f}", f"{measurement.tokens_per_second:,.1f}", f"{ratio:.2f}x",
                      f"{low:.2f}-{high:.2f}", "yes" if identical[name] else "[red]NO[/]")
        rows.append({"configuration": name, "median_seconds": measurement.median, "seconds": measurement.seconds,
                     "tokens": measurement.tokens, "tokens_per_second": measurement.tokens_per_second, "time_ratio": ratio,
                     "time_ratio_quartiles": [low, high], "same_tokens_as_baseline": identical[name]})
    return table, rows


def generation_main(warmup: int, repeats: int, output: Path) -> None:
    from bench.generation import generation_benchmark, quickstart_chat_workload

    workload = quickstart_chat_workload()
    console.print(f"[bold]generation[/]: {len(workload.conversations)} prompts of the chat quickstart, "
                  f"batch {workload.batch_size}, {workload.settings.max_new_tokens} new tokens at most "
                  f"({warmup} warm-up + {repeats} interleaved rounds)...")
    measured, identical = generation_benchmark(workload, warmup, repeats)
    results = {"device": str(workload.target.model.device), "torch": torch.__version__, "platform": platform.platform(),
               "threads": torch.get_num_threads(), "warmup": warmup, "repeats": repeats,
               "prompts": len(workload.conversations), "batch_size": workload.batch_size,
               "generation": workload.settings.model_dump()}
    for group, title in (("eval", "hkft eval / final evaluation: one pass over the prompts"),
                         ("chat", "hkft chat: one prompt at a time")):
        table, results[group] = generation_report(measured[group], identical, title)
        console.print(table)
    atomic_write_json(output, results)
    console.print(f"results written to {output}")


def cli_report(seconds: dict[str, list[float]], title: str) -> tuple[Table, list[dict]]:
    """The faster round of each configuration, as ms a step and as ratios to plain peft + Trainer,
    to hkft `none` and to the one-branch floor."""
    best = {name: min(values) for name, values in seconds.items()}
    plain, none = best[PLAIN], best["hkft none"]
    table = Table(title=title)
    floor = best[FLOOR]
    for column in ("configuration", "ms a step (faster round)", "rounds (ms)", "ratio to plain peft + Trainer", "ratio to hkft none",
                   "ratio to the floor"):
        table.add_column(column, justify="left" if column == "configuration" else "right")
    rows = []
    for name, fastest in best.items():
        table.add_row(name, f"{fastest * 1000:.1f}", ", ".join(f"{value * 1000:.0f}" for value in seconds[name]),
                      f"{fastest / plain:.2f}x", f"{fastest / none:.2f}x", f"{fastest / floor:.2f}x")
        rows.append({"configuration": name, "seconds_per_step": fastest, "rounds_seconds_per_step": seconds[name],
                     "ratio_to_plain": fastest / plain, "ratio_to_none": fastest / none, "ratio_to_floor": fastest / floor})
    return table, rows


def cli_main(rounds: int, steps: str, shape_set: str, output: Path) -> None:
    from bench.cli import select_shapes

    try:
        shapes = select_shapes(shape_set)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--shapes") from None
    first, last = (int(step) for step in steps.split("-"))
    console.print(f"[bold]hkft train[/], end to end: steps {first}-{last} of one process per configuration, {rounds} interleaved rounds...")
    with tempfile.TemporaryDirectory(prefix="hkft-bench-cli-") as scratch:
        results = cli_results(shapes, rounds, first, last, Path(scratch))
    atomic_write_json(output, results)
    console.print(f"results written to {output}")


def cli_results(shapes: list, rounds: int, first: int, last: int, folder: Path) -> dict:
    from bench.cli import (
        chat_model_dir,
        chat_tokens_per_step,
        cli_benchmark,
        kl_cost_per_token,
    )

    seconds, data = cli_benchmark(shapes, rounds, first, last, folder, report=console.print)
    results = {"torch": torch.__version__, "platform": platform.platform(), "threads": torch.get_num_threads(),
               "rounds": rounds, "steps": [first, last], "shapes": []}
    for shape in shapes:
        measured = {"name": shape.name, "preset": shape.preset, "max_length": shape.max_length, "filled": shape.fill,
                    "batch_size": shape.batch_size}
        title = f"{shape.name}: hkft train against plain peft + Trainer"
        if shape.chat:
            measured.update(chat_tokens_per_step(shape, data[shape.name]))
            title += f" ({measured['tokens']:.0f} tokens a step, {measured['supervised_tokens']:.0f} supervised)"
        else:
            title = f"MiniLM, batch {shape.batch_size}, {title}"
        table, measured["rows"] = cli_report(seconds[shape.name], title)
        for row in measured["rows"] if shape.chat else ():
            row["ms_per_supervised_token"] = row["seconds_per_step"] * 1000 / measured["supervised_tokens"]
        console.print(table)
        results["shapes"].append(measured)
    if any(shape.chat for shape in shapes):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(chat_model_dir())
        results["kl"] = kl_cost_per_token(256, config.hidden_size, config.vocab_size, repeats=rounds * 5)
        console.print("one-branch KL at SmolLM2's vocabulary, ms a supervised token: " + ", ".join(
            f"{key.removesuffix('_ms_per_token')} {value:.3f}" for key, value in results["kl"].items() if key.endswith("_ms_per_token")))
    return results


if __name__ == "__main__":
    app()
