"""The one place that decides which implementation of an op runs.

Choices, per tensor device:

- ``cpu``:  the C++ kernel in ``fastaccum._C`` when the extension is built, else the
  pure-PyTorch reference.
- ``cuda``: the CUDA kernel in ``fastaccum._C`` when the extension was built against CUDA
  torch; else the Triton kernel when Triton can launch on this device; else the reference.
  Reason for preferring CUDA over Triton for every op (``accumulate_``, ``finalize_``,
  ``sgd_window_step_``, ``adam_window_step_``): both are multi-tensor kernels, but the CUDA
  ones pack the tensor table into the kernel arguments and need no host-to-device table
  copy. No GPU comparison has been recorded yet (see benchmarks/results/README.md); revisit
  when one is. A build without an op's CUDA kernel routes that op to Triton. The batch-norm
  ops (``bn_stats``, ``bn_apply``, ``bn_backward_reduce``, ``bn_backward_apply``) have no
  CUDA kernels: Triton is their GPU path (benchmarks/gpu_batchnorm.py compares it with
  cuDNN's batch norm). The same holds for ``quantize_groups`` / ``dequantize_groups``.
- anything else (``meta``, ``mps``, ...): the reference, which is plain PyTorch.

Whether Triton works is decided by the device, never by whether ``import triton``
succeeds: an installed Triton on a machine without a GPU fails at launch with
"0 active drivers".

``FASTACCUM_BACKEND=reference|native|triton`` forces a choice (for tests and
benchmarks); a forced backend that cannot run raises instead of silently falling back.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

import torch

REFERENCE = "reference"
NATIVE = "native"  # fastaccum._C: the C++ CPU kernels or the CUDA kernels
TRITON = "triton"
BACKENDS = (REFERENCE, NATIVE, TRITON)


def _load_extension() -> ModuleType | None:
    if os.environ.get("FASTACCUM_NO_EXT", "").strip().lower() in {"1", "true", "yes", "on"}:
        return None
    try:
        return importlib.import_module("fastaccum._C")
    except ImportError:
        return None


def _native_kernels() -> frozenset[tuple[str, str]]:
    """(op name, "cpu"/"cuda") pairs that fastaccum._C registered a kernel for."""
    if _EXTENSION is None:
        return frozenset()
    found = set()
    for key, device in (("CPU", "cpu"), ("CUDA", "cuda")):
        for name in torch._C._dispatch_get_registrations_for_dispatch_key(key):
            if name.startswith("fastaccum::"):
                found.add((name.removeprefix("fastaccum::").split(".")[0], device))
    return frozenset(found)


# Decided once, at import, so that select() is plain Python that torch.compile can trace.
_EXTENSION = _load_extension()
_NATIVE_KERNELS = _native_kernels()
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def extension() -> ModuleType | None:
    """The compiled extension ``fastaccum._C``, or None when it was not built."""
    return _EXTENSION


def has_extension() -> bool:
    """True when the C++ extension is importable (its ops are then in ``torch.ops.fastaccum``)."""
    return _EXTENSION is not None


def has_cuda_kernels() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    return _EXTENSION is not None and bool(_EXTENSION.cuda_built())


def triton_available() -> bool:
    """True when Triton is installed; says nothing about whether it can launch."""
    return _TRITON_INSTALLED


def triton_interpreted() -> bool:
    """True when Triton runs its interpreter (``TRITON_INTERPRET=1``), on CPU tensors too."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def triton_can_run(device: torch.device) -> bool:
    """True when a Triton kernel can launch on tensors of ``device``."""
    if not triton_available():
        return False
    if triton_interpreted():
        return device.type in {"cpu", "cuda"}
    return device.type == "cuda" and torch.cuda.is_available()


def native_can_run(device: torch.device, op: str | None = None) -> bool:
    """True when ``fastaccum._C`` has kernels for ``device`` (for ``op``, when named: a
    build may predate an op's kernel for that device)."""
    if op is not None:
        return (op, device.type) in _NATIVE_KERNELS
    if device.type == "cpu":
        return has_extension()
    if device.type == "cuda":
        return has_cuda_kernels()
    return False


def _forced() -> str | None:
    value = os.environ.get("FASTACCUM_BACKEND", "").strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        raise ValueError(f"FASTACCUM_BACKEND must be one of {BACKENDS}, got {value!r}")
    return value


def select(device: torch.device | str, backend: str | None = None, op: str | None = None) -> str:
    """Pick the backend for ``op`` (a ``torch.ops.fastaccum`` name) on tensors of ``device``.

    ``backend`` (or ``FASTACCUM_BACKEND``) forces a choice. Raises RuntimeError when a
    forced backend cannot run on ``device``, and ValueError for an unknown name.
    """
    device = torch.device(device)
    wanted = backend if backend is not None else _forced()
    if wanted is not None:
        if wanted not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {wanted!r}")
        if wanted == NATIVE and not native_can_run(device, op):
            if not has_extension():
                why = "fastaccum._C is not built (reinstall without FASTACCUM_NO_EXT=1)"
            else:
                why = f"fastaccum._C has no {device.type} kernel" + (f" for {op}" if op else "s")
            raise RuntimeError(
                f"backend 'native' cannot run on {device.type}: {why}; use backend='triton' "
                "or 'reference'"
            )
        if wanted == TRITON and not triton_can_run(device):
            raise RuntimeError(
                f"backend 'triton' cannot run on {device.type}: Triton needs a CUDA device "
                "(or TRITON_INTERPRET=1 set before triton is imported)"
            )
        return wanted
    if native_can_run(device, op):
        return NATIVE
    if device.type == "cuda" and triton_can_run(device):
        return TRITON
    return REFERENCE


def describe() -> dict[str, object]:
    """A summary of what is available, for ``fastaccum bench`` and bug reports."""
    return {
        "torch": torch.__version__,
        "extension": has_extension(),
        "cuda_kernels": has_cuda_kernels(),
        "triton": triton_available(),
        "triton_interpreted": triton_interpreted(),
        "cuda_available": torch.cuda.is_available(),
        "cpu": select("cpu"),
        "cuda": select("cuda") if torch.cuda.is_available() else None,
    }
