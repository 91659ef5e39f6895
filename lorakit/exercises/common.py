"""What every check shares: run the learner's function safely, compare tensors, print the verdict.

A check never raises a bare AssertionError: an exception inside the learner's code becomes one line of its verdict.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable

import torch

NOT_WRITTEN = "not written yet"


def verdict(ok: bool, title: str, details: list[str]) -> bool:
    print(("✅ " if ok else "❌ ") + title)
    for line in details:
        print("   " + line)
    return ok


def conclude(ok: bool, details: list[str], passed: str, failed: str, hint: str) -> bool:
    """The verdict of a check: `passed` or `failed` as its title, and the hint only when something is wrong."""
    return verdict(ok, passed if ok else failed, details + ([] if ok else [hint]))


def unwritten(error: str | None) -> bool:
    """True while the learner's function is still the stub: further cases would only repeat the same line."""
    return bool(error) and error.startswith(NOT_WRITTEN)


def attempt(fn: Callable, *args, **kwargs) -> tuple[object, str | None]:
    """Call the learner's function; return (result, None) or (None, a one-line description of what went wrong)."""
    try:
        return fn(*args, **kwargs), None
    except NotImplementedError:
        return None, f"{NOT_WRITTEN}: replace the `raise NotImplementedError` line with your code"
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
