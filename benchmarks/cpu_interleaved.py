"""Interleaved CPU timing of the providers of a pytest-benchmark suite.

pytest-benchmark times one provider after another; on a shared CPU whose speed drifts over
minutes, that drift can exceed the differences between providers. This script runs the
providers round-robin (one call each per round, the order rotated every round), so drift
hits all of them alike, then reports the median and minimum time of each as a ratio to
native.

Suites:
- ``wrapper``: one optimizer window (test_wrapper_cpu.py). The report adds each provider's
  overhead beyond forward and backward as a ratio to native's, (t - t_floor) /
  (t_native - t_floor), from the medians, for two floors: ``fwd_bwd.fresh`` (forward and
  backward making fresh gradients: accumulation counts as overhead) and ``fwd_bwd``
  (native's forward and backward with autograd's ``.grad +=`` inside: native's
  accumulation counts as free).
- ``wgrad``: one micro-step with fused vs unfused weight gradients (test_wgrad_cpu.py).

Run: python benchmarks/cpu_interleaved.py wrapper|wgrad [--rounds 30]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence

from tqdm import tqdm


def _suites() -> dict[str, tuple[list[str], Callable[[str], Callable[[], object]]]]:
    import test_wgrad_cpu
    import test_wrapper_cpu

    return {
        "wrapper": (
            test_wrapper_cpu.WINDOW_PROVIDERS,
            test_wrapper_cpu._setup,
        ),
        "wgrad": (
            ["native", "wrap.unfused", "wrap.fused"],
            lambda provider: test_wgrad_cpu._setup(provider)[1],
        ),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suite", choices=["wrapper", "wgrad"])
    parser.add_argument("--rounds", type=int, default=30, help="calls per provider")
    args = parser.parse_args(argv)
    if args.rounds < 3:
        print(f"error: --rounds must be >= 3, got {args.rounds}", file=sys.stderr)
        return 2
    providers, setup = _suites()[args.suite]
    calls = {p: setup(p) for p in providers}
    for call in calls.values():
        call()  # warm-up: optimizer state, accumulators, allocator
    times: dict[str, list[float]] = {p: [] for p in providers}
    for r in tqdm(range(args.rounds), desc=args.suite, file=sys.stderr):
        for p in providers[r % len(providers) :] + providers[: r % len(providers)]:
            t0 = time.perf_counter()
            calls[p]()
            times[p].append(time.perf_counter() - t0)
    med = {p: statistics.median(t) for p, t in times.items()}
    low = {p: min(t) for p, t in times.items()}
    floors = [f for f in ("fwd_bwd.fresh", "fwd_bwd") if f in med]
    header = f"{'provider':<28} {'median vs native':>17} {'min vs native':>14}"
    print(header + "".join(f" {'overhead/native (' + f + ')':>32}" for f in floors))
    for p in providers:
        line = f"{p:<28} {med['native'] / med[p]:>16.2f}x {low['native'] / low[p]:>13.2f}x"
        for f in floors:
            base = med["native"] - med[f]
            overhead = (med[p] - med[f]) / base if base > 0 else float("nan")
            line += f" {overhead:>32.2f}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
