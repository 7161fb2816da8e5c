"""``fastaccum bench-ops``: the op micro-benchmark.

It times, on this machine, what a native PyTorch loop does per micro-step (per-parameter
``add_`` into fp32, the clip-norm reduction and GradScaler's non-finite check) against
fastaccum's fused ``accumulate_``, which does the same job in one pass, on a GPT-2-small
parameter set, and reports the ratio, the bytes per second each reaches and a measured
copy bandwidth for scale.
"""

from __future__ import annotations

import functools
import statistics
import sys
from collections.abc import Sequence
from typing import Any

import torch

from fastaccum.bench.timing import device_name, time_call

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def bandwidths(nbytes: int, device: torch.device, repeats: int) -> tuple[float, float]:
    """Measured (copy, in-place add) rates in bytes/s, counting bytes read plus written.

    Copy: a float32 ``dst.copy_(src)`` of ``nbytes`` (2 x nbytes moved). In-place add:
    ``dst.add_(src)`` (3 x nbytes). On CPUs a copy also reads its destination
    (write-allocate) without that being counted, so read-modify-write kernels such as
    accumulate_ can pass 100% of the copy figure; the in-place add is their fair ceiling.
    """
    src = torch.randn(max(nbytes // 4, 1), device=device)
    dst = torch.zeros_like(src)
    copy = statistics.median(time_call(lambda: dst.copy_(src), device, repeats))
    add = statistics.median(time_call(lambda: dst.add_(src), device, repeats))
    return 2 * nbytes / copy, 3 * nbytes / add


def run_ops_bench(
    param_set: str, device: torch.device, dtypes: Sequence[str], repeats: int
) -> list[dict[str, Any]]:
    """Time native vs fused accumulation for each gradient dtype; return one row per run."""
    from tqdm import tqdm

    from fastaccum import _backend
    from fastaccum.workloads import (
        PARAM_SETS,
        bytes_moved,
        fused_accumulate,
        make_param_set,
        native_accumulate,
    )

    shapes = PARAM_SETS[param_set]()
    rows: list[dict[str, Any]] = []
    runs = [(d, p) for d in dtypes for p in ("native", "fastaccum")]
    for dtype_name, provider in tqdm(runs, desc="bench", unit="run", file=sys.stderr):
        accums, grads = make_param_set(shapes, DTYPES[dtype_name], device)
        if provider == "native":
            fn = functools.partial(native_accumulate, accums, grads, 0.125)
            backend = "torch"
        else:
            fn = functools.partial(fused_accumulate, accums, grads, 0.125)
            backend = _backend.select(device)
        times = time_call(fn, device, repeats)
        seconds = statistics.median(times)
        rows.append(
            {
                "dtype": dtype_name,
                "provider": provider,
                "backend": backend,
                "ms": seconds * 1e3,
                "gb_per_s": bytes_moved(grads) / seconds / 1e9,
                "params": sum(g.numel() for g in grads),
                "tensors": len(grads),
            }
        )
    return rows


def format_ops_table(
    rows: list[dict[str, Any]], copy_gbps: float, add_gbps: float, device: torch.device
) -> str:
    """The bench table: time per micro-step, speed-up over native, bytes/s vs copy/add_."""
    native = {r["dtype"]: r["ms"] for r in rows if r["provider"] == "native"}
    lines = [
        f"{'grads':<6} {'provider':<10} {'backend':<10} {'ms/micro-step':>14} "
        f"{'speed-up':>9} {'GB/s':>8} {'of copy':>8} {'of add_':>8}",
    ]
    for r in rows:
        speedup = native[r["dtype"]] / r["ms"]
        lines.append(
            f"{r['dtype']:<6} {r['provider']:<10} {r['backend']:<10} {r['ms']:>14.2f} "
            f"{speedup:>8.2f}x {r['gb_per_s']:>8.1f} {r['gb_per_s'] / copy_gbps:>8.0%} "
            f"{r['gb_per_s'] / add_gbps:>8.0%}"
        )
    first = rows[0]
    lines.append(
        f"{first['params']:,} parameters in {first['tensors']} tensors on {device_name(device)}; "
        f"fp32 accumulators; measured copy {copy_gbps:.1f} GB/s and in-place add_ "
        f"{add_gbps:.1f} GB/s (bytes read + written)."
    )
    lines.append(
        "native = per-parameter add_ + clip_grad_norm_'s norm + GradScaler's non-finite "
        "check; fastaccum = one fused accumulate_ pass doing all three."
    )
    return "\n".join(lines)
