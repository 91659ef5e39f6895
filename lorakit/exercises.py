"""Self-checks for the notebooks' "your turn" cells.

Each check takes the learner's function, runs it on cases with known answers (from a reference implementation or a
real library), prints a friendly verdict — what is right, what is wrong, expected vs got — and returns True or False.
It never raises a bare AssertionError: an exception inside the learner's code is reported as part of the verdict.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable

import torch


def verdict(ok: bool, title: str, details: list[str]) -> bool:
    print(("✅ " if ok else "❌ ") + title)
    for line in details:
        print("   " + line)
    return ok


def attempt(fn: Callable, *args, **kwargs) -> tuple[object, str | None]:
    """Call the learner's function; return (result, None) or (None, a one-line description of what went wrong)."""
    try:
        return fn(*args, **kwargs), None
    except NotImplementedError:
        return None, "not written yet: replace the `raise NotImplementedError` line with your code"
    except Exception as error:  # any learner error becomes a verdict line, not a traceback
        where = traceback.extract_tb(error.__traceback__)[-1]
        return None, f"{type(error).__name__}: {error} (line {where.lineno})"


def compare_tensors(name: str, got: object, expected: torch.Tensor, atol: float = 1e-5) -> str | None:
    """None when `got` matches `expected`; otherwise a sentence saying how it differs."""
    if not isinstance(got, torch.Tensor):
        return f"{name}: expected a tensor of shape {tuple(expected.shape)}, got {type(got).__name__}"
    if got.shape != expected.shape:
        return f"{name}: expected shape {tuple(expected.shape)}, got {tuple(got.shape)}"
    got, expected = got.detach().float(), expected.detach().float()
    # isclose, not `max diff > atol`: a NaN difference compares False and would pass as a match
    close = torch.isclose(got, expected, rtol=0.0, atol=atol, equal_nan=True)
    if close.all():
        return None
    if torch.isnan(got[~close]).any():
        return f"{name}: got NaN where a number was expected (look for 0/0, or exp of a large number)"
    diff = (got - expected).abs()[~close].max().item()
    return f"{name}: values differ by up to {diff:.3g} (tolerance {atol:g})"

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
    if wrong:
        return verdict(False, f"reverse_answer is wrong on {len(wrong)} of {len(records)} training records",
                       wrong[:3] + ['hint: the word is what follows "reverse: "; s[::-1] reverses a string'])
    return verdict(True, f"reverse_answer matches all {len(records)} training answers",
                   ["this is the reference the model is graded against: exact match, character for character"])


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
    if problems:
        return verdict(False, "chat_prompt does not match the tokenizer's chat template yet", problems[:3] + [
            "hint: print(tokenizer.chat_template), or render one example with apply_chat_template(tokenize=False)"])
    return verdict(True, "chat_prompt matches apply_chat_template on 4 questions", [
        "the model answers after <|assistant|>; generation stops at the end-of-sequence token </s>"])


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
    if problems:
        return verdict(False, "merged_weight is not W0 + (alpha / r) B A yet", problems +
                       ["hint: B is (d_out, r) and A is (r, d_in), so B @ A has the shape of W0"])
    return verdict(True, "merged_weight matches LoRALinear.merge() on 3 shapes", [
        "one (d_out, d_in) matmul at inference, exactly as cheap as the base layer"])

# ---- 02 NF4 ----

def check_pack_4bit(fn: Callable) -> bool:
    """Notebook 02: fn(codes (n,) uint8 0..15) -> (ceil(n/2), 1) uint8, high nibble first, odd n padded with code 7.

    The expected bytes are bitsandbytes' own: quantize_4bit's packed output for a tensor whose codes are known.
    """
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    from bitsandbytes.functional import quantize_4bit

    details, ok = [], True
    for n in (10, 7, 65):
        w = torch.randn(n, generator=torch.Generator().manual_seed(n))
        expected, _ = quantize_4bit(w, quant_type="nf4")
        codes = torch.stack([expected.reshape(-1) >> 4, expected.reshape(-1) & 0xF], dim=1).reshape(-1)[:n].clone()
        got, error = attempt(fn, codes.clone())
        if error is None and isinstance(got, torch.Tensor) and got.dtype != torch.uint8:
            error = f"expected dtype torch.uint8, got {got.dtype} (build the bytes with uint8 shifts and |)"
        error = error or compare_tensors("packed bytes", got, expected, atol=0)
        ok &= error is None
        details.append(f"{n} codes: " + (error or f"{expected.shape[0]} bytes, identical to bitsandbytes"))
        if error and "not written yet" in error:
            break
    return verdict(ok, "pack_4bit matches bitsandbytes' layout" if ok else "pack_4bit needs another look", details)

# ---- 03 attention ----

def check_online_softmax_step(fn: Callable) -> bool:
    """Notebook 03: fn(m (R,), total (R,), acc (R, D), scores (R, bk), values (bk, D)) -> (m, total, acc) after one
    block of keys. Folded over the blocks from m=-inf, total=0, acc=0, acc/total must equal softmax(scores) @ values —
    also for scores near 1000, where exp() without the running max overflows.
    """
    details, ok = [], True
    for name, shift in (("ordinary scores", 0.0), ("scores near 1000 (exp would overflow)", 1000.0)):
        gen = torch.Generator().manual_seed(3)
        scores = torch.randn(5, 12, generator=gen, dtype=torch.float64) * 3 + shift  # (R, Lk)
        values = torch.randn(12, 4, generator=gen, dtype=torch.float64)  # (Lk, D)
        state = (torch.full((5,), float("-inf"), dtype=torch.float64), torch.zeros(5, dtype=torch.float64),
                 torch.zeros(5, 4, dtype=torch.float64))
        error = None
        for j0 in range(0, 12, 4):  # three blocks of four keys
            state, error = attempt(fn, *state, scores[:, j0:j0 + 4], values[j0:j0 + 4])
            if error is not None:
                break
            if not (isinstance(state, tuple) and len(state) == 3):
                error = f"expected a tuple (m, total, acc), got {type(state).__name__}"
                break
        if error is None:
            m, total, acc = state
            result, error = attempt(torch.div, acc, total[..., None] if isinstance(total, torch.Tensor) else total)
            if error is None and isinstance(result, torch.Tensor) and not torch.isfinite(result).all():
                error = "acc / total has inf or nan: exp() overflowed — subtract the running max before exp()"
            error = error or (compare_tensors("m (running max)", m, scores.amax(-1), atol=1e-9)
                              or compare_tensors("acc / total", result, scores.softmax(-1) @ values, atol=1e-9))
        ok &= error is None
        details.append(f"{name}: " + ("matches softmax(scores) @ values" if error is None else error))
    return verdict(ok, "online softmax step" + (" is right" if ok else " needs work"), details)


# ---- 04 PEFT wrapping ----

def check_lora_parameter_count(fn: Callable) -> bool:
    """Notebook 04: fn(model, r, target_modules) -> the number of parameters LoRA adds, before wrapping anything.

    The oracle is peft: get_peft_model on a fresh copy of the same small Llama, then get_nb_trainable_parameters().
    """
    import warnings

    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    details, ok = [], True
    for r, targets in ((8, ["q_proj", "v_proj"]), (6, ["q_proj", "k_proj", "v_proj", "o_proj"]),
                       (2, ["gate_proj", "up_proj", "down_proj"])):
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # peft calls a transformers alias deprecated in v5
            expected = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=r, target_modules=targets))
        expected = expected.get_nb_trainable_parameters()[0]
        got, error = attempt(fn, LlamaForCausalLM(config), r, list(targets))
        if error is None and got != expected:
            error = f"expected {expected:,}, got {got!r} (each layer adds r x (in_features + out_features))"
        ok &= error is None
        details.append(f"r={r}, {'+'.join(t.replace('_proj', '') for t in targets)}: " + (error or f"{expected:,}"))
        if error and "not written yet" in error:
            break
    return verdict(ok, "your count matches peft's" if ok else "the count differs from peft's", details)

# ---- 05 Trainer run ----

def check_last_checkpoint(fn: Callable) -> bool:
    """Notebook 05: fn(output_dir) -> the checkpoint-N folder to resume from (largest N), or None when there is none.

    The oracle is transformers.trainer_utils.get_last_checkpoint on folders built for the case: none, a few, the
    "checkpoint-9 vs checkpoint-10" ordering trap, and a file or a non-numeric folder that only looks like one.
    """
    import tempfile
    from pathlib import Path

    from transformers.trainer_utils import get_last_checkpoint

    cases = {"no checkpoint": ([], []), "two checkpoints": (["checkpoint-2", "checkpoint-4"], []),
             "checkpoint-9 and checkpoint-10": (["checkpoint-9", "checkpoint-10"], []),
             "look-alikes": (["checkpoint-3", "checkpoint-final", "runs"], ["checkpoint-99"])}
    details, ok = [], True
    for name, (folders, files) in cases.items():
        with tempfile.TemporaryDirectory() as root:
            for folder in folders:
                (Path(root) / folder).mkdir()
            for file in files:
                (Path(root) / file).write_text("not a checkpoint")
            expected = get_last_checkpoint(root)
            got, error = attempt(fn, root)
            if error is None and (got is None) != (expected is None) or (
                    got is not None and expected is not None and Path(got) != Path(expected)):
                error = f"expected {expected and Path(expected).name}, got {got and Path(str(got)).name}"
        ok &= error is None
        details.append(f"{name}: " + (error or f"{expected and Path(expected).name}"))
        if error and "not written yet" in error:
            break
    return verdict(ok, "you pick the checkpoint the Trainer would resume from" if ok else "not the checkpoint the "
                   "Trainer would pick", details)

# ---- 06 ZeRO-3 ----

def check_adapter_names(fn: Callable) -> bool:
    """fn(named_params, bias) -> the parameter names an adapter save must gather, for bias none/all/lora_only.

    The oracle is peft itself: on a small Llama with attention biases and LoRA on q_proj/v_proj, the expected names
    are exactly the parameters peft made trainable for that bias mode.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    details, ok = [], True
    for bias in ("none", "all", "lora_only"):
        torch.manual_seed(0)
        base = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=1, attention_bias=True))
        model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], bias=bias))
        expected = {n for n, p in model.named_parameters() if p.requires_grad}
        got, error = attempt(fn, model.named_parameters(), bias)
        if error:
            return verdict(False, "adapter_names raised an error", [f"bias={bias!r}: {error}"])
        got = set(got)
        short = lambda names: ", ".join(sorted(n.split("self_attn.")[-1] for n in names)[:3])  # noqa: E731
        if got == expected:
            details.append(f"bias={bias!r}: the {len(expected)} tensors peft trains")
        else:
            ok = False
            if expected - got:
                details.append(f"bias={bias!r}: missing {len(expected - got)}, e.g. {short(expected - got)}")
            if got - expected:
                details.append(f"bias={bias!r}: {len(got - expected)} too many, e.g. {short(got - expected)}")
    if not ok:
        details.append("hint: current peft keeps a wrapped layer's bias at <layer>.base_layer.bias")
    return verdict(ok, "adapter names match peft for every bias mode" if ok else "adapter names differ from peft",
                   details)
