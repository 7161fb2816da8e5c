"""Command line: ``fastaccum bench`` (also ``python -m fastaccum bench``).

``bench`` times, on this machine, what a native PyTorch loop does per micro-step
(per-parameter ``add_`` into fp32, the clip-norm reduction and GradScaler's non-finite
check) against fastaccum's fused ``accumulate_``, which does the same job in one pass, on
a GPT-2-small parameter set. It prints a table with the ratio of the two, the bytes per
second each reaches and a measured copy bandwidth for scale.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _sync(device: torch.device) -> None:
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
    _sync(device)
    return [time_once(fn, device) for _ in range(repeats)]


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


def run_bench(
    param_set: str, device: torch.device, dtypes: Sequence[str], repeats: int
) -> list[dict[str, object]]:
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
    rows: list[dict[str, object]] = []
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


def format_table(
    rows: list[dict[str, object]], copy_gbps: float, add_gbps: float, device: torch.device
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


def device_name(device: torch.device) -> str:
    """A readable device name (the GPU model on CUDA)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def _cmd_bench(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda was given but no CUDA GPU is available", file=sys.stderr)
        return 2
    rows = run_bench(args.params, device, args.dtype, args.repeats)
    nbytes = max(int(r["params"]) for r in rows) * 4
    copy, add = bandwidths(nbytes, device, args.repeats)
    print(format_table(rows, copy / 1e9, add / 1e9, device))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``fastaccum`` argument parser."""
    parser = argparse.ArgumentParser(prog="fastaccum", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="time native PyTorch accumulation against fastaccum")
    bench.add_argument(
        "--params",
        choices=["gpt2-small", "tiny"],
        default="gpt2-small",
        help="parameter set (default: gpt2-small, 124M parameters)",
    )
    bench.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default=None,
        help="default: cuda when available, else cpu",
    )
    bench.add_argument(
        "--dtype",
        nargs="+",
        choices=sorted(DTYPES),
        default=["bf16", "fp32"],
        help="gradient dtypes to run (default: bf16 fp32)",
    )
    bench.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="timed runs per measurement; the median is reported (default: 5)",
    )
    bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fastaccum`` console script."""
    args = build_parser().parse_args(argv)
    if getattr(args, "repeats", 1) < 1:
        print(f"error: --repeats must be >= 1, got {args.repeats}", file=sys.stderr)
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
