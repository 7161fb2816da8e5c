"""Modules: fused weight-gradient :class:`Linear`, :class:`Embedding`,
:class:`MultiheadAttention` and Hugging Face's ``Conv1D`` (:mod:`fastaccum.nn.conv1d`),
all switched on by :func:`fuse_wgrad`; and accumulation-aware BatchNorm
(:func:`convert_batchnorm`, :func:`end_window`)."""

from fastaccum.nn.attention import MultiheadAttention
from fastaccum.nn.batchnorm import (
    AccumBatchNorm1d,
    AccumBatchNorm2d,
    AccumBatchNorm3d,
    convert_batchnorm,
    end_window,
    load_window_state_dict,
    window_state_dict,
)
from fastaccum.nn.embedding import Embedding
from fastaccum.nn.linear import Linear, WgradSink, fuse_wgrad

__all__ = [
    "AccumBatchNorm1d",
    "AccumBatchNorm2d",
    "AccumBatchNorm3d",
    "Embedding",
    "Linear",
    "MultiheadAttention",
    "WgradSink",
    "convert_batchnorm",
    "end_window",
    "fuse_wgrad",
    "load_window_state_dict",
    "window_state_dict",
]
