"""CSV rows of GPU figures in benchmarks/results/: the columns and the writer, shared by
the GPU scripts (run as ``python benchmarks/<script>.py``, so this module is importable as a
sibling)."""

import csv
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
    """Short hash of the checked-out commit, or "unknown"."""
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
