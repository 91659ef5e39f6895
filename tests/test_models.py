"""The embedded tiny model: tokenizer, recipe determinism, loading, errors, and what the base knows."""

import itertools
import json

import pytest
import torch
from transformers import LlamaForCausalLM

from lorakit import models
from lorakit.evaluate import exact_match
from lorakit.tasks import pretraining_pairs, read_jsonl, record


@pytest.fixture(scope="module")
def base():
    return models.load_base("tiny")


def test_tokenizer_is_character_level_and_round_trips():
    tokenizer = models.build_tokenizer()
    text = "reverse: kfdq  Add: 12+7 = ?\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert tokenizer.decode(ids) == text


def test_special_tokens_are_distinct_and_pad_is_not_unk():
    tokenizer = models.build_tokenizer()
    ids = [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id]
    assert len(set(ids)) == 4
    assert tokenizer("é", add_special_tokens=False)["input_ids"] == [tokenizer.unk_token_id]


def test_chat_template_and_encode_pair_mask_the_prompt():
    tokenizer = models.build_tokenizer()
    text = tokenizer.apply_chat_template([{"role": "user", "content": "copy: ab"},
                                          {"role": "assistant", "content": "ab"}], tokenize=False)
    assert text == "<s><|user|>copy: ab<|assistant|>ab</s>"
    ids, labels = models.encode_pair(tokenizer, "copy: ab", "ab")
    assert tokenizer.decode(ids) == text
    answer = [label for label in labels if label != -100]
    assert tokenizer.decode(answer) == "ab</s>"
    assert labels[: len(ids) - len(answer)] == [-100] * (len(ids) - len(answer))


def test_committed_tokenizer_equals_the_recipe(base):
    _, tokenizer = base
    fresh = models.build_tokenizer()
    assert tokenizer.get_vocab() == fresh.get_vocab()
    assert tokenizer.chat_template == fresh.chat_template


def test_load_base_gives_a_llama_with_the_seed_target_modules(base):
    model, tokenizer = base
    assert isinstance(model, LlamaForCausalLM) and not model.training
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= names
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # grouped-query attention
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.pad_token_id == tokenizer.pad_token_id != tokenizer.unk_token_id


def test_recipe_is_deterministic():
    def short_run() -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        tokenizer = models.build_tokenizer()
        model = LlamaForCausalLM(models.tiny_config(tokenizer))
        models.pretrain(model, tokenizer, steps=3, batch_size=8, lr=1e-3, warmup=2, weight_decay=0.0, seed=0,
                        log_every=100)
        return model.state_dict()

    first, second = short_run(), short_run()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_committed_config_matches_the_recipe(base):
    model, _ = base
    for key, value in models.TINY_CONFIG.items():
        assert getattr(model.config, key) == value, key


@pytest.mark.parametrize("name", ["nope", "/definitely/not/here"])
def test_unknown_model_lists_what_exists(name):
    with pytest.raises(FileNotFoundError, match="tiny"):
        models.load_base(name)


def test_unbuilt_known_model_says_how_to_build(monkeypatch, tmp_path):
    monkeypatch.setitem(models.MODELS, "tiny", tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="python -m lorakit.models build"):
        models.load_base("tiny")


def test_lorakit_model_environment_variable_selects_the_default(monkeypatch):
    monkeypatch.setenv("LORAKIT_MODEL", "nope")
    with pytest.raises(FileNotFoundError, match="'nope'"):
        models.load_base()


def test_base_knows_its_skills_but_not_the_task(base):
    model, tokenizer = base
    skills = [record(str(i), q, a) for i, (q, a) in enumerate(itertools.islice(pretraining_pairs(999), 200))]
    assert exact_match(model, tokenizer, skills) >= 0.6
    assert exact_match(model, tokenizer, read_jsonl(models.TASK_DIR / "eval.jsonl")) <= 0.10


def test_committed_base_records_the_current_recipe():
    """data/tiny/pretraining.json names the recipe it was built with; a changed recipe means `make base` is due."""
    recipe = json.loads((models.TINY_DIR / "pretraining.json").read_text())["recipe"]
    assert recipe["pretrain"] == models.PRETRAIN, "PRETRAIN changed since data/tiny was built: run make base"
    assert recipe["skills"] == models.skill_weights(), "tasks.SKILLS changed since data/tiny was built: run make base"
