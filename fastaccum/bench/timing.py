"""Timing helpers shared by ``fastaccum bench``, ``fastaccum bench-ops`` and the GPU scripts."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes: CUDA events on a GPU, the host clock on the CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_call(fn: Callable[[], object], device: torch.device, repeats: int) -> list[float]:
    """Seconds per call of ``fn`` over ``repeats`` timed runs after one warm-up run."""
    fn()
    sync(device)
    return [time_once(fn, device) for _ in range(repeats)]


def device_name(device: torch.device) -> str:
    """A readable device name (the GPU model on CUDA, the thread count on the CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"cpu ({threads} thread{'s' if threads > 1 else ''})"
