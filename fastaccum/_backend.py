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
import warnings
from types import ModuleType
from typing import Any

import torch

REFERENCE = "reference"
NATIVE = "native"  # fastaccum._C: the C++ CPU kernels or the CUDA kernels
TRITON = "triton"
BACKENDS = (REFERENCE, NATIVE, TRITON)


def _load_extension(name: str = "fastaccum._C") -> tuple[ModuleType | None, str]:
    """(the compiled extension ``name`` or None, why it is or is not in use).

    A compiled extension that is present but fails to import (most often: built against
    another torch, "undefined symbol") is reported with a RuntimeWarning, since every op
    then runs through the much slower PyTorch reference."""
    if os.environ.get("FASTACCUM_NO_EXT", "").strip().lower() in {"1", "true", "yes", "on"}:
        return None, "not loaded: FASTACCUM_NO_EXT is set"
    if importlib.util.find_spec(name) is None:
        return None, (
            "not built (installed with FASTACCUM_NO_EXT=1, or without a C++ compiler); "
            "reinstall with pip install --no-build-isolation ."
        )
    try:
        module = importlib.import_module(name)
    except ImportError as err:
        why = (
            f"built but fails to load ({err}); rebuild it against the installed torch "
            f"{torch.__version__}: pip install --no-build-isolation --force-reinstall ."
        )
        warnings.warn(
            f"fastaccum: the compiled extension {name} is {why}. Until then every op "
            "runs through the PyTorch reference, which is much slower",
            RuntimeWarning,
            stacklevel=2,
        )
        return None, why
    return module, f"loaded from {module.__file__}"


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
_EXTENSION, _EXTENSION_STATUS = _load_extension()
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


# The ops that go through select(), in the order ``fastaccum info`` lists them.
OPS = (
    "accumulate_",
    "finalize_",
    "sumsq",
    "sgd_window_step_",
    "adam_window_step_",
    "bn_stats",
    "bn_apply",
    "bn_backward_reduce",
    "bn_backward_apply",
    "quantize_groups",
    "dequantize_groups",
)


def extension_status() -> str:
    """Why ``fastaccum._C`` is or is not in use, in words (for ``fastaccum info``)."""
    return _EXTENSION_STATUS


def _triton_version() -> str | None:
    if not triton_available():
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("triton")
    except PackageNotFoundError:  # importable but not installed as a distribution
        return "unknown version"


def describe() -> dict[str, Any]:
    """What is available and which backend each op takes on each device, for
    ``fastaccum info`` and bug reports. Imports nothing heavy (not Triton itself)."""
    cuda = torch.cuda.is_available()
    devices = ["cpu"] + (["cuda"] if cuda else [])
    chosen = {device: backends_on(device) for device in devices}
    ops = {op: {device: chosen[device][op] for device in devices} for op in OPS}
    gpus = [
        {
            "name": torch.cuda.get_device_name(i),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(i))),
        }
        for i in range(torch.cuda.device_count() if cuda else 0)
    ]
    return {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "extension": has_extension(),
        "extension_status": extension_status(),
        "cuda_kernels": has_cuda_kernels(),
        "triton": triton_available(),
        "triton_version": _triton_version(),
        "triton_interpreted": triton_interpreted(),
        "cuda_available": cuda,
        "gpus": gpus,
        "forced_backend": os.environ.get("FASTACCUM_BACKEND") or None,
        "cpu": _selected("cpu"),
        "cuda": _selected("cuda") if cuda else None,
        "ops": ops,
        "wgrad_low_precision_cuda": _wgrad_cuda_path() if cuda else None,
    }


def backends_on(device: torch.device | str) -> dict[str, str]:
    """Op name -> the backend it takes on tensors of ``device`` (for each of :data:`OPS`);
    ``"error: ..."`` where a forced FASTACCUM_BACKEND cannot run there."""
    return {op: _selected(device, op) for op in OPS}


def _selected(device: torch.device | str, op: str | None = None) -> str:
    """:func:`select`, or the error it raises (a FASTACCUM_BACKEND that cannot run)."""
    try:
        return select(device, op=op)
    except (RuntimeError, ValueError) as err:
        return f"error: {err}"


def _wgrad_cuda_path() -> str:
    """How fused weight gradients from bf16/fp16 inputs reach an fp32 accumulator on CUDA
    (the choice of ``fastaccum.ops.wgrad``)."""
    if hasattr(torch.ops.aten.addmm, "dtype_out"):
        return "aten.addmm with an fp32 out_dtype (cuBLAS)"
    if triton_can_run(torch.device("cuda")):
        return "triton"
    return "upcast, then addmm_"
