"""hkft's batched generation (hkft eval, the final evaluation, hkft chat): batches formed longest
prompt first, left-padded, with the KV cache, and replies token for token those of plain
transformers `generate`, in the order of the prompts."""

import pytest
from checkpoints import memorise_texts, save_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from hkft.config.schema import GenerationConfig
from hkft.tasks.evaluation import generate

NEW_TOKENS = 3
# Prompts of 2, 9, 3, 8 and 4 words (the tokenizer has one token per word).
WORDS = ["name", "Aromi", "food", "Italian", "serves", "Chinese", "Korean", "French", "English"]
PROMPTS = [" ".join(WORDS[:count]) for count in (2, 9, 3, 8, 4)]


@pytest.fixture(scope="module")
def tiny_decoder(tmp_path_factory):
    model_dir = save_tiny_model("llama", tmp_path_factory.mktemp("generation") / "llama", memorise_texts())
    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)


def words_only(tokenizer) -> dict:
    """An untrained model may end at once: with the special tokens suppressed every reply is NEW_TOKENS words."""
    return {"suppress_tokens": tokenizer.all_special_ids}


def watch_forward(model) -> list[tuple[int, int]]:
    """The [batch, positions] of the input ids of each forward the model runs: with the KV cache,
    a batch's prompt pass and then one position per step (without it, the whole sequence again)."""
    calls = []
    model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    return calls


def test_prompts_are_batched_longest_first_and_the_cache_carries_each_new_token(tiny_decoder):
    """5 prompts, 2 a batch: {9, 8}, {4, 3}, {2} words, so the prompt passes hold 28 token slots where
    batches in the prompts' order ({2, 9}, {3, 8}, {4}) hold 38; after each, every step feeds one
    token per row and reads the rest from the cache."""
    model, tokenizer = tiny_decoder
    model = AutoModelForCausalLM.from_config(model.config).eval()  # hooks of its own
    calls = watch_forward(model)
    generate(model, tokenizer, PROMPTS, GenerationConfig(max_new_tokens=NEW_TOKENS), 2, **words_only(tokenizer))
    assert calls == [(2, 9), *[(2, 1)] * (NEW_TOKENS - 1), (2, 4), *[(2, 1)] * (NEW_TOKENS - 1), (1, 2), *[(1, 1)] * (NEW_TOKENS - 1)]
    assert sum(batch * length for batch, length in calls if length > 1) == 28


def test_the_cache_is_used_even_where_the_generation_config_switches_it_off(tiny_decoder):
    """A checkpoint may ship a generation_config.json with use_cache false: hkft decodes with the cache anyway."""
    model, tokenizer = tiny_decoder
    model = AutoModelForCausalLM.from_config(model.config).eval()
    model.generation_config.use_cache = False
    calls = watch_forward(model)
    generate(model, tokenizer, PROMPTS[:1], GenerationConfig(max_new_tokens=NEW_TOKENS), 1, **words_only(tokenizer))
    assert calls == [(1, 2)] + [(1, 1)] * (NEW_TOKENS - 1)


def test_replies_are_plain_generates_token_for_token_in_the_prompts_order(tiny_decoder):
    """Each reply equals plain transformers generate of its prompt alone (no padding) and of the
    prompts batched in their own order, as text and as tokens."""
    model, tokenizer = tiny_decoder
    settings = GenerationConfig(max_new_tokens=NEW_TOKENS)
    generated = []
    original = model.generate

    def recorded(**kwargs):
        output = original(**kwargs)
        generated.extend(zip(kwargs["input_ids"].tolist(), output[:, kwargs["input_ids"].shape[1]:].tolist()))
        return output

    model.generate = recorded
    try:
        texts = generate(model, tokenizer, PROMPTS, settings, 2, **words_only(tokenizer))
    finally:
        del model.generate
    hkft_tokens = {tuple(token for token in ids if token != tokenizer.pad_token_id): new for ids, new in generated}

    alone = []
    for prompt in PROMPTS:
        inputs = tokenizer(prompt, return_tensors="pt")
        output = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                **words_only(tokenizer))
        alone.append(output[0, inputs["input_ids"].shape[1]:].tolist())
        assert hkft_tokens[tuple(inputs["input_ids"][0].tolist())] == alone[-1]
    assert texts == [tokenizer.decode(tokens, skip_special_tokens=True).strip() for tokens in alone]
    assert [len(text.split()) for text in texts] == [NEW_TOKENS] * len(PROMPTS)

    tokenizer.padding_side = "left"
    in_order = []
    for start in range(0, len(PROMPTS), 2):
        inputs = tokenizer(PROMPTS[start:start + 2], return_tensors="pt", padding=True)
        output = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                **words_only(tokenizer))
        in_order += tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert texts == [text.strip() for text in in_order]


def test_max_examples_and_no_prompt(tiny_decoder):
    model, tokenizer = tiny_decoder
    first_two = generate(model, tokenizer, PROMPTS, GenerationConfig(max_new_tokens=NEW_TOKENS, max_examples=2), 2,
                         **words_only(tokenizer))
    assert first_two == generate(model, tokenizer, PROMPTS[:2], GenerationConfig(max_new_tokens=NEW_TOKENS), 2,
                                 **words_only(tokenizer))
    assert generate(model, tokenizer, [], GenerationConfig(), 2) == []


def test_longest_first_keeps_ties_in_order():
    from hkft.tasks.evaluation import longest_first

    assert longest_first([2, 9, 3, 9, 2]) == [1, 3, 2, 0, 4]
    assert longest_first([]) == []
