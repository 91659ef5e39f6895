"""The embedded model's recipe: tokenizer, config, pretraining batches and determinism, and what the base knows."""

import hashlib
import itertools
import json

import pytest
import torch
from transformers import LlamaForCausalLM

from lorakit import tiny
from lorakit.evaluate import exact_match
from lorakit.models import TASK_DIR, TINY_DIR, load_base
from lorakit.tasks import pretraining_pairs, read_jsonl, record


@pytest.fixture(scope="module")
def base():
    return load_base("tiny")


def test_tokenizer_is_character_level_and_round_trips():
    tokenizer = tiny.build_tokenizer()
    text = "reverse: kfdq  Add: 12+7 = ?\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert tokenizer.decode(ids) == text


def test_special_tokens_are_distinct_and_pad_is_not_unk():
    tokenizer = tiny.build_tokenizer()
    ids = [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id]
    assert len(set(ids)) == 4
    assert tokenizer("é", add_special_tokens=False)["input_ids"] == [tokenizer.unk_token_id]


def test_chat_template_and_pretraining_batches_mask_the_prompt():
    tokenizer = tiny.build_tokenizer()
    text = tokenizer.apply_chat_template([{"role": "user", "content": "copy: ab"},
                                          {"role": "assistant", "content": "ab"}], tokenize=False)
    assert text == "<s><|user|>copy: ab<|assistant|>ab</s>"
    batch = tiny.encode_batch(tokenizer, [("copy: ab", "ab"), ("add: 1+2", "3")])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    assert tokenizer.decode(ids) == text
    answer = [label for label in labels if label != -100]
    assert tokenizer.decode(answer) == "ab</s>"
    assert labels[: len(ids) - len(answer)] == [-100] * (len(ids) - len(answer))
    assert batch["attention_mask"].sum(1).tolist() == [14, 13]  # special tokens are one token each
    assert batch["input_ids"][1, 13] == tokenizer.pad_token_id and batch["labels"][1, 13] == -100  # right-padded


def test_pretraining_batches_are_the_ones_data_tiny_was_trained_on():
    """The first two batches of the recipe, as bytes: the hash of what the original recipe (its own encoder and
    collator, before lorakit.data's were shared) produced. A change here changes the weights: make base is due."""
    tokenizer, stream = tiny.build_tokenizer(), pretraining_pairs(tiny.PRETRAIN["seed"])
    batch = tiny.encode_batch(tokenizer, [next(stream) for _ in range(2 * tiny.PRETRAIN["batch_size"])])
    digest = hashlib.sha256(b"".join(batch[k].numpy().tobytes() for k in ("input_ids", "labels", "attention_mask")))
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == (128, 27)
    assert digest.hexdigest()[:16] == "810ea08aa9ebd351"


def test_committed_tokenizer_equals_the_recipe(base):
    _, tokenizer = base
    fresh = tiny.build_tokenizer()
    assert tokenizer.get_vocab() == fresh.get_vocab()
    assert tokenizer.chat_template == fresh.chat_template


def test_recipe_is_deterministic():
    def short_run() -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        tokenizer = tiny.build_tokenizer()
        model = LlamaForCausalLM(tiny.tiny_config(tokenizer))
        tiny.pretrain(model, tokenizer, steps=3, batch_size=8, lr=1e-3, warmup=2, weight_decay=0.0, seed=0,
                      log_every=100)
        return model.state_dict()

    first, second = short_run(), short_run()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_committed_config_matches_the_recipe(base):
    model, _ = base
    for key, value in tiny.TINY_CONFIG.items():
        assert getattr(model.config, key) == value, key


def test_base_knows_its_skills_but_not_the_task(base):
    model, tokenizer = base
    skills = [record(str(i), q, a) for i, (q, a) in enumerate(itertools.islice(pretraining_pairs(999), 200))]
    assert exact_match(model, tokenizer, skills) >= 0.6
    assert exact_match(model, tokenizer, read_jsonl(TASK_DIR / "eval.jsonl")) <= 0.10


def test_committed_base_records_the_current_recipe():
    """data/tiny/pretraining.json names the recipe it was built with; a changed recipe means `make base` is due."""
    recipe = json.loads((TINY_DIR / "pretraining.json").read_text())["recipe"]
    assert recipe["pretrain"] == tiny.PRETRAIN, "PRETRAIN changed since data/tiny was built: run make base"
    assert recipe["skills"] == tiny.skill_weights(), "tasks.SKILLS changed since data/tiny was built: run make base"
