"""What every check shares: call the learner's function safely, judge it case by case, compare tensors, print verdicts.

A check never raises a bare AssertionError: an exception inside the learner's code becomes one line of its verdict.
The usual shape of a check, with `judge(case) -> (problem or None, what is right)`:

    ok, details = run_cases(cases.items(), judge)
    return conclude(ok, details, "what passing means", "what failing means", "hint: where to look")
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterable
from typing import TypeVar

import torch

NOT_WRITTEN = "not written yet"
Case = TypeVar("Case")


def verdict(ok: bool, title: str, details: list[str]) -> bool:
    """Print ✅ or ❌ with the title, then each detail indented under it; return ok."""
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


def run_cases(cases: Iterable[tuple[str, Case]], judge: Callable[[Case], tuple[str | None, str]]
              ) -> tuple[bool, list[str]]:
    """Judge each (label, case) in turn; return (every case right, one verdict line per case judged).

    judge(case) -> (problem, praise): problem is None when the learner's answer is right, otherwise a sentence saying
    what is wrong; the case's line reads "label: problem" or "label: praise". The run stops after the first "not written
    yet" (the stub), which every further case would only repeat.
    """
    ok, lines = True, []
    for label, case in cases:
        problem, praise = judge(case)
        ok &= problem is None
        lines.append(f"{label}: {problem or praise}")
        if unwritten(problem):
            break
    return ok, lines


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
