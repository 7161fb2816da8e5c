"""Interleaved CPU timing of the optimizer-window providers of test_wrapper_cpu.py.

pytest-benchmark times one provider after another; on a shared CPU whose speed drifts over
minutes, that drift is larger than the differences between the optimizer paths. This
script runs the providers round-robin (one window each per round, order rotated every
round) so that drift hits all of them alike, then reports per provider the median and the
minimum window time as ratios to native, and the overhead beyond the native loop's own
forward/backward passes, (t - t_fwd_bwd) / (t_native - t_fwd_bwd), from the minima.

Run: python benchmarks/cpu_wrapper_interleaved.py [--rounds 30]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence

from test_wrapper_cpu import _setup
from tqdm import tqdm

PROVIDERS = [
    "fwd_bwd",
    "native",
    "wrap.step",
    "wrap.backward",
    "fused.AdamW.step",
    "fused.AdamW.backward",
]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30, help="windows per provider")
    args = parser.parse_args(argv)
    if args.rounds < 3:
        print(f"error: --rounds must be >= 3, got {args.rounds}", file=sys.stderr)
        return 2
    windows = {p: _setup(p) for p in PROVIDERS}
    for w in windows.values():
        w()  # warm-up: optimizer state, accumulators, allocator
    times: dict[str, list[float]] = {p: [] for p in PROVIDERS}
    for r in tqdm(range(args.rounds), desc="rounds", file=sys.stderr):
        order = PROVIDERS[r % len(PROVIDERS) :] + PROVIDERS[: r % len(PROVIDERS)]
        for p in order:
            t0 = time.perf_counter()
            windows[p]()
            times[p].append(time.perf_counter() - t0)
    med = {p: statistics.median(t) for p, t in times.items()}
    low = {p: min(t) for p, t in times.items()}
    base = low["native"] - low["fwd_bwd"]
    print(
        f"{'provider':<22} {'median vs native':>17} {'min vs native':>14} {'overhead vs native':>19}"
    )
    for p in PROVIDERS:
        overhead = (low[p] - low["fwd_bwd"]) / base if base > 0 else float("nan")
        print(
            f"{p:<22} {med['native'] / med[p]:>16.2f}x {low['native'] / low[p]:>13.2f}x "
            f"{overhead:>19.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
