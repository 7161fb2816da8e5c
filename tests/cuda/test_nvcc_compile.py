"""Every CUDA kernel source compiles with nvcc, for sm_80 and sm_90, without a warning.

The ``.cu`` files are plain CUDA with no torch headers (DESIGN.md, "Build and install"), so
nvcc compiles them on any machine that has it, GPU or not, CPU torch or CUDA torch. This is
the check CI runs; the kernels' numerics are tested in test_accumulate_cuda.py on a GPU.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CUDA_DIR = ROOT / "csrc" / "cuda"
CU_FILES = sorted(CUDA_DIR.glob("*.cu"))
KERNEL_SOURCES = sorted([*CU_FILES, *CUDA_DIR.glob("*.cuh")])
ARCHS = ("80", "90")
TORCH_INCLUDE = re.compile(r"^\s*#\s*include\s*[<\"](torch|ATen|c10)/", re.MULTILINE)


def find_nvcc() -> str | None:
    """Path of nvcc from PATH, else from CUDA_HOME/CUDA_PATH, else /usr/local/cuda; or None."""
    found = shutil.which("nvcc")
    if found:
        return found
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    for home in homes:
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return None


NVCC = find_nvcc()


def test_cuda_sources_exist() -> None:
    assert CU_FILES, f"no .cu files under {CUDA_DIR}"


@pytest.mark.parametrize("source", KERNEL_SOURCES, ids=lambda p: p.name)
def test_kernel_sources_do_not_include_torch(source: Path) -> None:
    hits = TORCH_INCLUDE.findall(source.read_text())
    assert not hits, (
        f"{source.name} includes torch headers ({', '.join(sorted(set(hits)))}); kernel "
        "sources must be plain CUDA so that nvcc compiles them without CUDA torch; move the "
        "torch side into a *_binding.cpp file"
    )


@pytest.mark.nvcc
@pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH or under CUDA_HOME")
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm_{a}")
@pytest.mark.parametrize("source", CU_FILES, ids=lambda p: p.name)
def test_compiles_without_warnings(source: Path, arch: str, tmp_path: Path) -> None:
    assert NVCC is not None
    cmd = [
        NVCC,
        "-c",
        str(source),
        "-o",
        str(tmp_path / f"{source.stem}_sm{arch}.o"),
        "-std=c++17",
        "-O2",
        f"-gencode=arch=compute_{arch},code=sm_{arch}",
        "-I",
        str(CUDA_DIR),
        # What torch's CUDAExtension adds: no implicit half/bfloat16 conversions or operators.
        "-D__CUDA_NO_HALF_OPERATORS__",
        "-D__CUDA_NO_HALF_CONVERSIONS__",
        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-D__CUDA_NO_HALF2_OPERATORS__",
        "--expt-relaxed-constexpr",
        # Every nvcc, ptxas and host-compiler warning is an error.
        "-Werror",
        "all-warnings",
        "-Xcompiler",
        "-Wall,-Wextra,-Werror",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)}\nfailed with:\n{output}"
    assert "warning" not in output.lower(), f"{' '.join(cmd)}\nwarned:\n{output}"
