"""lorakit.zero3: adapter selection per bias mode (peft as the oracle), exact save/reload round trips, the refusal of
0-element tensors, the ZeRO paper's arithmetic and the notebook's inline copy of it. The same functions under a real
two-rank ZeRO-3 run are checked in test_zero3_demo.py."""

import json
import os
import re
import socket
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from lorakit import zero3

ROOT = Path(__file__).resolve().parent.parent


def biased_llama(seed: int = 0) -> LlamaForCausalLM:
    """A small random Llama WITH attention biases, so that the three bias modes differ (the tiny model has none)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attention_bias=True, max_position_embeddings=32)
    return LlamaForCausalLM(config).eval()


def lora_model(bias: str) -> PeftModel:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bias=bias, lora_dropout=0.0)
    model = get_peft_model(biased_llama(), config)
    torch.manual_seed(1)
    with torch.no_grad():  # as if trained: B != 0 and the trainable biases moved
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def logits(model, seed: int = 2) -> torch.Tensor:
    torch.manual_seed(seed)
    with torch.no_grad():
        return model(torch.randint(0, 64, (2, 10))).logits  # (B, T, V)


@pytest.mark.parametrize("bias, extra", [
    ("none", set()),
    ("all", {f"layers.{i}.self_attn.{m}_proj" for i in range(2) for m in "qkvo"}),
    ("lora_only", {f"layers.{i}.self_attn.{m}_proj" for i in range(2) for m in "qv"}),
])
def test_selection_matches_what_peft_trains_and_saves(bias, extra):
    model = lora_model(bias)
    names = zero3.adapter_parameter_names(model.named_parameters(), bias)
    assert set(names) == {n for n, p in model.named_parameters() if p.requires_grad}  # what peft trains
    peft_keys = set(get_peft_model_state_dict(model))  # what peft saves (adapter name removed)
    assert {n.replace(".default", "") for n in names} == peft_keys
    biases = {re.search(r"layers\.\d+\.self_attn\.\w_proj", n).group() for n in names if n.endswith("bias")}
    assert biases == extra
    if bias == "lora_only":  # current peft keeps the wrapped layer's bias one level down, not at <layer>.bias
        assert all(n.endswith("base_layer.bias") for n in names if n.endswith("bias"))


@pytest.mark.parametrize("bias", zero3.bias_modes())
def test_save_reload_round_trips_exactly(bias, tmp_path):
    model = lora_model(bias)
    out = zero3.save_adapter(model, tmp_path / "adapter", bias=bias)
    reloaded = PeftModel.from_pretrained(biased_llama(), out).eval()
    assert torch.equal(logits(reloaded), logits(model))
    assert not torch.equal(logits(biased_llama()), logits(model))  # the adapter does change the model
    saved = load_file(out / "adapter_model.safetensors")
    state = zero3.get_peft_state_maybe_zero_3(model.named_parameters(), bias)
    assert {k: v.shape for k, v in saved.items()} == {k.replace(".default", ""): v.shape for k, v in state.items()}


def test_refuses_zero_element_tensors(tmp_path):
    model = lora_model("none")
    state = zero3.get_peft_state_maybe_zero_3(model.named_parameters())
    # what an un-gathered ZeRO-3 read gives
    state = {k: torch.empty(0) if "lora_A" in k else v for k, v in state.items()}
    with pytest.raises(ValueError, match="0-element"):
        zero3.write_adapter(model, tmp_path / "bad", state)
    assert not (tmp_path / "bad").exists()


def test_bias_modes_are_read_from_peft():
    assert zero3.bias_modes() == ("none", "all", "lora_only")  # LoraConfig.bias: Literal["none", "all", "lora_only"]


@pytest.mark.parametrize("call, message", [
    (lambda m, d: zero3.save_adapter(m, d, bias="lora_only"), "LoraConfig\\(bias='none'\\)"),
    (lambda m, d: zero3.save_adapter(m.get_base_model(), d), "needs a peft model"),
    (lambda m, d: zero3.adapter_parameter_names(m.named_parameters(), "some"), "not a peft bias mode"),
])
def test_bad_input_gets_a_clear_error(call, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        call(lora_model("none"), tmp_path / "x")


def test_port_is_free_sees_a_listener():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert not zero3.port_is_free(port)
    assert zero3.port_is_free(port)


@pytest.mark.parametrize("args, message", [
    ((1e9, 8, 4), "stage=4"),
    ((1e9, 0, 3), "num_devices=0"),
])
def test_zero_memory_refuses_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        zero3.zero_memory_bytes(*args)


def test_init_is_a_no_op_without_deepspeed(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    zero3.maybe_init_cpu_distributed(None)
    assert "RANK" not in os.environ and not torch.distributed.is_initialized()


def test_configs_are_valid_for_the_hf_integration():
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    stages = {}
    for name in ("zero2", "zero3", "zero3_offload"):
        config = json.loads((zero3.CONFIGS / f"{name}.json").read_text())
        stages[name] = HfDeepSpeedConfig(config).is_zero3()
        assert config["train_micro_batch_size_per_gpu"] == "auto"  # filled from TrainingArguments
    assert stages == {"zero2": False, "zero3": True, "zero3_offload": True}
    assert zero3.load_config(zero3.CONFIGS / "zero3.json", 0)["zero_optimization"][
        "stage3_param_persistence_threshold"] == 0


@pytest.mark.parametrize("stage, gigabytes", [(0, 120.0), (1, 31.4), (2, 16.6), (3, 1.9)])
def test_zero_memory_matches_the_paper(stage, gigabytes):
    """Figure 1 of Rajbhandari et al. 2020 (ZeRO): Ψ = 7.5B, K = 12, Nd = 64."""
    assert zero3.zero_memory_bytes(7.5e9, 64, stage) / 1e9 == pytest.approx(gigabytes, abs=0.05)


def test_notebook_inline_memory_formula_equals_the_package():
    from lorakit.course import code_cells

    notebook = ROOT / "notebooks" / "06_deepspeed_zero3_saving.ipynb"
    source = code_cells(notebook, "# inline: lorakit.zero3.zero_memory_bytes")
    namespace: dict = {}
    exec(source.split("\n\n\n")[0], namespace)  # the function definition only, not the cell's prints
    for case in [(1e6, 1, 0), (7e9, 8, 1), (7e9, 8, 2), (65e9, 64, 3), (123_457, 3, 3)]:
        assert namespace["zero_memory_bytes"](*case) == pytest.approx(zero3.zero_memory_bytes(*case), rel=1e-12)


def test_maybe_zero_3_returns_a_detached_cpu_copy_without_zero3():
    param = torch.nn.Parameter(torch.randn(3, 4))
    copy = zero3.maybe_zero_3(param)
    assert torch.equal(copy, param) and not copy.requires_grad
    copy.add_(1.0)
    assert not torch.equal(copy, param)  # a copy, not a view: later training cannot change what was saved
