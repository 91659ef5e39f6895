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
