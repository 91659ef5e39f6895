"""Peak bytes allocated by torch tensors during one call: an exact, deterministic memory meter that works on CPU.

    import torch
    from lorakit.meter import peak_allocated
    x = torch.randn(1024, 1024)                           # inputs made before the call are not counted
    peak = peak_allocated(lambda: (x @ x).softmax(-1))    # 2 tensors of 4 MiB are alive at once
    assert peak == 2 * 1024 * 1024 * 4

Process RSS moves with the allocator's caching, other threads and the garbage collector, and torch keeps allocator
statistics (torch.cuda.max_memory_allocated) for CUDA only. This meter instead watches every op through a
TorchDispatchMode: each new tensor storage adds its nbytes to a live count when an op creates it, and subtracts them
when the storage is freed (a weakref finalizer). The peak of that count is the answer. Views and in-place results
share their input's storage and are counted once. Only tensors returned by torch ops inside the call count: not the
workspace of a kernel that allocates internally without returning a tensor, nor tensors made outside torch's
dispatcher (torch.from_numpy). Tensors made before the call are not counted, with one exception: a view or in-place
result of such a tensor, taken inside the call, shares a storage the meter has not seen and counts that storage's
full size once (`lambda: x.view(-1)` measures x.nbytes). The count is the same on every run, on any device, so it can
sit in a test or in a notebook whose printed output is compared strictly.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class _LiveBytes(TorchDispatchMode):
    """While active (`with _LiveBytes() as meter:`), `meter.live` is the bytes of tensor storages created inside and
    still alive, `meter.peak` the largest value `live` has had."""

    def __init__(self) -> None:
        super().__init__()
        self.live, self.peak = 0, 0
        self.storages: dict[int, int] = {}  # data_ptr -> nbytes of every storage counted and not yet freed

    def _freed(self, key: int, nbytes: int) -> None:
        self.storages.pop(key, None)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if nbytes and key not in self.storages:  # views and in-place results share a storage: count once
                    self.storages[key] = nbytes
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._freed, key, nbytes)
        return out


def peak_allocated(fn: Callable[[], object]) -> int:
    """Peak bytes of tensors alive at once among those `fn` allocates, on any device (see the module docstring).

    Args:
        fn: a call with no arguments (a lambda or functools.partial); its return value is discarded after the call.

    Returns:
        The peak, in bytes, of the sum of the sizes of the tensor storages created by torch ops during `fn` and not yet
        freed at that moment.
    """
    meter = _LiveBytes()
    with meter:
        fn()
    return meter.peak
