"""Checks for notebook 09 (what matters in LoRA, measured): two "your turn" cells."""

from __future__ import annotations

from collections.abc import Callable

from lorakit.exercises.common import attempt, conclude, run_cases

# ---- 09 What matters ----


def check_lora_scale(fn: Callable) -> bool:
    """Notebook 09: fn(r, alpha, rslora) -> the factor peft multiplies B A by: alpha / r, or alpha / sqrt(r) (rsLoRA).

    The oracle is peft itself: the `scaling` a LoraConfig gives a real adapted layer.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    cases = {f"r={r}, alpha={alpha:g}{', rsLoRA' * rslora}": (r, alpha, rslora)
             for r, alpha, rslora in ((8, 16, False), (64, 16, False), (64, 16, True), (1, 2, False), (16, 16, True))}

    def judge(case: tuple[int, float, bool]) -> tuple[str | None, str]:
        r, alpha, rslora = case
        model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)),
                               LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=["0"]))
        expected = model.base_model.model[0].scaling["default"]
        got, error = attempt(fn, r, alpha, rslora)
        if error is None and not (isinstance(got, int | float) and abs(got - expected) < 1e-9):
            error = f"peft scales B A by {expected:g}, got {got!r}" + (
                " (that is alpha / r: rsLoRA divides by sqrt(r))" if rslora and got == alpha / r else "")
        return error, f"scale {expected:g}"

    ok, details = run_cases(cases.items(), judge)
    return conclude(ok, details, "your scale is peft's: with alpha = 16, rank 64 gets 0.25, or 2 with rsLoRA",
                    "not the scale peft applies", "hint: alpha / r, and alpha / r ** 0.5 when rslora is True")


def _front(points: dict[str, tuple[float, float]]) -> list[str]:
    """The reference: names whose (learned, kept) no other point matches or beats in both and beats in one."""
    return sorted(name for name, (a, k) in points.items()
                  if not any(a2 >= a and k2 >= k and (a2, k2) != (a, k) for a2, k2 in points.values()))


def check_pareto_front(fn: Callable) -> bool:
    """Notebook 09: fn({name: (accuracy, skills_kept)}) -> sorted names of the settings no other setting dominates.

    A setting is dominated when another one is at least as good on both axes and better on one (ties on both: neither
    dominates). The cases include ties, a single point, and the committed grid's means.
    """
    from lorakit.experiments_report import load, summary

    rows = summary(load())
    cases = {
        "two points, one better on both": {"a": (0.9, 0.5), "b": (0.8, 0.4)},
        "a trade-off keeps both": {"fast": (0.9, 0.1), "gentle": (0.5, 0.6)},
        "an exact tie keeps both": {"x": (0.7, 0.2), "y": (0.7, 0.2), "z": (0.7, 0.1)},
        "one point": {"only": (0.1, 0.1)},
        "the committed grid (means over seeds)": {n: (r.accuracy.mean, r.skills.mean) for n, r in rows.items()},
    }

    def judge(points: dict[str, tuple[float, float]]) -> tuple[str | None, str]:
        expected = _front(points)
        got, error = attempt(fn, dict(points))
        if error is None and (not isinstance(got, list) or sorted(got) != expected):
            extra = sorted(set(got or []) - set(expected)) if isinstance(got, list | tuple | set) else []
            error = f"expected {expected}, got {got!r}" + (f" ({extra[0]} is dominated)" if extra else "")
        return error, f"{len(expected)} on the front: {', '.join(expected[:4])}" + (" ..." * (len(expected) > 4))

    ok, details = run_cases(cases.items(), judge)
    return conclude(ok, details, "your front matches on every case: nothing on it is beaten on both axes",
                    "not the Pareto front",
                    "hint: keep a name unless another point has accuracy >= and kept >= with at least one strictly >")
