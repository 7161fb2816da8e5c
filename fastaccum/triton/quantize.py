"""Triton kernels of ``quantize_groups`` and ``dequantize_groups`` (format and math:
:mod:`fastaccum.ops.quantize`).

Top to bottom: the ``@triton.jit`` helpers and kernels, the launchers, the
``torch.library.triton_op`` registrations (``fastaccum::quantize_groups_triton``,
``fastaccum::dequantize_groups_triton``), and the functions :mod:`fastaccum.ops.quantize`
calls.

One program handles ``ROWS`` whole groups, so a group's minimum and maximum are one
in-register reduction and no atomics are needed. Codes are packed by reading the group
``8 // bits`` times with a stride of ``8 // bits`` elements (the re-reads hit the cache):
read ``k`` supplies bits ``k * bits ..`` of every byte. Divisions use ``div_rn`` (correctly
rounded) so that scales and codes match the reference; on a GPU the compiler may still fuse
``mn + q * scale`` into one fma, which moves a dequantized value by at most an ulp.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastaccum import _backend
from fastaccum.ops.quantize import (
    QuantizedGroups,
    _check_input,
    check_dequantize_args,
    check_quantize_args,
    num_groups,
)
from fastaccum.triton.accumulate import wrap_triton

ELEMENTS_PER_PROGRAM = 4096
"""Elements one program covers (``ROWS * group_size``)."""

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


# --------------------------------------------------------------------------- kernels


@triton.jit
def _mix32(x):
    """The reference's 32-bit hash on uint32 values (multiplications wrap)."""
    x = x ^ (x >> 16)
    x = x * tl.full([], 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full([], 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def _rounding_offsets(index, seed_lo, seed_hi):
    """``u`` in ``[0, 1)`` of int64 element indices ``index``, as the reference computes it."""
    hi = (index >> 32).to(tl.uint32)
    key = _mix32((seed_hi ^ hi) + tl.full([], 0x9E3779B9, tl.uint32))
    key = _mix32(seed_lo ^ key)
    h = _mix32((index & 0xFFFFFFFF).to(tl.uint32) ^ key)
    return (h >> 8).to(tl.float32) * (1.0 / 16777216.0)


@triton.jit
def _program_groups(groups, numel, GROUP: tl.constexpr, ROWS: tl.constexpr):
    """This program's groups: row ids, which exist, their first flat index (int64), and the
    ``[ROWS, GROUP]`` flat indices with the mask of those below ``numel``."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    first = rows.to(tl.int64) * GROUP
    index = first[:, None] + tl.arange(0, GROUP)[None, :]
    return rows, rows < groups, first, index, index < numel


# Seeds are never compile-time constants: Triton would otherwise specialize a seed word of 1
# into a constexpr and compile a kernel per such seed.
@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _quantize_kernel(
    x_ptr,
    packed_ptr,
    scale_ptr,
    min_ptr,
    numel,
    groups,
    seed_lo,
    seed_hi,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    ROWS: tl.constexpr,
    STOCHASTIC: tl.constexpr,
):
    """Groups ``[pid * ROWS, pid * ROWS + ROWS)``: scale, minimum and packed codes."""
    PER_BYTE: tl.constexpr = 8 // BITS
    GROUP_BYTES: tl.constexpr = GROUP // PER_BYTE
    LEVELS: tl.constexpr = (1 << BITS) - 1
    rows, row_ok, first, index, valid = _program_groups(groups, numel, GROUP, ROWS)
    v = tl.load(x_ptr + index, mask=valid, other=0.0).to(tl.float32)
    mn = tl.min(tl.where(valid, v, float("inf")), axis=1)
    mx = tl.max(tl.where(valid, v, -float("inf")), axis=1)
    # NaN compares false, so "not |v| < inf" catches NaN and +-Inf with one comparison.
    nonfinite = tl.max(tl.where(valid & ~(tl.abs(v) < float("inf")), 1, 0), axis=1)
    rng = mx - mn
    bad = (nonfinite > 0) | ~(tl.abs(rng) < float("inf"))
    levels = tl.full([ROWS], LEVELS, tl.float32)
    scale = tl.math.div_rn(rng, levels)
    inv = tl.math.div_rn(levels, rng)
    inv = tl.where(inv < float("inf"), inv, 0.0)  # a constant group (or NaN): codes 0
    tl.store(scale_ptr + rows, tl.where(bad, float("nan"), scale), mask=row_ok)
    tl.store(min_ptr + rows, tl.where(bad, float("nan"), mn), mask=row_ok)

    seed_lo = seed_lo.to(tl.uint32)
    seed_hi = seed_hi.to(tl.uint32)
    byte_col = tl.arange(0, GROUP_BYTES)
    packed = tl.zeros([ROWS, GROUP_BYTES], dtype=tl.uint32)
    for k in tl.static_range(PER_BYTE):
        idx = first[:, None] + (byte_col * PER_BYTE + k)[None, :]
        ok = idx < numel
        vk = tl.load(x_ptr + idx, mask=ok, other=0.0).to(tl.float32)
        y = (vk - mn[:, None]) * inv[:, None]
        if STOCHASTIC:  # noqa: SIM108  (a constexpr branch, resolved at compile time)
            u = _rounding_offsets(idx, seed_lo, seed_hi)
        else:
            u = 0.5
        # y + u >= 0 (x >= mn), so truncation is floor.
        q = tl.minimum((y + u).to(tl.int32), LEVELS)
        q = tl.where(ok & ~bad[:, None], q, 0)
        packed = packed | (q.to(tl.uint32) << (k * BITS))
    out = rows.to(tl.int64)[:, None] * GROUP_BYTES + byte_col[None, :]
    tl.store(packed_ptr + out, packed.to(tl.uint8), mask=row_ok[:, None])


@triton.jit
def _dequantize_kernel(
    packed_ptr,
    scale_ptr,
    min_ptr,
    out_ptr,
    numel,
    groups,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    ROWS: tl.constexpr,
):
    """``out = minimum + code * scale`` for groups ``[pid * ROWS, pid * ROWS + ROWS)``."""
    PER_BYTE: tl.constexpr = 8 // BITS
    GROUP_BYTES: tl.constexpr = GROUP // PER_BYTE
    LEVELS: tl.constexpr = (1 << BITS) - 1
    rows, row_ok, _first, index, valid = _program_groups(groups, numel, GROUP, ROWS)
    col = tl.arange(0, GROUP)
    byte_at = rows.to(tl.int64)[:, None] * GROUP_BYTES + (col // PER_BYTE)[None, :]
    byte = tl.load(packed_ptr + byte_at, mask=row_ok[:, None], other=0).to(tl.int32)
    q = (byte >> ((col % PER_BYTE) * BITS)[None, :]) & LEVELS
    scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
    mn = tl.load(min_ptr + rows, mask=row_ok, other=0.0)
    value = mn[:, None] + q.to(tl.float32) * scale[:, None]
    tl.store(out_ptr + index, value.to(out_ptr.dtype.element_ty), mask=valid)


# --------------------------------------------------------------------------- launchers


def _rows(group_size: int) -> int:
    return max(1, ELEMENTS_PER_PROGRAM // group_size)


def launch_quantize(
    x: torch.Tensor, bits: int, group_size: int, seed: int, stochastic: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Allocate the outputs and run ``_quantize_kernel`` over contiguous ``x``."""
    numel = x.numel()
    groups = num_groups(numel, group_size)
    packed = torch.empty(groups * group_size * bits // 8, dtype=torch.uint8, device=x.device)
    scale = torch.empty(groups, dtype=torch.float32, device=x.device)
    minimum = torch.empty(groups, dtype=torch.float32, device=x.device)
    if groups:
        rows = _rows(group_size)
        wrap_triton(_quantize_kernel)[(triton.cdiv(groups, rows),)](
            x,
            packed,
            scale,
            minimum,
            numel,
            groups,
            seed & 0xFFFFFFFF,
            seed >> 32,
            BITS=bits,
            GROUP=group_size,
            ROWS=rows,
            STOCHASTIC=stochastic,
        )
    return packed, scale, minimum


def launch_dequantize(
    packed: torch.Tensor,
    scale: torch.Tensor,
    minimum: torch.Tensor,
    bits: int,
    group_size: int,
    numel: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Allocate the output and run ``_dequantize_kernel``."""
    out = torch.empty(numel, dtype=dtype, device=packed.device)
    groups = scale.numel()
    if groups:
        rows = _rows(group_size)
        wrap_triton(_dequantize_kernel)[(triton.cdiv(groups, rows),)](
            packed, scale, minimum, out, numel, groups, BITS=bits, GROUP=group_size, ROWS=rows
        )
    return out


# --------------------------------------------------------------------------- registrations


def _check_launchable(device: torch.device) -> None:
    if not _backend.triton_can_run(device):
        raise RuntimeError(
            f"the fastaccum Triton kernels cannot run on {device.type} tensors: they need a "
            "CUDA device (or TRITON_INTERPRET=1 set before triton is imported)"
        )


def _on_device(device: torch.device):
    """Make ``device`` current: Triton launches on the current CUDA device, not the tensors'."""
    import contextlib

    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@torch.library.triton_op("fastaccum::quantize_groups_triton", mutates_args=())
def _quantize_op(
    x: torch.Tensor, bits: int, group_size: int, seed: int, stochastic: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate, then launch."""
    _check_input(x)
    check_quantize_args(bits, group_size, seed)
    if not x.is_contiguous():
        raise ValueError("x must be contiguous (it is read flat, in memory order)")
    if not x.is_meta:
        _check_launchable(x.device)
    with _on_device(x.device):
        return launch_quantize(x, bits, group_size, seed, stochastic)


@torch.library.triton_op("fastaccum::dequantize_groups_triton", mutates_args=())
def _dequantize_op(
    packed: torch.Tensor,
    scale: torch.Tensor,
    minimum: torch.Tensor,
    bits: int,
    group_size: int,
    numel: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Validate, then launch."""
    check_dequantize_args(QuantizedGroups(packed, scale, minimum), bits, group_size, numel, dtype)
    if not (packed.is_contiguous() and scale.is_contiguous() and minimum.is_contiguous()):
        raise ValueError("packed, scale and minimum must be contiguous")
    if not packed.is_meta:
        _check_launchable(packed.device)
    with _on_device(packed.device):
        return launch_dequantize(packed, scale, minimum, bits, group_size, numel, dtype)


# --------------------------------------------------------------------------- public


def quantize_groups_triton(
    x: torch.Tensor, bits: int, group_size: int, seed: int, stochastic: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`fastaccum.ops.quantize.quantize_groups` of contiguous ``x`` with Triton.

    Returns ``(packed uint8, scale f32, minimum f32)``. Raises TypeError/ValueError on bad
    arguments and RuntimeError when Triton cannot run on ``x``'s device.
    """
    return torch.ops.fastaccum.quantize_groups_triton(x, bits, group_size, seed, stochastic)


def dequantize_groups_triton(
    packed: torch.Tensor,
    scale: torch.Tensor,
    minimum: torch.Tensor,
    bits: int,
    group_size: int,
    numel: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """:func:`fastaccum.ops.quantize.dequantize_groups` with Triton: flat ``[numel]`` of
    ``dtype``. Raises as :func:`quantize_groups_triton` does."""
    return torch.ops.fastaccum.dequantize_groups_triton(
        packed, scale, minimum, bits, group_size, numel, dtype
    )
