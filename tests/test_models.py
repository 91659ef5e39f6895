"""The model registry and loader: names, paths, the environment variable, and the errors that say what to do."""

import pytest
from transformers import LlamaForCausalLM

from lorakit import models, smollm2


def test_load_base_gives_a_llama_with_the_seed_target_modules():
    model, tokenizer = models.load_base("tiny")
    assert isinstance(model, LlamaForCausalLM) and not model.training
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= names
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # grouped-query attention
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.pad_token_id == tokenizer.pad_token_id != tokenizer.unk_token_id


def test_registry_paths():
    assert models.TINY_DIR == models.DATA_DIR / "tiny" and models.TASK_DIR == models.DATA_DIR / "task"
    assert models.resolve("tiny") == models.TINY_DIR and models.resolve(str(models.TINY_DIR)) == models.TINY_DIR
    assert models.MODELS["smollm2"] == smollm2.checkpoint_dir()  # smollm2 owns its cache path; the registry asks it


@pytest.mark.parametrize("name", ["nope", "/definitely/not/here"])
def test_unknown_model_lists_what_exists(name):
    with pytest.raises(FileNotFoundError, match="tiny"):
        models.load_base(name)


@pytest.mark.parametrize("name, command", [("tiny", "python -m lorakit.models build"),
                                           ("smollm2", "python -m lorakit.models smollm2")])
def test_unbuilt_known_model_says_how_to_build(monkeypatch, tmp_path, name, command):
    monkeypatch.setitem(models.MODELS, name, tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=command):
        models.load_base(name)


def test_lorakit_model_environment_variable_selects_the_default(monkeypatch):
    monkeypatch.setenv("LORAKIT_MODEL", "nope")
    with pytest.raises(FileNotFoundError, match="'nope'"):
        models.load_base()


def test_build_commands_dispatch_to_the_recipe(monkeypatch, tmp_path):
    from lorakit import tiny

    built = []
    monkeypatch.setattr(tiny, "build_tiny", lambda out: built.append(("build", out)))
    monkeypatch.setattr(tiny, "build_task", lambda out: built.append(("task", out)))
    assert models.main(["build", "--out", str(tmp_path / "m")]) == models.main(["task", "--out", str(tmp_path)]) == 0
    assert built == [("build", tmp_path / "m"), ("task", tmp_path)]
