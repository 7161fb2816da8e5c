"""Typed wrappers over ``torch.ops.fastaccum``, their fake kernels and references."""

from fastaccum.ops.accumulate import (
    AccumulateResult,
    accumulate_,
    accumulate_ref,
    finalize_,
    finalize_ref,
)

__all__ = ["AccumulateResult", "accumulate_", "accumulate_ref", "finalize_", "finalize_ref"]
