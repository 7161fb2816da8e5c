"""Fused weight gradients for Hugging Face ``transformers``' ``Conv1D``.

GPT-2, OpenAI GPT, ImageGPT and a few other ``transformers`` models build their
projections from ``transformers.pytorch_utils.Conv1D``: a Linear layer whose weight is
stored transposed, ``[in_features, out_features]``, and applied as
``addmm(bias, x, weight)``. Its weight gradient is ``input^T @ grad_out``, the transpose of
``nn.Linear``'s, so the same fused GEMM serves it, writing the accumulator through a
transposed view (or with its operands swapped).

:func:`fastaccum.fuse_wgrad` switches each ``Conv1D`` (exact class) to
:func:`fused_conv1d_class`, a subclass of it: ``isinstance(m, Conv1D)`` still holds (so
``transformers``' weight init and PEFT's layer matching keep working), and parameters,
``state_dict`` keys, ``repr`` and forward results are unchanged. The class is made on first
use, so fastaccum never imports ``transformers`` unless a model holds one of its layers; it
pickles as ``fastaccum.nn.conv1d.Conv1D``.
"""

from __future__ import annotations

import sys

import torch

from fastaccum.nn._sink import SinkLink, skip_frames
from fastaccum.nn.linear import fused_linear

_HF_MODULE = "transformers.pytorch_utils"
_FUSED: type[torch.nn.Module] | None = None


def hf_conv1d_class() -> type[torch.nn.Module] | None:
    """``transformers.pytorch_utils.Conv1D`` when ``transformers`` is already imported (a
    model holding one has imported it), else None."""
    module = sys.modules.get(_HF_MODULE)
    return getattr(module, "Conv1D", None) if module is not None else None


def fused_conv1d_class() -> type[torch.nn.Module]:
    """The fused subclass of ``transformers``' ``Conv1D`` (made once, on first use).

    Raises:
        ImportError: ``transformers`` is not installed.
    """
    global _FUSED
    if _FUSED is None:
        from transformers.pytorch_utils import Conv1D as HFConv1D

        class Conv1D(SinkLink, HFConv1D):
            """``transformers``' ``Conv1D`` with fused weight-gradient accumulation: while a
            sink is attached, backward adds ``input^T @ grad_out`` into the weight's fp32
            accumulator (and the bias gradient into the bias's) instead of making
            ``.grad``. Without one, it is ``transformers``' layer."""

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                out = fused_linear(self, x, transposed=True)
                return super().forward(x) if out is None else out

        skip_frames(Conv1D.forward)
        Conv1D.__module__ = __name__
        Conv1D.__qualname__ = "Conv1D"
        _FUSED = Conv1D
    return _FUSED


def __getattr__(name: str) -> type[torch.nn.Module]:
    # ``fastaccum.nn.conv1d.Conv1D``: where pickle finds the class of a fused layer.
    if name == "Conv1D":
        return fused_conv1d_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
