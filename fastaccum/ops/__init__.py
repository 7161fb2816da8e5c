"""Typed wrappers over ``torch.ops.fastaccum``, their fake kernels and references."""

from fastaccum.ops.accumulate import (
    AccumulateResult,
    accumulate_,
    accumulate_ref,
    finalize_,
    finalize_ref,
    sumsq,
    sumsq_ref,
)
from fastaccum.ops.batchnorm import (
    BatchNormGradSums,
    BatchNormStats,
    batch_norm_apply,
    batch_norm_backward_apply,
    batch_norm_backward_reduce,
    batch_norm_stats,
    batch_norm_train,
)
from fastaccum.ops.optim_step import (
    adam_window_step_,
    adam_window_step_ref,
    sgd_window_step_,
    sgd_window_step_ref,
)

__all__ = [
    "AccumulateResult",
    "BatchNormGradSums",
    "BatchNormStats",
    "accumulate_",
    "accumulate_ref",
    "adam_window_step_",
    "adam_window_step_ref",
    "batch_norm_apply",
    "batch_norm_backward_apply",
    "batch_norm_backward_reduce",
    "batch_norm_stats",
    "batch_norm_train",
    "finalize_",
    "finalize_ref",
    "sgd_window_step_",
    "sgd_window_step_ref",
    "sumsq",
    "sumsq_ref",
]
