"""``fastaccum.nn.Embedding``: an ``nn.Embedding`` whose weight gradient goes straight into
an accumulator, one row per looked-up token.

Plain autograd makes a dense ``[num_embeddings, embedding_dim]`` dW on every micro-batch
(zero-filled, then the looked-up rows added), and then adds all of it into ``.grad``: for a
GPT-2 vocabulary that is 147 MiB written and read twice per micro-batch to update a few
thousand rows. With a sink attached (``fastaccum.wrap(..., model=model)`` attaches itself,
as for :class:`fastaccum.nn.Linear`), backward adds ``weight x grad_out`` row by row into the
fp32 accumulator (``index_add_``) and makes no dW at all. Without a sink, or while the sink
declines (``loss.backward()`` instead of ``opt.backward``), the layer computes exactly what
``nn.Embedding`` computes. As for the Linear layer, the fused forward and backward run as
one C++ autograd function (``torch.ops.fastaccum.embedding_wgrad``) where the sink hands out
a route, and as a Python one otherwise.

Only plain lookups are fused: layers with ``max_norm`` (which rewrites the weight in
forward), ``scale_grad_by_freq`` or ``sparse=True`` are left as ``nn.Embedding`` by
:func:`fastaccum.fuse_wgrad`.
"""

from __future__ import annotations

import sys
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from fastaccum.nn._sink import SinkLink, routes, run_eagerly, skip_frames


class EmbeddingGradSink(Protocol):
    """What a fused Embedding hands its weight gradient to."""

    def accepts_wgrad(self, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
        """True when the sink takes this layer's gradient on this backward pass."""

    def accumulate_embedding_grad(
        self, weight: torch.Tensor, indices: torch.Tensor, grad_out: torch.Tensor
    ) -> None:
        """Add row ``grad_out[i]`` into row ``indices[i]`` of the weight's accumulator."""

    def wgrad_route(self, layer: Embedding) -> tuple[torch.Tensor, None, torch.Tensor, int] | None:
        """``(weight_accum, None, control, slot)`` for ``fastaccum::embedding_wgrad``, or
        None when the layer has to take the Python route on this forward pass."""


class _FusedEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, indices: torch.Tensor, weight: torch.Tensor, layer: Embedding):
        out = F.embedding(indices, weight, layer.padding_idx)
        ctx.save_for_backward(indices)
        ctx.layer = layer
        ctx.weight = weight
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        (indices,) = ctx.saved_tensors
        if not ctx.needs_input_grad[1]:
            return None, None, None
        layer = ctx.layer
        flat_idx = indices.reshape(-1)
        rows = grad_out.reshape(-1, grad_out.shape[-1])
        if layer.padding_idx is not None:  # the padding row gets no gradient, as in torch
            keep = flat_idx != layer.padding_idx
            flat_idx, rows = flat_idx[keep], rows[keep]
        sink = layer._wgrad_sink
        if sink is not None and sink.accepts_wgrad(ctx.weight, None):
            sink.accumulate_embedding_grad(ctx.weight, flat_idx, rows)
            return None, None, None
        grad_w = torch.zeros(ctx.weight.shape, dtype=grad_out.dtype, device=grad_out.device)
        grad_w.index_add_(0, flat_idx, rows)
        return None, grad_w.to(ctx.weight.dtype), None


class Embedding(SinkLink, torch.nn.Embedding):
    """``torch.nn.Embedding`` with fused weight-gradient accumulation.

    Same constructor, parameters, ``state_dict`` keys and results as ``nn.Embedding``. While
    a sink is attached and accepts (``fastaccum.wrap(opt, K, model=model)`` with
    ``opt.backward``), backward adds the looked-up rows' gradients into the sink's fp32
    accumulator instead of producing a dense ``.grad``.

    Raises:
        ValueError: at forward, for ``max_norm``, ``scale_grad_by_freq`` or ``sparse``
            (use ``nn.Embedding`` for those; :func:`fastaccum.fuse_wgrad` does).
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.max_norm is not None or self.scale_grad_by_freq or self.sparse:
            raise ValueError(
                "fastaccum.nn.Embedding fuses plain lookups only; this layer has "
                f"max_norm={self.max_norm}, scale_grad_by_freq={self.scale_grad_by_freq}, "
                f"sparse={self.sparse}: use torch.nn.Embedding for it"
            )
        sink = self._wgrad_sink
        if not routes(sink, self.weight):
            return F.embedding(input, self.weight, self.padding_idx)
        return _fused_embedding(self, input, sink)  # eager under torch.compile


def _fused_embedding(
    layer: Embedding, input: torch.Tensor, sink: EmbeddingGradSink
) -> torch.Tensor:
    """The lookup of a layer that routes to ``sink``: as for fastaccum.nn.Linear, the C++
    autograd function where the sink hands out a route, else the Python one (which
    decides in backward)."""
    route = sink.wgrad_route(layer)
    if route is None:
        return _FusedEmbedding.apply(input, layer.weight, layer)
    accum, _, control, slot = route
    padding = -1 if layer.padding_idx is None else layer.padding_idx
    return torch.ops.fastaccum.embedding_wgrad.default(
        input, layer.weight, padding, accum, control, slot
    )


run_eagerly(sys.modules[__name__], "_fused_embedding")
skip_frames(Embedding.forward)


def fusable_embedding(module: torch.nn.Module) -> bool:
    """True for an ``nn.Embedding`` (exact class) whose options :class:`Embedding` fuses."""
    return (
        type(module) is torch.nn.Embedding
        and module.max_norm is None
        and not module.scale_grad_by_freq
        and not module.sparse
    )
