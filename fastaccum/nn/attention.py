"""Fused weight gradients for ``nn.MultiheadAttention``'s projections.

``nn.MultiheadAttention`` never calls a Linear module: ``F.multi_head_attention_forward``
applies ``in_proj_weight`` and ``out_proj.weight`` with ``F.linear`` itself, so swapping
the class of ``out_proj`` alone would change nothing. :class:`MultiheadAttention` (what
:func:`fastaccum.fuse_wgrad` switches ``nn.MultiheadAttention`` to) runs torch's own
sequence of operations, with the projections going through the fused GEMM while a sink
is attached: the packed ``[3E, E]`` input projection (whole for self-attention, as its q
and kv or q, k, v row blocks otherwise) and the output projection each add their weight
gradient into an accumulator, and no dW is made. That covers self-attention
(``nn.TransformerEncoderLayer``, torchvision's ViT), cross-attention
(``nn.TransformerDecoderLayer``), ``need_weights`` both ways, and unbatched input.

Calls it does not fuse run torch's own forward, unchanged: modules with ``bias_k`` /
``bias_v``, ``add_zero_attn`` or separate q/k/v weights (``kdim`` or ``vdim`` other than
``embed_dim``), nested tensors, no sink or no gradient, and input torch rejects (wrong
shapes, ``is_causal`` without a mask), which then gets torch's own error.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from fastaccum.nn._sink import SinkLink, run_eagerly, skip_frames
from fastaccum.nn.linear import Linear, fused_linear, takes_fused_route


class OutProjection(Linear, NonDynamicallyQuantizableLinear):
    """The output projection of a fused :class:`MultiheadAttention`: a fused
    :class:`fastaccum.nn.Linear` that is still a ``NonDynamicallyQuantizableLinear``."""


def _project(layer: SinkLink, x: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
    """``F.linear`` with ``layer``'s weight pair (its ``rows`` only, when given), fused
    when the layer takes the route."""
    out = fused_linear(layer, x, transposed=False, rows=rows)
    if out is not None:
        return out
    weight, bias = layer._wgrad_pair()
    if rows is not None:
        weight, bias = weight[rows], None if bias is None else bias[rows]
    return F.linear(x, weight, bias)


def _split_packed(proj: torch.Tensor, parts: int, embed: int) -> torch.Tensor:
    """[..., parts * E] -> contiguous [parts, ..., E], as torch splits a packed projection."""
    return proj.unflatten(-1, (parts, embed)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()


def _is_mask(mask: torch.Tensor | None, shapes: tuple[tuple[int, ...], ...]) -> bool:
    """True for no mask, or a bool or floating mask of one of ``shapes``."""
    if mask is None:
        return True
    return (mask.dtype == torch.bool or mask.is_floating_point()) and tuple(mask.shape) in shapes


class MultiheadAttention(SinkLink, torch.nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` whose projections accumulate their weight gradients
    in place (see the module docstring). Same constructor, parameters, ``state_dict`` keys
    and results as ``nn.MultiheadAttention``."""

    def _wgrad_pair(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.in_proj_weight, self.in_proj_bias

    def _fuses(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
        attn_mask: torch.Tensor | None,
        is_causal: bool,
    ) -> bool:
        """True when this call takes the fused path: a module layout it handles, a sink
        taking the gradients, and input torch accepts (anything else goes to torch's
        forward, which raises torch's error for bad input)."""
        if not (
            self._qkv_same_embed_dim
            and self.bias_k is None
            and self.bias_v is None
            and not self.add_zero_attn
            and takes_fused_route(self)
        ):
            return False
        dim, embed = query.dim(), self.embed_dim
        if (
            dim not in (2, 3)
            or key.dim() != dim
            or query.is_nested
            or key.is_nested
            or value.is_nested
            or query.shape[-1] != embed
            or key.shape[-1] != embed
            or key.shape != value.shape
            or (is_causal and attn_mask is None)
        ):
            return False
        if dim == 3:
            b = 0 if self.batch_first else 1
            batch, tgt, src = query.shape[b], query.shape[1 - b], key.shape[1 - b]
            if key.shape[b] != batch:
                return False
            padding_shape: tuple[int, ...] = (batch, src)
        else:
            batch, tgt, src = 1, query.shape[0], key.shape[0]
            padding_shape = (src,)
        return _is_mask(key_padding_mask, (padding_shape,)) and _is_mask(
            attn_mask, ((tgt, src), (batch * self.num_heads, tgt, src))
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
        if not self._fuses(query, key, value, key_padding_mask, attn_mask, is_causal):
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
        return self._fused_forward(
            query,
            key,
            value,
            key_padding_mask,
            need_weights,
            attn_mask,
            average_attn_weights,
            is_causal,
        )

    def _fused_forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
        need_weights: bool,
        attn_mask: torch.Tensor | None,
        average_attn_weights: bool,
        is_causal: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`forward` of a call that ``_fuses`` accepted (eager under torch.compile,
        see :mod:`fastaccum.nn._sink`)."""
        # Masks as torch canonicalizes them: bool masks become float (-inf where True).
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask,
            mask_name="key_padding_mask",
            other_type=F._none_or_dtype(attn_mask),
            other_name="attn_mask",
            target_type=query.dtype,
        )
        attn_mask = F._canonical_mask(
            mask=attn_mask,
            mask_name="attn_mask",
            other_type=None,
            other_name="",
            target_type=query.dtype,
            check_other=False,
        )
        batched = query.dim() == 3
        if batched and self.batch_first:  # to [seq, batch, embed], keeping which is which
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = query.transpose(1, 0), key.transpose(1, 0)
                    value = key
            else:
                query, key, value = (t.transpose(1, 0) for t in (query, key, value))
        elif not batched:  # a batch of one; torch's unsqueeze makes three distinct tensors
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        out, weights = self._attention(
            query,
            key,
            value,
            key_padding_mask,
            attn_mask,
            need_weights,
            average_attn_weights,
            is_causal,
        )
        if not batched:
            out = out.squeeze(1)
            weights = None if weights is None else weights.squeeze(0)
        elif self.batch_first:
            out = out.transpose(1, 0)
        return out, weights

    def _in_projection(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v from the packed input projection, as torch computes them: one GEMM for
        self-attention, the q and kv row blocks when key is value, else three."""
        embed = self.embed_dim
        if key is value:
            if query is key:
                q, k, v = _split_packed(_project(self, query), 3, embed)
                return q, k, v
            q = _project(self, query, slice(0, embed))
            k, v = _split_packed(_project(self, key, slice(embed, 3 * embed)), 2, embed)
            return q, k, v
        q, k, v = (
            _project(self, t, slice(i * embed, (i + 1) * embed))
            for i, t in enumerate((query, key, value))
        )
        return q, k, v

    def _attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
        attn_mask: torch.Tensor | None,
        need_weights: bool,
        average_attn_weights: bool,
        is_causal: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of ``query`` [tgt, batch, E] over ``key``/``value`` [src, batch, E]
        with canonical (float) masks whose shapes ``_fuses`` checked, as
        ``F.multi_head_attention_forward`` computes it, with fused projections."""
        tgt, batch, embed = query.shape
        src = key.shape[0]
        heads = self.num_heads
        head_dim = embed // heads
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # scaled dot-product attention applies the causal mask itself
        elif key_padding_mask is not None:
            is_causal = False  # merged with the padding mask, it is no longer causal
        q, k, v = self._in_projection(query, key, value)
        if attn_mask is not None and attn_mask.dim() == 2:
            attn_mask = attn_mask.unsqueeze(0)
        q = q.view(tgt, batch * heads, head_dim).transpose(0, 1)
        k = k.view(src, batch * heads, head_dim).transpose(0, 1)
        v = v.view(src, batch * heads, head_dim).transpose(0, 1)
        if key_padding_mask is not None:
            padding = (
                key_padding_mask.view(batch, 1, 1, src)
                .expand(-1, heads, -1, -1)
                .reshape(batch * heads, 1, src)
            )
            attn_mask = padding if attn_mask is None else attn_mask + padding
        dropout_p = self.dropout if self.training else 0.0

        weights = None
        if need_weights:  # explicit softmax, as torch computes it when weights are asked for
            q_scaled = q * math.sqrt(1.0 / float(head_dim))
            if attn_mask is not None:
                weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
            else:
                weights = torch.bmm(q_scaled, k.transpose(-2, -1))
            del q_scaled, k
            weights = F.softmax(weights, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = torch.bmm(weights, v)
            del v
            out = out.transpose(0, 1).reshape(tgt * batch, embed)
            weights = weights.view(batch, heads, tgt, src)
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            if attn_mask is not None:
                if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                    attn_mask = attn_mask.unsqueeze(0)
                else:
                    attn_mask = attn_mask.view(batch, heads, -1, src)
            q = q.view(batch, heads, tgt, head_dim)
            k = k.view(batch, heads, src, head_dim)
            v = v.view(batch, heads, src, head_dim)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
            del q, k, v
            out = out.permute(2, 0, 1, 3).reshape(batch * tgt, embed)
        out = _project(cast(OutProjection, self.out_proj), out).view(tgt, batch, embed)
        return out, weights


run_eagerly(MultiheadAttention, "_fused_forward")
skip_frames(MultiheadAttention.forward)
