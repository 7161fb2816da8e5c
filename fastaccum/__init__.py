"""fastaccum: train with the batch size you want on the GPU you have.

Fused micro-batch gradient accumulation for PyTorch. Importing this package is cheap: it
loads the compiled extension (if built) and registers its ops; Triton is imported only
when a Triton kernel is about to run.
"""

from fastaccum import _backend  # noqa: F401  (fastaccum._backend, for introspection)
from fastaccum.nn import convert_batchnorm, fuse_wgrad
from fastaccum.ops import AccumulateResult, accumulate_, finalize_
from fastaccum.optim import AccumulatingOptimizer, wrap

__version__ = "0.1.0"

__all__ = [
    "AccumulateResult",
    "AccumulatingOptimizer",
    "__version__",
    "accumulate_",
    "convert_batchnorm",
    "finalize_",
    "fuse_wgrad",
    "wrap",
]
