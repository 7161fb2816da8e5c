"""fastaccum: train with the batch size you want on the GPU you have.

Fused micro-batch gradient accumulation for PyTorch. Importing this package is cheap: it
loads the compiled extension (if built) and registers its ops; Triton is imported only
when a Triton kernel is about to run.
"""

from typing import TYPE_CHECKING

from fastaccum import _backend  # noqa: F401  (fastaccum._backend, for introspection)
from fastaccum.nn import convert_batchnorm, fuse_wgrad
from fastaccum.ops import AccumulateResult, accumulate_, finalize_
from fastaccum.optim import AccumulatingOptimizer, wrap

if TYPE_CHECKING:  # what __getattr__ loads on first use, for type checkers and IDEs
    from fastaccum import memory
    from fastaccum.memory import ActivationPolicy, save_activations
    from fastaccum.memory.checkpoint import checkpoint
    from fastaccum.memory.planner import BatchPlan, PlanningError, plan_batch
    from fastaccum.optim.lr import scale_lr, warmup

__version__ = "0.1.0"

# Loaded on first use, so that `import fastaccum` does not pay for the activation pipeline.
_LAZY = {
    "ActivationPolicy": "fastaccum.memory",
    "checkpoint": "fastaccum.memory",
    "save_activations": "fastaccum.memory",
    "BatchPlan": "fastaccum.memory.planner",
    "PlanningError": "fastaccum.memory.planner",
    "plan_batch": "fastaccum.memory.planner",
    "scale_lr": "fastaccum.optim.lr",
    "warmup": "fastaccum.optim.lr",
}


def __getattr__(name: str) -> object:
    if name == "memory":
        import importlib

        return importlib.import_module("fastaccum.memory")
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastaccum' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The loaded names and the ones loaded on first use, for ``dir()`` and completion."""
    return sorted({*globals(), *_LAZY, "memory"})


__all__ = [
    "AccumulateResult",
    "AccumulatingOptimizer",
    "ActivationPolicy",
    "BatchPlan",
    "PlanningError",
    "__version__",
    "accumulate_",
    "checkpoint",
    "convert_batchnorm",
    "finalize_",
    "fuse_wgrad",
    "memory",
    "plan_batch",
    "save_activations",
    "scale_lr",
    "warmup",
    "wrap",
]
