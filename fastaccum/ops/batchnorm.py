"""Fused batch normalization: per-channel statistics, normalize + affine (+ ReLU), backward.

This module holds, for this op family:

- the typed wrappers (:func:`batch_norm_stats`, :func:`batch_norm_apply`,
  :func:`batch_norm_backward_reduce`, :func:`batch_norm_backward_apply`), which validate,
  then route through :mod:`fastaccum._backend` (CPU: the C++ kernels ``fastaccum::bn_*``;
  CUDA: the Triton kernels ``fastaccum::bn_*_triton``; otherwise the references);
- :func:`batch_norm_train`, an autograd function whose backward is the exact gradient of
  batch normalization through the batch statistics, with optional Batch Renormalization
  corrections;
- the fake (meta) kernels of the C++ ops, for ``torch.compile`` and ``opcheck``;
- the pure-PyTorch references (``*_ref``): the spec every backend is tested against.

Semantics. ``x`` is ``(N, C)`` or ``(N, C, *spatial)``: float32, bfloat16 or float16, with
the channels in dim 1. ``count = x.numel() // C`` is the number of elements per channel.
Per-channel tensors have shape ``(C,)``, any floating dtype, and are read as float32;
everything per-channel that an op returns is float32, except the statistics that
``batch_norm_stats`` is asked for in float64. Element-wise math is float32.

``batch_norm_stats(x, dtype) -> (mean, m2)``
    ``mean[c]`` and ``m2[c] = sum((x[:, c] - mean[c])**2)``; the biased variance is
    ``m2 / count``. Robust to a large mean (values are shifted by one sample of their
    channel and reduced in blocks merged with Chan et al.'s update). Float32 by default;
    ``dtype=torch.float64`` keeps the mean's digits beyond float32 (a mean of 1e4 rounds
    to float32 with an error of up to 5e-4), for statistics that are merged further.
``batch_norm_apply(x, mean, invstd, weight, bias, relu) -> y``
    ``y = act((x - mean) * (invstd * weight) + bias)``, ``act`` = ReLU when ``relu``;
    ``weight``/``bias`` None mean 1/0. ``y`` has x's dtype.
``batch_norm_backward_reduce(grad_y, x, mean, invstd, weight, bias, relu)``
    ``sum_dy[c] = sum(g)``, ``sum_dy_xhat[c] = sum(g * xhat)`` with
    ``xhat = (x - mean) * invstd`` and ``g`` the incoming gradient, zeroed where the ReLU's
    pre-activation (recomputed from x, so y need not be kept) is not positive.
``batch_norm_backward_apply(grad_y, x, ..., sum_dy, sum_dy_xhat, count, relu)``
    ``grad_x = weight * invstd * (g - sum_dy / count - xhat * sum_dy_xhat / count)``,
    the input gradient of training-mode batch norm; x's dtype.

Layouts. Contiguous (NCHW) and channels-last tensors (``torch.channels_last``,
``channels_last_3d``, or any rank with the channels innermost) are read in place, and the
outputs keep x's layout. Other layouts (a transposed or sliced view) are copied to
contiguous first, by the wrapper; their outputs are contiguous.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, cast

import torch

from fastaccum import _backend

X_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Dtypes of ``x`` the kernels accept."""


class BatchNormStats(NamedTuple):
    """Per-channel ``mean`` and ``m2`` (sum of squared deviations from the mean), float32
    or float64."""

    mean: torch.Tensor
    m2: torch.Tensor


class BatchNormGradSums(NamedTuple):
    """Per-channel float32 ``sum_dy`` and ``sum_dy_xhat`` of the (ReLU-masked) gradient."""

    sum_dy: torch.Tensor
    sum_dy_xhat: torch.Tensor


# --------------------------------------------------------------------------- layout


def is_channels_last_like(x: torch.Tensor) -> bool:
    """True when ``x`` is dense with dims ordered (0, 2, ..., d-1, 1) from outer to inner:
    ``torch.channels_last`` for 4-D, ``channels_last_3d`` for 5-D, the same idea for any
    rank. Size-1 dims may have any stride, as in ``Tensor.is_contiguous``."""
    expected = 1
    for d in (1, *range(x.dim() - 1, 1, -1), 0):
        size = x.shape[d]
        if size == 1:
            continue
        if x.stride(d) != expected:
            return False
        expected *= size
    return True


def in_kernel_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when contiguous or channels-last-like, else a contiguous copy."""
    if x.is_contiguous() or is_channels_last_like(x):
        return x
    return x.contiguous()


def like_layout(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t`` (shaped like ``x``, which is in a kernel layout) in x's layout; copies only
    when the layouts differ."""
    if x.is_contiguous():
        return t.contiguous()
    if is_channels_last_like(t):
        return t
    return t.movedim(1, -1).contiguous().movedim(-1, 1)


def empty_in_layout(x: torch.Tensor) -> torch.Tensor:
    """An uninitialized tensor like ``x`` laid out as the kernels write their outputs:
    channels-last when ``x`` is (and not contiguous), else contiguous."""
    if x.is_contiguous() or not is_channels_last_like(x):
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    permuted = (x.shape[0], *x.shape[2:], x.shape[1])
    return torch.empty(permuted, dtype=x.dtype, device=x.device).movedim(-1, 1)


# --------------------------------------------------------------------------- validation


def _check_x(x: object, name: str = "x") -> int:
    """Check x's type, dtype and rank; return C."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in X_DTYPES:
        raise TypeError(f"{name} has dtype {x.dtype}; expected one of float32, bfloat16, float16")
    if x.dim() < 2:
        raise ValueError(
            f"{name} must have shape (N, C) or (N, C, *spatial) with the channels in dim 1, "
            f"got shape {tuple(x.shape)}"
        )
    if x.shape[1] == 0:
        raise ValueError(f"{name} has no channels (shape {tuple(x.shape)}); expected C >= 1")
    return x.shape[1]


def _check_count(x: torch.Tensor) -> int:
    """Elements per channel; raise ValueError when there are none."""
    count = x.numel() // x.shape[1]
    if count == 0:
        raise ValueError(
            f"x has no elements per channel (shape {tuple(x.shape)}); batch statistics need "
            "at least one"
        )
    return count


def _check_channel(t: object, name: str, x: torch.Tensor, optional: bool = False) -> None:
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        kind = "a torch.Tensor or None" if optional else "a torch.Tensor"
        raise TypeError(f"{name} must be {kind}, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    c = x.shape[1]
    if tuple(t.shape) != (c,):
        raise ValueError(
            f"{name} must have shape ({c},), one value per channel of x (shape "
            f"{tuple(x.shape)}), got {tuple(t.shape)}"
        )
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}; move it to x's device")


def _check_grad(grad_y: object, x: torch.Tensor) -> None:
    _check_x(grad_y, "grad_y")
    grad_y = cast(torch.Tensor, grad_y)  # _check_x raised unless it is one
    if grad_y.shape != x.shape or grad_y.dtype != x.dtype:
        raise ValueError(
            f"grad_y ({tuple(grad_y.shape)}, {grad_y.dtype}) must match x "
            f"({tuple(x.shape)}, {x.dtype}) in shape and dtype"
        )
    if grad_y.device != x.device:
        raise ValueError(f"grad_y is on {grad_y.device} but x is on {x.device}")


STATS_DTYPES = (torch.float32, torch.float64)
"""Dtypes :func:`batch_norm_stats` returns its statistics in."""


def check_stats_args(x: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """Validate :func:`batch_norm_stats`'s arguments; raise TypeError/ValueError."""
    _check_x(x)
    _check_count(x)
    if dtype is not None and dtype not in STATS_DTYPES:
        raise ValueError(
            f"dtype (of the statistics) must be torch.float32 or torch.float64, got {dtype!r}"
        )


def check_apply_args(
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> None:
    """Validate :func:`batch_norm_apply`'s tensors; raise TypeError/ValueError."""
    _check_x(x)
    _check_channel(mean, "mean", x)
    _check_channel(invstd, "invstd", x)
    _check_channel(weight, "weight", x, optional=True)
    _check_channel(bias, "bias", x, optional=True)


def check_backward_args(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    sums: tuple[torch.Tensor, torch.Tensor] | None = None,
    count: int | None = None,
) -> None:
    """Validate the backward ops' arguments (``sums``/``count`` of backward_apply)."""
    check_apply_args(x, mean, invstd, weight, bias)
    _check_grad(grad_y, x)
    _check_count(x)
    if sums is not None:
        _check_channel(sums[0], "sum_dy", x)
        _check_channel(sums[1], "sum_dy_xhat", x)
    if count is not None and (isinstance(count, bool) or not isinstance(count, int)):
        raise TypeError(f"count must be an int, got {type(count).__name__}")
    if count is not None and count < 1:
        raise ValueError(f"count must be >= 1 (elements per channel), got {count}")


# --------------------------------------------------------------------------- references


def _per_channel(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor | float:
    """``t`` (shape (C,)) as float32 shaped to broadcast against x; numbers pass through."""
    if not isinstance(t, torch.Tensor):
        return t
    return t.float().view(1, -1, *([1] * (x.dim() - 2)))


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _masked_grad(grad_y, x, mean, invstd, weight, bias, relu):
    """(float32 incoming gradient with the ReLU's mask, x - mean, invstd * weight)."""
    mul = invstd.float() if weight is None else invstd.float() * weight.float()
    xmu = x.float() - _per_channel(mean, x)
    g = grad_y.float()
    if relu:
        add = 0.0 if bias is None else bias
        z = xmu * _per_channel(mul, x) + _per_channel(add, x)
        g = torch.where(z > 0, g, torch.zeros((), dtype=g.dtype, device=g.device))
    return g, xmu, mul


def batch_norm_stats_ref(x: torch.Tensor, dtype: torch.dtype | None = None) -> BatchNormStats:
    """Pure-PyTorch :func:`batch_norm_stats`: the spec (float32 math, shifted by one sample
    of each channel so that a large mean costs no digits; the shift is added back in the
    output ``dtype``, float32 when None)."""
    first = x.select(0, 0)
    while first.dim() > 1:
        first = first.select(1, 0)
    shift = first.float()
    var, mean = torch.var_mean(
        x.float() - _per_channel(shift, x), dim=_reduce_dims(x), correction=0
    )
    count = x.numel() // x.shape[1]
    out = torch.float32 if dtype is None else dtype
    return BatchNormStats(mean.to(out) + shift.to(out), var.to(out) * count)


def batch_norm_apply_ref(
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    relu: bool = False,
) -> torch.Tensor:
    """Pure-PyTorch :func:`batch_norm_apply`: the spec (float32 math, x's layout kept)."""
    mul = invstd.float() if weight is None else invstd.float() * weight.float()
    y = (x.float() - _per_channel(mean, x)) * _per_channel(mul, x)
    if bias is not None:
        y = y + _per_channel(bias, x)
    if relu:
        y = torch.relu(y)
    # No no-op .to(): an autograd.Function whose output is the same tensor as an
    # intermediate gets a zero gradient for it under torch 2.11's torch.compile.
    return y if y.dtype == x.dtype else y.to(x.dtype)


def batch_norm_backward_reduce_ref(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    relu: bool = False,
) -> BatchNormGradSums:
    """Pure-PyTorch :func:`batch_norm_backward_reduce`: the spec (float32 sums)."""
    g, xmu, _ = _masked_grad(grad_y, x, mean, invstd, weight, bias, relu)
    dims = _reduce_dims(x)
    return BatchNormGradSums(g.sum(dims), (g * xmu).sum(dims) * invstd.float())


def batch_norm_backward_apply_ref(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    sum_dy: torch.Tensor,
    sum_dy_xhat: torch.Tensor,
    count: int,
    relu: bool = False,
) -> torch.Tensor:
    """Pure-PyTorch :func:`batch_norm_backward_apply`: the spec (float32 math)."""
    g, xmu, mul = _masked_grad(grad_y, x, mean, invstd, weight, bias, relu)
    mean_dy = _per_channel(sum_dy.float() / count, x)
    k = _per_channel(sum_dy_xhat.float() * invstd.float() / count, x)
    return (_per_channel(mul, x) * ((g - mean_dy) - xmu * k)).to(x.dtype)


_REFERENCES: dict[str, Callable[..., Any]] = {
    "bn_stats": batch_norm_stats_ref,
    "bn_apply": batch_norm_apply_ref,
    "bn_backward_reduce": batch_norm_backward_reduce_ref,
    "bn_backward_apply": batch_norm_backward_apply_ref,
}


# --------------------------------------------------------------------------- fake kernels


def _register_fakes() -> None:
    def per_channel(x):
        return torch.empty(x.shape[1], dtype=torch.float32, device=x.device)

    @torch.library.register_fake("fastaccum::bn_stats")
    def _stats_fake(x, dtype=None):
        out = torch.float32 if dtype is None else dtype
        return per_channel(x).to(out), per_channel(x).to(out)

    @torch.library.register_fake("fastaccum::bn_apply")
    def _apply_fake(x, mean, invstd, weight, bias, relu):
        return empty_in_layout(x)

    @torch.library.register_fake("fastaccum::bn_backward_reduce")
    def _backward_reduce_fake(grad_y, x, mean, invstd, weight, bias, relu):
        return per_channel(x), per_channel(x)

    @torch.library.register_fake("fastaccum::bn_backward_apply")
    def _backward_apply_fake(
        grad_y, x, mean, invstd, weight, bias, sum_dy, sum_dy_xhat, count, relu
    ):
        return empty_in_layout(x)


if _backend.native_can_run(torch.device("cpu"), "bn_stats"):
    _register_fakes()


# --------------------------------------------------------------------------- dispatch


def _run(op: str, backend: str | None, *args: object) -> Any:
    """Run ``op`` (a ``torch.ops.fastaccum`` name) on validated arguments with the backend
    :func:`fastaccum._backend.select` picks for the device of the first one."""
    x = cast(torch.Tensor, args[0])  # every op's first argument is a tensor
    choice = _backend.select(x.device, backend, op=op)
    if choice == _backend.NATIVE:
        return getattr(torch.ops.fastaccum, op)(*args)
    if choice == _backend.TRITON:
        import fastaccum.triton.batchnorm  # noqa: F401  (registers the fastaccum::bn_*_triton ops)

        return getattr(torch.ops.fastaccum, op + "_triton")(*args)
    return _REFERENCES[op](*args)


# --------------------------------------------------------------------------- wrappers


def batch_norm_stats(
    x: torch.Tensor, *, dtype: torch.dtype = torch.float32, backend: str | None = None
) -> BatchNormStats:
    """Per-channel mean and M2 (sum of squared deviations from the mean) of ``x``.

    Args:
        x: ``(N, C)`` or ``(N, C, *spatial)``, float32/bfloat16/float16.
        dtype: of the statistics, ``torch.float32`` or ``torch.float64``. Both are computed
            alike (deviations in float32 from a shift, merged in double); float64 keeps the
            mean's digits beyond float32 (a mean of 1e4 rounds to float32 with an error of
            up to 5e-4), for statistics that are merged further, as ``AccumBatchNorm``
            merges micro-batches.
        backend: force ``"native"``, ``"triton"`` or ``"reference"`` (default: chosen by
            :mod:`fastaccum._backend` from x's device).

    Returns:
        :class:`BatchNormStats` of ``(C,)`` tensors in ``dtype``; the biased variance is
        ``m2 / count`` with ``count = x.numel() // C``.

    Raises:
        TypeError: x is not a float32/bfloat16/float16 tensor.
        ValueError: x has fewer than 2 dims, no channels or no elements per channel, or
            ``dtype`` is neither float32 nor float64.
        RuntimeError: a forced ``backend`` cannot run on x's device.
    """
    check_stats_args(x, dtype)
    return BatchNormStats(*_run("bn_stats", backend, in_kernel_layout(x), dtype))


def apply_unchecked(
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    relu: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """:func:`batch_norm_apply`'s op without validation or autograd, for callers that built
    valid arguments themselves (the ``AccumBatchNorm`` modules)."""
    return _run("bn_apply", backend, in_kernel_layout(x), mean, invstd, weight, bias, relu)


def batch_norm_backward_reduce(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    relu: bool = False,
    *,
    backend: str | None = None,
) -> BatchNormGradSums:
    """Per-channel ``sum(g)`` and ``sum(g * xhat)`` of the incoming gradient ``grad_y``.

    ``xhat = (x - mean) * invstd``; with ``relu``, ``g`` is ``grad_y`` zeroed where the
    pre-activation ``xhat * weight + bias`` is not positive, as the ReLU of
    :func:`batch_norm_apply` (same ``weight``/``bias``) passes no gradient there.

    Args:
        grad_y: gradient of the output, same shape and dtype as ``x`` (any layout).
        x, mean, invstd, weight, bias, relu: as given to :func:`batch_norm_apply`.
        backend: as in :func:`batch_norm_stats`.

    Returns:
        :class:`BatchNormGradSums` of float32 ``(C,)`` tensors.

    Raises:
        TypeError, ValueError: wrong types, dtypes, shapes or devices, or an empty x.
        RuntimeError: a forced ``backend`` cannot run on x's device.
    """
    check_backward_args(grad_y, x, mean, invstd, weight, bias)
    x = in_kernel_layout(x)
    return backward_reduce_unchecked(
        like_layout(grad_y, x), x, mean, invstd, weight, bias, relu, backend
    )


def backward_reduce_unchecked(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    relu: bool = False,
    backend: str | None = None,
) -> BatchNormGradSums:
    """:func:`batch_norm_backward_reduce`'s op without validation; ``x`` in a kernel layout
    (:func:`in_kernel_layout`) and ``grad_y`` in x's (:func:`like_layout`)."""
    sums = _run("bn_backward_reduce", backend, grad_y, x, mean, invstd, weight, bias, relu)
    return BatchNormGradSums(*sums)


def backward_apply_unchecked(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
    sums: tuple[torch.Tensor, torch.Tensor],
    count: int = 1,
    bias: torch.Tensor | None = None,
    relu: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """:func:`batch_norm_backward_apply`'s op without validation; layouts as in
    :func:`backward_reduce_unchecked`, ``sums`` = (sum_dy, sum_dy_xhat)."""
    return _run(
        "bn_backward_apply", backend, grad_y, x, mean, invstd, weight, bias, *sums, count, relu
    )


def batch_norm_backward_apply(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    sum_dy: torch.Tensor,
    sum_dy_xhat: torch.Tensor,
    count: int,
    relu: bool = False,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Input gradient of training-mode batch norm, through the batch statistics.

    ``grad_x = weight * invstd * (g - sum_dy / count - xhat * sum_dy_xhat / count)`` with
    ``g`` and ``xhat`` as in :func:`batch_norm_backward_reduce`, whose results
    ``sum_dy``/``sum_dy_xhat`` are (possibly after summing them over processes, with
    ``count`` the matching total).

    Returns:
        ``grad_x`` in x's dtype and layout.

    Raises:
        TypeError, ValueError: wrong types, dtypes, shapes or devices, an empty x or
            ``count < 1``.
        RuntimeError: a forced ``backend`` cannot run on x's device.
    """
    check_backward_args(grad_y, x, mean, invstd, weight, bias, (sum_dy, sum_dy_xhat), count)
    x = in_kernel_layout(x)
    return backward_apply_unchecked(
        like_layout(grad_y, x),
        x,
        mean,
        invstd,
        weight,
        (sum_dy, sum_dy_xhat),
        count,
        bias,
        relu,
        backend,
    )


# --------------------------------------------------------------------------- autograd


def _effective_affine(weight, bias, scale, offset):
    """(weight * r, weight * d + bias): Batch Renormalization folded into the affine."""
    if scale is None and offset is None:
        return weight, bias
    c = (scale if scale is not None else offset).shape[0]
    device = (scale if scale is not None else offset).device
    w = torch.ones(c, device=device) if weight is None else weight.float()
    r = torch.ones(c, device=device) if scale is None else scale.float()
    d = torch.zeros(c, device=device) if offset is None else offset.float()
    b = d * w if bias is None else d * w + bias.float()
    return w * r, b


class _BatchNormFunction(torch.autograd.Function):
    """y = act(weight' * xhat + bias') with weight' = weight * r, bias' = weight * d + bias.

    ``batch_stats``: mean/invstd are this x's batch statistics, and the input gradient
    flows through them (training mode); else they are constants (running statistics).

    The backward runs the kernels; under ``create_graph=True`` (a gradient penalty, say)
    it recomputes the gradients with torch ops instead, so that they can be differentiated
    again (:func:`_differentiable_grads`).
    """

    @staticmethod
    def forward(ctx, x, mean, invstd, weight, bias, scale, offset, relu, batch_stats, backend):
        w_eff, b_eff = _effective_affine(weight, bias, scale, offset)
        y = apply_unchecked(x, mean, invstd, w_eff, b_eff, relu, backend)
        ctx.save_for_backward(x, mean, invstd, w_eff, b_eff, scale, offset, weight, bias)
        ctx.options = relu, batch_stats, backend
        ctx.param_dtypes = (
            None if weight is None else weight.dtype,
            None if bias is None else bias.dtype,
        )
        return y

    @staticmethod
    def backward(ctx, grad_y):
        if torch.is_grad_enabled():  # backward(create_graph=True)
            return _differentiable_grads(ctx, grad_y)
        x, mean, invstd, w_eff, b_eff, scale, offset, _, _ = ctx.saved_tensors
        relu, batch_stats, backend = ctx.options
        need_x = ctx.needs_input_grad[0]
        need_w, need_b = ctx.needs_input_grad[3:5]
        x = in_kernel_layout(x)
        grad_y = like_layout(grad_y, x)
        grad_x = grad_w = grad_b = sums = None
        if x.numel() == 0:  # an empty batch (eval mode only): every gradient is zero
            sums = (torch.zeros_like(invstd, dtype=torch.float32),) * 2
            grad_x = torch.zeros_like(x) if need_x else None
            need_x = False
        elif batch_stats or need_w or need_b:
            sums = backward_reduce_unchecked(grad_y, x, mean, invstd, w_eff, b_eff, relu, backend)
        if need_x:
            if batch_stats:
                apply_sums = sums
            else:  # constant statistics: only weight * invstd * g remains
                apply_sums = (torch.zeros_like(invstd, dtype=torch.float32),) * 2
            count = x.numel() // x.shape[1]
            grad_x = backward_apply_unchecked(
                grad_y, x, mean, invstd, w_eff, apply_sums, count, b_eff, relu, backend
            )
        if need_w:
            sum_dy, sum_dy_xhat = sums
            grad_w = sum_dy_xhat if scale is None else sum_dy_xhat * scale.float()
            if offset is not None:
                grad_w = grad_w + sum_dy * offset.float()
            grad_w = grad_w.to(ctx.param_dtypes[0])
        if need_b:
            grad_b = sums[0].to(ctx.param_dtypes[1])
        return grad_x, None, None, grad_w, grad_b, None, None, None, None, None


def _differentiable_grads(ctx, grad_y: torch.Tensor) -> tuple:
    """:class:`_BatchNormFunction`'s gradients as a graph of torch ops, for a backward with
    ``create_graph=True``: the forward recomputed in float32 from the saved x, weight and
    bias (which carry their own graph), then differentiated.

    With batch statistics the mean and variance are recomputed from x, and ``eps`` is
    recovered as ``1 / invstd**2 - var`` (in float64): only ``var + eps`` enters, and it
    equals ``1 / invstd**2`` to float32 precision, so the value and every derivative of
    ``invstd = rsqrt(var + eps)`` are those of the forward.
    """
    x, mean, invstd, _, _, scale, offset, weight, bias = ctx.saved_tensors
    relu, batch_stats, _ = ctx.options
    shape = (1, -1, *([1] * (x.dim() - 2)))
    dims = [0, *range(2, x.dim())]
    xf = x.float()
    if batch_stats:
        centred = xf - xf.mean(dims).view(shape)
        var = centred.square().mean(dims)
        eps = invstd.double().reciprocal().square() - var.detach().double()
        xhat = centred * (var + eps.float()).rsqrt().view(shape)
    else:
        xhat = (xf - mean.float().view(shape)) * invstd.float().view(shape)
    w_eff, b_eff = _effective_affine(weight, bias, scale, offset)
    y = xhat if w_eff is None else xhat * w_eff.float().view(shape)
    if b_eff is not None:
        y = y + b_eff.float().view(shape)
    if relu:
        y = torch.relu(y)
    wanted = {0: x, 3: weight, 4: bias}
    inputs = {i: t for i, t in wanted.items() if ctx.needs_input_grad[i]}
    grads = torch.autograd.grad(
        y, list(inputs.values()), grad_y.float(), create_graph=True, allow_unused=True
    )
    out: list[torch.Tensor | None] = [None] * 10
    for (i, t), g in zip(inputs.items(), grads, strict=True):
        out[i] = torch.zeros_like(t) if g is None else g.to(t.dtype)
    return tuple(out)


def _check_statistics_constant(mean: torch.Tensor, invstd: torch.Tensor) -> None:
    if mean.requires_grad or invstd.requires_grad:
        raise ValueError(
            "mean and invstd must not require grad: compute them with batch_norm_stats (or "
            "under torch.no_grad()); batch_norm_train already differentiates through them"
        )


def batch_norm_train(
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    scale: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    relu: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Training-mode batch norm of ``x`` with its own batch statistics, differentiable.

    ``y = act(weight * (xhat * r + d) + bias)`` with ``xhat = (x - mean) * invstd``,
    ``r = scale`` and ``d = offset`` (Batch Renormalization; None: 1 and 0) and ``act`` =
    ReLU when ``relu``. The backward is the exact gradient through the batch statistics:
    ``mean``/``invstd`` must be those of this ``x`` (``mean`` from
    :func:`batch_norm_stats`, ``invstd = rsqrt(m2 / count + eps)``), and are themselves
    given no gradient. ``scale``/``offset`` are stop-gradient: their gradient is not
    computed. ``grad_weight = r * sum(g * xhat) + d * sum(g)``, ``grad_bias = sum(g)``.

    Args:
        x: ``(N, C, *spatial)`` or ``(N, C)``, float32/bfloat16/float16, any layout (see
            the module docstring).
        mean, invstd: float32 ``(C,)`` batch statistics of ``x``, without grad.
        weight, bias: ``(C,)`` affine parameters or None (``affine=False``).
        scale, offset: ``(C,)`` Batch Renormalization ``r`` and ``d``, or None.
        relu: fuse a ReLU after the affine.
        backend: as in :func:`batch_norm_stats`.

    Returns:
        ``y`` in x's dtype and layout.

    Raises:
        TypeError, ValueError: wrong types, dtypes, shapes or devices, an empty x, or
            ``mean``/``invstd`` that require grad.
        RuntimeError: a forced ``backend`` cannot run on x's device.
    """
    check_apply_args(x, mean, invstd, weight, bias)
    _check_channel(scale, "scale", x, optional=True)
    _check_channel(offset, "offset", x, optional=True)
    _check_count(x)
    _check_statistics_constant(mean, invstd)
    return _BatchNormFunction.apply(
        x, mean, invstd, weight, bias, scale, offset, relu, True, backend
    )


def train_unchecked(
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    scale: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`batch_norm_train` without validation, for callers that built valid arguments
    themselves (the ``AccumBatchNorm`` modules)."""
    return _BatchNormFunction.apply(x, mean, invstd, weight, bias, scale, offset, False, True, None)


def batch_norm_apply(
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    relu: bool = False,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``y = act((x - mean) * invstd * weight + bias)`` per channel, in one pass.

    With running statistics as ``mean``/``invstd`` this is eval-mode batch norm. It is
    differentiable in ``x``, ``weight`` and ``bias``, with ``mean``/``invstd`` constants
    (use :func:`batch_norm_train` for batch statistics).

    Args:
        x: ``(N, C)`` or ``(N, C, *spatial)``, float32/bfloat16/float16; may be empty.
        mean, invstd: ``(C,)`` per-channel statistics (read as float32), without grad.
        weight, bias: ``(C,)`` or None (1 and 0).
        relu: apply a ReLU to the result.
        backend: as in :func:`batch_norm_stats`.

    Returns:
        ``y`` in x's dtype and layout.

    Raises:
        TypeError, ValueError: wrong types, dtypes, shapes or devices, or ``mean``/``invstd``
            that require grad.
        RuntimeError: a forced ``backend`` cannot run on x's device.
    """
    check_apply_args(x, mean, invstd, weight, bias)
    _check_statistics_constant(mean, invstd)
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias)
    )
    if not wants_grad:
        return apply_unchecked(x, mean, invstd, weight, bias, relu, backend)
    return _BatchNormFunction.apply(x, mean, invstd, weight, bias, None, None, relu, False, backend)
