"""``fastaccum.nn.Linear``: an ``nn.Linear`` whose weight gradient can go straight into an
accumulator, and :func:`fuse_wgrad`, which switches a model's Linear layers to it.

Without a sink attached, the layer is ``nn.Linear`` (it calls ``F.linear``). With one
attached (``fastaccum.wrap(..., model=model)`` attaches itself), backward adds
``grad_out^T @ input`` into the sink's fp32 accumulator with one GEMM (beta = 1) while the
sink's ``opt.backward`` runs. No dW tensor is made and ``.grad`` stays None for the weight
and the bias.

Two routes lead there. Where the sink hands out a route (:meth:`WgradSink.wgrad_route`:
its accumulators and a control tensor) and the GEMM runs in fp32 or on the CPU, the layer
calls ``torch.ops.fastaccum.linear_wgrad``, a C++ autograd function: no Python runs in
either pass, which on a CPU saves about 60 us per layer and micro-batch. Otherwise (bf16
or fp16 GEMMs on CUDA, which take a GEMM with fp32 output or the Triton kernel) a Python
autograd function hands ``grad_out`` and the input to :meth:`WgradSink.accumulate_wgrad`.
"""

from __future__ import annotations

import sys
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from fastaccum.nn._sink import ModuleT, SinkLink, refresh_sinks, routes, run_eagerly, skip_frames


class WgradSink(Protocol):
    """What a fused Linear layer hands its weight gradient to."""

    def accepts_wgrad(self, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
        """True when the sink takes this layer's gradients on this backward pass."""

    def accumulate_wgrad(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        grad_out: torch.Tensor,
        input: torch.Tensor,
        transposed: bool = False,
        rows: slice | None = None,
    ) -> None:
        """Add ``grad_out^T @ input`` (and ``grad_out.sum(0)``) into the accumulators;
        with ``transposed`` (a weight stored [in, out]) add ``input^T @ grad_out``; with
        ``rows``, into those rows of the weight's and bias's accumulators only."""

    def wgrad_route(
        self, layer: SinkLink
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, int] | None:
        """``(weight_accum, bias_accum, control, slot)`` for ``fastaccum::linear_wgrad``, or
        None when the layer has to take the Python route on this forward pass."""


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


class _FusedWgradLinear(torch.autograd.Function):
    """``F.linear(x, weight, bias)``, where ``(weight, bias)`` are ``rows`` of the layer's
    weight pair ``pair`` (all of it when ``rows`` is None)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias,
        layer,
        transposed: bool,
        pair: tuple[torch.Tensor, torch.Tensor | None],
        rows: slice | None,
    ):
        # Under autocast, cast here as autocast would for F.linear, and keep the cast copies
        # for backward, so that gradients match nn.Linear under autocast.
        dtype = _autocast_dtype(x.device.type)
        xc, wc = x, weight.t() if transposed else weight
        bc = bias
        if dtype is None:
            out = F.linear(xc, wc, bc)  # no autocast: no context to enter
        else:
            if weight.is_floating_point():
                xc, wc = x.to(dtype), wc.to(dtype)
                bc = None if bias is None else bias.to(dtype)
            with torch.autocast(x.device.type, enabled=False):
                out = F.linear(xc, wc, bc)
        ctx.save_for_backward(xc, wc)
        ctx.layer = layer
        ctx.x_dtype = x.dtype
        ctx.weight_dtype = weight.dtype
        ctx.has_bias = bias is not None
        ctx.pair = pair
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.transposed = transposed
        ctx.rows = rows
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        x, w = ctx.saved_tensors
        grad_out = grad_out.to(w.dtype)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_out @ w).to(ctx.x_dtype)
        go2 = grad_out.reshape(-1, grad_out.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        sink = ctx.layer._wgrad_sink
        if sink is not None and ctx.needs_input_grad[1] and sink.accepts_wgrad(*ctx.pair):
            sink.accumulate_wgrad(*ctx.pair, go2, x2, transposed=ctx.transposed, rows=ctx.rows)
            return grad_x, None, None, None, None, None, None
        if ctx.needs_input_grad[1]:
            grad_w = x2.t() @ go2 if ctx.transposed else go2.t() @ x2
            grad_w = grad_w.to(ctx.weight_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = go2.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None


def takes_fused_route(layer: SinkLink) -> bool:
    """True when ``layer`` (a fused layer) routes its weight gradient on this forward
    pass: a sink is attached, gradients are wanted, and the weight is fp32/bf16/fp16."""
    return routes(layer._wgrad_sink, *layer._wgrad_pair())


def fused_linear(
    layer: SinkLink,
    input: torch.Tensor,
    *,
    transposed: bool,
    rows: slice | None = None,
) -> torch.Tensor | None:
    """``F.linear(input, W, b)`` whose weight gradient goes to the layer's sink, where
    ``(W, b)`` is the layer's weight pair (``layer.weight`` [out, in] and ``layer.bias``
    for Linear layers), or ``W``'s transpose with ``transposed`` (a weight stored
    [in, out], as in Hugging Face's ``Conv1D``). With ``rows`` (not with ``transposed``),
    ``W[rows]`` and ``b[rows]`` instead: one part of a packed weight, whose gradient goes
    into those rows of the accumulators. None when the layer does not route on this pass
    (:func:`takes_fused_route`): the caller runs its plain forward then."""
    sink = layer._wgrad_sink
    pair = layer._wgrad_pair()
    if not routes(sink, *pair):
        return None
    return _fused_linear(layer, input, transposed, rows, sink, pair)  # eager under compile


def _fused_linear(
    layer: SinkLink,
    input: torch.Tensor,
    transposed: bool,
    rows: slice | None,
    sink: WgradSink,
    pair: tuple[torch.Tensor, torch.Tensor | None],
) -> torch.Tensor:
    """:func:`fused_linear` for a layer that routes to ``sink``: the C++ op where the sink
    hands out a route, else the Python autograd function."""
    weight, bias = pair
    dtype = _autocast_dtype(input.device.type) if weight.is_floating_point() else None
    compute = weight.dtype if dtype is None else dtype
    route = None
    if compute == torch.float32 or input.device.type == "cpu":
        route = sink.wgrad_route(layer)
    if rows is not None:
        weight = weight[rows]
        bias = None if bias is None else bias[rows]
    if route is None:
        return _FusedWgradLinear.apply(input, weight, bias, layer, transposed, pair, rows)
    weight_accum, bias_accum, control, slot = route
    if rows is not None:
        weight_accum = weight_accum[rows]
        bias_accum = None if bias_accum is None else bias_accum[rows]
    if transposed:  # the op sees [out, in] views of the weight and of its accumulator
        weight, weight_accum = weight.t(), weight_accum.t()
    if dtype is not None:  # autocast's casts for F.linear, done here as in nn.Linear
        input, weight = input.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    return torch.ops.fastaccum.linear_wgrad.default(
        input, weight, bias, weight_accum, bias_accum, control, slot
    )


class Linear(SinkLink, torch.nn.Linear):
    """``torch.nn.Linear`` with fused weight-gradient accumulation.

    Same constructor, parameters, ``state_dict`` keys and results as ``nn.Linear``. While a
    sink is attached (see :class:`WgradSink`; ``fastaccum.wrap(opt, K, model=model)``
    attaches the optimizer wrapper), backward adds the weight and bias gradients straight
    into the sink's fp32 accumulators instead of producing ``.grad``.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        out = fused_linear(self, input, transposed=False)
        return F.linear(input, self.weight, self.bias) if out is None else out


run_eagerly(sys.modules[__name__], "_fused_linear")
skip_frames(Linear.forward, fused_linear)


def fuse_wgrad(model: ModuleT, *, embeddings: bool = True) -> ModuleT:
    """Switch every ``nn.Linear`` of ``model`` (exact class, at any depth) to
    :class:`fastaccum.nn.Linear`, every ``nn.MultiheadAttention`` to
    :class:`fastaccum.nn.MultiheadAttention` (its self-attention projections), every
    Hugging Face ``transformers`` ``Conv1D`` (GPT-2's projections) to its fused subclass
    (:mod:`fastaccum.nn.conv1d`), and with
    ``embeddings`` every plain ``nn.Embedding`` to :class:`fastaccum.nn.Embedding`, in
    place, and return ``model``.

    Parameters, buffers, hooks and ``state_dict`` keys are kept (the modules are the same
    objects). Subclasses are left alone, since they may override forward, and so are
    embeddings with ``max_norm``, ``scale_grad_by_freq`` or ``sparse=True``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or ``embeddings`` not a bool.
    """
    from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

    from fastaccum.nn.attention import MultiheadAttention, OutProjection
    from fastaccum.nn.conv1d import fused_conv1d_class, hf_conv1d_class
    from fastaccum.nn.embedding import Embedding, fusable_embedding

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(embeddings, bool):
        raise TypeError(f"embeddings must be True or False, got {type(embeddings).__name__}")
    hf_conv1d = hf_conv1d_class()
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = Linear
        elif type(module) is torch.nn.MultiheadAttention:
            module.__class__ = MultiheadAttention
            if type(module.out_proj) is NonDynamicallyQuantizableLinear:
                module.out_proj.__class__ = OutProjection
        elif hf_conv1d is not None and type(module) is hf_conv1d:
            module.__class__ = fused_conv1d_class()
        elif embeddings and fusable_embedding(module):
            module.__class__ = Embedding
    refresh_sinks(model)  # a wrapper built on the model before takes the new layers
    return model
