"""`fastaccum bench`: runs end to end on a small parameter set and prints its table."""

import subprocess
import sys

import pytest

from fastaccum.cli import main


def test_bench_prints_native_and_fused_rows(capsys):
    assert main(["bench", "--params", "tiny", "--repeats", "2", "--dtype", "bf16", "fp32"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith(("bf16", "fp32"))]
    assert [(r[0], r[1]) for r in rows] == [
        ("bf16", "native"),
        ("bf16", "fastaccum"),
        ("fp32", "native"),
        ("fp32", "fastaccum"),
    ]
    for r in rows:
        assert float(r[3]) > 0  # ms per micro-step
        assert r[4].endswith("x") and float(r[4][:-1]) > 0
    assert "889,984 parameters in 40 tensors" in out


def test_bench_rejects_bad_repeats(capsys):
    assert main(["bench", "--repeats", "0"]) == 2
    assert "--repeats must be >= 1, got 0" in capsys.readouterr().err


def test_bench_rejects_unknown_param_set():
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--params", "huge"])
    assert exc.value.code == 2


def test_python_dash_m_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "fastaccum", "bench", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0 and "--params" in proc.stdout
