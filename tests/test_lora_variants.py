"""peft's LoRA variants as preset keys: lora.init (PiSSA, OLoRA, EVA, ...) and LoRA+
(lora.loraplus_lr_ratio). Every saved adapter loads with peft alone on the original base model."""

import json

import pytest
import torch
import yaml
from checkpoints import MEMORISE, memorise_texts, save_tiny_model, write_jsonl
from conftest import assert_one_line_error
from peft import PeftModel
from tiny_models import batch, tiny_model

from hkft.config import load_config
from hkft.config.schema import LoraConfig
from hkft.dropout import instrument, named_method
from hkft.models.adapters import save_lora_adapter
from hkft.models.lora import build_lora_model, initial_adapter
from hkft.recipes.trainer import HkftTrainer
from hkft.tasks.registry import task_for

TASKS = {"llama": "causal-lm", "bert": "classification"}


def lora_model(arch: str, init: str, **lora):
    task = TASKS[arch]
    cfg = LoraConfig(init=init, r=4, **lora)
    return build_lora_model(tiny_model(arch, task), cfg, task, quantized=False, gradient_checkpointing=False), cfg


def train_steps(model, arch: str, steps: int = 3) -> None:
    inputs = batch(arch, padded=True)
    labels = inputs["input_ids"] if TASKS[arch] == "causal-lm" else torch.tensor([0, 1, 2])
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for _ in range(steps):
        model(**inputs, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def base_weights(model) -> dict[str, torch.Tensor]:
    """The adapted layers' base weights, named as in the plain model."""
    return {name.replace(".base_layer", "").removeprefix("base_model.model."): tensor.detach().clone()
            for name, tensor in model.named_parameters() if ".base_layer." in name}


@pytest.mark.parametrize("arch,init", [("llama", "pissa"), ("llama", "pissa_niter_2"), ("llama", "olora"), ("bert", "pissa")])
def test_base_mutating_init_saves_an_adapter_for_the_original_base(tmp_path, arch, init):
    model, cfg = lora_model(arch, init)
    original = dict(tiny_model(arch, TASKS[arch]).named_parameters())
    mutated = base_weights(model)
    assert any(not torch.equal(tensor, original[name]) for name, tensor in mutated.items())  # the init moved the base
    initial = initial_adapter(model, cfg)
    train_steps(model, arch)
    inputs = batch(arch, padded=True)
    model.eval()
    with torch.no_grad():
        trained = model(**inputs).logits
    save_lora_adapter(model, tmp_path, initial)

    reloaded = PeftModel.from_pretrained(tiny_model(arch, TASKS[arch]), tmp_path).eval()  # the ORIGINAL base
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, trained, rtol=0, atol=2e-5)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 2 * cfg.r  # [A | A0], [B | -B0]


@pytest.mark.parametrize("init", ["default", "gaussian", "orthogonal"])
def test_other_inits_leave_the_base_alone_and_save_as_usual(tmp_path, init):
    model, cfg = lora_model("llama", init)
    original = dict(tiny_model("llama").named_parameters())
    assert all(torch.equal(tensor, original[name]) for name, tensor in base_weights(model).items())
    assert model.peft_config["default"].init_lora_weights == (True if init == "default" else init)
    assert initial_adapter(model, cfg) is None
    train_steps(model, "llama")
    model.eval()
    inputs = batch("llama", padded=True)
    save_lora_adapter(model, tmp_path, None)
    reloaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, model(**inputs).logits)


def test_eva_initialises_from_the_data_and_starts_as_the_base_model():
    data = batch("llama", padded=True, size=8, length=16)
    data["labels"] = data["input_ids"].masked_fill(data["attention_mask"] == 0, -100)
    batches = [data]  # peft cycles through the batches until the SVD converges: one batch converges at once
    default, _ = lora_model("llama", "default")
    eva = build_lora_model(tiny_model("llama"), LoraConfig(init="eva", r=4), "causal-lm", quantized=False,
                           gradient_checkpointing=False, eva_batches=batches)
    eva_a = {n: p for n, p in eva.named_parameters() if "lora_A" in n}
    default_a = dict(default.named_parameters())
    assert any(p.shape != default_a[n].shape or not torch.allclose(p, default_a[n]) for n, p in eva_a.items())
    for name, a in eva_a.items():  # EVA's A rows are orthonormal singular vectors of the layer inputs
        torch.testing.assert_close(a @ a.T, torch.eye(a.shape[0]), atol=1e-4, rtol=0)
    eva.eval()
    plain = tiny_model("llama").eval()
    inputs = batch("llama", padded=True)
    torch.testing.assert_close(eva(**inputs).logits, plain(**inputs).logits, atol=1e-6, rtol=0)  # B = 0


def test_eva_without_data_is_a_clear_error():
    from hkft.errors import ModelError

    with pytest.raises(ModelError, match="lora.init eva needs the training data"):
        build_lora_model(tiny_model("llama"), LoraConfig(init="eva"), "causal-lm", quantized=False, gradient_checkpointing=False)


def causal_run(tmp_path, cli, lora: dict, name: str = "run"):
    model_dir = tmp_path / "model"
    if not model_dir.exists():
        save_tiny_model("llama", model_dir, memorise_texts())
    data = write_jsonl(tmp_path / "d.jsonl", MEMORISE)
    preset = {"model": {"name": str(model_dir), "task": "causal-lm"}, "lora": {"r": 4, **lora},
              "dropout": {"method": "hiddenkey-"}, "data": {"train": str(data), "validation": str(data), "test": str(data)},
              "train": {"max_steps": 4, "batch_size": 4, "lr": 5e-2, "eval_strategy": "no"}, "eval": {"generate": False}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(preset))
    result = cli("train", tmp_path / "p.yaml", "--output-dir", tmp_path / name)
    assert result.exit_code == 0, result.stderr
    return tmp_path / name


@pytest.mark.parametrize("init", ["pissa", "eva"])
def test_hkft_eval_on_the_original_base_reproduces_the_in_training_score(tmp_path, cli, init):
    """The final evaluation of `hkft train` ran on the model as trained (for PiSSA: its residual base);
    `hkft eval` loads the saved adapter onto the original base with peft and scores the same."""
    run = causal_run(tmp_path, cli, {"init": init})
    in_training = json.loads((run / "metrics.json").read_text())["eval"]["loss"]
    evaluated = cli("eval", run)
    assert evaluated.exit_code == 0, evaluated.stderr
    assert json.loads((run / "eval.json").read_text())["metrics"]["loss"] == pytest.approx(in_training, abs=1e-5)


def test_loraplus_gives_the_b_matrices_the_ratio_of_the_learning_rate(training_args):
    model, _ = lora_model("bert", "default")
    controller = instrument(model, named_method("none", 0.0), seed=0)
    args = training_args(learning_rate=1e-3, weight_decay=0.1)
    trainer = HkftTrainer(model=model, args=args, dropout=controller, task=task_for("classification"), loraplus_lr_ratio=16.0)
    optimizer = trainer.create_optimizer()
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    assert set(lr_of) == set(names)  # every trained parameter, once
    for key, name in names.items():
        expected = 16e-3 if "lora_B" in name else None
        if expected is not None:
            assert lr_of[key] == pytest.approx(expected), name
        elif "lora_A" in name:
            assert lr_of[key] == pytest.approx(1e-3), name
    assert type(optimizer).__name__ == "AdamW"


def test_without_loraplus_every_parameter_has_the_learning_rate(training_args):
    model, _ = lora_model("bert", "default")
    controller = instrument(model, named_method("none", 0.0), seed=0)
    args = training_args(learning_rate=1e-3)
    optimizer = HkftTrainer(model=model, args=args, dropout=controller, task=task_for("classification")).create_optimizer()
    assert {group["lr"] for group in optimizer.param_groups} == {1e-3}


@pytest.mark.parametrize("overrides,message", [
    (["lora.init=pisa"], "unknown LoRA initialisation 'pisa'; choose one of default, gaussian, pissa, pissa_niter_<K>"),
    (["lora.init=pissa_niter_x"], "unknown LoRA initialisation 'pissa_niter_x'"),
    (["lora.int=pissa"], "lora.int: unknown key (did you mean lora.init?)"),
    (["lora.init=pissa", "lora.use_dora=true"], "lora.init pissa changes the base weights"),
    (["lora.init=olora", "model.quantization=4bit"], "lora.init olora decomposes the full-precision base weights"),
    (["lora.loraplus_lr_ratio=0"], "lora.loraplus_lr_ratio: Input should be greater than 0"),
    (["lora.loraplus_ratio=16"], "did you mean lora.loraplus_lr_ratio?"),
])
def test_lora_keys_are_validated(tmp_path, cli, overrides, message):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": "x"}, "data": {"train": "t.jsonl"}}))
    result = cli("config", path, *[arg for override in overrides for arg in ("--set", override)])
    assert_one_line_error(result, message)


def test_valid_lora_keys_resolve(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": "x"}, "data": {"train": "t.jsonl"}}))
    cfg = load_config(path, ["lora.init=pissa_niter_4", "lora.loraplus_lr_ratio=16"])
    assert (cfg.lora.init, cfg.lora.loraplus_lr_ratio, cfg.lora.mutates_base) == ("pissa_niter_4", 16.0, True)
    assert load_config(path).lora.init == "default"
