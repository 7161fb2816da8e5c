"""Fused weight gradients for ``nn.MultiheadAttention``'s projections.

``nn.MultiheadAttention`` never calls a Linear module: ``F.multi_head_attention_forward``
applies ``in_proj_weight`` and ``out_proj.weight`` with ``F.linear`` itself, so swapping
the class of ``out_proj`` alone would change nothing. :class:`MultiheadAttention` (what
:func:`fastaccum.fuse_wgrad` switches ``nn.MultiheadAttention`` to) computes
self-attention (``query is key is value``, ``need_weights=False``: what
``nn.TransformerEncoderLayer``, ``nn.TransformerDecoderLayer``'s self-attention and
torchvision's ViT call) with the same operations as torch, the two projections going
through the fused GEMM while a sink is attached: the packed ``[3E, E]`` input projection
and the output projection each add their weight gradient into an accumulator, and no dW
is made.

Every other call (cross-attention, ``need_weights=True``, ``bias_k``/``bias_v``,
``add_zero_attn``, separate q/k/v weights, unbatched input, no sink, no gradient) runs
torch's own forward, unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from fastaccum.nn._sink import SinkLink
from fastaccum.nn.linear import Linear, fused_linear, takes_fused_route


class OutProjection(Linear, NonDynamicallyQuantizableLinear):
    """The output projection of a fused :class:`MultiheadAttention`: a fused
    :class:`fastaccum.nn.Linear` that is still a ``NonDynamicallyQuantizableLinear``."""


def _project(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``F.linear`` with ``layer``'s weight pair, fused when the layer takes the route."""
    out = fused_linear(layer, x, transposed=False)
    return F.linear(x, *layer._wgrad_pair()) if out is None else out


class MultiheadAttention(SinkLink, torch.nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` whose self-attention projections accumulate their
    weight gradients in place (see the module docstring). Same constructor, parameters,
    ``state_dict`` keys and results as ``nn.MultiheadAttention``."""

    def _wgrad_pair(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.in_proj_weight, self.in_proj_bias

    def _fuses(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
        return (
            query is key
            and key is value
            and query.dim() == 3
            and not query.is_nested
            and self._qkv_same_embed_dim
            and self.bias_k is None
            and self.bias_v is None
            and not self.add_zero_attn
            and takes_fused_route(self)
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if need_weights or not self._fuses(query, key, value):
            return super().forward(
                query,
                key,
                value,
                key_padding_mask=key_padding_mask,
                need_weights=need_weights,
                attn_mask=attn_mask,
                average_attn_weights=average_attn_weights,
                is_causal=is_causal,
            )
        x = query.transpose(1, 0) if self.batch_first else query
        out = self._self_attention(x, key_padding_mask, attn_mask, is_causal)
        return (out.transpose(1, 0) if self.batch_first else out), None

    def _self_attention(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
        attn_mask: torch.Tensor | None,
        is_causal: bool,
    ) -> torch.Tensor:
        """Self-attention of ``x`` [seq, batch, embed], as torch computes it without
        attention weights (scaled dot-product attention), with fused projections."""
        seq, batch, embed = x.shape
        heads = self.num_heads
        head_dim = embed // heads
        if embed != self.embed_dim:
            raise ValueError(f"expected embedding dimension {self.embed_dim}, got {embed}")
        # Masks as torch canonicalizes them: bool masks become float (-inf where True).
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask,
            mask_name="key_padding_mask",
            other_type=F._none_or_dtype(attn_mask),
            other_name="attn_mask",
            target_type=x.dtype,
        )
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "is_causal=True needs attn_mask too (the causal mask): nn.MultiheadAttention "
                "takes is_causal as a hint, not as a replacement for the mask"
            )
        if is_causal and key_padding_mask is None:
            attn_mask = None  # scaled dot-product attention applies the causal mask itself
        else:
            attn_mask = F._canonical_mask(
                mask=attn_mask,
                mask_name="attn_mask",
                other_type=None,
                other_name="",
                target_type=x.dtype,
                check_other=False,
            )
            if key_padding_mask is not None:
                is_causal = False  # merged with the padding mask, it is no longer causal
        if attn_mask is not None:
            expected = (seq, seq) if attn_mask.dim() == 2 else (batch * heads, seq, seq)
            if attn_mask.dim() not in (2, 3) or tuple(attn_mask.shape) != expected:
                raise RuntimeError(
                    f"attn_mask must have shape {(seq, seq)} or {(batch * heads, seq, seq)}, "
                    f"got {tuple(attn_mask.shape)}"
                )
            if attn_mask.dim() == 2:
                attn_mask = attn_mask.unsqueeze(0)
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (batch, seq):
                raise RuntimeError(
                    f"key_padding_mask must have shape {(batch, seq)}, "
                    f"got {tuple(key_padding_mask.shape)}"
                )
            padding = (
                key_padding_mask.view(batch, 1, 1, seq)
                .expand(-1, heads, -1, -1)
                .reshape(batch * heads, 1, seq)
            )
            attn_mask = padding if attn_mask is None else attn_mask + padding

        # The packed input projection, split into q, k, v as torch splits it.
        qkv = _project(self, x)
        qkv = qkv.unflatten(-1, (3, embed)).unsqueeze(0).transpose(0, -2).squeeze(-2)
        qkv = qkv.contiguous()
        q, k, v = (
            t.view(seq, batch * heads, head_dim).transpose(0, 1).view(batch, heads, seq, head_dim)
            for t in qkv
        )
        if attn_mask is not None:
            if attn_mask.size(0) == 1:
                attn_mask = attn_mask.unsqueeze(0)
            else:
                attn_mask = attn_mask.view(batch, heads, -1, seq)
        dropout_p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
        del q, k, v, qkv
        out = out.permute(2, 0, 1, 3).reshape(seq * batch, embed)
        return _project(self.out_proj, out).view(seq, batch, embed)
