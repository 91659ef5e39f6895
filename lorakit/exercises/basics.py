"""Checks for notebooks 00 (start here), 01 (low-rank math) and 02 (NF4): two "your turn" cells each."""

from __future__ import annotations

from collections.abc import Callable

import torch

from lorakit.exercises.common import attempt, compare_tensors, conclude, run_cases, verdict

# ---- 00 start here ----


def check_reverse_answer(fn: Callable) -> bool:
    """Notebook 00 (warm-up): fn("reverse: abcd") must return "dcba", the reference answer of every record in
    data/task/train.jsonl (FastChat format: the human turn asks, the gpt turn answers)."""
    import json

    from lorakit.models import TASK_DIR

    lines = (TASK_DIR / "train.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    wrong = []
    for rec in records:
        question, answer = rec["conversations"][0]["value"], rec["conversations"][1]["value"]
        got, error = attempt(fn, question)
        if error:
            return verdict(False, "reverse_answer raised an error", [error])
        if got != answer:
            wrong.append(f"{question!r}: expected {answer!r}, got {got!r}")
    return conclude(not wrong, wrong[:3] or ["this is the reference the model is graded against: exact match, "
                                             "character for character"],
                    f"reverse_answer matches all {len(records)} training answers",
                    f"reverse_answer is wrong on {len(wrong)} of {len(records)} training records",
                    'hint: the word is what follows "reverse: "; s[::-1] reverses a string')


def check_chat_prompt(fn: Callable) -> bool:
    """Notebook 00 (harder): fn(question) must build, as a plain string, the exact prompt the model sees before it
    answers — what tokenizer.apply_chat_template(..., add_generation_prompt=True) renders for one user turn."""
    from lorakit.models import load_base

    _, tokenizer = load_base("tiny")
    problems = []
    for question in ["reverse: abc", "upper: kiwi", "", "add: 12+30"]:
        expected = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                                 add_generation_prompt=True, tokenize=False)
        got, error = attempt(fn, question)
        if error:
            return verdict(False, "chat_prompt raised an error", [error])
        if got != expected:
            problems.append(f"{question!r}: expected {expected!r}, got {got!r}")
    return conclude(not problems, problems[:3] or [
        "the model answers after <|assistant|>; generation stops at the end-of-sequence token </s>"],
        "chat_prompt matches apply_chat_template on 4 questions",
        "chat_prompt does not match the tokenizer's chat template yet",
        "hint: print(tokenizer.chat_template), or render one example with apply_chat_template(tokenize=False)")


# ---- 01 low-rank math ----


def check_merged_weight(fn: Callable) -> bool:
    """Notebook 01: fn(W0, A, B, alpha, r) must return W0 + (alpha / r) B A, the weight that makes LoRA free at
    inference. The expected values come from lorakit.lora.LoRALinear.merge()."""
    from torch import nn

    from lorakit.lora import LoRALinear

    generator = torch.Generator().manual_seed(0)
    problems = []
    for d_in, d_out, r, alpha in [(6, 4, 2, 4.0), (16, 8, 4, 16.0), (32, 32, 8, 8.0)]:
        layer = LoRALinear(nn.Linear(d_in, d_out, bias=False), r=r, alpha=alpha)
        with torch.no_grad():
            layer.base_layer.weight.copy_(torch.randn(d_out, d_in, generator=generator))
            layer.lora_A.copy_(torch.randn(r, d_in, generator=generator))
            layer.lora_B.copy_(torch.randn(d_out, r, generator=generator))
        w0, a, b = (t.detach().clone() for t in (layer.base_layer.weight, layer.lora_A, layer.lora_B))
        got, error = attempt(fn, w0, a, b, alpha, r)
        if error:
            return verdict(False, "merged_weight raised an error", [error])
        untouched = all(torch.equal(x, y) for x, y in ((w0, layer.base_layer.weight), (a, layer.lora_A),
                                                        (b, layer.lora_B)))
        layer.merge()
        problem = compare_tensors(f"W0 {tuple(w0.shape)}, r={r}, alpha={alpha:g}", got, layer.base_layer.weight)
        if problem is None and not untouched:
            problem = "your function changed W0, A or B in place: return a new tensor instead"
        if problem:
            problems.append(problem)
    return conclude(not problems, problems or ["one (d_out, d_in) matmul at inference, exactly as cheap as the base "
                                               "layer"],
                    "merged_weight matches LoRALinear.merge() on 3 shapes",
                    "merged_weight is not W0 + (alpha / r) B A yet",
                    "hint: B is (d_out, r) and A is (r, d_in), so B @ A has the shape of W0")


def check_lora_from_delta(fn: Callable) -> bool:
    """Notebook 01 (harder): fn(delta (d_out, d_in), r, alpha) -> (A (r, d_in), B (d_out, r)) such that the LoRA
    update (alpha / r) B A is the best rank-r approximation of delta: how a LoRA is extracted from a full fine-tune.

    The oracle is torch.linalg.svd: by Eckart–Young the truncated SVD U_r diag(S_r) V_rᵀ is the closest matrix of
    rank r, unique here because the test matrices have distinct singular values.
    """

    def judge(case: tuple[int, int, int, float]) -> tuple[str | None, str]:
        d_out, d_in, r, alpha = case
        gen = torch.Generator().manual_seed(d_out + r)
        # like the ΔW of section 2: directions of decaying strength, and a little noise everywhere
        k = min(d_out, d_in)
        delta = ((torch.randn(d_out, k, generator=gen) * 0.6 ** torch.arange(k)) @ torch.randn(k, d_in, generator=gen)
                 / d_in**0.5 + 0.01 * torch.randn(d_out, d_in, generator=gen))  # (d_out, d_in)
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)  # (d_out, m), (m,), (m, d_in)
        best = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]  # (d_out, d_in), rank r
        got, error = attempt(fn, delta.clone(), r, alpha)
        if error is None and not (isinstance(got, tuple | list) and len(got) == 2):
            error = f"expected a tuple (A, B), got {type(got).__name__}"
        if error is None:
            A, B = got
            for label, factor, shape in (("A", A, (r, d_in)), ("B", B, (d_out, r))):
                if error is None and (not isinstance(factor, torch.Tensor) or tuple(factor.shape) != shape):
                    error = compare_tensors(label, factor, torch.zeros(shape))
            if error is None:
                update = (alpha / r) * (B.detach().float() @ A.detach().float())  # (d_out, d_in)
                error = compare_tensors("(alpha / r) B A", update, best, atol=1e-4 * best.abs().max().item())
        left = ((delta - best).norm() / delta.norm()).item()
        return error, f"the best rank-{r} update; it misses {left:.1%} of ΔW, the Eckart–Young minimum"

    cases = ((64, 128, 8, 16.0), (32, 32, 4, 4.0), (48, 16, 2, 32.0))
    ok, details = run_cases(((f"ΔW {(d_out, d_in)}, r={r}, alpha={alpha:g}", (d_out, d_in, r, alpha))
                             for d_out, d_in, r, alpha in cases), judge)
    return conclude(ok, details, "lora_from_delta extracts the best rank-r LoRA",
                    "lora_from_delta needs another look",
                    "hint: U, S, Vh = torch.linalg.svd(delta, full_matrices=False); keep the top r directions, "
                    "and remember the layer multiplies B A by alpha / r")

# ---- 02 NF4 ----


def check_pack_4bit(fn: Callable) -> bool:
    """Notebook 02: fn(codes (n,) uint8 0..15) -> (ceil(n/2), 1) uint8, high nibble first, odd n padded with code 7.

    The expected bytes are bitsandbytes' own: quantize_4bit's packed output for a tensor whose codes are known.
    """
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    from bitsandbytes.functional import quantize_4bit

    def judge(n: int) -> tuple[str | None, str]:
        w = torch.randn(n, generator=torch.Generator().manual_seed(n))
        expected, _ = quantize_4bit(w, quant_type="nf4")
        codes = torch.stack([expected.reshape(-1) >> 4, expected.reshape(-1) & 0xF], dim=1).reshape(-1)[:n].clone()
        got, error = attempt(fn, codes.clone())
        if error is None and isinstance(got, torch.Tensor) and got.dtype != torch.uint8:
            error = f"expected dtype torch.uint8, got {got.dtype} (build the bytes with uint8 shifts and |)"
        return (error or compare_tensors("packed bytes", got, expected, atol=0),
                f"{expected.shape[0]} bytes, identical to bitsandbytes")

    ok, details = run_cases(((f"{n} codes", n) for n in (10, 7, 65)), judge)
    return conclude(ok, details, "pack_4bit matches bitsandbytes' layout", "pack_4bit needs another look",
                    "hint: pad an odd count with one code 7, then byte i is (codes[2i] << 4) | codes[2i + 1], "
                    "as a column of shape (ceil(n/2), 1)")


def check_nf4_roundtrip(fn: Callable) -> bool:
    """Notebook 02 (harder): fn(w (n,) float32, blocksize) -> (n,) float32: w quantised to the nearest NF4 level on
    a scale of one absmax per block of `blocksize` weights, then dequantised. This is what a QLoRA layer multiplies by
    in every forward pass.

    The oracle is bitsandbytes: dequantize_4bit(quantize_4bit(w, blocksize, "nf4")) without double quantisation.
    """
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    gen = torch.Generator().manual_seed(2)
    sparse = torch.randn(192, generator=gen)
    sparse[64:128] = 0.0  # a whole block of exact zeros (pruned or padded weights)
    sparse[130] = 40.0  # one outlier: only its own block loses precision
    cases = {"256 weights, blocks of 64": (torch.randn(256, generator=gen), 64),
             "100 weights, blocks of 32 (the last block is partial)": (torch.randn(100, generator=gen), 32),
             "a block of zeros, then one with an outlier": (sparse, 64)}

    def judge(case: tuple[torch.Tensor, int]) -> tuple[str | None, str]:
        w, blocksize = case
        packed, state = quantize_4bit(w, blocksize=blocksize, compress_statistics=False, quant_type="nf4")
        expected = dequantize_4bit(packed, state).reshape(-1)  # (n,)
        got, error = attempt(fn, w.clone(), blocksize)
        relative = ((expected - w).norm() / w.norm()).item()
        return (error or compare_tensors("dequantised weights", got, expected, atol=1e-6),
                f"identical to bitsandbytes (relative error {relative:.3f})")

    ok, details = run_cases(cases.items(), judge)
    return conclude(ok, details, "nf4_roundtrip matches bitsandbytes",
                    "nf4_roundtrip differs from bitsandbytes",
                    "hint: pad to whole blocks, absmax = blocks.abs().amax(dim=1, keepdim=True); the nearest level "
                    "is an argmin over |w / absmax - NF4_CODEBOOK|; a block of zeros has absmax 0 and stays 0")
