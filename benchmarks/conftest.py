"""pytest-benchmark suites: fastaccum against native PyTorch in the same run.

At the end of a run this prints, per group, each provider's median time as a ratio to the
native PyTorch provider of the same group, plus bytes/s against the measured copy rate
(for benchmarks that record ``extra_info["bytes"]``). With ``--benchmark-disable`` the
suites run once each as smoke tests and nothing is printed.
"""

from __future__ import annotations

import pytest


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    session = getattr(config, "_benchmarksession", None)
    if session is None or session.disabled or not session.benchmarks:
        return
    groups: dict[str, list] = {}
    for bench in session.benchmarks:
        if bench:
            groups.setdefault(bench.group or "", []).append(bench)
    ceilings = {}  # provider -> bytes/s of the bandwidth references ("copy", "rmw")
    for bench in session.benchmarks:
        if bench and bench.extra_info.get("provider") in ("copy", "rmw"):
            ceilings[bench.extra_info["provider"]] = bench.extra_info["bytes"] / bench.stats.median
    write = terminalreporter.write_line
    terminalreporter.section("fastaccum vs native PyTorch (median, same run)")
    for name, benches in sorted(groups.items()):
        native = [b for b in benches if b.extra_info.get("provider") == "native"]
        if not native:
            continue
        base = native[0].stats.median
        floor = [
            b.stats.median
            for b in benches
            if b.extra_info.get("provider") == native[0].extra_info.get("baseline")
        ]
        for b in sorted(benches, key=lambda b: b.stats.median):
            provider = b.extra_info.get("provider", b.name)
            line = f"{name:<28} {provider:<14} speed-up vs native {base / b.stats.median:6.2f}x"
            if floor and base > floor[0]:
                overhead = (b.stats.median - floor[0]) / (base - floor[0])
                line += f"   overhead vs native's {overhead:6.2f}"
            if "allocated_bytes" in b.extra_info:
                line += f"   allocated {b.extra_info['allocated_bytes'] / 2**20:7.1f} MiB"
            if "peak_bytes" in b.extra_info:
                line += f"   peak {b.extra_info['peak_bytes'] / 2**20:8.1f} MiB"
            if "bytes" in b.extra_info:
                rate = b.extra_info["bytes"] / b.stats.median
                line += f"   {rate / 1e9:7.1f} GB/s"
                line += "".join(f" ({rate / c:.0%} of {n})" for n, c in ceilings.items())
            write(line)
    for n, c in ceilings.items():
        write(
            f"{n}: {c / 1e9:.1f} GB/s (float32 {'copy_' if n == 'copy' else 'add_'}, bytes read + written)"
        )
