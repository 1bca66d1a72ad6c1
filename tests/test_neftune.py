"""NEFTune (`dropout.method: neftune`): uniform noise on the input embeddings, alpha/sqrt(L*d) with
L each example's own length, training only, from hkft's seeded mask generator."""

import json
import math

import pytest
import torch
import yaml
from checkpoints import MEMORISE, memorise_texts, save_tiny_model, write_jsonl
from conftest import assert_one_line_error
from test_dropout_methods import task_for, zero_dropout
from tiny_models import batch, tiny_model

from hkft.config import load_config
from hkft.dropout import build_plan, instrument, named_method
from hkft.dropout.config import plan_from_config
from hkft.study.grid import expand_cells
from hkft.study.spec import load_study

ALPHA = 5.0


def neftune_noise_by_hand(shape, attention_mask, alpha, seed):
    """The formula in plain PyTorch: U(-1, 1) * alpha / sqrt(L * d) on each example's real tokens,
    drawn as hkft's generator draws (a CPU generator seeded with the run's seed, rank 0)."""
    uniform = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
    lengths = attention_mask.sum(dim=1).double()
    scale = alpha / torch.sqrt(lengths * shape[-1])
    return ((2 * uniform - 1) * scale[:, None, None] * attention_mask[..., None]).float()


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_training_forward_is_the_model_on_embeddings_plus_the_papers_noise(arch):
    task = task_for(arch)
    reference, model = tiny_model(arch, task), tiny_model(arch, task)
    zero_dropout(reference)
    instrument(model, named_method("neftune", 0.1, neftune_alpha=ALPHA), seed=3)
    reference.train(), model.train()
    inputs = batch(arch, padded=True)
    embeddings = reference.get_input_embeddings()(inputs["input_ids"])
    noise = neftune_noise_by_hand(embeddings.shape, inputs["attention_mask"], ALPHA, seed=3)
    expected = reference(inputs_embeds=embeddings + noise, attention_mask=inputs["attention_mask"]).logits
    got = model(**inputs).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(got, reference(**inputs).logits, atol=1e-4)  # the noise matters


def test_eval_mode_is_the_plain_model():
    reference, model = tiny_model("llama"), tiny_model("llama")
    zero_dropout(reference)
    instrument(model, named_method("neftune", 0.1), seed=0)
    reference.eval(), model.eval()
    inputs = batch("llama", padded=True)
    assert torch.equal(model(**inputs).logits, reference(**inputs).logits)


def test_noise_resumes_exactly_from_the_generator_state():
    model = tiny_model("llama")
    controller = instrument(model, named_method("neftune", 0.1), seed=0)
    model.train()
    inputs = batch("llama", padded=False)
    model(**inputs)
    state = controller.state_dict()
    after = model(**inputs).logits
    fresh = tiny_model("llama")
    instrument(fresh, named_method("neftune", 0.1), seed=0).load_state_dict(state)
    fresh.train()
    assert torch.equal(fresh(**inputs).logits, after)
    assert not torch.equal(model(**inputs).logits, after)  # each step draws new noise


def test_an_unpadded_batch_uses_its_whole_length():
    """L is the example's own length: without padding, every example's noise has the scale alpha/sqrt(T*d)."""
    model = tiny_model("llama")
    captured = []
    instrument(model, named_method("neftune", 0.1, neftune_alpha=ALPHA), seed=0)
    model.get_input_embeddings().register_forward_hook(lambda m, a, out: captured.append(out))
    model.train()
    inputs = batch("llama", padded=False, size=2, length=10)
    model(**inputs)
    clean = model.get_input_embeddings().weight[inputs["input_ids"]]
    bound = ALPHA / math.sqrt(10 * clean.shape[-1])
    noise = captured[0] - clean
    assert noise.abs().max() <= bound and noise.abs().max() > 0.9 * bound


def test_neftune_sits_beside_the_drop_positions():
    plan = build_plan("neftune", 0.1, 1.0, position_overrides={"hidden": ("element", None)}, neftune_alpha=3.0)
    assert plan.neftune_alpha == 3.0 and set(plan.active_positions) == {"hidden"}
    assert named_method("hiddenkey", 0.1).neftune_alpha == 0.0


def test_config_key_is_validated(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": "x"}, "data": {"train": "t.jsonl"}, "dropout": {"method": "neftune"}}))
    assert plan_from_config(load_config(path).dropout).neftune_alpha == 5.0  # TRL's and the paper's default
    assert plan_from_config(load_config(path, ["dropout.neftune_alpha=10"]).dropout).neftune_alpha == 10.0
    with pytest.raises(Exception, match=r"dropout\.neftune_alpha: Input should be greater than 0"):
        load_config(path, ["dropout.neftune_alpha=0"])
    with pytest.raises(Exception, match=r"did you mean dropout\.neftune_alpha\?"):
        load_config(path, ["dropout.neftune_alpa=10"])


def test_a_study_puts_neftune_beside_hiddenkey(tmp_path):
    """NEFTune ignores dropout.rate, so its rates collapse into one cell."""
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"base": "quickstart", "output": str(tmp_path / "out"), "grid": {
        "dropout.method": ["hiddenkey", "neftune"], "dropout.rate": [0.05, 0.1], "train.seed": [1]}}))
    names = [cell.name for cell in expand_cells(load_study(study))]
    assert names == ["method=hiddenkey,rate=0.05,seed=1", "method=hiddenkey,rate=0.1,seed=1", "method=neftune,rate=0.05,seed=1"]


def test_a_decoder_trains_with_neftune_from_the_command_line(cli, tmp_path):
    model = save_tiny_model("llama", tmp_path / "model", memorise_texts())
    data = write_jsonl(tmp_path / "d.jsonl", MEMORISE)
    preset = {"model": {"name": str(model), "task": "causal-lm"}, "dropout": {"method": "neftune", "neftune_alpha": 7},
              "data": {"train": str(data), "validation": str(data)},
              "train": {"max_steps": 2, "batch_size": 4, "eval_strategy": "no"}, "eval": {"generate": False}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(preset))
    result = cli("train", tmp_path / "p.yaml", "--output-dir", tmp_path / "run")
    assert result.exit_code == 0, result.stderr
    assert json.loads((tmp_path / "run/adapter/hkft_adapter.json").read_text())["dropout"]["neftune_alpha"] == 7.0
    assert_one_line_error(cli("train", tmp_path / "p.yaml", "--set", "dropout.neftune_alpha=-1"), "dropout.neftune_alpha")
