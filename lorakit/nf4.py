"""NF4 from scratch: the 4-bit NormalFloat data type of QLoRA, blockwise absmax quantisation, double quantisation.

    from lorakit.nf4 import NF4_CODEBOOK, quantize_nf4, dequantize_nf4, bits_per_param
    packed, state = quantize_nf4(w)              # (ceil(n/2), 1) uint8: two 4-bit codes per byte
    w_hat = dequantize_nf4(packed, state)        # w's shape and dtype; equal bit for bit to bitsandbytes on CPU

The idea (Dettmers et al., QLoRA, 2023). Pretrained weights are close to normal, so the 16 levels are placed at
quantiles of N(0, 1), each level covering an equal probability mass, rescaled to [-1, 1] with an exact zero:

    w ↦ c_b · NF4[q],  q = argmin_j |w / c_b − NF4[j]|,  c_b = max_{i ∈ block b} |w_i|   (blocks of 64 weights)

Double quantisation stores each c_b as an 8-bit code of the 8-bit "dynamic" type, after subtracting their mean,
with one fp32 scale per 256 constants: bits per weight 4 + 32/64 = 4.5 become 4 + 8/64 + 32/(64·256) ≈ 4.127.
Everything here is plain PyTorch; tests/test_nf4.py holds it bit-exact against bitsandbytes.functional.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Outermost quantile: halfway between 1 − 1/(2·15) and 1 − 1/(2·16), the two natural choices for 15 and 16 bins,
# rounded to 7 digits as bitsandbytes does (the unrounded 0.96770833.. moves the levels by up to 3e-7).
NF4_OFFSET = 0.9677083


def normal_quantile(p: torch.Tensor) -> torch.Tensor:
    """Φ⁻¹(p) = √2 · erfinv(2p − 1), the inverse CDF of N(0, 1), in float64."""
    return math.sqrt(2) * torch.erfinv(2 * p.double() - 1)


def nf4_codebook(offset: float = NF4_OFFSET) -> torch.Tensor:
    """The 16 NF4 levels, sorted, in [-1, 1]: 8 positive quantiles, an exact 0, 7 negative (asymmetric by one).

    The probabilities are spaced evenly from `offset` to 0.5 on each side (in float32, as bitsandbytes computes them),
    mapped through Φ⁻¹ and divided by the largest, so that ±1 are levels and absmax maps onto them exactly.
    """
    positive = normal_quantile(torch.linspace(offset, 0.5, 9)[:-1])  # (8,) largest first
    negative = -normal_quantile(torch.linspace(offset, 0.5, 8)[:-1])  # (7,)
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).float().sort().values  # (16,)
    return values / values.max()


NF4_CODEBOOK = nf4_codebook()

# The two other 4-bit grids the notebook compares with, on the same [-1, 1] absmax scale:
# FP4 (e2m1: sign, 2 exponent bits, 1 mantissa bit, bitsandbytes' bias) and uniform symmetric INT4.
FP4_LEVELS = torch.tensor(sorted({s * v / 12 for s in (1, -1) for v in (0, 0.0625, 2, 3, 4, 6, 8, 12)}))  # (15,)
INT4_LEVELS = torch.arange(-7, 8, dtype=torch.float32) / 7  # (15,)


def dynamic_codebook() -> torch.Tensor:
    """The signed 8-bit dynamic tree type (Dettmers 2016) used for the double-quantised constants, (256,) sorted.

    For exponents e = 0..6, 2^e evenly spaced fraction means in (0.1, 1) are scaled by 10^(e−6), with both signs;
    plus 0 and 1. Dense near 0, sparse near ±1: constants minus their mean are small numbers of either sign.
    """
    values: list[float] = []
    for e in range(7):
        bounds = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        values += ((10 ** (e - 6)) * means).tolist() + (-(10 ** (e - 6)) * means).tolist()
    return torch.tensor(sorted(values + [0.0, 1.0]), dtype=torch.float32)  # (256,)


def nearest_level_table(code: torch.Tensor, size: int = 65536) -> torch.Tensor:
    """(size,) index of the level of `code` nearest to each point of an even grid over [-1, 1].

    bitsandbytes' CPU quantiser (measured on 0.50.2) rounds a normalised value to this grid, then reads the level off the table:
    the nearest level everywhere except within half a grid step (1.5e-5) of a midpoint between two levels.
    """
    grid = torch.arange(size, dtype=torch.float32, device=code.device) / (size - 1) * 2 - 1  # (size,)
    left = (torch.searchsorted(code, grid, right=True) - 1).clamp(0, code.numel() - 1)  # largest j: code[j] <= g
    right = (left + 1).clamp(max=code.numel() - 1)
    return torch.where((grid - code[right]).abs() < (grid - code[left]).abs(), right, left)


@dataclass
class NF4State:
    """Everything dequantize_nf4 needs besides the packed codes.

    absmax: (blocks,) fp32 constants c_b, or (blocks,) uint8 codes of (c_b − offset) when double-quantised.
    offset, absmax2, code2: the double quantisation (mean of c_b, fp32 scale per 256 constants, the dynamic type).
    """

    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    absmax: torch.Tensor
    offset: torch.Tensor | None = None
    absmax2: torch.Tensor | None = None
    code2: torch.Tensor | None = None


def _refuse_non_finite(x: torch.Tensor, name: str, caller: str) -> None:
    """Raise a ValueError naming the index of x's first NaN/inf and how many there are; one isfinite pass otherwise.

    A NaN would spread silently: its block's absmax becomes NaN, so does the mean of all constants that double
    quantisation subtracts, and with it every dequantised weight of the tensor.
    """
    if x.is_meta:  # a meta tensor has a shape but no values (dry runs that only count bytes): nothing to check
        return
    finite = torch.isfinite(x)  # x's shape, bool
    if bool(finite.all()):
        return
    bad = (~finite).reshape(-1).to(torch.uint8)  # (n,) 1 where non-finite
    count = int(bad.sum())
    # argmax returns the first maximum, i.e. the first non-finite value in row-major order, without a nonzero() list
    first = tuple(int(i) for i in torch.unravel_index(bad.argmax(), x.shape))
    raise ValueError(f"{caller}: {name} holds {count} non-finite value{'s' if count > 1 else ''} (NaN/inf), the first "
                     f"at index {first} = {x[first].item()}, which would spoil the quantised tensor; check the weights "
                     f"for NaN/inf before quantising, e.g. torch.isfinite({name}).all()")


def _blockwise_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """(blocks,) max |x| per block; the last block may be partial."""
    padded = torch.nn.functional.pad(flat.abs(), (0, -flat.numel() % blocksize))
    return padded.view(-1, blocksize).amax(dim=1)


def quantize_8bit(x: torch.Tensor, code: torch.Tensor, blocksize: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax 8-bit quantisation onto a sorted 256-level code, as bitsandbytes does it on CPU.

    v = x · (1/absmax_b), then the grid index ⌊((v + 1) · 0.5) · 65535 + 0.5⌋ selects a level from
    nearest_level_table(code). A block of zeros (absmax 0) gets code 0, which dequantises to 0 all the same.

    Args:
        x: (n,) float32.
        code: (256,) sorted levels in [-1, 1].
    Returns:
        q (n,) uint8 and absmax (blocks,) float32.
    Raises:
        ValueError: x holds a NaN or inf (it would poison its block's absmax and every value of that block).
    """
    _refuse_non_finite(x, "x", "quantize_8bit")
    code = code.to(x.device)  # (256,) the lookup table below is built on the code's device and indexed on x's
    absmax = _blockwise_absmax(x, blocksize)  # (blocks,)
    scale = (1.0 / absmax).repeat_interleave(blocksize)[: x.numel()]  # (n,)
    normed = (x * scale).clamp(-1, 1)  # (n,)
    grid = (((normed + 1) * 0.5) * 65535 + 0.5).long()  # (n,) 0..65535
    q = nearest_level_table(code)[grid.clamp(0, 65535)]
    return torch.where(scale.isinf(), 0, q).to(torch.uint8), absmax


def dequantize_8bit(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int = 256) -> torch.Tensor:
    """x̂_i = code[q_i] · absmax[i // blocksize], float32, (n,)."""
    return code.to(q.device)[q.long()] * absmax.repeat_interleave(blocksize)[: q.numel()]


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> tuple[torch.Tensor, NF4State]:
    """Quantise a tensor of any shape and size to NF4 codes, blockwise over its flattened values.

    Args:
        w: (...) float32, bfloat16 or float16; flattened in row-major order, so blocks run along the last dimension.
        blocksize: weights per absmax constant (bitsandbytes accepts 32 .. 4096; QLoRA uses 64).
        double_quant: quantise the constants too (8-bit dynamic type, blocks of 256, after subtracting their mean).
    Returns:
        packed (ceil(n/2), 1) uint8, the first weight of each pair in the high nibble; and the NF4State, on w's device.
    Raises:
        ValueError: a dtype or blocksize bitsandbytes does not take, or a NaN/inf in w (named by its index).
    """
    if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"quantize_nf4 takes float32/bfloat16/float16 weights, got {w.dtype}: convert with .float()")
    if blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        raise ValueError(f"blocksize {blocksize} is not supported: use a power of two from 32 to 4096 (QLoRA: 64)")
    _refuse_non_finite(w, "w", "quantize_nf4")
    flat = w.reshape(-1).float()  # (n,)
    n, full = flat.numel(), flat.numel() - flat.numel() % blocksize
    absmax = _blockwise_absmax(flat, blocksize)  # (blocks,)
    if full < n:  # bitsandbytes stores a partial tail block's absmax clamped to 1e-38 (full blocks keep 0)
        absmax[-1] = absmax[-1].clamp(min=1e-38)
    # bitsandbytes multiplies full blocks by the reciprocal 1/c_b but divides the partial tail block by c_b; the two
    # can differ in the last bit, so both are reproduced here to land on the same side of every level boundary.
    inverse = 1.0 / absmax[: full // blocksize].clamp(min=1e-38)
    head = (flat[:full].view(-1, blocksize) * inverse[:, None]).reshape(-1)  # (full,)
    tail = flat[full:] / absmax[full // blocksize:].clamp(min=1e-38)  # (n - full,)
    scaled = torch.cat([head, tail]).clamp(-1, 1)  # (n,)
    nf4 = NF4_CODEBOOK.to(w.device)  # the module's tables live on the CPU; compute where the weights are
    midpoints = (nf4[:-1] + nf4[1:]) / 2  # (15,) a value on a midpoint takes the lower level
    scaled = torch.nn.functional.pad(scaled, (0, n % 2))  # an odd count is padded with one 0.0 weight (code 7)
    codes = torch.bucketize(scaled, midpoints).to(torch.uint8)  # (n + n % 2,) 0..15
    packed = ((codes[0::2] << 4) | codes[1::2]).unsqueeze(1)  # (ceil(n/2), 1)
    state = NF4State(shape=w.shape, dtype=w.dtype, blocksize=blocksize, absmax=absmax)
    if double_quant:
        state.offset = absmax.mean()
        state.code2 = dynamic_codebook().to(w.device)
        state.absmax, state.absmax2 = quantize_8bit(absmax - state.offset, state.code2, 256)
    return packed, state


def dequantize_nf4(packed: torch.Tensor, state: NF4State) -> torch.Tensor:
    """ŵ_i = c_b · NF4[q_i] with c_b restored from its 8-bit code when double-quantised; w's shape and dtype."""
    absmax = state.absmax
    if state.absmax2 is not None:
        absmax = dequantize_8bit(state.absmax, state.absmax2, state.code2, 256) + state.offset  # (blocks,)
    n = state.shape.numel()
    flat = packed.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[:n].long()  # (n,)
    values = NF4_CODEBOOK.to(codes.device)[codes] * absmax.repeat_interleave(state.blocksize)[:n]  # (n,) float32
    return values.view(state.shape).to(state.dtype)


def state_bytes(packed: torch.Tensor, state: NF4State, per_tensor: bool = False) -> int:
    """Bytes stored per block: packed codes, constants (and their fp32 scales); per_tensor adds offset and codebooks,
    a fixed cost of ~1 KB per tensor that the paper's arithmetic leaves out."""
    tensors = [packed, state.absmax] + ([state.absmax2] if state.absmax2 is not None else [])
    if per_tensor:
        tensors += [NF4_CODEBOOK] + ([state.offset, state.code2] if state.absmax2 is not None else [])
    return sum(t.nelement() * t.element_size() for t in tensors)


def bits_per_param(blocksize: int = 64, double_quant: bool = True) -> float:
    """Bits per weight measured on a real quantised tensor of 16 · 256 blocks.

    Equals the QLoRA arithmetic: 4 + 32/blocksize without double quantisation (4.5 at 64),
    4 + 8/blocksize + 32/(256 · blocksize) with it (4.127 at 64).
    """
    w = torch.randn(16 * 256 * blocksize, generator=torch.Generator().manual_seed(0))
    packed, state = quantize_nf4(w, blocksize, double_quant)
    return 8 * state_bytes(packed, state) / w.numel()


def fake_quantize(w: torch.Tensor, levels: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """Round each weight to the nearest of `levels` (sorted, in [-1, 1]) on a blockwise absmax scale, and back:
    the quantisation error of any 4-bit grid (NF4, FP4, INT4) without packing. Same shape and dtype as w."""
    flat = w.reshape(-1).float()  # (n,)
    levels = levels.to(flat.device)  # (L,) the grids above are CPU tensors; compute where the weights are
    scale = _blockwise_absmax(flat, blocksize).clamp(min=1e-38).repeat_interleave(blocksize)[: flat.numel()]  # (n,)
    nearest = (flat[:, None] / scale[:, None] - levels[None, :]).abs().argmin(dim=1)  # (n,)
    return (levels[nearest] * scale).view(w.shape).to(w.dtype)
