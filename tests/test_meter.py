"""The allocation meter counts exactly the tensor storages a call creates and frees, the same on every run."""

import pytest
import torch

from lorakit import meter
from lorakit.meter import peak_allocated

X = torch.ones(1000)  # 4000 bytes, made outside every metered call


def two_in_turn():
    a = torch.ones(1000)  # 4000 bytes
    a.add_(1).view(10, 100)  # in place and a view: no new storage
    del a
    torch.ones(500, dtype=torch.float64)  # 4000 bytes again, after the first was freed


def forward_backward():
    x, w = torch.ones(10, 100), torch.ones(100, 10, requires_grad=True)  # 4000 bytes each
    (x @ w).sum().backward()  # the gradient of w: 4000 bytes more, plus a few small tensors


CASES = {  # name: (call, peak bytes)
    "nothing allocated": (lambda: None, 0),
    "an input is not counted": (lambda: X.clone(), 4000),
    "in place on a new tensor": (lambda: X.clone().mul_(2), 4000),
    "a view of an input counts its storage once (documented)": (lambda: X.view(10, 100).t(), 4000),
    "freed before the next one": (two_in_turn, 4000),
    "alive together": (lambda: (torch.ones(1000), torch.ones(1000)), 8000),
    "a temporary and its result": (lambda: (X * 2).exp(), 8000),
    "half precision": (lambda: torch.zeros(1000, dtype=torch.bfloat16), 2000),
}


@pytest.mark.parametrize("call, expected", CASES.values(), ids=CASES.keys())
def test_peak_allocated_counts_live_storages_once(call, expected):
    assert peak_allocated(call) == expected


def test_backward_allocations_are_counted():
    peak = peak_allocated(forward_backward)
    assert 12000 <= peak < 12000 + 1024  # x, w and the gradient of w; the rest are a few small tensors


def test_same_answer_every_run():
    assert len({peak_allocated(forward_backward) for _ in range(5)}) == 1


def test_docstring_example_runs():
    example = [line[4:] for line in meter.__doc__.splitlines() if line.startswith("    ")]
    assert any("peak_allocated" in line for line in example)
    exec("\n".join(example), {})
