#!/usr/bin/env bash
# Build and test fastaccum against the CUDA build of torch that the GPU machines run, on a
# machine with nvcc but no GPU.
#
# The CPU torch wheel has no CUDA headers, so a CPU machine never compiles the *_binding.cpp
# files or links the CUDA kernels into fastaccum._C. This script does, in a separate virtual
# environment holding PyPI's CUDA build of torch (several GB with its NVIDIA libraries), then
# checks that the CUDA kernels registered and runs the whole test suite there on the CPU:
# that is the torch and Triton versions of the GPU machines (the Triton interpreter for the
# kernels' numerics, tests/triton/compile_for_gpu.py for their sm_90 builds).
#
#   bash tools/check_cuda_torch.sh                 # torch 2.11.0, in /tmp/fastaccum-cuda-torch
#   CUDA_TORCH_VERSION=2.12.0 CUDA_TORCH_WORK=/scratch/x bash tools/check_cuda_torch.sh
#
# It copies the working tree (tracked and untracked, not ignored files), so uncommitted edits
# are checked too. Exits non-zero on the first failure.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CUDA_TORCH_VERSION="${CUDA_TORCH_VERSION:-2.11.0}"
CUDA_TORCH_WORK="${CUDA_TORCH_WORK:-/tmp/fastaccum-cuda-torch}"
PYTHON="${PYTHON:-python3}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"

if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
    echo "no nvcc under CUDA_HOME=$CUDA_HOME; set CUDA_HOME to the CUDA toolkit" >&2
    exit 1
fi

echo "== virtual environment with torch==$CUDA_TORCH_VERSION (CUDA build) in $CUDA_TORCH_WORK/venv"
mkdir -p "$CUDA_TORCH_WORK"
[ -x "$CUDA_TORCH_WORK/venv/bin/python" ] || "$PYTHON" -m venv "$CUDA_TORCH_WORK/venv"
VENV_PY="$CUDA_TORCH_WORK/venv/bin/python"
"$VENV_PY" -m pip install -q "torch==$CUDA_TORCH_VERSION" setuptools wheel ninja pybind11 numpy tqdm \
    pytest pytest-benchmark matplotlib scikit-learn transformers accelerate trl peft datasets
"$VENV_PY" - <<'PY'
import torch
if torch.version.cuda is None:
    raise SystemExit(f"torch {torch.__version__} is a CPU build; this check needs a CUDA build")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda})")
PY

echo "== copy of the working tree in $CUDA_TORCH_WORK/src"
rm -rf "$CUDA_TORCH_WORK/src"
mkdir -p "$CUDA_TORCH_WORK/src"
(
    cd "$ROOT"
    git ls-files -z --cached --others --exclude-standard \
        | while IFS= read -r -d '' f; do if [ -e "$f" ]; then printf '%s\0' "$f"; fi; done \
        | tar --null -T - -cf -
) | tar -xf - -C "$CUDA_TORCH_WORK/src"

echo "== build with the CUDA kernels (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
(cd "$CUDA_TORCH_WORK/src" && "$VENV_PY" -m pip install -q --no-build-isolation --no-deps -e .)

echo "== the CUDA kernels are registered"
(cd "$CUDA_TORCH_WORK" && "$VENV_PY" - <<'PY'
import torch

import fastaccum._C  # noqa: F401

ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("fastaccum::"))
cuda = [n for n in ops if "\nCUDA: registered" in torch._C._dispatch_dump(n)]
if not cuda:
    raise SystemExit("fastaccum._C registered no CUDA kernel")
print(f"{len(cuda)} of {len(ops)} fastaccum ops have a CUDA kernel: {', '.join(cuda)}")
PY
)

echo "== test suite on the CPU with this torch and Triton"
(cd "$CUDA_TORCH_WORK/src" && TRITON_INTERPRET=1 "$VENV_PY" -m pytest -q -p no:cacheprovider tests)
