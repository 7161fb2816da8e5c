"""Triton kernels of ``accumulate_`` and ``finalize_`` (semantics: :mod:`fastaccum.ops.accumulate`).

Top to bottom: the ``@triton.jit`` kernels, the launchers, the ``torch.library.triton_op``
registrations (``fastaccum::accumulate_triton_``, ``fastaccum::finalize_triton_``), and the
public functions that :mod:`fastaccum.ops.accumulate` calls.

Multi-tensor scheme. Each tensor is cut into chunks of ``CHUNK`` elements, and one program
handles one (tensor, chunk) work item. There are two ways to launch:

- Pointer tables (eager, the fast path). Pairs are grouped by dtype pair and each group is
  one launch. A program reads its tensor's addresses and numel from an int64 table on the
  device. The tables depend only on (addresses, numels, dtypes), so they are cached under
  that key: a training loop passes the same buffers every micro-step, so after the first
  step no table is built or copied to the device again.
- Direct (while torch.compile traces the op with fake or functional tensors, which have no
  addresses to put in a table). One launch per tensor, with the tensors passed as kernel
  arguments so that torch sees what each launch reads and writes.

Both ways write each chunk's partial sums into the same workspace slot, and a second
kernel adds up each tensor's slots in a fixed order. The sums are therefore deterministic
(no atomics) and bit-identical between the two ways.
"""

import contextlib
import functools
import itertools
from collections.abc import Sequence
from typing import Any, NamedTuple, cast

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor

from fastaccum import _backend
from fastaccum.ops.accumulate import check_accumulate_args, check_finalize_args

BLOCK = 1024
"""Elements a program processes per step."""
ITERS = 16
"""Steps per program: a work item (chunk) is ``BLOCK * ITERS`` elements."""
CHUNK = BLOCK * ITERS
REDUCE_BLOCK = 256
"""Partial sums the reduction kernel reads per step."""
ALIGNMENT = 16
"""Bytes of one vector load; groups whose addresses are all multiples of it get vector loads."""

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


# --------------------------------------------------------------------------- kernels


@triton.jit
def _chunk_bounds(numel, chunk, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """Element range of work item ``chunk``: ``[start, end)``, whole blocks up to ``full_end``."""
    start = chunk * (BLOCK * ITERS)
    end = tl.minimum(start + BLOCK * ITERS, numel)
    full_end = start + (end - start) // BLOCK * BLOCK
    return start, full_end, end


@triton.jit
def _accumulate_block(
    accum_ptr, grad_ptr, offs, limit, scale, grad_sq, accum_sq, nonfinite, ZERO_GRADS: tl.constexpr
):
    """One block of ``accum += scale * grad`` (fp32 math) where ``offs < limit``.

    Adds ``grad**2`` and ``accum_new**2`` (of the value stored) into the running fp32 sums
    ``grad_sq`` and ``accum_sq``, ORs "grad is NaN or +-Inf" into ``nonfinite`` and returns
    the three.
    """
    mask = offs < limit
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(accum_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # One rounding via an explicit fma: whether Triton contracts a + s*g on its own depends on
    # its version (the default flips in 3.10), and the result should not.
    stored = tl.fma(g, scale, a).to(accum_ptr.dtype.element_ty)
    tl.store(accum_ptr + offs, stored, mask=mask)
    if ZERO_GRADS:
        tl.store(grad_ptr + offs, tl.zeros_like(g).to(grad_ptr.dtype.element_ty), mask=mask)
    # Squares of bf16/fp16 values summed in their own dtype would overflow (fp16) or lose
    # most digits after a few thousand terms, so the sums are kept in fp32. The accumulator
    # sum is of the values stored (after rounding to a bf16/fp16 accumulator's dtype), as
    # the reference's is.
    r = stored.to(tl.float32)
    grad_sq += g * g
    accum_sq += r * r
    # NaN compares false, so "not |g| < inf" catches NaN and +-Inf with one comparison.
    nonfinite |= ~(tl.abs(g) < float("inf"))
    return grad_sq, accum_sq, nonfinite


@triton.jit
def _accumulate_chunk(
    accum_ptr,
    grad_ptr,
    numel,
    chunk,
    scale,
    ZERO_GRADS: tl.constexpr,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
):
    """``_accumulate_block`` over work item ``chunk`` of one pair.

    Returns ``(sum grad**2, sum accum_new**2, int32 any grad non-finite)`` over the chunk.
    """
    start, full_end, end = _chunk_bounds(numel, chunk, BLOCK, ITERS)
    grad_sq = tl.zeros([BLOCK], dtype=tl.float32)
    accum_sq = tl.zeros([BLOCK], dtype=tl.float32)
    nonfinite = tl.zeros([BLOCK], dtype=tl.int1)
    # Whole blocks are masked against full_end, a multiple of BLOCK, and not against numel:
    # the compiler can then prove the mask uniform over each 16-byte vector and emit vector
    # loads, where a mask against an arbitrary numel forces one load per element.
    for block_start in range(start, full_end, BLOCK):
        offs = block_start + tl.arange(0, BLOCK)
        grad_sq, accum_sq, nonfinite = _accumulate_block(
            accum_ptr, grad_ptr, offs, full_end, scale, grad_sq, accum_sq, nonfinite, ZERO_GRADS
        )
    if full_end < end:
        offs = full_end + tl.arange(0, BLOCK)
        grad_sq, accum_sq, nonfinite = _accumulate_block(
            accum_ptr, grad_ptr, offs, end, scale, grad_sq, accum_sq, nonfinite, ZERO_GRADS
        )
    return tl.sum(grad_sq), tl.sum(accum_sq), tl.max(nonfinite.to(tl.int32))


@triton.jit
def _table_work_item(tensor_table, item_table):
    """This program's work item: (row of ``tensor_table``, chunk index, numel of the row).

    ``tensor_table`` is int64 ``[T, 4]``: first address, second address, numel, first
    workspace slot. ``item_table`` is int32 ``[P, 2]``: row, chunk index.
    """
    item = tl.program_id(0)
    row = tl.load(item_table + 2 * item)
    chunk = tl.load(item_table + 2 * item + 1).to(tl.int64)  # chunk * CHUNK may pass 2**31
    numel = tl.load(tensor_table + 4 * row + 2)
    return row, chunk, numel


@triton.jit
def _table_pointer(tensor_table, row, column, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """The address at ``tensor_table[row, column]`` as a pointer to ``DTYPE``."""
    ptr = tl.load(tensor_table + 4 * row + column).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        # An address loaded from memory carries no alignment facts. The launcher checked
        # that every address in this launch is 16-byte aligned; saying so here lets the
        # compiler use 16-byte vector loads and stores.
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _accumulate_table_kernel(
    tensor_table,
    item_table,
    grad_partials,
    accum_partials,
    nonfinite_partials,
    scale,
    ACCUM_DTYPE: tl.constexpr,
    GRAD_DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    ZERO_GRADS: tl.constexpr,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
):
    """Multi-tensor ``accum += scale * grad``: one program per (tensor, chunk) work item.

    Tables as in ``_table_work_item`` (first address: accumulator, second: gradient).
    Program ``p`` writes its chunk's sums to workspace slot ``first slot + chunk``.
    """
    row, chunk, numel = _table_work_item(tensor_table, item_table)
    accum_ptr = _table_pointer(tensor_table, row, 0, ACCUM_DTYPE, ALIGNED)
    grad_ptr = _table_pointer(tensor_table, row, 1, GRAD_DTYPE, ALIGNED)
    slot = tl.load(tensor_table + 4 * row + 3) + chunk
    grad_sq, accum_sq, nonfinite = _accumulate_chunk(
        accum_ptr, grad_ptr, numel, chunk, scale, ZERO_GRADS, BLOCK, ITERS
    )
    tl.store(grad_partials + slot, grad_sq)
    tl.store(accum_partials + slot, accum_sq)
    tl.store(nonfinite_partials + slot, nonfinite)


@triton.jit
def _accumulate_direct_kernel(
    accum_ptr,
    grad_ptr,
    numel,
    first_slot,
    grad_partials,
    accum_partials,
    nonfinite_partials,
    scale,
    ZERO_GRADS: tl.constexpr,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
):
    """``accum += scale * grad`` for one pair: program ``p`` handles chunk ``p``.

    Writes its chunk's sums to workspace slot ``first_slot + p``, as the table kernel does.
    """
    chunk = tl.program_id(0).to(tl.int64)
    grad_sq, accum_sq, nonfinite = _accumulate_chunk(
        accum_ptr, grad_ptr, numel, chunk, scale, ZERO_GRADS, BLOCK, ITERS
    )
    tl.store(grad_partials + first_slot + chunk, grad_sq)
    tl.store(accum_partials + first_slot + chunk, accum_sq)
    tl.store(nonfinite_partials + first_slot + chunk, nonfinite)


@triton.jit
def _reduce_partials_kernel(
    segments,
    grad_partials,
    accum_partials,
    nonfinite_partials,
    grad_sumsq,
    accum_sumsq,
    nonfinite,
    BLOCK: tl.constexpr,
):
    """Per tensor ``i``: sum (max for ``nonfinite``) of workspace slots ``segments[i]``.

    ``segments`` is int64 ``[N, 2]``: first slot, slot count. The order of the additions
    depends only on the count, which makes the result deterministic.
    """
    i = tl.program_id(0)
    first = tl.load(segments + 2 * i)
    count = tl.load(segments + 2 * i + 1)
    grad_sq = tl.zeros([BLOCK], dtype=tl.float32)
    accum_sq = tl.zeros([BLOCK], dtype=tl.float32)
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    for block_start in range(0, count, BLOCK):
        offs = block_start + tl.arange(0, BLOCK)
        mask = offs < count
        grad_sq += tl.load(grad_partials + first + offs, mask=mask, other=0.0)
        accum_sq += tl.load(accum_partials + first + offs, mask=mask, other=0.0)
        bad = tl.maximum(bad, tl.load(nonfinite_partials + first + offs, mask=mask, other=0))
    tl.store(grad_sumsq + i, tl.sum(grad_sq))
    tl.store(accum_sumsq + i, tl.sum(accum_sq))
    tl.store(nonfinite + i, tl.max(bad))


@triton.jit
def _finalize_block(accum_ptr, out_ptr, factor_ptr, offs, limit, factor, ZERO_ACCUMS: tl.constexpr):
    """One block of ``r = accum * factor * factor_tensor`` in fp32 where ``offs < limit``.

    Stores ``r`` (cast) to ``out`` when there is one, then ``0`` or ``r`` to ``accum``. The
    two products are rounded one at a time, in the reference's order.
    """
    mask = offs < limit
    r = tl.load(accum_ptr + offs, mask=mask).to(tl.float32) * factor
    if factor_ptr is not None:
        r = r * tl.load(factor_ptr)
    if out_ptr is not None:
        tl.store(out_ptr + offs, r.to(out_ptr.dtype.element_ty), mask=mask)
    if ZERO_ACCUMS:
        tl.store(accum_ptr + offs, tl.zeros_like(r).to(accum_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(accum_ptr + offs, r.to(accum_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _finalize_chunk(
    accum_ptr,
    out_ptr,
    factor_ptr,
    numel,
    chunk,
    factor,
    ZERO_ACCUMS: tl.constexpr,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
):
    """``_finalize_block`` over work item ``chunk`` of one accumulator."""
    start, full_end, end = _chunk_bounds(numel, chunk, BLOCK, ITERS)
    # Masked against full_end for vector loads, as in _accumulate_chunk.
    for block_start in range(start, full_end, BLOCK):
        offs = block_start + tl.arange(0, BLOCK)
        _finalize_block(accum_ptr, out_ptr, factor_ptr, offs, full_end, factor, ZERO_ACCUMS)
    if full_end < end:
        offs = full_end + tl.arange(0, BLOCK)
        _finalize_block(accum_ptr, out_ptr, factor_ptr, offs, end, factor, ZERO_ACCUMS)


@triton.jit
def _finalize_table_kernel(
    tensor_table,
    item_table,
    factor_ptr,
    factor,
    ACCUM_DTYPE: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    ZERO_ACCUMS: tl.constexpr,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
):
    """Multi-tensor finalize: one program per (tensor, chunk) work item.

    Tables as in ``_table_work_item`` (first address: accumulator, second: output, unused
    when ``OUT_DTYPE`` is None, i.e. there are no outputs).
    """
    row, chunk, numel = _table_work_item(tensor_table, item_table)
    accum_ptr = _table_pointer(tensor_table, row, 0, ACCUM_DTYPE, ALIGNED)
    out_ptr = None
    if OUT_DTYPE is not None:
        out_ptr = _table_pointer(tensor_table, row, 1, OUT_DTYPE, ALIGNED)
    _finalize_chunk(accum_ptr, out_ptr, factor_ptr, numel, chunk, factor, ZERO_ACCUMS, BLOCK, ITERS)


@triton.jit
def _finalize_direct_kernel(
    accum_ptr,
    out_ptr,
    factor_ptr,
    numel,
    factor,
    ZERO_ACCUMS: tl.constexpr,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
):
    """Finalize one accumulator: program ``p`` handles chunk ``p``."""
    chunk = tl.program_id(0).to(tl.int64)
    _finalize_chunk(accum_ptr, out_ptr, factor_ptr, numel, chunk, factor, ZERO_ACCUMS, BLOCK, ITERS)


# --------------------------------------------------------------------------- launchers


class _Group(NamedTuple):
    """One launch of a table kernel: the pairs of one dtype pair."""

    dtypes: tuple[torch.dtype, torch.dtype | None]
    aligned: bool
    tensor_table: torch.Tensor  # int64 [T, 4] on the device
    item_table: torch.Tensor  # int32 [P, 2] on the device


class _Plan(NamedTuple):
    """Everything the table kernels of one call need; a function of the pairs alone."""

    groups: tuple[_Group, ...]
    segments: torch.Tensor  # int64 [N, 2] on the device: first workspace slot, slot count


_Pair = tuple[int, int, int, torch.dtype, torch.dtype | None]
"""(first address, second address or 0, numel, first dtype, second dtype or None)."""


def _workspace_layout(numels: Sequence[int]) -> tuple[list[int], list[int]]:
    """First workspace slot and slot count (one slot per chunk) of each tensor, in order."""
    counts = [triton.cdiv(n, CHUNK) for n in numels]
    firsts = list(itertools.accumulate(counts, initial=0))[:-1]
    return firsts, counts


def _segment_table(numels: Sequence[int], device: torch.device) -> torch.Tensor:
    """int64 ``[N, 2]``: each tensor's first workspace slot and slot count."""
    firsts, counts = _workspace_layout(numels)
    rows = list(zip(firsts, counts, strict=True))
    return torch.tensor(rows, dtype=torch.int64, device=device).reshape(len(rows), 2)


def _to_device(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a host table to ``device``; to a GPU from pinned memory, without a host sync."""
    if device.type == "cuda":
        return table.pin_memory().to(device, non_blocking=True)
    return table.to(device)


# Small: the item table holds 8 bytes per CHUNK elements (about 4 MB for 7e9 elements), and
# a loop that reallocates its gradients (zero_grad(set_to_none=True)) may bring new
# addresses each step.
@functools.lru_cache(maxsize=8)
def _plan(device: torch.device, pairs: tuple[_Pair, ...]) -> _Plan:
    """Device tables for ``pairs``, cached: they depend on nothing but the key."""
    firsts, counts = _workspace_layout([p[2] for p in pairs])
    members: dict[tuple[torch.dtype, torch.dtype | None], list[int]] = {}
    for i, (_, _, numel, first_dtype, second_dtype) in enumerate(pairs):
        if numel:
            members.setdefault((first_dtype, second_dtype), []).append(i)
    groups = []
    for dtypes, rows in members.items():
        tensor_table = torch.tensor(
            [[pairs[i][0], pairs[i][1], pairs[i][2], firsts[i]] for i in rows], dtype=torch.int64
        )
        row_counts = torch.tensor([counts[i] for i in rows], dtype=torch.int64)
        row_of_item = torch.repeat_interleave(torch.arange(len(rows)), row_counts)
        row_first_item = torch.cumsum(row_counts, 0) - row_counts
        chunk_of_item = torch.arange(len(row_of_item)) - row_first_item[row_of_item]
        item_table = torch.stack([row_of_item, chunk_of_item], dim=1).to(torch.int32)
        # A missing second tensor has address 0, which is aligned.
        aligned = all(pairs[i][0] % ALIGNMENT == 0 and pairs[i][1] % ALIGNMENT == 0 for i in rows)
        tables = _to_device(tensor_table, device), _to_device(item_table, device)
        groups.append(_Group(dtypes, aligned, *tables))
    segments = _to_device(_segment_table([p[2] for p in pairs], torch.device("cpu")), device)
    return _Plan(tuple(groups), segments)


def _plan_for(firsts: list[torch.Tensor], seconds: list[torch.Tensor] | None) -> _Plan:
    """The (cached) plan of pairs ``(firsts[i], seconds[i])``; ``seconds=None``: no partner."""
    key: tuple[_Pair, ...]
    if seconds is None:
        key = tuple((a.data_ptr(), 0, a.numel(), a.dtype, None) for a in firsts)
    else:
        key = tuple(
            (a.data_ptr(), b.data_ptr(), a.numel(), a.dtype, b.dtype)
            for a, b in zip(firsts, seconds, strict=True)
        )
    return _plan(firsts[0].device, key)


def _has_addresses(tensor: torch.Tensor) -> bool:
    """False for the fake and functional tensors that torch.compile and export trace with."""
    return not (
        isinstance(tensor, (FakeTensor, FunctionalTensor))
        or torch._is_functional_tensor(tensor)
        or tensor.is_meta
    )


def launch_accumulate(
    accums: list[torch.Tensor],
    grads: list[torch.Tensor],
    scale: float,
    zero_grads: bool,
    *,
    pointer_tables: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the accumulate kernels on validated, non-empty lists; results as the op's.

    ``pointer_tables=False`` launches once per tensor with the tensors as kernel arguments
    (what tracing needs); the results are bit-identical either way.
    """
    device = accums[0].device
    n = len(accums)
    # int() pins symbolic sizes (torch.compile(dynamic=True)) to this call's values, with a
    # guard: the workspace layout below is baked into the traced graph.
    numels = [int(a.numel()) for a in accums]
    firsts, counts = _workspace_layout(numels)
    n_slots = max(1, sum(counts))
    grad_partials = torch.empty(n_slots, dtype=torch.float32, device=device)
    accum_partials = torch.empty(n_slots, dtype=torch.float32, device=device)
    nonfinite_partials = torch.empty(n_slots, dtype=torch.int32, device=device)
    if pointer_tables:
        plan = _plan_for(accums, grads)
        for group in plan.groups:
            n_items = group.item_table.shape[0]
            wrap_triton(_accumulate_table_kernel)[(n_items,)](
                group.tensor_table,
                group.item_table,
                grad_partials,
                accum_partials,
                nonfinite_partials,
                scale,
                ACCUM_DTYPE=_TL_DTYPES[group.dtypes[0]],
                GRAD_DTYPE=_TL_DTYPES[cast(torch.dtype, group.dtypes[1])],  # (pairs here)
                ALIGNED=group.aligned,
                ZERO_GRADS=zero_grads,
                BLOCK=BLOCK,
                ITERS=ITERS,
            )
        segments = plan.segments
    else:
        for a, g, numel, first, count in zip(accums, grads, numels, firsts, counts, strict=True):
            if count:
                wrap_triton(_accumulate_direct_kernel)[(count,)](
                    a,
                    g,
                    numel,
                    first,
                    grad_partials,
                    accum_partials,
                    nonfinite_partials,
                    scale,
                    ZERO_GRADS=zero_grads,
                    BLOCK=BLOCK,
                    ITERS=ITERS,
                )
        segments = _segment_table(numels, device)
    grad_per_tensor = torch.empty(n, dtype=torch.float32, device=device)
    accum_per_tensor = torch.empty(n, dtype=torch.float32, device=device)
    nonfinite_per_tensor = torch.empty(n, dtype=torch.int32, device=device)
    wrap_triton(_reduce_partials_kernel)[(n,)](
        segments,
        grad_partials,
        accum_partials,
        nonfinite_partials,
        grad_per_tensor,
        accum_per_tensor,
        nonfinite_per_tensor,
        BLOCK=REDUCE_BLOCK,
    )
    # Totals over tensors in float64: N fp32 terms of very different sizes, and it is cheap.
    return (
        grad_per_tensor.sum(dtype=torch.float64).float(),
        grad_per_tensor,
        accum_per_tensor.sum(dtype=torch.float64).float(),
        nonfinite_per_tensor.any(),
    )


def launch_finalize(
    accums: list[torch.Tensor],
    outs: list[torch.Tensor],
    factor: float,
    factor_tensor: torch.Tensor | None,
    zero_accums: bool,
    *,
    pointer_tables: bool = True,
) -> None:
    """Launch the finalize kernels on validated, non-empty lists (``outs`` may be empty).

    ``pointer_tables`` as in :func:`launch_accumulate`.
    """
    # Read on the device (no .item(), no sync), as one fp32 value like the reference.
    factor_fp32 = None if factor_tensor is None else factor_tensor.reshape(()).float()
    if pointer_tables:
        for group in _plan_for(accums, outs or None).groups:
            accum_dtype, out_dtype = group.dtypes
            wrap_triton(_finalize_table_kernel)[(group.item_table.shape[0],)](
                group.tensor_table,
                group.item_table,
                factor_fp32,
                factor,
                ACCUM_DTYPE=_TL_DTYPES[accum_dtype],
                OUT_DTYPE=None if out_dtype is None else _TL_DTYPES[out_dtype],
                ALIGNED=group.aligned,
                ZERO_ACCUMS=zero_accums,
                BLOCK=BLOCK,
                ITERS=ITERS,
            )
        return
    for i, a in enumerate(accums):
        numel = int(a.numel())  # pinned as in launch_accumulate
        if numel:
            wrap_triton(_finalize_direct_kernel)[(triton.cdiv(numel, CHUNK),)](
                a,
                outs[i] if outs else None,
                factor_fp32,
                numel,
                factor,
                ZERO_ACCUMS=zero_accums,
                BLOCK=BLOCK,
                ITERS=ITERS,
            )


# --------------------------------------------------------------------------- registrations


def _is_fake(tensor: torch.Tensor) -> bool:
    """True when the op runs as its own fake kernel, which only describes the outputs."""
    return isinstance(tensor, FakeTensor) or tensor.is_meta


def wrap_triton(kernel: Any) -> Any:
    """``torch.library.wrap_triton(kernel)``, or ``kernel`` itself under the Triton
    interpreter: torch 2.13's wrap_triton hands interpreted kernels back as they are, torch
    2.11's refuses them."""
    if _backend.triton_interpreted():
        return kernel
    return torch.library.wrap_triton(kernel)


def _check_launchable(tensor: torch.Tensor) -> None:
    """Raise RuntimeError unless the kernels can run on ``tensor`` (real or being traced)."""
    if not _has_addresses(tensor):
        if _backend.triton_interpreted():
            # torch.library.wrap_triton hands back the raw kernel under the interpreter, and
            # the interpreter cannot run on traced tensors (torch 2.13, checked 2026-11).
            raise RuntimeError(
                "the fastaccum Triton ops cannot be lowered by torch.compile while "
                "TRITON_INTERPRET=1; compile with backend='eager' or run on a CUDA device"
            )
        return
    if not _backend.triton_can_run(tensor.device):
        raise RuntimeError(
            f"the fastaccum Triton kernels cannot run on {tensor.device.type} tensors: they "
            "need a CUDA device (or TRITON_INTERPRET=1 set before triton is imported)"
        )


def _on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` current: Triton launches on the current CUDA device, not the tensors'."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _accumulate_results(
    n: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zeroed results of :func:`accumulate_triton` for ``n`` tensors."""
    f32 = torch.float32
    return (
        torch.zeros((), dtype=f32, device=device),
        torch.zeros(n, dtype=f32, device=device),
        torch.zeros((), dtype=f32, device=device),
        torch.zeros((), dtype=torch.bool, device=device),
    )


@torch.library.triton_op("fastaccum::accumulate_triton_", mutates_args={"accums", "grads"})
def _accumulate_op(
    accums: list[torch.Tensor], grads: list[torch.Tensor], scale: float, zero_grads: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate, then launch (or describe the outputs, as the fake kernel)."""
    accums, grads, scale = check_accumulate_args(accums, grads, scale)
    if not accums:
        return _accumulate_results(0, torch.device("cpu"))
    if _is_fake(accums[0]):
        # Under FakeTensorMode wrap_triton's launch does nothing either; skipping it here also
        # keeps the interpreter (which wrap_triton does not wrap) away from fake memory.
        return _accumulate_results(len(accums), accums[0].device)
    _check_launchable(accums[0])
    with _on_device(accums[0].device):
        return launch_accumulate(
            accums, grads, scale, zero_grads, pointer_tables=_has_addresses(accums[0])
        )


@torch.library.triton_op("fastaccum::finalize_triton_", mutates_args={"accums", "outs"})
def _finalize_op(
    accums: list[torch.Tensor],
    outs: list[torch.Tensor],
    factor: float,
    factor_tensor: torch.Tensor | None,
    zero_accums: bool,
) -> None:
    """Validate, then launch (nothing to do as the fake kernel)."""
    accums, outs, factor = check_finalize_args(accums, outs, factor, factor_tensor)
    if not accums or _is_fake(accums[0]):
        return
    _check_launchable(accums[0])
    with _on_device(accums[0].device):
        launch_finalize(
            accums,
            outs,
            factor,
            factor_tensor,
            zero_accums,
            pointer_tables=_has_addresses(accums[0]),
        )


# --------------------------------------------------------------------------- public


def accumulate_triton(
    accums: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    scale: float,
    zero_grads: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``accums[i] += scale * grads[i]`` with Triton, through ``fastaccum::accumulate_triton_``.

    Returns ``(grad_sumsq f32[], grad_sumsq_per_tensor f32[N], accum_sumsq f32[],
    found_nonfinite bool[])`` as :func:`fastaccum.accumulate_` documents. Raises
    TypeError/ValueError on invalid lists (nothing is modified then) and RuntimeError when
    Triton cannot run on the tensors' device.
    """
    return torch.ops.fastaccum.accumulate_triton_(list(accums), list(grads), scale, zero_grads)


def finalize_triton(
    accums: Sequence[torch.Tensor],
    outs: Sequence[torch.Tensor],
    factor: float,
    factor_tensor: torch.Tensor | None,
    zero_accums: bool,
) -> None:
    """``r = accums[i] * factor * factor_tensor``; ``outs[i] = r``; ``accums[i] = 0`` or ``r``.

    With Triton, through ``fastaccum::finalize_triton_``; semantics as
    :func:`fastaccum.finalize_`. Raises as :func:`accumulate_triton` does.
    """
    torch.ops.fastaccum.finalize_triton_(
        list(accums), list(outs or []), factor, factor_tensor, zero_accums
    )
