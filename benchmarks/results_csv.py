"""CSV rows of GPU figures in benchmarks/results/: the columns and the writer, shared by
the GPU scripts (run as ``python benchmarks/<script>.py``, so this module is importable as a
sibling)."""

import csv
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CSV_COLUMNS = [
    "op",
    "provider",
    "metric",
    "unit",
    "size",
    "dtype",
    "p50",
    "p20",
    "p80",
    "device",
    "torch",
    "commit",
    "date",
]


def commit() -> str:
    """Short hash of the checked-out commit: ``$FASTACCUM_COMMIT`` when set (a copy of the
    working tree without ``.git``, as on a lent GPU machine), else git's, else "unknown"."""
    given = os.environ.get("FASTACCUM_COMMIT", "").strip()
    if given:
        return given
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def append_csv(path: Path, rows: Sequence[dict]) -> None:
    """Append ``rows`` to ``path``, writing the header first when the file is new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def device_error(device, smoke: bool, script: str, cpu_hint: str = "") -> str | None:
    """Why a GPU script cannot run on ``device`` (None when it can): CUDA needs a GPU, and
    on the CPU only ``--smoke`` runs (a check of the script itself; CPU figures come from
    the pytest-benchmark suites, named by ``cpu_hint``)."""
    import torch

    if device.type == "cuda" and not torch.cuda.is_available():
        return f"{script} needs a CUDA GPU (or --device cpu --smoke to check the script)"
    if device.type == "cpu" and not smoke:
        return "on the CPU only --smoke runs" + (f"; use {cpu_hint}" if cpu_hint else "")
    return None


def record_rows(device, smoke: bool, path: Path, rows: Sequence[dict]) -> None:
    """Append ``rows`` to the CSV at ``path`` for real GPU runs only (absolute times are
    recorded for GPUs, never for smoke runs or the CPU)."""
    if device.type == "cuda" and not smoke and rows:
        append_csv(Path(path), rows)
        print(f"wrote {len(rows)} rows to {path}")


def time_calls(calls: Sequence, device) -> tuple[list[float], int]:
    """Run each zero-argument callable of ``calls`` once, timing each (CUDA events on a GPU,
    the host clock on the CPU). Returns the seconds per call and the peak bytes allocated on
    the GPU during them (0 on the CPU). Warm up before calling this."""
    import torch

    from fastaccum.cli import time_once

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = [time_once(call, device) for call in calls]
    return times, torch.cuda.max_memory_allocated() if cuda else 0


def time_and_peak_rows(common: dict, times: Sequence[float], peak: int) -> list[dict]:
    """Two CSV rows: time in ms (median, 20 % and 80 % quantiles) and the peak in bytes."""
    import statistics

    q = statistics.quantiles(times, n=5, method="inclusive")
    return [
        {
            **common,
            "metric": "time",
            "unit": "ms",
            "p50": f"{statistics.median(times) * 1e3:.6g}",
            "p20": f"{q[0] * 1e3:.6g}",
            "p80": f"{q[3] * 1e3:.6g}",
        },
        {
            **common,
            "metric": "peak_memory",
            "unit": "bytes",
            "p50": str(peak),
            "p20": "",
            "p80": "",
        },
    ]


def environment(device) -> dict:
    """The device, torch, commit and date columns of a row."""
    import datetime

    import torch

    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "commit": commit(),
        "date": datetime.date.today().isoformat(),
    }
