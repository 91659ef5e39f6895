"""Tiled attention against transformers' eager attention (the oracle): kernel, whole model, generate(), registry, switch."""

from types import SimpleNamespace

import pytest
import torch
from transformers.models.llama.modeling_llama import eager_attention_forward

from lorakit import attention
from lorakit.course import NOTEBOOKS, code_cells
from lorakit.meter import peak_allocated
from lorakit.models import load_base

ATOL = 1e-5
# Whole-model comparisons scale 1e-5 by the tensor's magnitude (max |Δ| ≤ 1e-5·max(1, max |x|)): float32 logits of size ~20 carry ~1e-5 of
# rounding noise from any change of summation order (torch's own sdpa differs from eager by 2.6e-5 on them). float64
# is no way out: eager's softmax runs in float32, where a fully masked row of float64 minima becomes -inf and NaN.
TEXTS = ["reverse: abcdef", "reverse: xy", "upper: hello there, how are you today?"]


def assert_close_to_scale(got, expected, what=""):
    diff, scale = (got - expected).abs().max().item(), max(1.0, expected.abs().max().item())
    assert diff <= ATOL * scale, f"{what}: max |difference| {diff:.3g} > {ATOL:g} x max(1, max |expected|) = {scale:.3g}"


def eager_reference(q, k, v, visible):
    """transformers' Llama eager attention with a boolean mask (B, 1, Lq, Lk) turned into its additive form."""
    module = SimpleNamespace(num_key_value_groups=q.shape[1] // k.shape[1], training=False)
    additive = torch.zeros(visible.shape, dtype=q.dtype).masked_fill(~visible, torch.finfo(q.dtype).min)
    out, _ = eager_attention_forward(module, q, k, v, additive, scaling=q.shape[-1] ** -0.5)
    return out.transpose(1, 2)  # (B, H, Lq, D)


def causal_visible(lq, lk):
    return torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)  # (Lq, Lk)


CASES = {  # name: (H, Hkv, Lq, Lk, padding, block)
    "causal": (4, 4, 37, 37, None, 8),
    "gqa 2 groups": (4, 2, 37, 37, None, 8),
    "gqa 4 groups, one block": (4, 1, 37, 37, None, 64),
    "right padding": (4, 2, 37, 37, "right", 8),
    "left padding": (4, 2, 37, 37, "left", 16),
    "decode with cache (Lq < Lk)": (4, 2, 3, 40, "left", 8),
    "one query": (4, 2, 1, 40, "left", 8),
}


@pytest.mark.parametrize("mask_form", ["key mask (B, Lk)", "full mask (B, 1, Lq, Lk)"])
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_tiled_attention_equals_eager_values_and_gradients(case, mask_form):
    heads, kv_heads, lq, lk, padding, block = CASES[case]
    torch.manual_seed(0)
    q = torch.randn(2, heads, lq, 16, requires_grad=True)
    k, v = (torch.randn(2, kv_heads, lk, 16, requires_grad=True) for _ in range(2))
    keys = torch.ones(2, lk, dtype=torch.bool)
    if padding == "right":
        keys[0, -9:] = False
    elif padding == "left":
        keys[0, :9] = False
    visible = causal_visible(lq, lk)[None, None] & keys[:, None, None, :]  # (B, 1, Lq, Lk)
    if mask_form.startswith("key"):
        out = attention.tiled_attention(q, k, v, mask=None if padding is None else keys, block=block)
    else:
        out = attention.tiled_attention(q, k, v, causal=False, mask=visible, block=block)
    expected = eager_reference(q, k, v, visible)
    # A query that sees no key at all (a left-padding position) has no defined output; its result is never used.
    seen = visible.any(-1)[..., None]  # (B, 1, Lq, 1)
    torch.testing.assert_close(out * seen, expected * seen, atol=ATOL, rtol=0)
    weight = torch.randn_like(expected) * seen
    got = torch.autograd.grad((out * weight).sum(), (q, k, v))
    want = torch.autograd.grad((expected * weight).sum(), (q, k, v))
    for name, g, w in zip("qkv", got, want, strict=True):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=0, msg=lambda m, name=name: f"d{name}: {m}")


def test_per_head_mask_follows_the_query_head():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 20, 8), torch.randn(2, 2, 20, 8), torch.randn(2, 2, 20, 8)
    visible = causal_visible(20, 20).repeat(2, 4, 1, 1)  # (B, H, Lq, Lk)
    visible[:, 1, :, :5] = False  # head 1 alone ignores the first five keys...
    visible[:, 1, :5, 0] = True  # ...except where that would leave a query with no key
    out = attention.tiled_attention(q, k, v, causal=False, mask=visible, block=8)
    torch.testing.assert_close(out, eager_reference(q, k, v, visible), atol=ATOL, rtol=0)


def test_custom_backward_passes_gradcheck():
    torch.manual_seed(0)
    q = torch.randn(1, 4, 6, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 2, 9, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    keys = torch.tensor([[False, True, True, True, True, True, True, True, False]])
    assert torch.autograd.gradcheck(lambda q, k, v: attention.tiled_attention(q, k, v, mask=keys, block=4), (q, k, v))


@pytest.mark.parametrize("kwargs, message", [
    (dict(q=(1, 3, 4, 8), k=(1, 2, 4, 8)), "multiple of Hkv"),
    (dict(q=(1, 2, 4, 8), k=(1, 2, 4, 6)), "expected q"),
    (dict(q=(1, 2, 5, 8), k=(1, 2, 4, 8)), "at least as many keys"),
    (dict(q=(1, 2, 4, 8), k=(1, 2, 4, 8), mask=torch.zeros(1, 4)), "must be boolean"),
    (dict(q=(1, 2, 4, 8), k=(1, 2, 4, 8), mask=torch.ones(1, 5, dtype=torch.bool)), "fits neither"),
])
def test_bad_input_is_named(kwargs, message):
    q, k = torch.randn(kwargs["q"]), torch.randn(kwargs["k"])
    with pytest.raises(ValueError, match=message):
        attention.tiled_attention(q, k, k, mask=kwargs.get("mask"))


@pytest.fixture(scope="module")
def models():
    attention.register()
    eager, tokenizer = load_base("tiny", attn_implementation="eager")
    tiled, _ = load_base("tiny", attn_implementation="lorakit_tiled")
    return eager, tiled, tokenizer


@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_model_logits_and_gradients_equal_eager(models, padding):
    eager, tiled, tokenizer = models
    tokenizer.padding_side = "left" if padding == "left" else "right"
    batch = tokenizer(TEXTS[:1] if padding == "none" else TEXTS, return_tensors="pt", padding=True)
    tokenizer.padding_side = "right"
    real = batch["attention_mask"].bool()  # (B, T)
    # Padding positions carry no loss, nor does the first real token (its logits would come from a left pad).
    labels = batch["input_ids"].masked_fill(~real | (real.cumsum(-1) == 1), -100)
    outputs = []
    for model in (eager, tiled):
        model.zero_grad()
        out = model(**batch, labels=labels)
        out.loss.backward()
        outputs.append((out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (logits_e, grads_e), (logits_t, grads_t) = outputs
    assert tiled.config._attn_implementation == "lorakit_tiled"
    assert_close_to_scale(logits_t[real], logits_e[real], "logits")
    for name, grad in grads_e.items():
        assert_close_to_scale(grads_t[name], grad, f"gradient of {name}")


@pytest.mark.parametrize("cache", ["dynamic", "static"])  # static: the kernel gets transformers' full 4D mask
def test_generate_equals_eager(models, cache):
    eager, tiled, tokenizer = models
    tokenizer.padding_side = "left"
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    tokenizer.padding_side = "right"
    runs = [model.generate(**batch, max_new_tokens=12, do_sample=False, output_scores=True,
                           return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id, cache_implementation=cache)
            for model in (eager, tiled)]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    assert_close_to_scale(torch.stack(runs[1].scores), torch.stack(runs[0].scores), "generation scores")


def test_bfloat16_model_is_as_close_to_float32_as_eager_bfloat16(models):
    _, _, tokenizer = models
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        reference = load_base("tiny")[0](**batch).logits[real]
        errors = {}
        for name in ("eager", "lorakit_tiled"):
            logits = load_base("tiny", dtype=torch.bfloat16, attn_implementation=name)[0](**batch).logits
            assert logits.dtype == torch.bfloat16
            errors[name] = (logits[real].float() - reference).abs().max().item()
    assert errors["lorakit_tiled"] <= 1.5 * errors["eager"], errors  # softmax statistics kept in fp32


def test_register_is_idempotent_and_refuses_flash_names():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert attention.register() == attention.register() == "lorakit_tiled"
    assert AttentionInterface._global_mapping["lorakit_tiled"] is attention.tiled_attention_forward
    assert AttentionMaskInterface._global_mapping["lorakit_tiled"] is attention.tiled_mask
    with pytest.raises(ValueError, match="contains 'flash'"):
        attention.register("my_flash_tiled")


def test_mask_function_is_compact_for_plain_causal_and_full_otherwise():
    from transformers.masking_utils import and_masks, causal_mask_function, sliding_window_overlay

    keys = torch.tensor([[True, True, True, True], [False, True, True, True]])
    assert attention.tiled_mask(2, 4, 4, attention_mask=torch.ones(2, 4, dtype=torch.bool)) is None
    assert torch.equal(attention.tiled_mask(2, 4, 4, attention_mask=keys), keys)
    windowed = attention.tiled_mask(2, 4, 4, mask_function=and_masks(causal_mask_function, sliding_window_overlay(2)),
                                    attention_mask=keys)
    assert windowed.shape == (2, 1, 4, 4) and not windowed[0, 0, 3, 1] and not windowed[1, 0, 1, 0]


def test_dropout_is_refused_with_the_fix():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="attention_dropout=0.0"):
        attention.tiled_attention_forward(SimpleNamespace(is_causal=True), q, q, q, None, dropout=0.1)


def test_choose_attention_without_flash_attn_request_keeps_sdpa():
    assert attention.choose_attention(False) == ("sdpa", None)


def test_choose_attention_falls_back_on_cpu_with_one_message(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    name, message = attention.choose_attention(True)
    assert name == "lorakit_tiled" and "no CUDA GPU" in message and "lorakit_tiled" in message
    from transformers import AttentionInterface

    assert "lorakit_tiled" in AttentionInterface._global_mapping  # registered by the switch itself


def test_choose_attention_says_when_the_flash_attn_package_is_absent(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(attention.importlib.util, "find_spec", lambda name: None)
    name, message = attention.choose_attention(True)
    assert name == "sdpa" and "flash-attn package is not installed" in message and "\n" not in message


def test_choose_attention_picks_flash_attention_2_when_present(monkeypatch):
    monkeypatch.setattr(attention, "flash_attention_2_missing", lambda: None)
    assert attention.choose_attention(True) == ("flash_attention_2", None)


def test_cast_for_flash_attention_casts_norms_embeddings_and_head():
    model, _ = load_base("tiny", dtype=torch.bfloat16)
    for module in model.modules():  # what k-bit preparation does: norms back to float32
        if "Norm" in type(module).__name__:
            module.float()
    model.lm_head.float()
    attention.cast_for_flash_attention(model, torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        attention.cast_for_flash_attention(model, torch.float32)


def test_tiled_peak_memory_grows_linearly_not_quadratically():
    torch.manual_seed(0)
    q, k = torch.randn(1, 4, 1024, 32), torch.randn(1, 2, 1024, 32)
    full = causal_visible(1024, 1024)[None, None]
    with torch.no_grad():
        eager = peak_allocated(lambda: eager_reference(q, k, k, full))
        tiled = peak_allocated(lambda: attention.tiled_attention(q, k, k, block=128))
    scores = 4 * 1024 * 1024 * 4  # one fp32 score matrix per head
    assert eager >= scores > 4 * tiled, (eager, tiled)


def test_notebook_inline_online_softmax_equals_lorakit():
    source = code_cells(NOTEBOOKS / "03_flash_attention.ipynb", "# inline: tiled_attention")
    namespace: dict = {"torch": torch}  # the notebook imported torch in an earlier cell
    exec(source, namespace)
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 50, 16), torch.randn(2, 4, 50, 16), torch.randn(2, 4, 50, 16)
    expected = attention.tiled_attention(q, k, v, causal=True)
    torch.testing.assert_close(namespace["online_softmax_attention"](q, k, v, block=16), expected, atol=ATOL, rtol=0)


def test_exercise_check_accepts_the_online_step_and_rejects_the_naive_one(capsys):
    from lorakit.exercises import check_online_softmax_step

    def online(m, total, acc, scores, values):
        m_new = torch.maximum(m, scores.amax(-1))
        p, correction = torch.exp(scores - m_new[:, None]), torch.exp(m - m_new)
        return m_new, total * correction + p.sum(-1), acc * correction[:, None] + p @ values

    def naive(m, total, acc, scores, values):  # right for small scores, overflows near 1000
        p = torch.exp(scores)
        return torch.maximum(m, scores.amax(-1)), total + p.sum(-1), acc + p @ values

    def stub(*args):
        raise NotImplementedError

    assert check_online_softmax_step(online)
    assert not check_online_softmax_step(naive)
    assert "overflowed" in capsys.readouterr().out
    assert not check_online_softmax_step(stub)
