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


# (name, function). Rows are run in this order.
ROWS: list[tuple[str, Callable[[], tuple[float, str]]]] = [
    ("tiny generate 100 / 50 records (time)", row_base_generation),
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
