"""lorakit.lora: invariants from a table of cases, and peft as the oracle for forward, gradients, counts and files."""

import copy
import math
import re

import numpy as np
import pytest
import torch
from torch import nn

from lorakit.course import NOTEBOOKS, code_cells
from lorakit.lora import (
    LoRAConfig,
    LoRALinear,
    add_lora,
    count_parameters,
    load_lora,
    lora_disabled,
    lora_layers,
    lora_state_dict,
    merge_lora,
    save_lora,
    to_peft,
    unmerge_lora,
)
from lorakit.models import load_base

# (d_in, d_out, r, alpha, use_rslora, bias)
CASES = [
    (16, 12, 1, 1.0, False, False),
    (32, 48, 4, 8.0, False, True),
    (64, 64, 8, 16.0, True, False),
    (24, 8, 16, 32.0, True, True),  # r larger than d_out: allowed, just wasteful
]
MERGE_ATOL = 1e-5  # fp32: W0 x + s B A x and (W0 + s B A) x round differently, by ~1e-7 relative


def _layer(d_in, d_out, r, alpha, use_rslora, bias, seed=0, dropout=0.0):
    torch.manual_seed(seed)
    layer = LoRALinear(nn.Linear(d_in, d_out, bias=bias), r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora)
    return layer


def _randomise_b(model_or_layer, seed=1, std=0.05):
    generator = torch.Generator().manual_seed(seed)
    layers = [model_or_layer] if isinstance(model_or_layer, LoRALinear) else lora_layers(model_or_layer).values()
    with torch.no_grad():
        for layer in layers:
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * std)


@pytest.fixture(scope="module")
def tiny():
    return load_base("tiny")


def _ids(tok, texts=("reverse: abcd", "copy: xyz")):
    return tok(list(texts), return_tensors="pt", padding=True)


@pytest.mark.parametrize("case", CASES)
def test_init_is_kaiming_uniform_a_and_zero_b(case):
    d_in, d_out, r, *_ = case
    layer = _layer(*case, seed=3)
    torch.manual_seed(3)
    nn.Linear(d_in, d_out, bias=case[-1])  # the base layer draws from the generator first
    expected = nn.init.kaiming_uniform_(torch.empty(r, d_in), a=math.sqrt(5))
    assert torch.equal(layer.lora_A, expected)
    assert torch.count_nonzero(layer.lora_B) == 0
    assert layer.scaling == (case[3] / math.sqrt(r) if case[4] else case[3] / r)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("train", [False, True])
def test_b_zero_gives_the_base_output_exactly(case, train):
    layer = _layer(*case, dropout=0.1).train(train)
    x = torch.randn(3, 5, case[0])  # (B, T, d_in)
    assert torch.equal(layer(x), layer.base_layer(x))


def test_only_lora_parameters_get_gradients_and_change(tiny):
    model = copy.deepcopy(tiny[0])
    add_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)
    _randomise_b(model)  # with B = 0, dL/dA = 0: give A a gradient to receive
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = _ids(tiny[1])
    model.train()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    for name, param in model.named_parameters():
        is_lora = name.endswith(("lora_A", "lora_B"))
        assert param.requires_grad == is_lora, name
        assert (param.grad is not None and param.grad.abs().sum() > 0) == is_lora, name
        assert (not torch.equal(param, before[name])) == is_lora, name


@pytest.mark.parametrize("case", CASES)
def test_merged_equals_unmerged_and_unmerge_restores_w0(case):
    layer = _layer(*case)
    _randomise_b(layer, std=0.5)
    w0 = layer.base_layer.weight.detach().clone()
    x = torch.randn(4, case[0])
    unmerged = layer(x)
    layer.merge()
    layer.merge()  # idempotent: a second merge must not add the update twice
    torch.testing.assert_close(layer(x), unmerged, atol=MERGE_ATOL, rtol=0)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), unmerged, atol=MERGE_ATOL, rtol=0)


def test_merged_model_equals_unmerged_model(tiny):
    model = copy.deepcopy(tiny[0])
    add_lora(model, ["q_proj", "k_proj", "v_proj", "o_proj"], r=8, alpha=16)
    _randomise_b(model)
    batch = _ids(tiny[1])
    with torch.no_grad():
        unmerged = model(**batch).logits
        merge_lora(model)
        merged = model(**batch).logits
        unmerge_lora(model)
        again = model(**batch).logits
    torch.testing.assert_close(merged, unmerged, atol=MERGE_ATOL * 10, rtol=0)  # two layers of rounding
    torch.testing.assert_close(again, unmerged, atol=MERGE_ATOL * 10, rtol=0)


def test_disabling_restores_the_base_exactly(tiny):
    base, tok = tiny
    model = copy.deepcopy(base)
    add_lora(model, ["q_proj", "v_proj"], r=8, alpha=16)
    _randomise_b(model)
    batch = _ids(tok)
    with torch.no_grad():
        reference, adapted = base(**batch).logits, model(**batch).logits
        with lora_disabled(model):
            disabled = model(**batch).logits
        assert torch.equal(disabled, reference)
        assert not torch.allclose(adapted, reference)
        assert torch.equal(model(**batch).logits, adapted)  # enabled again on exit
        merge_lora(model)
        with pytest.raises(RuntimeError, match="unmerge"):
            with lora_disabled(model):
                pass


def test_save_load_round_trip_is_exact(tiny, tmp_path):
    base, tok = tiny
    model = copy.deepcopy(base)
    names = add_lora(model, ["q_proj", "v_proj"], r=4, alpha=8, dropout=0.05, use_rslora=True)
    _randomise_b(model)
    path = save_lora(model, tmp_path / "adapter.safetensors")
    fresh = copy.deepcopy(base)
    assert load_lora(fresh, path) == names
    saved, loaded = lora_state_dict(model), lora_state_dict(fresh)
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert {str(m.config) for m in lora_layers(fresh).values()} == {str(m.config) for m in lora_layers(model).values()}
    batch = _ids(tok)
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, model(**batch).logits)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_forward_and_gradients_equal_peft(case, dropout):
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLinear

    d_in, d_out, r, alpha, use_rslora, bias = case
    ours = _layer(*case, dropout=dropout).train()
    _randomise_b(ours, std=0.3)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=use_rslora)
    theirs = PeftLinear(copy.deepcopy(ours.base_layer), "default", config, r=r, lora_alpha=alpha).train()
    with torch.no_grad():
        theirs.lora_A["default"].weight.copy_(ours.lora_A)
        theirs.lora_B["default"].weight.copy_(ours.lora_B)
    x = torch.randn(2, 7, d_in)  # (B, T, d_in)
    outputs, grads = [], []
    for layer, params in ((ours, [ours.lora_A, ours.lora_B]),
                          (theirs, [theirs.lora_A["default"].weight, theirs.lora_B["default"].weight])):
        xi = x.clone().requires_grad_()
        torch.manual_seed(7)  # the same dropout mask on both sides
        y = layer(xi)
        y.pow(2).sum().backward()
        outputs.append(y.detach())
        grads.append([xi.grad, *(p.grad for p in params)])
    assert ours.scaling == theirs.scaling["default"]
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-6, rtol=1e-6)
    for name, g_ours, g_theirs in zip(("x", "A", "B"), *grads, strict=True):
        torch.testing.assert_close(g_ours, g_theirs, atol=1e-5, rtol=1e-5, msg=f"gradient of {name} differs")


@pytest.mark.parametrize("r", [1, 8, 64])
def test_count_parameters_equals_peft(tiny, r):
    from peft import LoraConfig, get_peft_model

    ours = copy.deepcopy(tiny[0])
    add_lora(ours, ["q_proj", "v_proj"], r=r, alpha=2 * r)
    theirs = get_peft_model(copy.deepcopy(tiny[0]), LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"]))
    assert count_parameters(ours) == theirs.get_nb_trainable_parameters()
    assert count_parameters(ours)[0] == r * 2 * ((128 + 128) + (128 + 64))  # 2 layers x (q: 128->128, v: 128->64)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["model.layers.0.self_attn.q_proj", "o_proj"]])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_converted_adapter_loads_in_peft_with_the_same_logits(tiny, tmp_path, targets, use_rslora):
    from peft import PeftModel

    base, tok = tiny
    model = copy.deepcopy(base)
    names = add_lora(model, targets, r=4, alpha=16, use_rslora=use_rslora)
    _randomise_b(model)
    to_peft(model, tmp_path)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    peft_names = [n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")
                  and hasattr(m, "base_layer")]
    assert peft_names == names
    batch = _ids(tok)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**batch).logits, model(**batch).logits, atol=1e-6, rtol=0)


def test_bad_targets_and_settings_get_clear_errors(tiny):
    model = copy.deepcopy(tiny[0])
    with pytest.raises(ValueError, match=r"\['q_prj'\].*'down_proj'.*'q_proj'"):
        add_lora(model, ["q_prj", "v_proj"])
    assert not lora_layers(model)  # nothing half-done
    with pytest.raises(ValueError, match="rank r=0 must be a positive integer"):
        add_lora(model, ["q_proj"], r=0)
    with pytest.raises(ValueError, match="dropout"):
        add_lora(model, ["q_proj"], dropout=1.0)
    add_lora(model, ["q_proj"])
    with pytest.raises(ValueError, match="already carry LoRA"):
        add_lora(model, ["q_proj"])
    with pytest.raises(TypeError, match="wraps an nn.Linear"):
        LoRALinear(nn.Conv1d(2, 2, 1))


# each bad value is refused with a message naming it, then the fix
FIXES = {"alpha": r"must be a finite number > 0; a common choice is 2 x r \(alpha=16 for r=8\)",
         "r": "must be a positive integer; the usual values are 4 to 64", "use_rslora": "must be True or False",
         "dropout": r"must be a number in \[0, 1\); 0.05 is a common value"}
BAD_VALUES = {"alpha": (math.nan, math.inf, -math.inf, 0.0, -16, "16", True), "r": (0, -4, 8.0, True),
              "dropout": (math.nan, 1.0, -0.1, "0.1"), "use_rslora": ("no", 1)}
BAD_SETTINGS = [(k, v, rf"{k}={re.escape(repr(v))} {FIXES[k]}") for k, values in BAD_VALUES.items() for v in values]
ENTRIES = {"add_lora": lambda model, kw: add_lora(model, ["0"], **kw),
           "LoRALinear": lambda model, kw: LoRALinear(model[0], **kw), "LoRAConfig": lambda model, kw: LoRAConfig(**kw)}


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("key, value, match", BAD_SETTINGS, ids=[f"{k}={v!r}" for k, v, _ in BAD_SETTINGS])
def test_bad_setting_is_named_before_anything_changes(entry, key, value, match):
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    with pytest.raises(ValueError, match=match):
        ENTRIES[entry](model, {key: value})
    assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())  # nothing half-done


# (setting, valid value, expected scaling with the others at their defaults r=8, alpha=16)
GOOD_SETTINGS = [("alpha", 16, 2.0), ("alpha", 1e-3, 1.25e-4), ("alpha", np.float32(8.0), 1.0), ("r", 1, 16.0),
                 ("r", np.int64(4), 4.0), ("dropout", 0.999, 2.0), ("use_rslora", True, 16 / math.sqrt(8))]


@pytest.mark.parametrize("key, value, scaling", GOOD_SETTINGS, ids=[f"{k}={v!r}" for k, v, _ in GOOD_SETTINGS])
def test_valid_setting_is_accepted(key, value, scaling):
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    assert add_lora(model, ["0"], **{key: value}) == ["0"] and model[0].scaling == pytest.approx(scaling)
    assert torch.isfinite(model(torch.randn(2, 4))).all()


NOTEBOOK = NOTEBOOKS / "01_low_rank_math.ipynb"


@pytest.mark.parametrize("case", [c for c in CASES if not c[4]])  # the inline layer teaches alpha / r only
def test_notebook_inline_layer_equals_lorakit(case):
    namespace: dict = {}
    exec(code_cells(NOTEBOOK, "# inline: LoRALinear"), namespace)
    d_in, d_out, r, alpha, _, bias = case
    ours = _layer(*case, seed=5)
    torch.manual_seed(5)
    inline = namespace["LoRALinear"](nn.Linear(d_in, d_out, bias=bias), r=r, alpha=alpha)
    assert torch.equal(inline.A, ours.lora_A) and torch.equal(inline.B, ours.lora_B)  # same init, same draws
    _randomise_b(ours, std=0.3)
    with torch.no_grad():
        inline.B.copy_(ours.lora_B)
    x = torch.randn(3, d_in)
    assert torch.equal(inline(x), ours(x))
    inline.merge()
    ours.merge()
    assert torch.equal(inline.base.weight, ours.base_layer.weight)


def test_exercise_check_accepts_the_solution_and_rejects_mistakes(capsys):
    from lorakit.exercises import check_merged_weight

    def stub(W0, A, B, alpha, r):
        raise NotImplementedError

    def in_place(W0, A, B, alpha, r):
        return W0.add_((alpha / r) * (B @ A))

    assert check_merged_weight(lambda W0, A, B, alpha, r: W0 + (alpha / r) * (B @ A))
    assert not check_merged_weight(stub)
    assert "not written yet" in capsys.readouterr().out
    assert not check_merged_weight(lambda W0, A, B, alpha, r: W0 + alpha * (B @ A))  # forgot to divide by r
    assert "values differ" in capsys.readouterr().out
    assert not check_merged_weight(lambda W0, A, B, alpha, r: W0 + (alpha / r) * (A.T @ B.T))  # wrong shape
    assert not check_merged_weight(in_place)
    assert "in place" in capsys.readouterr().out
