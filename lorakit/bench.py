"""Side-by-side ratios, measured in one run on this machine (never timed assertions in tests).

    python -m lorakit.bench [--json FILE] [--only NAME ...]     (make bench)

Each row is a function returning (value, goal) where value is a ratio measured by timing or counting two things
back to back in this process. Later course pieces add rows to ROWS.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

import torch


def best_time(fn: Callable[[], object], repeat: int = 5, number: int = 3) -> float:
    """Best-of-`repeat` mean seconds of `number` calls: the least noisy single figure on a shared machine."""
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - start) / number)
    return min(times)


def interleaved_ratio(numerator: Callable[[], object], denominator: Callable[[], object], rounds: int = 5,
                      number: int = 3) -> float:
    """time(numerator) / time(denominator), alternating the two so that machine noise hits both alike."""
    numerator(), denominator()
    num, den = [], []
    for _ in range(rounds):
        num.append(best_time(numerator, repeat=1, number=number))
        den.append(best_time(denominator, repeat=1, number=number))
    return min(num) / min(den)


def row_base_generation() -> tuple[float, str]:
    """Greedy generation on the embedded model: seconds per held-out batch of 100 / seconds per batch of 50."""
    from lorakit.evaluate import exact_match
    from lorakit.models import TASK_DIR, load_base
    from lorakit.tasks import read_jsonl

    model, tokenizer = load_base("tiny")
    records = read_jsonl(TASK_DIR / "eval.jsonl")
    ratio = interleaved_ratio(lambda: exact_match(model, tokenizer, records),
                              lambda: exact_match(model, tokenizer, records[:50]), rounds=3, number=1)
    return ratio, "report (batched generation: < 2 means batching pays)"


def _attention_inputs(length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One sequence, 4 query heads sharing 2 key/value heads of width 64 (grouped-query, as in the tiny model)."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, length, 64, generator=generator)  # (B, H, L, D)
    k, v = (torch.randn(1, 2, length, 64, generator=generator) for _ in range(2))  # (B, Hkv, L, D)
    return q, k, v


def row_tiled_attention_memory() -> tuple[float, str]:
    """Causal attention at L = 4096: peak bytes allocated by lorakit's tiled kernel / by eager attention."""
    from types import SimpleNamespace

    from transformers.masking_utils import eager_mask
    from transformers.models.llama.modeling_llama import eager_attention_forward

    from lorakit.attention import tiled_attention
    from lorakit.meter import peak_allocated

    q, k, v = _attention_inputs(4096)
    layer = SimpleNamespace(num_key_value_groups=2, training=False)  # what eager_attention_forward reads

    def eager() -> torch.Tensor:  # transformers' eager path: (1, 1, L, L) mask, then the (B, H, L, L) scores
        mask = eager_mask(batch_size=1, q_length=4096, kv_length=4096)
        return eager_attention_forward(layer, q, k, v, mask, scaling=q.shape[-1] ** -0.5)[0]

    with torch.no_grad():
        return peak_allocated(lambda: tiled_attention(q, k, v)) / peak_allocated(eager), "<= 0.1"


def row_tiled_attention_time() -> tuple[float, str]:
    """Causal attention at L = 2048: seconds of lorakit's tiled kernel (Python loop over blocks) / torch sdpa."""
    import torch.nn.functional as F

    from lorakit.attention import tiled_attention

    q, k, v = _attention_inputs(2048)
    with torch.no_grad():
        ratio = interleaved_ratio(lambda: tiled_attention(q, k, v),
                                  lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                                  rounds=3, number=1)
    return ratio, "report (goal <= 3)"


def row_zero3_partition() -> tuple[float, str]:
    """Two real gloo ranks under ZeRO-3 (persistence threshold 0): bytes of parameters rank 0 holds / total bytes."""
    import json
    import tempfile
    from pathlib import Path

    from lorakit.launch import run_ranks

    with tempfile.TemporaryDirectory() as out:
        result = run_ranks(["-m", "lorakit.zero3_demo", "--out", out, "--steps", "2", "--no-saves"])
        if result.returncode != 0:
            raise RuntimeError("two-rank ZeRO-3 run failed:\n" + result.stderr[-2000:])
        report = json.loads((Path(out) / "partition-rank0.json").read_text())
    return report["local_bytes"] / report["total_bytes"], "0.50 ± 0.02 (each of 2 ranks holds half)"


def row_nf4_quantize_time() -> tuple[float, str]:
    """lorakit.nf4.quantize_nf4 (plain PyTorch) / bitsandbytes quantize_4bit, NF4 + double quant, 1024 x 1024."""
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    from bitsandbytes.functional import quantize_4bit

    from lorakit.nf4 import quantize_nf4

    w = torch.randn(1024, 1024)
    ratio = interleaved_ratio(lambda: quantize_nf4(w), lambda: quantize_4bit(w, compress_statistics=True,
                                                                              quant_type="nf4"))
    return ratio, "report (same bytes; bitsandbytes' CPU path is PyTorch too, plus a C kernel for the constants)"


def row_nf4_bits_per_param() -> tuple[float, str]:
    """Bytes of a real NF4 + double-quant tensor x 8 / its weight count (codes, absmax codes, fp32 second scales)."""
    from lorakit.nf4 import bits_per_param

    return bits_per_param(64, double_quant=True), "4.127 = 4 + 8/64 + 32/(64*256) (QLoRA)"


def row_lora_step_checkpointing() -> tuple[float, str]:
    """One LoRA training step (forward + backward, batch 16 of the task) with gradient checkpointing / without."""
    import warnings

    from peft import LoraConfig, get_peft_model

    from lorakit.data import DataCollator, SupervisedDataset, load_records
    from lorakit.models import TASK_DIR, load_base

    def step_fn(checkpointing: bool):
        model, tokenizer = load_base("tiny")
        model.config.use_cache = False
        if checkpointing:  # transformers 5 name of gradient_checkpointing_enable
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
        model.train()
        data = SupervisedDataset(load_records(TASK_DIR / "train.jsonl")[:16], tokenizer, 512)
        batch = DataCollator(tokenizer.pad_token_id)([data[i] for i in range(16)])
        return lambda: model(**batch).loss.backward()

    return interleaved_ratio(step_fn(True), step_fn(False)), "report (> 1: recomputing activations costs time)"


def row_lora_linear_vs_peft() -> tuple[float, str]:
    """Forward + backward of one adapted 1024x1024 layer, r=8, on (8, 128, 1024) inputs: lorakit / peft lora.Linear."""
    import copy

    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLinear

    from lorakit.lora import LoRALinear

    base = torch.nn.Linear(1024, 1024)
    ours = LoRALinear(copy.deepcopy(base), r=8, alpha=16)
    theirs = PeftLinear(copy.deepcopy(base), "default", LoraConfig(r=8, lora_alpha=16), r=8, lora_alpha=16)
    theirs.base_layer.requires_grad_(False)  # as get_peft_model does; lorakit freezes W0 itself
    x = torch.randn(8, 128, 1024, requires_grad=True)  # (B, T, d_in)

    def step(layer: torch.nn.Module) -> Callable[[], None]:
        return lambda: layer(x).sum().backward()

    return interleaved_ratio(step(ours), step(theirs)), "<= 1.05"


def row_lora_merged_vs_base() -> tuple[float, str]:
    """Forward of the tiny model with q_proj+v_proj LoRA (r=8) merged / the base model, (64, 128) tokens."""
    import copy

    from lorakit.lora import add_lora, lora_layers, merge_lora
    from lorakit.models import load_base

    base, _ = load_base("tiny")
    merged = copy.deepcopy(base)
    add_lora(merged, ["q_proj", "v_proj"], r=8, alpha=16)
    with torch.no_grad():
        for layer in lora_layers(merged).values():
            layer.lora_B.normal_(std=0.05)  # a trained-looking adapter, so merging really changes W0
    merge_lora(merged)
    ids = torch.randint(7, base.config.vocab_size, (64, 128))  # (B, T), no special tokens

    def forward(model: torch.nn.Module) -> Callable[[], None]:
        return lambda: model(input_ids=ids)

    with torch.no_grad():
        return interleaved_ratio(forward(merged), forward(base), rounds=9), "1.00 +- 0.03"


# (name, function). Rows are run in this order.
ROWS: list[tuple[str, Callable[[], tuple[float, str]]]] = [
    ("tiny generate 100 / 50 records (time)", row_base_generation),
    ("attention: tiled peak memory / eager, L=4096", row_tiled_attention_memory),
    ("attention: tiled time / sdpa, L=2048", row_tiled_attention_time),
    ("ZeRO-3 per-rank parameter bytes / total, 2 ranks (count)", row_zero3_partition),
    ("NF4 quantise: lorakit / bitsandbytes, 1024x1024 + DQ (time)", row_nf4_quantize_time),
    ("NF4 + double quant bits per parameter (count)", row_nf4_bits_per_param),
    ("LoRA train step: gradient checkpointing / off (time)", row_lora_step_checkpointing),
    ("LoRALinear fwd+bwd: lorakit / peft lora.Linear, 1024x1024 r=8 (time)", row_lora_linear_vs_peft),
    ("LoRALinear merged model / base model forward, tiny (time)", row_lora_merged_vs_base),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorakit.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--only", nargs="*", default=[], help="run only rows whose name contains one of these")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    results = []
    print(f"{'ratio':60s} {'value':>8s}  goal", flush=True)
    for name, row in ROWS:
        if args.only and not any(key in name for key in args.only):
            continue
        value, goal = row()
        results.append({"name": name, "value": round(value, 4), "goal": goal})
        print(f"{name:60s} {value:8.3f}  {goal}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch_threads": torch.get_num_threads(), "rows": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
