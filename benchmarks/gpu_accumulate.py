"""GPU benchmark of ``accumulate_`` and ``finalize_`` on the GPT-2-small parameter set.

For gradients in bf16 and fp32 with fp32 accumulators, times (``triton.testing.do_bench``:
median and 20/80 % quantiles, L2 flushed before each run, two buffer sets used in turn):

accumulate_ (one micro-step)
    fastaccum-cuda      ``accumulate_(..., backend="native")``: add, sums of squares and
                        non-finite flag in one pass
    fastaccum-triton    ``accumulate_(..., backend="triton")``
    add_-loop           ``for a, g: a.add_(g, alpha=s)`` (accumulation only)
    foreach_add_        ``torch._foreach_add_(accums, grads, alpha=s)`` (accumulation only)
    foreach+norm+check  ``_foreach_add_``, then ``_foreach_norm`` + ``vector_norm`` and an
                        ``isfinite().all()``: the same job as fastaccum, as users write it
    add_+clip+scaler    ``fastaccum.workloads.native_accumulate``: per-parameter ``add_``,
                        clip_grad_norm_'s norm, GradScaler's non-finite check
finalize_ (end of a window: scale, write ``.grad`` in the gradient dtype, zero)
    fastaccum-cuda / fastaccum-triton, and foreach (``_foreach_mul`` + ``_foreach_copy_``
    + ``_foreach_zero_``) and copy-loop (``o.copy_(a * f); a.zero_()``)
copy
    ``dst.copy_(src)`` of a uint8 buffer moving as many bytes (read + written) as the op:
    the bandwidth ceiling each figure is compared with.

Bytes moved per element: accumulate_ reads the gradient (2 or 4 B) and reads and writes
the fp32 accumulator (8 B); finalize_ reads the accumulator (4 B), writes the output (2 or
4 B) and zeroes the accumulator (4 B). Achieved GB/s = those bytes / median time.

Rows are appended to benchmarks/results/accumulate_gpu.csv (see --out). ``--check`` is a
quick run: the tiny parameter set, short timings, no CSV. Every provider's result is checked
against float64 before it is timed.

Usage: python benchmarks/gpu_accumulate.py [--check] [--dtypes bf16 fp32] [--out PATH]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from results_csv import append_csv, commit

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CSV = ROOT / "benchmarks" / "results" / "accumulate_gpu.csv"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GPT2_SMALL_TENSORS = 148
GPT2_SMALL_PARAMS = 124_439_808
DEVICE = "cuda"
SCALE = 0.125  # the 1/K of an 8-micro-batch window
FACTOR = 1.0 / 4096  # a 1/num_items normalization

Lists = tuple[list[torch.Tensor], list[torch.Tensor]]
Provider = Callable[[list[torch.Tensor], list[torch.Tensor]], object]


@dataclass
class Timing:
    """One provider's do_bench result, in milliseconds, and the bytes one call moves."""

    op: str
    provider: str
    dtype: str
    nbytes: int
    p50: float
    p20: float
    p80: float

    def gbps(self, ms: float) -> float:
        return self.nbytes / (ms * 1e-3) / 1e9


# ----------------------------------------------------------------------------- providers


def accumulate_providers() -> dict[str, Provider]:
    """accumulate_ providers: each takes (accums, grads) and does one micro-step."""
    from fastaccum.ops import accumulate_
    from fastaccum.workloads import native_accumulate

    def foreach_norm_check(accums: list[torch.Tensor], grads: list[torch.Tensor]) -> object:
        torch._foreach_add_(accums, grads, alpha=SCALE)
        norms = torch.stack(torch._foreach_norm(grads))
        return torch.linalg.vector_norm(norms), ~torch.isfinite(norms).all()

    def add_loop(accums: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        for a, g in zip(accums, grads, strict=True):
            a.add_(g, alpha=SCALE)

    return {
        "fastaccum-cuda": lambda a, g: accumulate_(a, g, SCALE, backend="native"),
        "fastaccum-triton": lambda a, g: accumulate_(a, g, SCALE, backend="triton"),
        "add_-loop": add_loop,
        "foreach_add_": lambda a, g: torch._foreach_add_(a, g, alpha=SCALE),
        "foreach+norm+check": foreach_norm_check,
        "add_+clip+scaler": lambda a, g: native_accumulate(a, g, SCALE),
    }


def finalize_providers() -> dict[str, Provider]:
    """finalize_ providers: each takes (accums, outs), writes outs and zeroes accums."""
    from fastaccum.ops import finalize_

    def foreach(accums: list[torch.Tensor], outs: list[torch.Tensor]) -> None:
        torch._foreach_copy_(outs, torch._foreach_mul(accums, FACTOR))
        torch._foreach_zero_(accums)

    def copy_loop(accums: list[torch.Tensor], outs: list[torch.Tensor]) -> None:
        for a, o in zip(accums, outs, strict=True):
            o.copy_(a * FACTOR)
            a.zero_()

    return {
        "fastaccum-cuda": lambda a, o: finalize_(a, o, FACTOR, backend="native"),
        "fastaccum-triton": lambda a, o: finalize_(a, o, FACTOR, backend="triton"),
        "foreach": foreach,
        "copy-loop": copy_loop,
    }


# ------------------------------------------------------------------------------ checking


def _relative_error(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """||out - ref|| / ||ref|| over all pairs, in float64, one tensor at a time."""
    err = ref_sq = 0.0
    for out, ref in pairs:
        err += (out.double() - ref).square().sum().item()
        ref_sq += ref.square().sum().item()
    return math.sqrt(err / ref_sq) if ref_sq > 0 else math.sqrt(err)


def check_accumulate(name: str, fn: Provider, accums: list[torch.Tensor], grads: list) -> None:
    """Run ``fn`` once on copies and compare with float64; raise AssertionError if off."""
    work = [a.clone() for a in accums]
    result = fn(work, grads)
    rel = _relative_error(
        [(w, a.double() + SCALE * g.double()) for w, a, g in zip(work, accums, grads, strict=True)]
    )
    assert rel <= 1e-6, f"accumulate_ {name}: accumulators off by {rel:.2e} (bound 1e-6)"
    if name.startswith("fastaccum"):
        expected = sum(g.double().square().sum().item() for g in grads)
        got = result.grad_sumsq.item()
        assert math.isclose(got, expected, rel_tol=1e-5), (
            f"accumulate_ {name}: grad_sumsq {got} != {expected}"
        )
        assert not bool(result.found_nonfinite), f"accumulate_ {name}: spurious non-finite flag"


def check_finalize(name: str, fn: Provider, accums: list[torch.Tensor], outs: list) -> None:
    """Run ``fn`` once on copies and compare with float64; raise AssertionError if off."""
    work = [a.clone() for a in accums]
    out_work = [o.clone() for o in outs]
    fn(work, out_work)
    bound = 1e-6 if outs[0].dtype == torch.float32 else torch.finfo(outs[0].dtype).eps
    rel = _relative_error([(o, a.double() * FACTOR) for o, a in zip(out_work, accums, strict=True)])
    assert rel <= bound, f"finalize_ {name}: outputs off by {rel:.2e} (bound {bound:.1e})"
    assert all(not w.any() for w in work), f"finalize_ {name}: accumulators not zeroed"


# ------------------------------------------------------------------------------- timing


def bench(fn: Provider, sets: Sequence[Lists], warmup_ms: int, rep_ms: int) -> list[float]:
    """(p50, p20, p80) in ms of ``fn``, called on the buffer sets in turn."""
    from triton.testing import do_bench

    turn = itertools.cycle(sets)

    def call() -> None:
        fn(*next(turn))

    return do_bench(call, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])


def bench_copy(nbytes: int, warmup_ms: int, rep_ms: int) -> list[float]:
    """(p50, p20, p80) in ms of a device-to-device copy that reads + writes ``nbytes``."""
    half = max(nbytes // 2, 1)
    pairs = [
        (
            [torch.empty(half, dtype=torch.uint8, device=DEVICE)],
            [torch.randint(0, 255, (half,), dtype=torch.uint8, device=DEVICE)],
        )
        for _ in range(2)
    ]
    return bench(lambda dst, src: dst[0].copy_(src[0]), pairs, warmup_ms, rep_ms)


def accumulate_bytes(grads: Sequence[torch.Tensor]) -> int:
    """Bytes one accumulate_ pass moves: gradient read, fp32 accumulator read + write."""
    from fastaccum.workloads import bytes_moved

    return bytes_moved(list(grads), torch.float32)


def finalize_bytes(accums: Sequence[torch.Tensor], outs: Sequence[torch.Tensor]) -> int:
    """Bytes one finalize_ pass moves: accumulator read + write (zero), output write."""
    return sum(
        a.numel() * (2 * a.element_size() + o.element_size())
        for a, o in zip(accums, outs, strict=True)
    )


# -------------------------------------------------------------------------------- output


def csv_rows(timings: Sequence[Timing], copy: dict[int, Timing], size: str) -> list[dict]:
    """Three rows per timing: time (ms), bandwidth (GB/s), fraction of the copy bandwidth."""
    common = {
        "size": size,
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "commit": commit(),
        "date": datetime.date.today().isoformat(),
    }
    rows = []
    for t in timings:
        ceiling = t.gbps(t.p50) if t.op == "copy" else copy[t.nbytes].gbps(copy[t.nbytes].p50)
        # The 20 % quantile of a rate comes from the 80 % quantile of the time.
        rate = (t.gbps(t.p50), t.gbps(t.p80), t.gbps(t.p20))
        for metric, unit, values in (
            ("time", "ms", (t.p50, t.p20, t.p80)),
            ("bandwidth", "GB/s", rate),
            ("of_copy", "fraction", tuple(r / ceiling for r in rate)),
        ):
            rows.append(
                {
                    **common,
                    "op": t.op,
                    "provider": t.provider,
                    "metric": metric,
                    "unit": unit,
                    "dtype": t.dtype,
                    "p50": f"{values[0]:.6g}",
                    "p20": f"{values[1]:.6g}",
                    "p80": f"{values[2]:.6g}",
                }
            )
    return rows


def format_table(timings: Sequence[Timing], copy: dict[int, Timing]) -> str:
    """Median time, GB/s and fraction of copy bandwidth per (op, dtype, provider)."""
    lines = [
        f"{'op':<12} {'dtype':<11} {'provider':<20} {'p50 ms':>9} {'p20-p80 ms':>17} "
        f"{'GB/s':>8} {'of copy':>8}"
    ]
    for t in timings:
        ceiling = copy[t.nbytes].gbps(copy[t.nbytes].p50)
        lines.append(
            f"{t.op:<12} {t.dtype:<11} {t.provider:<20} {t.p50:>9.3f} "
            f"{t.p20:>8.3f}-{t.p80:<8.3f} {t.gbps(t.p50):>8.1f} {t.gbps(t.p50) / ceiling:>7.0%}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="quick run: tiny parameter set, short timings, no CSV written",
    )
    parser.add_argument(
        "--dtypes",
        nargs="+",
        choices=sorted(DTYPES),
        default=["bf16", "fp32"],
        help="gradient dtypes (accumulators are fp32); default: bf16 fp32",
    )
    parser.add_argument(
        "--providers",
        nargs="+",
        default=None,
        help="only these providers (names as in the table); default: all",
    )
    parser.add_argument("--sets", type=int, default=2, help="buffer sets used in turn (default 2)")
    parser.add_argument("--warmup-ms", type=int, default=100, help="do_bench warm-up time")
    parser.add_argument("--rep-ms", type=int, default=1000, help="do_bench measurement time")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_CSV, help=f"CSV to append to (default: {DEFAULT_CSV})"
    )
    parser.add_argument("--no-csv", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    if args.sets < 1:
        parser.error(f"--sets must be >= 1, got {args.sets}")
    if args.check:
        args.warmup_ms, args.rep_ms, args.no_csv = 10, 50, True
    return args


def param_shapes(check: bool) -> tuple[str, list[tuple[int, ...]]]:
    """The parameter set's name and shapes; GPT-2 small is checked against its known size."""
    from fastaccum.workloads import gpt2_small_shapes, tiny_shapes

    if check:
        return "tiny", tiny_shapes()
    shapes = gpt2_small_shapes()
    numel = sum(math.prod(s) for s in shapes)
    if (len(shapes), numel) != (GPT2_SMALL_TENSORS, GPT2_SMALL_PARAMS):
        raise RuntimeError(
            f"the GPT-2 small set should have {GPT2_SMALL_PARAMS:,} parameters in "
            f"{GPT2_SMALL_TENSORS} tensors, got {numel:,} in {len(shapes)}; "
            "see fastaccum.workloads.gpt2_small_shapes"
        )
    return "gpt2-small", shapes


def run_op(
    op: str,
    providers: dict[str, Provider],
    sets: Sequence[Lists],
    dtype: str,
    nbytes: int,
    args: argparse.Namespace,
    failures: list[str],
) -> list[Timing]:
    """Check then time every selected provider of one op on ``sets``.

    A provider that cannot run here (no Triton, no CUDA build) is skipped with a message;
    one that gives wrong results is not timed and is recorded in ``failures``.
    """
    check = check_accumulate if op == "accumulate_" else check_finalize
    timings = []
    for name, fn in providers.items():
        if args.providers and name not in args.providers:
            continue
        try:
            check(name, fn, *sets[0])
        except (RuntimeError, NotImplementedError, ImportError) as exc:
            print(f"skip {op} {name} ({dtype}): {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        except AssertionError as exc:
            print(f"error: {exc} ({dtype}); not timed", file=sys.stderr)
            failures.append(f"{op} {name} {dtype}")
            continue
        p50, p20, p80 = bench(fn, sets, args.warmup_ms, args.rep_ms)
        timings.append(Timing(op, name, dtype, nbytes, p50, p20, p80))
        print(f"{op} {dtype} {name}: {p50:.3f} ms", file=sys.stderr)
    return timings


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the process exit status."""
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "error: gpu_accumulate.py needs a CUDA GPU, but torch.cuda.is_available() is False "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}). Run it on "
            "a GPU machine, or use `make bench-cpu` / `fastaccum bench-ops` for the CPU.",
            file=sys.stderr,
        )
        return 2
    try:
        import triton.testing  # noqa: F401  (do_bench)
    except ImportError:
        print(
            "error: gpu_accumulate.py times with triton.testing.do_bench; install triton",
            file=sys.stderr,
        )
        return 2
    from fastaccum.workloads import make_param_set

    set_name, shapes = param_shapes(args.check)
    numel = sum(math.prod(s) for s in shapes)
    size = f"{set_name} ({numel} params, {len(shapes)} tensors)"
    timings: list[Timing] = []
    failures: list[str] = []
    for dtype in args.dtypes:
        grad_dtype = DTYPES[dtype]
        sets = [make_param_set(shapes, grad_dtype, DEVICE, seed=i) for i in range(args.sets)]
        nbytes = accumulate_bytes(sets[0][1])
        timings += run_op(
            "accumulate_", accumulate_providers(), sets, f"{dtype}->fp32", nbytes, args, failures
        )
        # finalize_ writes .grad in the gradient dtype: the gradients serve as outputs.
        nbytes = finalize_bytes(*sets[0])
        timings += run_op(
            "finalize_", finalize_providers(), sets, f"fp32->{dtype}", nbytes, args, failures
        )
        del sets
        torch.cuda.empty_cache()
    copy: dict[int, Timing] = {}
    for nbytes in sorted({t.nbytes for t in timings}):
        p50, p20, p80 = bench_copy(nbytes, args.warmup_ms, args.rep_ms)
        copy[nbytes] = Timing("copy", "copy_", "uint8", nbytes, p50, p20, p80)
    print(f"\n{size} on {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(format_table([*timings, *copy.values()], copy))
    if not args.no_csv and timings:
        append_csv(args.out, csv_rows([*timings, *copy.values()], copy, size))
        print(f"appended {3 * (len(timings) + len(copy))} rows to {args.out}")
    if failures:
        print(f"error: wrong results from {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
