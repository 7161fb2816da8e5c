"""Every Triton kernel builds for an H100 (sm_90) through the package's own launch paths.

tests/triton/compile_for_gpu.py runs in a fresh Python without the interpreter, behind a
Triton driver that reports an sm_90 GPU: each op call goes through Triton's full code
generation down to ptxas's cubin, with the signatures, specializations, autotuner configs
and shared-memory limit a real launch would see, and launches nothing. The interpreter
tests check what the kernels compute; this checks that they build, which the interpreter
never does.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "triton" / "compile_for_gpu.py"


def test_every_kernel_builds_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a cold cache: every kernel really compiles
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # silences triton 3.9's notice; the default anyway
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "90"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    built = {
        name: int(count)
        for name, count in re.findall(r"^(\S+): (\d+) variant\(s\) built", proc.stdout, re.M)
    }
    assert len(built) >= 14, proc.stdout  # every *_kernel of fastaccum.triton was found
    assert all(count > 0 for count in built.values()), built

    from fastaccum.triton.wgrad import _gpu_configs

    # Every autotuner config of the weight-gradient GEMM builds (or is refused for its shared
    # memory, as on the GPU), for each dtype, with and without a bias.
    assert built["wgrad._wgrad_accumulate_kernel"] >= len(_gpu_configs()) * 3, built
