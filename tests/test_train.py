"""lorakit.train end to end on the embedded model: the CLI runs and saves, resume is exact, the adapter reloads."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from lorakit.data import LazySupervisedDataset, load_records
from lorakit.models import TASK_DIR, load_base
from lorakit.runs import MARKER
from lorakit.train import main, train


@pytest.fixture(scope="module")
def small_task(tmp_path_factory):
    """A slice of the task, so each run takes a second or two."""
    folder = tmp_path_factory.mktemp("task")
    for name, count in (("train", 32), ("eval", 8)):
        records = load_records(TASK_DIR / f"{name}.jsonl")[:count]
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def quick(small_task, output_dir, *extra: str) -> list[str]:
    return ["--output_dir", str(output_dir), "--data_path", str(small_task / "train.jsonl"),
            "--eval_data_path", str(small_task / "eval.jsonl"), "--per_device_train_batch_size", "8",
            "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2", "--logging_steps", "1",
            "--disable_tqdm", "True", "--seed", "3", *extra]


def adapter(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


def test_cli_end_to_end(small_task, tmp_path, capsys):
    assert main(quick(small_task, tmp_path)) == 0
    out = capsys.readouterr().out
    config = load_base("tiny")[0].config
    head_dim = config.hidden_size // config.num_attention_heads
    d, d_kv = config.hidden_size, config.num_key_value_heads * head_dim
    lora = 8 * ((d + d) + (d + d_kv)) * config.num_hidden_layers  # r (d_in + d_out) for q_proj and v_proj per layer
    assert f"trainable params: {lora:,} || all params:" in out
    assert "held-out exact match:" in out
    saved = {p.name for p in tmp_path.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.json", "checkpoint-4"} <= saved
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (8, 16, ["q_proj", "v_proj"])
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3, 4]
    assert all(key.endswith(("lora_A.weight", "lora_B.weight")) for key in adapter(tmp_path))
    assert any(t.abs().max() > 0 for k, t in adapter(tmp_path).items() if "lora_B" in k)  # B moved off zero


def test_resume_equals_straight_run(small_task, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(quick(small_task, straight))
    train(quick(small_task, resumed))
    # simulate a crash after step 2: drop everything written later, then run the same command again
    shutil.rmtree(resumed / "checkpoint-4")
    for path in resumed.glob("*.*"):
        if path.name != MARKER:  # written when the run started
            path.unlink()
    train(quick(small_task, resumed))
    a, b = adapter(straight), adapter(resumed)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_saved_adapter_reloads_with_stock_peft(small_task, tmp_path):
    trainer = train(quick(small_task, tmp_path))
    trained = trainer.model.eval()
    base, tokenizer = load_base("tiny")
    reloaded = PeftModel.from_pretrained(base, str(tmp_path)).eval()
    batch = tokenizer(["<s><|user|>reverse: abcd<|assistant|>"], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        assert torch.equal(trained(**batch).logits, reloaded(**batch).logits)


def test_bad_target_module_is_named(small_task, tmp_path):
    with pytest.raises(ValueError, match=r"--lora_target_modules 'q_projj' matches no module"):
        train(quick(small_task, tmp_path, "--lora_target_modules", "q_proj", "q_projj"))


def test_lora_weight_path_continues_from_saved_adapter(small_task, tmp_path):
    first = train(quick(small_task, tmp_path / "first", "--max_steps", "2"))
    second = train(quick(small_task, tmp_path / "second", "--max_steps", "1", "--learning_rate", "1e-12",
                         "--lora_weight_path", str(tmp_path / "first")))
    a, b = first.model.state_dict(), second.model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a if "lora_" in k)


def test_module_entry_point_help():
    result = subprocess.run([sys.executable, "-m", "lorakit.train", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "--lora_target_modules" in result.stdout and "--q_lora" in result.stdout


@pytest.mark.slow
def test_torchrun_two_cpu_ranks_share_the_data(small_task, tmp_path):
    """Two CPU processes must form one gloo group: each step then consumes 2 x batch records, printed once."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "lorakit.train",
               *quick(small_task, tmp_path, "--max_steps", "3", "--per_device_train_batch_size", "4")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("trainable params:") == 1
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and state["epoch"] == pytest.approx(3 * 2 * 4 / 32)
    assert PeftModel.from_pretrained(load_base("tiny")[0], str(tmp_path)) is not None


def _attn(model) -> str:
    return model.get_base_model().config._attn_implementation


def _tokenised_lazily(trainer) -> bool:
    """The Trainer got the lazy dataset, which after 2 steps of 8 has tokenised only the records read (24 of 32 measured:
    the data loader reads a batch ahead), each once."""
    dataset = trainer.train_dataset
    return isinstance(dataset, LazySupervisedDataset) and 0 < len(dataset.cache) == dataset.seen < len(dataset)


@pytest.mark.parametrize("flags, check", [
    (["--q_lora", "True"], lambda t: any(type(x).__name__ == "Linear4bit" for x in t.model.modules())),
    (["--flash_attn", "True"], lambda t: _attn(t.model) in ("flash_attention_2", "lorakit_tiled")),
    (["--gradient_checkpointing", "True"], lambda t: t.model.get_base_model().is_gradient_checkpointing),
    (["--lora_bias", "all", "--lora_target_modules", "q_proj", "k_proj", "v_proj", "o_proj"],
     lambda t: t.model.peft_config["default"].bias == "all"),
    (["--lazy_preprocess", "True"], _tokenised_lazily),
])
def test_modes_train_the_adapter(small_task, tmp_path, flags, check):
    trainer = train(quick(small_task, tmp_path, "--max_steps", "2", "--save_strategy", "no", *flags))
    assert check(trainer)
    lora_b = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().max() > 0 for p in lora_b)  # every adapter got gradient and moved off zero
    assert (tmp_path / "adapter_model.safetensors").is_file()
