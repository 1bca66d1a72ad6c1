"""FSDP2 on 2 CPU processes over gloo, without the Trainer.

accelerate (1.15) switches FSDP on only for accelerator jobs, so the Trainer cannot shard a CPU job
and hkft refuses `distributed.strategy: fsdp` there (test_distributed.py). Here torch's
`fully_shard` wraps each decoder layer and then the root of an hkft-instrumented LoRA LLaMA, as
accelerate's FSDP2 preparation does, and both ranks run hkft's trainer loss: HiddenKey with the KL
on one branch and on both, with and without the shared-prefix replay. Every number is compared with
the same code run in one process without sharding.
"""

import json
import os
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from peft import PeftModel
from safetensors.torch import load_file
from tiny_models import tiny_model
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from transformers import TrainingArguments

from hkft.config.schema import DistributedConfig, LoraConfig
from hkft.dropout import instrument
from hkft.dropout.architecture import layer_stack
from hkft.dropout.methods import build_plan
from hkft.dropout.patterns import MaskSampler
from hkft.models.adapters import save_lora_adapter
from hkft.models.lora import build_lora_model
from hkft.recipes.trainer import HkftTrainer
from hkft.tasks.registry import task_for

pytestmark = pytest.mark.slow  # two processes each import transformers and peft: about a minute on 2 cores

WORLD = 2
SEED = 11
LR = 0.5


def instrumented(rank: int, output_dir: Path, **training_args):
    """A tiny LoRA LLaMA (non-zero B, so A gets gradients too) with HiddenKey, KL on one branch,
    instrumented with the rank's mask generator, and hkft's trainer around it."""
    model = build_lora_model(tiny_model("llama"), LoraConfig(), "causal-lm", quantized=False, gradient_checkpointing=False)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    controller = instrument(model, build_plan("hiddenkey", 0.2, 1.0, branches="one"), seed=SEED, rank=rank)
    args = TrainingArguments(output_dir=str(output_dir), report_to=[], use_cpu=True, **training_args)
    return model, controller, HkftTrainer(model=model, args=args, dropout=controller, task=task_for("causal-lm"))


def token_batch(seed: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(4, 128, (2, 8), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP shard (a collective: every rank calls it in the same order)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor.detach().clone()


def exercise(model, controller, trainer, rank: int) -> dict:
    """What both the sharded ranks and the single-process reference compute, in the same order of
    mask draws: eval and training outputs on a common batch, then the KL loss and LoRA gradients on
    the rank's own batch, for R-Drop's two graphs and the paper's one, with and without the
    shared-prefix replay; last, one SGD step with the one-branch gradients."""
    common = {key: value for key, value in token_batch(100).items() if key != "labels"}
    model.eval()
    with torch.no_grad():
        eval_logits = [model(**common).logits for _ in range(2)]
    model.train()
    before = controller.sampler.state_dict()
    with torch.no_grad():
        train_logits = model(**common).logits
    drew = controller.sampler.state_dict()
    masks_drawn = set(before) != set(drew) or any(not torch.equal(before[d], drew[d]) for d in drew)

    first_layer_calls = []
    counter = layer_stack(model).blocks[0].mlp.register_forward_pre_hook(lambda module, args: first_layer_calls.append(1))
    start, plan, shared = controller.sampler.state_dict(), controller.plan, controller.shared
    results = {}
    for branches, sharing in (("both", "plain"), ("both", "shared"), ("one", "plain"), ("one", "shared")):
        controller.sampler.load_state_dict(start)
        controller.plan = replace(plan, branches=branches)
        controller.shared = shared if sharing == "shared" else []
        first_layer_calls.clear()
        loss = trainer.compute_loss(model, token_batch(rank))
        loss.backward()
        results[f"{branches}-{sharing}"] = {
            "loss": loss.detach(), "first_layer_calls": len(first_layer_calls),
            "grads": {n: full(p.grad) for n, p in model.named_parameters() if p.requires_grad}}
        if (branches, sharing) != ("one", "shared"):
            model.zero_grad(set_to_none=True)
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR).step()
    controller.plan, controller.shared = plan, shared
    counter.remove()
    return {"eval_logits": eval_logits, "train_logits": train_logits, "masks_drawn": masks_drawn,
            "seed": controller.sampler.seed, "passes": results}


def shard(model) -> None:
    """accelerate's FSDP2 preparation: each transformer block, then the root."""
    mesh = init_device_mesh("cpu", (WORLD,))
    for block in layer_stack(model).blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def sharded_rank(rank: int, directory: Path) -> None:
    """One rank of a torchrun-like job: the Trainer sees a 2-process job, as it would under torchrun."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
    dist.init_process_group("gloo", init_method=f"file://{directory / 'store'}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=300))
    try:
        model, controller, trainer = instrumented(rank, directory / f"trainer-{rank}", fsdp=DistributedConfig().fsdp)
        shard(model)
        outcome = exercise(model, controller, trainer, rank)
        outcome["fsdp_module"] = isinstance(model, FSDPModule)
        outcome["trainer_shards"] = trainer.is_fsdp_enabled
        state = trainer.adapter_state_dict()
        if rank == 0:
            save_lora_adapter(model, directory / "adapter", None, state)
        torch.save(outcome, directory / f"rank-{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fsdp")
    mp.spawn(sharded_rank, args=(directory,), nprocs=WORLD)
    sharded = [torch.load(directory / f"rank-{rank}.pt", weights_only=False) for rank in range(WORLD)]
    reference = []
    for rank in range(WORLD):
        model, controller, trainer = instrumented(rank, directory / f"reference-{rank}")
        reference.append(exercise(model, controller, trainer, rank))
    return directory, sharded, reference


def mean_gradients(runs: list[dict], name: str) -> dict[str, torch.Tensor]:
    """FSDP averages the ranks' gradients in its reduce-scatter."""
    grads = [run["passes"][name]["grads"] for run in runs]
    return {key: sum(rank[key] for rank in grads) / len(grads) for key in grads[0]}


def test_the_model_is_sharded_where_the_trainer_would_not_shard(fsdp_run):
    _, sharded, _ = fsdp_run
    assert all(run["fsdp_module"] for run in sharded)
    assert not any(run["trainer_shards"] for run in sharded)  # if this fails, accelerate shards CPU jobs: lift hkft's refusal


def test_dropout_hooks_fire_under_fsdp_and_eval_is_the_plain_model(fsdp_run):
    _, sharded, reference = fsdp_run
    for run, alone in zip(sharded, reference):
        assert run["masks_drawn"]
        assert torch.equal(run["eval_logits"][0], run["eval_logits"][1])
        assert torch.allclose(run["eval_logits"][0], alone["eval_logits"][0], atol=1e-5)
        assert not torch.allclose(run["train_logits"], run["eval_logits"][0], atol=1e-3)


def test_each_rank_draws_its_own_reproducible_masks(fsdp_run):
    _, sharded, reference = fsdp_run
    assert [run["seed"] for run in sharded] == [MaskSampler(SEED, rank).seed for rank in range(WORLD)]
    assert not torch.allclose(sharded[0]["train_logits"], sharded[1]["train_logits"], atol=1e-3)  # same batch, other masks
    for run, alone in zip(sharded, reference):  # the single process with the rank's seed draws the same masks
        assert torch.allclose(run["train_logits"], alone["train_logits"], atol=1e-5)


@pytest.mark.parametrize("branches", ["one", "both"])
def test_shared_prefix_replay_gives_the_unshared_loss_and_gradients_under_fsdp(fsdp_run, branches):
    _, sharded, _ = fsdp_run
    for run in sharded:
        shared, plain = run["passes"][f"{branches}-shared"], run["passes"][f"{branches}-plain"]
        assert (shared["first_layer_calls"], plain["first_layer_calls"]) == (1, 2)  # the replay ran
        assert torch.allclose(shared["loss"], plain["loss"], atol=1e-6)
        for key, value in shared["grads"].items():
            assert torch.allclose(value, plain["grads"][key], atol=1e-6), key


@pytest.mark.parametrize("branches", ["one", "both"])
def test_gradients_equal_the_mean_of_both_ranks_computed_in_one_process(fsdp_run, branches):
    _, sharded, reference = fsdp_run
    name = f"{branches}-shared"
    for run, alone in zip(sharded, reference):
        assert torch.isfinite(run["passes"][name]["loss"])
        assert torch.allclose(run["passes"][name]["loss"], alone["passes"][name]["loss"], atol=1e-5)
    expected = mean_gradients(reference, name)
    assert len(expected) == 16  # q and v LoRA A and B in each of 4 layers
    for run in sharded:  # every rank holds the same full gradient
        for key, value in expected.items():
            assert value.abs().sum() > 0, key
            assert torch.allclose(run["passes"][name]["grads"][key], value, atol=1e-5), key


def test_the_gathered_adapter_saves_in_the_single_process_format(fsdp_run):
    directory, _, reference = fsdp_run
    gradients = mean_gradients(reference, "one-shared")
    model, _, _ = instrumented(0, directory / "single-trainer")
    with torch.no_grad():  # a fresh single-process model, given the averaged step the sharded ranks took
        for name, parameter in model.named_parameters():
            if name in gradients:
                parameter -= LR * gradients[name]
    save_lora_adapter(model, directory / "single", None)
    saved, single = (load_file(directory / name / "adapter_model.safetensors") for name in ("adapter", "single"))
    assert {key: (value.shape, value.dtype) for key, value in saved.items()} == {
        key: (value.shape, value.dtype) for key, value in single.items()}
    assert all(torch.allclose(saved[key], single[key], atol=1e-5) for key in single)
    configs = [json.loads((directory / name / "adapter_config.json").read_text()) for name in ("adapter", "single")]
    for config in configs:  # peft writes a set of names, in each process's hash order
        config["target_modules"] = sorted(config["target_modules"])
    assert configs[0] == configs[1]
    loaded = PeftModel.from_pretrained(tiny_model("llama"), directory / "adapter")
    assert sum("lora_" in name for name, _ in loaded.named_parameters()) == len(single)
