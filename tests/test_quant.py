"""lorakit.quant: 4-bit loading with the seed's config, the CPU eval->train guard, memory report, k-bit preparation."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from lorakit.models import TINY_DIR, load_base
from lorakit.nf4 import dequantize_nf4, quantize_nf4
from lorakit.quant import (
    KINDS,
    bits_per_weight,
    cpu_has_eval_trap,
    guard_eval_trap,
    linear_weight_count,
    load_in_4bit,
    memory_report,
    prepare_kbit,
)

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def model_4bit():
    return load_in_4bit(TINY_DIR)


@pytest.fixture(scope="module")
def base():
    return load_base("tiny")[0]


def test_load_in_4bit_quantises_every_linear_but_the_head(model_4bit):
    layers = [m for m in model_4bit.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 7 * model_4bit.config.num_hidden_layers  # q, k, v, o, gate, up, down
    for layer in layers:
        state = layer.weight.quant_state
        assert state.quant_type == "nf4" and state.blocksize == 64 and state.nested  # the seed's config
        assert layer.support_avx512bf16_for_cpu is False  # the guard is applied
    assert model_4bit.get_input_embeddings().weight.dtype == torch.float32
    assert not model_4bit.training


def test_load_in_4bit_stores_lorakit_nf4(model_4bit, base):
    """What transformers + bitsandbytes store for a layer is exactly lorakit.nf4 of the fp32 weight."""
    layer = model_4bit.model.layers[1].mlp.down_proj
    weight = base.model.layers[1].mlp.down_proj.weight.detach()
    packed, state = quantize_nf4(weight)
    assert torch.equal(layer.weight.data, packed)
    assert torch.equal(bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state),
                       dequantize_nf4(packed, state))


def test_4bit_logits_stay_close_to_fp32(model_4bit, base):
    ids = torch.randint(7, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact, quantised = base(input_ids=ids).logits, model_4bit(input_ids=ids).logits
    relative = ((quantised - exact).norm() / exact.norm()).item()
    print(f"relative logit error of the 4-bit model: {relative:.4f}")
    assert 0 < relative < 0.25


def test_bf16_compute_and_prepare_kbit_upcasts_the_rest():
    model = load_in_4bit(TINY_DIR, compute_dtype=torch.bfloat16)
    assert model.model.norm.weight.dtype == torch.bfloat16
    assert model.model.layers[0].self_attn.q_proj.compute_dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 20, 30, 40]])).logits).all()
    model = prepare_kbit(model, gradient_checkpointing=False)
    # norms and embeddings go to fp32 for stable training; the 4-bit weights stay packed uint8
    assert model.model.norm.weight.dtype == torch.float32 and model.model.embed_tokens.weight.dtype == torch.float32
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.uint8


def test_missing_checkpoint_names_the_fix():
    with pytest.raises(FileNotFoundError, match="resolve"):
        load_in_4bit("tiny")


def _lora_grads_after_eval(guard: bool) -> dict[str, torch.Tensor | None]:
    model = load_in_4bit(TINY_DIR)
    if not guard:  # undo what load_in_4bit did, to show the trap
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = cpu_has_eval_trap()
    model = prepare_kbit(model, gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                             lora_dropout=0.0))
    ids = torch.randint(7, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)  # an evaluation pass, as Trainer.evaluate or a generate() would do
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if "lora_B" in n}


def test_gradients_flow_after_an_eval_pass_with_the_guard():
    grads = _lora_grads_after_eval(guard=True)
    assert len(grads) == 4
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())


@pytest.mark.skipif(not cpu_has_eval_trap(), reason="this CPU has no AVX512-BF16: bitsandbytes never repacks, "
                                                    "so the trap cannot be shown here")
def test_without_the_guard_an_eval_pass_silently_kills_gradients():
    with pytest.warns(UserWarning, match="autograd kernel was not registered"):
        grads = _lora_grads_after_eval(guard=False)
    assert all(g is None or g.abs().sum() == 0 for g in grads.values())


def test_guard_undoes_a_repack_already_done():
    if not cpu_has_eval_trap():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks")
    model = load_in_4bit(TINY_DIR)
    layer = model.model.layers[0].self_attn.q_proj
    before = layer.weight.data.clone()
    layer.support_avx512bf16_for_cpu = True
    with torch.no_grad():
        layer(torch.randn(1, 3, 128))
    assert layer.weight.quant_state.packing_format_for_cpu  # repacked for the inference kernel
    assert guard_eval_trap(model) == 14
    assert torch.equal(layer.weight.data, before)


@pytest.mark.parametrize("kind", ["fp32", "bf16", "nf4", "nf4+dq"])
def test_memory_report_agrees_with_get_memory_footprint(kind):
    if kind in ("fp32", "bf16"):
        model = load_base("tiny", dtype=torch.float32 if kind == "fp32" else torch.bfloat16)[0]
    else:
        model = load_in_4bit(TINY_DIR, double_quant=kind == "nf4+dq")
    report = memory_report(model)
    assert tuple(report) == KINDS
    assert sum(report.values()) - report["quantisation constants"] == model.get_memory_footprint()
    bits = bits_per_weight(model)
    print(f"{kind}: {report}, {bits:.3f} bits per linear weight")
    if kind.startswith("nf4"):
        assert report["linear weights"] * 2 == linear_weight_count(model)  # two 4-bit codes per byte
        assert 4 < bits < 5
    else:
        assert report["quantisation constants"] == 0 and bits == {"fp32": 32, "bf16": 16}[kind]


def test_prepare_kbit_freezes_the_base():
    model = prepare_kbit(load_in_4bit(TINY_DIR))
    assert not any(p.requires_grad for p in model.parameters())
    assert model.is_activation_checkpointing


@pytest.mark.parametrize("how", ["flag", "fsdp"])
def test_prepare_kbit_refuses_zero3_and_fsdp(how, monkeypatch, model_4bit):
    if how == "fsdp":
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="bnb_4bit_quant_storage"):
        prepare_kbit(model_4bit, zero3=how == "flag")
