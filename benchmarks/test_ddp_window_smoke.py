"""Smoke test of benchmarks/ddp_window.py: both modes, tiny MLP, 2 gloo processes."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("ddp_window.py")


@pytest.mark.parametrize("mode", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_ddp_window_script_runs(mode: list[str]) -> None:
    args = ["--rounds", "3", "--accum-steps", "2", "--width", "32", *mode]
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    kind = "fsdp" if mode else "ddp"
    assert f"per-round time / {kind}.no_sync" in done.stdout
    assert "fastaccum.fused" in done.stdout
