"""Peak tensor memory of a piece of work, on the CPU as on CUDA.

CUDA keeps allocator statistics (``torch.cuda.max_memory_allocated``); the CPU allocator
keeps none, and the resident set of a process mixes tensors with everything else the
process holds. :class:`LiveTensorBytes` gives the CPU the same figure as CUDA's: it sees
every op's outputs (a ``TorchDispatchMode``, which autograd's backward also runs under),
adds the bytes of each storage an op creates and subtracts them when that storage is
freed, and keeps the maximum. Outputs that share storage with an input (views, in-place
ops) add nothing.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["LiveTensorBytes", "peak_bytes", "tensor_bytes"]


def _storage_key(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
        return 0


class LiveTensorBytes(TorchDispatchMode):
    """Count the bytes of CPU tensor storages created while the mode is active.

    ``current`` is what is still alive, ``peak`` the most that was alive at once. Storages
    that existed before (parameters, inputs) are not counted, nor are views of them.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.device = torch.device(device)
        self.current = 0
        self.peak = 0
        self._live: dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            _storage_key(t)
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor) and t.device == self.device
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device != self.device:
                continue
            key = _storage_key(t)
            if not key or key in inputs or key in self._live:
                continue
            storage = t.untyped_storage()
            self._live[key] = storage.nbytes()
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, key)
        return out


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (shared storage counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        key = _storage_key(t)
        if key:
            seen[key] = t.untyped_storage().nbytes()
    return sum(seen.values())


def peak_bytes(fn: Callable[[], Any], device: torch.device | str) -> tuple[int, Any]:
    """``(peak, result)``: run ``fn`` and return the most tensor memory it held at once on
    ``device`` above what was allocated before it started, in bytes, and its result.

    CUDA: from the allocator's peak statistics. CPU: from :class:`LiveTensorBytes`.

    Raises:
        ValueError: a device other than CPU or CUDA.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, result
    if device.type == "cpu":
        with LiveTensorBytes(device) as live:
            result = fn()
        return live.peak, result
    raise ValueError(f"peak_bytes measures CPU or CUDA memory, got device {device}")
