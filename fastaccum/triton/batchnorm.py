"""Triton kernels of the fused batch-norm ops (semantics: :mod:`fastaccum.ops.batchnorm`).

Top to bottom: the ``@triton.jit`` kernels, the launchers, and the
``torch.library.triton_op`` registrations ``fastaccum::bn_stats_triton``,
``bn_apply_triton``, ``bn_backward_reduce_triton`` and ``bn_backward_apply_triton``, which
:mod:`fastaccum.ops.batchnorm` calls on CUDA tensors.

Every kernel sees x as planes ``[P][C][S]`` addressed ``p * SP + c * SC + s * SS``:

- contiguous (NC*): ``P = N`` planes of ``C`` channels by ``S = prod(spatial)`` positions,
  ``(SP, SC, SS) = (C * S, S, 1)``;
- channels-last (and 2-D ``(N, C)``): one plane of ``S = N * prod(spatial)`` rows,
  ``(SP, SC, SS) = (0, 1, C)``.

A program works on tiles ``[BLOCK_S positions, BLOCK_C channels]``, shaped so that the
contiguous dimension is the long one. The reductions (statistics, gradient sums) give each
program a block of channels and a contiguous range of the ``P * S`` (plane, position)
pairs; its per-channel partial results go to a workspace, which a few torch ops then
combine in a fixed order (deterministic, no atomics).

Statistics: values are shifted by one sample of their channel; each tile's mean and M2
come from two passes over the tile in registers, and tiles are combined with Chan et al.'s
update, all in fp32 on shifted values. The programs' moments are combined, and the shift
added back, in the statistics' dtype (fp32, or float64 when asked: a mean of 1e4 keeps its
digits beyond fp32).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fastaccum.ops.batchnorm import (
    check_apply_args,
    check_backward_args,
    check_stats_args,
    empty_in_layout,
    in_kernel_layout,
    like_layout,
)
from fastaccum.triton.accumulate import _check_launchable, _is_fake, _on_device, wrap_triton

TILE = 1024
"""Elements per tile (BLOCK_S * BLOCK_C)."""
PROGRAMS_PER_SM = 4
"""Reduction programs per streaming multiprocessor that the splits aim for."""
INTERPRETER_PROGRAMS = 4
"""Reduction programs the splits aim for under the interpreter (which runs them one by one)."""


# --------------------------------------------------------------------------- kernels


@triton.jit
def _tile(p, s, cb, s_end, C, SP, SC, SS, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Offsets, mask and channel indices of the tile at plane ``p``, positions from ``s``
    (below ``s_end``), channel block ``cb``."""
    offs_s = s + tl.arange(0, BLOCK_S).to(tl.int64)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mask = (offs_s < s_end)[:, None] & mask_c[None, :]
    offs = p * SP + offs_s[:, None] * SS + offs_c[None, :].to(tl.int64) * SC
    return offs, mask, offs_c, mask_c


@triton.jit
def _channel_values(ptr, offs_c, mask_c):
    """A per-channel fp32 vector, shaped to broadcast over a tile's positions."""
    return tl.load(ptr + offs_c, mask=mask_c, other=0.0)[None, :]


@triton.jit
def _split_bounds(S, pairs, pairs_per_split):
    """This program's (plane, position) pairs ``[first, end)`` and planes to visit."""
    first = tl.program_id(1).to(tl.int64) * pairs_per_split
    end = tl.minimum(first + pairs_per_split, pairs)
    return first, end, first // S, (end - 1) // S + 1


@triton.jit
def _stats_partial_kernel(
    x_ptr,
    shift_ptr,
    mean_part,
    m2_part,
    count_part,
    C,
    S,
    pairs,
    pairs_per_split,
    SP,
    SC,
    SS,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """(count, mean, M2) of x - shift per channel over this program's pairs.

    Each tile: its mean, then the sum of squared deviations from it (both in registers),
    merged into the running moments with Chan et al.'s update. Writes
    ``mean_part[split, c]``, ``m2_part[split, c]`` and ``count_part[split]``.
    """
    cb = tl.program_id(0)
    first, end, p_first, p_end = _split_bounds(S, pairs, pairs_per_split)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    shift = _channel_values(shift_ptr, offs_c, offs_c < C)
    count = 0.0
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p in range(p_first, p_end):
        s_lo = tl.maximum(first - p * S, 0)
        s_hi = tl.minimum(end - p * S, S)
        for s in range(s_lo, s_hi, BLOCK_S):
            offs, mask, _, _ = _tile(p, s, cb, s_hi, C, SP, SC, SS, BLOCK_S, BLOCK_C)
            v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - shift
            n_b = tl.minimum(s_hi - s, BLOCK_S).to(tl.float32)
            mean_b = tl.sum(tl.where(mask, v, 0.0), axis=0) / n_b
            dev = tl.where(mask, v - mean_b[None, :], 0.0)
            m2_b = tl.sum(dev * dev, axis=0)
            total = count + n_b
            delta = mean_b - mean
            mean += delta * (n_b / total)
            m2 += m2_b + delta * delta * (count * n_b / total)
            count = total
    split = tl.program_id(1)
    out = split * C + offs_c
    tl.store(mean_part + out, mean, mask=offs_c < C)
    tl.store(m2_part + out, m2, mask=offs_c < C)
    if cb == 0:
        tl.store(count_part + split, count)


@triton.jit
def _grad_sums_partial_kernel(
    dy_ptr,
    x_ptr,
    mean_ptr,
    mul_ptr,
    add_ptr,
    sum_dy_part,
    sum_dy_xmu_part,
    C,
    S,
    pairs,
    pairs_per_split,
    SP,
    SC,
    SS,
    RELU: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """sum(g) and sum(g * (x - mean)) per channel over this program's pairs, g the
    incoming gradient with the ReLU's mask (pre-activation ``(x - mean) * mul + add``)."""
    cb = tl.program_id(0)
    first, end, p_first, p_end = _split_bounds(S, pairs, pairs_per_split)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mean = _channel_values(mean_ptr, offs_c, mask_c)
    mul = _channel_values(mul_ptr, offs_c, mask_c)
    add = _channel_values(add_ptr, offs_c, mask_c)
    sum_g = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    sum_gd = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
    for p in range(p_first, p_end):
        s_lo = tl.maximum(first - p * S, 0)
        s_hi = tl.minimum(end - p * S, S)
        for s in range(s_lo, s_hi, BLOCK_S):
            offs, mask, _, _ = _tile(p, s, cb, s_hi, C, SP, SC, SS, BLOCK_S, BLOCK_C)
            # Masked-out elements load g = 0 and add nothing.
            g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            d = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - mean
            if RELU:
                g = tl.where(d * mul + add > 0.0, g, 0.0)
            sum_g += g
            sum_gd += g * d
    out = tl.program_id(1) * C + offs_c
    tl.store(sum_dy_part + out, tl.sum(sum_g, axis=0), mask=mask_c)
    tl.store(sum_dy_xmu_part + out, tl.sum(sum_gd, axis=0), mask=mask_c)


@triton.jit
def _elementwise_tile(C, S, SP, SC, SS, n_sb, n_cb, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """The tile of an element-wise program: programs run over (plane, position block,
    channel block), channel blocks fastest."""
    pid = tl.program_id(0)
    cb = pid % n_cb
    rest = pid // n_cb
    p = (rest // n_sb).to(tl.int64)
    s = (rest % n_sb).to(tl.int64) * BLOCK_S
    return _tile(p, s, cb, S, C, SP, SC, SS, BLOCK_S, BLOCK_C)


@triton.jit
def _apply_kernel(
    x_ptr,
    y_ptr,
    mean_ptr,
    mul_ptr,
    add_ptr,
    C,
    S,
    SP,
    SC,
    SS,
    n_sb,
    n_cb,
    RELU: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """y = act((x - mean) * mul + add), fp32 math, stored in y's dtype."""
    offs, mask, offs_c, mask_c = _elementwise_tile(C, S, SP, SC, SS, n_sb, n_cb, BLOCK_S, BLOCK_C)
    mean = _channel_values(mean_ptr, offs_c, mask_c)
    mul = _channel_values(mul_ptr, offs_c, mask_c)
    add = _channel_values(add_ptr, offs_c, mask_c)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z = (x - mean) * mul + add
    if RELU:
        z = tl.where(z < 0.0, 0.0, z)  # NaN stays NaN, as torch.relu keeps it
    tl.store(y_ptr + offs, z.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_input_kernel(
    dy_ptr,
    x_ptr,
    gx_ptr,
    mean_ptr,
    mul_ptr,
    add_ptr,
    mean_dy_ptr,
    k_ptr,
    C,
    S,
    SP,
    SC,
    SS,
    n_sb,
    n_cb,
    RELU: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """grad_x = mul * ((g - mean_dy) - (x - mean) * k), g the masked incoming gradient."""
    offs, mask, offs_c, mask_c = _elementwise_tile(C, S, SP, SC, SS, n_sb, n_cb, BLOCK_S, BLOCK_C)
    mean = _channel_values(mean_ptr, offs_c, mask_c)
    mul = _channel_values(mul_ptr, offs_c, mask_c)
    mean_dy = _channel_values(mean_dy_ptr, offs_c, mask_c)
    k = _channel_values(k_ptr, offs_c, mask_c)
    d = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - mean
    g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        add = _channel_values(add_ptr, offs_c, mask_c)
        g = tl.where(d * mul + add > 0.0, g, 0.0)
    gx = mul * ((g - mean_dy) - d * k)
    tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- launchers


class _Geometry(NamedTuple):
    """x as planes [P][C][S] with element strides (SP, SC, SS), and the tile shape."""

    P: int
    C: int
    S: int
    SP: int
    SC: int
    SS: int
    BLOCK_S: int
    BLOCK_C: int


def _geometry(x: torch.Tensor) -> _Geometry:
    """The planes view of ``x`` (in a kernel layout, not empty)."""
    n, c = int(x.shape[0]), int(x.shape[1])
    s = int(x.numel()) // (n * c)
    if x.is_contiguous() and s > 1:
        # Positions are contiguous: tiles long in s, a few channels wide.
        block_c = min(4, triton.next_power_of_2(c))
        return _Geometry(n, c, s, c * s, s, 1, TILE // block_c, block_c)
    # Channels are contiguous: tiles as wide as the channels (up to 128).
    block_c = min(128, triton.next_power_of_2(c))
    return _Geometry(1, c, n * s, 0, 1, c, TILE // block_c, block_c)


@functools.lru_cache(maxsize=16)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _splits(g: _Geometry, device: torch.device) -> tuple[int, int]:
    """(splits, pairs per split) of a reduction: enough programs to fill the device."""
    if device.type == "cuda":
        target = PROGRAMS_PER_SM * _sm_count(device.index or 0)
    else:
        target = INTERPRETER_PROGRAMS
    pairs = g.P * g.S
    c_blocks = triton.cdiv(g.C, g.BLOCK_C)
    splits = max(1, min(triton.cdiv(target, c_blocks), triton.cdiv(pairs, g.BLOCK_S)))
    per_split = triton.cdiv(pairs, splits)
    return triton.cdiv(pairs, per_split), per_split


def _fp32(t: torch.Tensor | None, c: int, fill: float, device: torch.device) -> torch.Tensor:
    """A per-channel tensor as C contiguous fp32 values (``fill`` when None)."""
    if t is None:
        return torch.full((c,), fill, dtype=torch.float32, device=device)
    return t.to(torch.float32).contiguous()


def _first_sample(x: torch.Tensor) -> torch.Tensor:
    first = x.select(0, 0)
    while first.dim() > 1:
        first = first.select(1, 0)
    return first.to(torch.float32).contiguous()


def launch_stats(
    x: torch.Tensor, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, M2) of ``x`` in ``dtype`` (validated, in a kernel layout, not
    empty)."""
    g = _geometry(x)
    splits, per_split = _splits(g, x.device)
    shift = _first_sample(x)
    mean_part = torch.empty((splits, g.C), dtype=torch.float32, device=x.device)
    m2_part = torch.empty_like(mean_part)
    count_part = torch.empty(splits, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(g.C, g.BLOCK_C), splits)
    wrap_triton(_stats_partial_kernel)[grid](
        x, shift, mean_part, m2_part, count_part,
        g.C, g.S, g.P * g.S, per_split, g.SP, g.SC, g.SS,
        BLOCK_S=g.BLOCK_S, BLOCK_C=g.BLOCK_C,
    )  # fmt: skip
    # The splits' moments, combined at once (the parallel form of Chan's update).
    mean_part, m2_part, count_part = (t.to(dtype) for t in (mean_part, m2_part, count_part))
    counts = count_part[:, None]
    mean = (mean_part * counts).sum(0) / count_part.sum()
    m2 = m2_part.sum(0) + ((mean_part - mean).square() * counts).sum(0)
    return mean + shift.to(dtype), m2


def _elementwise_grid(g: _Geometry) -> tuple[tuple[int], int, int]:
    n_sb = triton.cdiv(g.S, g.BLOCK_S)
    n_cb = triton.cdiv(g.C, g.BLOCK_C)
    return (g.P * n_sb * n_cb,), n_sb, n_cb


def launch_apply(x, mean, invstd, weight, bias, relu) -> torch.Tensor:
    """y = act((x - mean) * invstd * weight + bias) (x validated, in a kernel layout)."""
    y = empty_in_layout(x)
    if x.numel() == 0:
        return y
    g = _geometry(x)
    mul = _fp32(invstd, g.C, 1.0, x.device) * _fp32(weight, g.C, 1.0, x.device)
    grid, n_sb, n_cb = _elementwise_grid(g)
    wrap_triton(_apply_kernel)[grid](
        x, y, _fp32(mean, g.C, 0.0, x.device), mul, _fp32(bias, g.C, 0.0, x.device),
        g.C, g.S, g.SP, g.SC, g.SS, n_sb, n_cb,
        RELU=relu, BLOCK_S=g.BLOCK_S, BLOCK_C=g.BLOCK_C,
    )  # fmt: skip
    return y


def launch_backward_reduce(grad_y, x, mean, invstd, weight, bias, relu):
    """(sum_dy, sum_dy_xhat) (validated; x in a kernel layout, grad_y in x's)."""
    g = _geometry(x)
    splits, per_split = _splits(g, x.device)
    invstd = _fp32(invstd, g.C, 1.0, x.device)
    mul = invstd * _fp32(weight, g.C, 1.0, x.device)
    sum_dy_part = torch.empty((splits, g.C), dtype=torch.float32, device=x.device)
    sum_dy_xmu_part = torch.empty_like(sum_dy_part)
    grid = (triton.cdiv(g.C, g.BLOCK_C), splits)
    wrap_triton(_grad_sums_partial_kernel)[grid](
        grad_y, x, _fp32(mean, g.C, 0.0, x.device), mul, _fp32(bias, g.C, 0.0, x.device),
        sum_dy_part, sum_dy_xmu_part,
        g.C, g.S, g.P * g.S, per_split, g.SP, g.SC, g.SS,
        RELU=relu, BLOCK_S=g.BLOCK_S, BLOCK_C=g.BLOCK_C,
    )  # fmt: skip
    return sum_dy_part.sum(0), sum_dy_xmu_part.sum(0) * invstd


def launch_backward_apply(grad_y, x, mean, invstd, weight, bias, sum_dy, sum_dy_xhat, count, relu):
    """grad_x of training-mode batch norm (validated; x in a kernel layout, grad_y in x's)."""
    gx = empty_in_layout(x)
    g = _geometry(x)
    invstd = _fp32(invstd, g.C, 1.0, x.device)
    mul = invstd * _fp32(weight, g.C, 1.0, x.device)
    mean_dy = sum_dy.to(torch.float32) / count
    k = sum_dy_xhat.to(torch.float32) * invstd / count
    grid, n_sb, n_cb = _elementwise_grid(g)
    wrap_triton(_grad_input_kernel)[grid](
        grad_y, x, gx, _fp32(mean, g.C, 0.0, x.device), mul, _fp32(bias, g.C, 0.0, x.device),
        mean_dy.contiguous(), k.contiguous(),
        g.C, g.S, g.SP, g.SC, g.SS, n_sb, n_cb,
        RELU=relu, BLOCK_S=g.BLOCK_S, BLOCK_C=g.BLOCK_C,
    )  # fmt: skip
    return gx


# --------------------------------------------------------------------------- registrations


def _per_channel_empty(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(x.shape[1], dtype=dtype, device=x.device)


@torch.library.triton_op("fastaccum::bn_stats_triton", mutates_args=())
def _stats_op(
    x: torch.Tensor, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate, then launch (or describe the outputs, as the fake kernel). ``dtype``: of
    the statistics, float32 (None) or float64."""
    check_stats_args(x, dtype)
    out = torch.float32 if dtype is None else dtype
    x = in_kernel_layout(x)
    if _is_fake(x):
        return _per_channel_empty(x, out), _per_channel_empty(x, out)
    _check_launchable(x)
    with _on_device(x.device):
        return launch_stats(x, out)


@torch.library.triton_op("fastaccum::bn_apply_triton", mutates_args=())
def _apply_op(
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    relu: bool,
) -> torch.Tensor:
    """Validate, then launch (or describe the output, as the fake kernel)."""
    check_apply_args(x, mean, invstd, weight, bias)
    x = in_kernel_layout(x)
    if _is_fake(x):
        return empty_in_layout(x)
    _check_launchable(x)
    with _on_device(x.device):
        return launch_apply(x, mean, invstd, weight, bias, relu)


@torch.library.triton_op("fastaccum::bn_backward_reduce_triton", mutates_args=())
def _backward_reduce_op(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    relu: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate, then launch (or describe the outputs, as the fake kernel)."""
    check_backward_args(grad_y, x, mean, invstd, weight, bias)
    x = in_kernel_layout(x)
    if _is_fake(x):
        return _per_channel_empty(x), _per_channel_empty(x)
    _check_launchable(x)
    with _on_device(x.device):
        return launch_backward_reduce(like_layout(grad_y, x), x, mean, invstd, weight, bias, relu)


@torch.library.triton_op("fastaccum::bn_backward_apply_triton", mutates_args=())
def _backward_apply_op(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    sum_dy: torch.Tensor,
    sum_dy_xhat: torch.Tensor,
    count: int,
    relu: bool,
) -> torch.Tensor:
    """Validate, then launch (or describe the output, as the fake kernel)."""
    check_backward_args(grad_y, x, mean, invstd, weight, bias, (sum_dy, sum_dy_xhat), count)
    x = in_kernel_layout(x)
    if _is_fake(x):
        return empty_in_layout(x)
    _check_launchable(x)
    with _on_device(x.device):
        return launch_backward_apply(
            like_layout(grad_y, x), x, mean, invstd, weight, bias, sum_dy, sum_dy_xhat, count,
            relu,
        )  # fmt: skip
