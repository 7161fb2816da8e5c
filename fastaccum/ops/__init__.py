"""Typed wrappers over ``torch.ops.fastaccum``, their fake kernels and references."""

from fastaccum.ops.accumulate import (
    AccumulateResult,
    accumulate_,
    accumulate_ref,
    finalize_,
    finalize_ref,
)
from fastaccum.ops.optim_step import (
    adam_window_step_,
    adam_window_step_ref,
    sgd_window_step_,
    sgd_window_step_ref,
)

__all__ = [
    "AccumulateResult",
    "accumulate_",
    "accumulate_ref",
    "adam_window_step_",
    "adam_window_step_ref",
    "finalize_",
    "finalize_ref",
    "sgd_window_step_",
    "sgd_window_step_ref",
]
