"""Checks for notebook 08 (will it fit?): two "your turn" cells."""

from __future__ import annotations

from collections.abc import Callable

from lorakit.exercises.common import attempt, conclude, run_cases

# ---- 08 Will it fit? ----


def check_loss_bytes(fn: Callable) -> bool:
    """Notebook 08: fn(batch, seq, vocab) -> bytes of the three fp32 batch×seq×vocab tensors alive in the loss backward.

    The oracle is lorakit.memory.plan on configs whose peak is the loss backward: its "logits and loss" part.
    """
    from lorakit import memory

    cases = {name: (name, batch, seq) for name, batch, seq in
             (("smollm2-135m", 8, 1024), ("llama-3.1-8b", 1, 4096), ("qwen2.5-7b", 2, 2048))}

    def judge(case: tuple[str, int, int]) -> tuple[str | None, str]:
        name, batch, seq = case
        plan = memory.plan(name, method="qlora", batch=batch, seq=seq)
        expected, vocab = plan.parts["logits and loss"], memory.shapes(name).vocab
        got, error = attempt(fn, batch, seq, vocab)
        if error is None and got != expected:
            error = (f"expected {expected:,} bytes ({expected / 2**30:.2f} GiB), got {got!r}" +
                     (" (that is one copy: count all three)" if got == expected // 3 else "") +
                     (" (bf16? the loss upcasts to fp32)" if got == expected // 2 else ""))
        return error, f"{expected / 2**30:.2f} GiB for vocab {vocab:,}"

    ok, details = run_cases(cases.items(), judge)
    return conclude(ok, details, "you sized the loss's fp32 tensors as the planner does",
                    "not the bytes the loss backward holds",
                    "hint: log-softmax output, its gradient and the logits' gradient: 3 tensors of batch×seq×vocab "
                    "float32 values (4 bytes each)")


def check_nf4_bytes(fn: Callable) -> bool:
    """Notebook 08: fn(numel) -> bytes bitsandbytes keeps for one weight of `numel` values in NF4 with double
    quantisation (block 64; the absmax constants in 8 bits with one fp32 per 256 of them).

    The oracle is bitsandbytes itself: every tensor of a real quantize_4bit result (codes, absmax, offset, code tables).
    """
    import torch
    from bitsandbytes.functional import quantize_4bit

    def stored(numel: int) -> int:
        packed, state = quantize_4bit(torch.randn(numel), blocksize=64, compress_statistics=True, quant_type="nf4")
        parts = [packed, state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code]
        return sum(t.numel() * t.element_size() for t in parts)

    cases = {f"{n:,} weights": n for n in (64 * 64, 576 * 1536, 1000 * 333, 65)}

    def judge(numel: int) -> tuple[str | None, str]:
        expected = stored(numel)
        got, error = attempt(fn, numel)
        if error is None and got != expected:
            error = f"bitsandbytes stores {expected:,} bytes, you said {got!r}"
        return error, f"{expected:,} bytes = {8 * expected / numel:.3f} bits per weight"

    ok, details = run_cases(cases.items(), judge)
    return conclude(ok, details, "your NF4 byte count equals what bitsandbytes stores",
                    "not what bitsandbytes stores",
                    "hint: ceil(n/2) packed bytes, one uint8 absmax per block of 64 (round up), one fp32 per 256 "
                    "absmax (round up), an fp32 offset, and two fp32 code tables of 16 and 256 values")
