"""lorakit.nf4 against bitsandbytes.functional as the oracle: codebooks, codes, constants, dequantised values."""

import logging

import pytest
import torch

from lorakit.course import NOTEBOOKS, code_cells
from lorakit.models import load_base
from lorakit.nf4 import (
    FP4_LEVELS,
    INT4_LEVELS,
    NF4_CODEBOOK,
    dequantize_nf4,
    dynamic_codebook,
    fake_quantize,
    nf4_codebook,
    quantize_8bit,
    quantize_nf4,
    state_bytes,
)
from lorakit.nf4 import bits_per_param as lorakit_bits_per_param

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
F = pytest.importorskip("bitsandbytes.functional")

NOTEBOOK = NOTEBOOKS / "02_nf4_4bit_loading.ipynb"


def assert_same_as_bitsandbytes(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> None:
    packed, state = quantize_nf4(w, blocksize, double_quant)
    packed_bnb, state_bnb = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")
    assert torch.equal(packed, packed_bnb), f"{(packed != packed_bnb).sum().item()} packed bytes differ"
    assert torch.equal(state.absmax, state_bnb.absmax)
    if double_quant:
        assert torch.equal(state.offset, state_bnb.offset)
        assert torch.equal(state.absmax2, state_bnb.state2.absmax)
        assert torch.equal(state.code2, state_bnb.state2.code)
    ours, theirs = dequantize_nf4(packed, state), F.dequantize_4bit(packed_bnb, state_bnb)
    # the one explained difference: bitsandbytes' CPU kernel returns a 1-D tensor as (1, n); values are identical
    expected_shape = (1, w.numel()) if w.dim() == 1 and w.numel() % 2 == 0 else w.shape
    assert theirs.shape == expected_shape and ours.shape == w.shape and ours.dtype == theirs.dtype == w.dtype
    assert torch.equal(ours.reshape(-1), theirs.reshape(-1)), f"{(ours.reshape(-1) != theirs.reshape(-1)).sum()} differ"


def test_codebook_is_bitsandbytes_table():
    assert torch.equal(NF4_CODEBOOK, F.get_4bit_type("nf4", device="cpu"))


def test_codebook_shape_of_the_type():
    levels = NF4_CODEBOOK.tolist()
    assert len(levels) == 16 and levels == sorted(levels)
    assert levels[0] == -1.0 and levels[-1] == 1.0 and levels[7] == 0.0  # exact zero, both ends reachable
    assert sum(v > 0 for v in levels) == 8 and sum(v < 0 for v in levels) == 7  # asymmetric by one level


def test_unrounded_offset_moves_levels_by_ulps_only():
    exact = nf4_codebook(0.5 * ((1 - 1 / 30) + (1 - 1 / 32)))
    assert 0 < (exact - NF4_CODEBOOK).abs().max() <= 3e-7


def test_dynamic_codebook_is_bitsandbytes_map():
    assert torch.equal(dynamic_codebook(), F.create_dynamic_map())


def test_other_4bit_grids():
    fp4 = F.get_4bit_type("fp4", device="cpu")
    assert torch.equal(FP4_LEVELS, fp4.unique().sort().values)  # +0 and -0 are one level
    assert INT4_LEVELS.numel() == 15 and torch.allclose(INT4_LEVELS.diff(), torch.full((14,), 2 / 14))


SHAPES = [(1,), (3,), (63,), (64,), (65,), (127, 129), (7, 13, 31), (300, 300), (256 * 64 + 5,)]


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_parity_random_odd_sizes(shape, double_quant):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape) * 1000 + shape[0]))
    assert_same_as_bitsandbytes(w, double_quant=double_quant)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_parity_half_precision(dtype):
    assert_same_as_bitsandbytes((torch.randn(1000, 333) * 0.02).to(dtype))


@pytest.mark.parametrize("blocksize", [32, 128, 256, 4096])
def test_parity_block_sizes(blocksize):
    assert_same_as_bitsandbytes(torch.randn(123, 457), blocksize=blocksize)


def test_parity_zero_blocks():
    w = torch.randn(300) * 0.02
    w[:64] = 0  # a zero block: absmax 0, every code the exact zero
    assert_same_as_bitsandbytes(w)
    assert_same_as_bitsandbytes(torch.zeros(200))


def test_parity_on_the_base_model_weights():
    model = load_base("tiny")[0]
    checked = 0
    for _, param in model.named_parameters():
        if param.dim() == 2:
            for double_quant in (True, False):
                assert_same_as_bitsandbytes(param.detach(), double_quant=double_quant)
                checked += 1
    assert checked >= 2 * 15  # 14 linear weights + the embedding


def test_error_within_half_a_level_gap():
    w = torch.randn(64 * 50, generator=torch.Generator().manual_seed(1))
    packed, state = quantize_nf4(w, double_quant=False)
    error = (dequantize_nf4(packed, state) - w).abs().view(-1, 64)
    half_gap = NF4_CODEBOOK.diff().max() / 2
    assert (error <= state.absmax[:, None] * half_gap * (1 + 1e-6)).all()


def test_bits_per_param_is_the_paper_arithmetic():
    assert lorakit_bits_per_param(64, double_quant=False) == 4 + 32 / 64 == 4.5
    assert lorakit_bits_per_param(64, double_quant=True) == 4 + 8 / 64 + 32 / (64 * 256)
    assert round(lorakit_bits_per_param(64, double_quant=True), 3) == 4.127


def test_state_bytes_per_tensor_adds_the_fixed_cost():
    packed, state = quantize_nf4(torch.randn(64, 64))
    assert state_bytes(packed, state, per_tensor=True) - state_bytes(packed, state) == 16 * 4 + 4 + 256 * 4


def test_fake_quantize_nf4_agrees_with_quantize_nf4():
    w = torch.randn(200, 64, generator=torch.Generator().manual_seed(2))
    packed, state = quantize_nf4(w, double_quant=False)
    agree = (fake_quantize(w, NF4_CODEBOOK) == dequantize_nf4(packed, state)).float().mean().item()
    assert agree > 0.999  # only a value on a level midpoint may round the other way (division vs reciprocal)


@pytest.mark.parametrize("bad, match", [(torch.arange(10), "int64"), (torch.randn(10, dtype=torch.float64), "float64")])
def test_bad_dtype_is_named(bad, match):
    with pytest.raises(ValueError, match=match):
        quantize_nf4(bad)


def test_bad_blocksize_is_named():
    with pytest.raises(ValueError, match="blocksize 48"):
        quantize_nf4(torch.randn(10), blocksize=48)


# (shape, positions set non-finite, value, the message's count and first index in row-major order)
NON_FINITE = [
    ((8, 64), [(3, 17)], float("nan"), r"w holds 1 non-finite value \(NaN/inf\), the first at index \(3, 17\) = nan"),
    ((8, 64), [(5, 1), (3, 17)], float("inf"), r"w holds 2 non-finite values .* index \(3, 17\) = inf"),
    ((2, 3, 65), [(1, 2, 64)], float("-inf"), r"w holds 1 non-finite value .* index \(1, 2, 64\) = -inf"),
    ((65,), [(64,)], float("nan"), r"w holds 1 non-finite value .* index \(64,\) = nan"),  # alone in a partial tail block
    ((300, 300), [(299, 299), (0, 0), (150, 7)], float("nan"), r"w holds 3 non-finite values .* index \(0, 0\) = nan"),
]
FIX = r"check the weights for NaN/inf before quantising, e.g. torch.isfinite\(w\).all\(\)"


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape, positions, value, match", NON_FINITE, ids=[str(c[1]) for c in NON_FINITE])
def test_non_finite_weight_is_named_by_its_index(shape, positions, value, match, dtype, double_quant):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    for position in positions:
        w[position] = value
    with pytest.raises(ValueError, match=f"^quantize_nf4: {match}.*{FIX}$"):
        quantize_nf4(w, double_quant=double_quant)
    for position in positions:  # the same tensor without them is quantised exactly as bitsandbytes does
        w[position] = 0.5
    assert_same_as_bitsandbytes(w, double_quant=double_quant)


@pytest.mark.parametrize("position, value", [(0, float("nan")), (300, float("inf")), (511, float("-inf"))])
def test_quantize_8bit_names_a_non_finite_value(position, value):
    x = torch.randn(512, generator=torch.Generator().manual_seed(0))
    x[position] = value
    with pytest.raises(ValueError, match=rf"^quantize_8bit: x holds 1 non-finite value .* index \({position},\) = "
                                         rf"{value}.*torch.isfinite\(x\).all\(\)$"):
        quantize_8bit(x, dynamic_codebook())


@pytest.mark.parametrize("double_quant", [True, False])
def test_quantize_and_dequantize_follow_the_input_device(double_quant):
    """The module's codebooks are CPU tensors; quantisation must run on w's device. Here that is "meta" (shapes and
    dtypes, no values), which fails the same way CUDA does when a CPU table meets another device's tensor."""
    w = torch.empty(40, 97, device="meta")
    packed, state = quantize_nf4(w, double_quant=double_quant)
    on_device = [packed, state.absmax] + ([state.offset, state.absmax2, state.code2] if double_quant else [])
    assert all(t.device.type == "meta" for t in on_device)
    w_hat = dequantize_nf4(packed, state)
    assert w_hat.device.type == "meta" and w_hat.shape == w.shape and w_hat.dtype == w.dtype
    cpu = quantize_nf4(torch.randn(40, 97), double_quant=double_quant)
    assert state_bytes(packed, state, per_tensor=True) == state_bytes(*cpu, per_tensor=True)
    assert fake_quantize(w, NF4_CODEBOOK).device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("double_quant", [True, False])
def test_cuda_input_is_quantised_on_cuda_like_on_cpu(double_quant):
    w = torch.randn(127, 129, generator=torch.Generator().manual_seed(0))
    packed, state = quantize_nf4(w.cuda(), double_quant=double_quant)
    packed_cpu, state_cpu = quantize_nf4(w, double_quant=double_quant)
    w_hat = dequantize_nf4(packed, state)
    assert packed.is_cuda and state.absmax.is_cuda and w_hat.is_cuda
    if double_quant:  # the mean of the constants may sum in another order on the GPU, moving a rare code by one
        assert (w_hat.cpu() == dequantize_nf4(packed_cpu, state_cpu)).float().mean() > 0.99
    else:  # amax, IEEE division and comparisons only: the same bits on any device
        assert torch.equal(packed.cpu(), packed_cpu) and torch.equal(state.absmax.cpu(), state_cpu.absmax)


def test_notebook_inline_copy_equals_lorakit():
    """The from-scratch cell of notebook 02 and lorakit.nf4 must not drift apart."""
    namespace: dict = {}
    exec(code_cells(NOTEBOOK, "# inline: quantize_nf4"), namespace)
    for shape in [(65,), (40, 96), (3, 5, 7)]:
        w = torch.randn(shape, generator=torch.Generator().manual_seed(shape[0]))
        for double_quant in (True, False):
            packed, state = quantize_nf4(w, double_quant=double_quant)
            packed_nb, state_nb = namespace["quantize_nf4"](w, double_quant=double_quant)
            assert torch.equal(packed_nb, packed)
            assert torch.equal(namespace["dequantize_nf4"](packed_nb, state_nb), dequantize_nf4(packed, state))
    assert torch.equal(namespace["NF4_CODEBOOK"], NF4_CODEBOOK)


def _pack_right(codes):
    codes = torch.nn.functional.pad(codes, (0, codes.numel() % 2), value=7)
    return ((codes[0::2] << 4) | codes[1::2]).unsqueeze(1)


def _pack_low_nibble_first(codes):
    codes = torch.nn.functional.pad(codes, (0, codes.numel() % 2), value=7)
    return ((codes[1::2] << 4) | codes[0::2]).unsqueeze(1)


def _not_written(codes):
    raise NotImplementedError


@pytest.mark.parametrize("fn, expected", [(_pack_right, True), (_pack_low_nibble_first, False), (_not_written, False)])
def test_exercise_check_pack_4bit(fn, expected, capsys):
    from lorakit.exercises import check_pack_4bit

    assert check_pack_4bit(fn) is expected
    assert ("not written yet" in capsys.readouterr().out) == (fn is _not_written)
