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
    diff = (got.detach().float() - expected.float()).abs().max().item()
    if diff > atol:
        return f"{name}: values differ by up to {diff:.3g} (tolerance {atol:g})"
    return None

# ---- 01 low-rank math ----

# ---- 02 NF4 ----

# ---- 03 attention ----

# ---- 04 PEFT wrapping ----

# ---- 05 Trainer run ----

# ---- 06 ZeRO-3 ----
