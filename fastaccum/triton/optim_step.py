"""Triton kernels of ``sgd_window_step_`` / ``adam_window_step_`` (semantics and the math:
:mod:`fastaccum.ops.optim_step`).

Top to bottom: the ``@triton.jit`` kernels, the launchers, the ``torch.library.triton_op``
registrations (``fastaccum::sgd_window_step_triton_``, ``fastaccum::adam_window_step_triton_``),
which :mod:`fastaccum.ops.optim_step` calls with the same arguments as the native ops.

Multi-tensor scheme, as in :mod:`fastaccum.triton.accumulate` (whose chunking and launch
helpers this module shares): one program per (tensor, chunk of ``CHUNK`` elements) work
item. In eager mode one launch covers every tensor of the call, reading each work item's
addresses from an int64 table on the device (cached under the addresses, so a training loop
builds it once). While torch.compile traces the op (fake or functional tensors, which have
no addresses) the same kernel runs once per tensor with the tensors as arguments.

Every value is computed in fp32 with the operations of ``torch.optim``'s single-tensor code
path. Division and square root use the IEEE round-to-nearest forms (``tl.div_rn``,
``tl.sqrt_rn``): Triton's ``/`` and ``tl.sqrt`` may be approximate on GPUs. A multiply
and an add may still be fused into one fma, as torch's own CUDA kernels do.
"""

import functools

import torch
import triton
import triton.language as tl

from fastaccum.ops.optim_step import (
    ADAM_OPTIONS,
    SGD_OPTIONS,
    check_adam_window_step_args,
    check_sgd_window_step_args,
)
from fastaccum.triton.accumulate import (
    ALIGNMENT,
    BLOCK,
    CHUNK,
    ITERS,
    _check_launchable,
    _chunk_bounds,
    _has_addresses,
    _is_fake,
    _on_device,
    _to_device,
    wrap_triton,
)

# --------------------------------------------------------------------------- kernels

TABLE_COLUMNS = 6
"""Columns of a tensor table row: numel, then the addresses of the parameter, the
accumulator and up to three state tensors."""
COLUMNS = tl.constexpr(TABLE_COLUMNS)  # the same, for the kernels


@triton.jit
def _work_item(tensor_table, item_table, TABLE: tl.constexpr):
    """This program's (row of ``tensor_table``, chunk index); row 0 without a table.

    ``tensor_table`` is int64 ``[T, COLUMNS]``: numel, then the addresses of the parameter,
    the accumulator and up to three state tensors (0 where absent). ``item_table`` is int32
    ``[P, 2]``: row, chunk index.
    """
    if TABLE:
        item = tl.program_id(0)
        row = tl.load(item_table + 2 * item)
        chunk = tl.load(item_table + 2 * item + 1).to(tl.int64)  # chunk * CHUNK may pass 2**31
    else:
        row = 0
        chunk = tl.program_id(0).to(tl.int64)
    return row, chunk


@triton.jit
def _row_pointer(tensor_table, row, column, ALIGNED: tl.constexpr):
    """The fp32 tensor whose address is ``tensor_table[row, column]``."""
    ptr = tl.load(tensor_table + COLUMNS * row + column).to(tl.pointer_type(tl.float32))
    if ALIGNED:
        # A loaded address carries no alignment facts; the launcher checked every address
        # of the launch, and saying so lets the compiler use 16-byte vector accesses.
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _window_gradient(accum_ptr, factor_ptr, offs, mask, factor):
    """``accum * factor * factor_tensor`` (``factor`` carries maximize's sign); zeroes accum."""
    g = tl.load(accum_ptr + offs, mask=mask) * factor
    if factor_ptr is not None:
        g = g * tl.load(factor_ptr)
    tl.store(accum_ptr + offs, tl.zeros_like(g), mask=mask)
    return g


@triton.jit
def _sgd_kernel(
    tensor_table,
    item_table,
    param_ptr,
    accum_ptr,
    buf_ptr,
    numel,
    factor_ptr,
    factor,
    weight_decay,
    momentum,
    one_minus_dampening,
    neg_lr,
    DECAY: tl.constexpr,
    MOMENTUM: tl.constexpr,
    FIRST: tl.constexpr,
    NESTEROV: tl.constexpr,
    TABLE: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
):
    """``torch.optim.SGD``'s update of one work item: with ``TABLE``, of the tensors in the
    tables (the pointer and ``numel`` arguments are unused); else of the tensors passed,
    chunk ``program_id``. ``FIRST``: the buffer starts as the gradient."""
    row, chunk = _work_item(tensor_table, item_table, TABLE)
    if TABLE:
        numel = tl.load(tensor_table + COLUMNS * row)
        param_ptr = _row_pointer(tensor_table, row, 1, ALIGNED)
        accum_ptr = _row_pointer(tensor_table, row, 2, ALIGNED)
        if MOMENTUM:
            buf_ptr = _row_pointer(tensor_table, row, 3, ALIGNED)
    start, full_end, end = _chunk_bounds(numel, chunk, BLOCK, ITERS)
    # Part 0: the whole blocks, masked against full_end (a multiple of BLOCK, so that the
    # compiler can prove each vector's mask uniform, as in fastaccum.triton.accumulate);
    # part 1: the partial block at the end of the chunk, if any.
    for part in tl.static_range(2):
        limit = full_end if part == 0 else end
        for block_start in range(start if part == 0 else full_end, limit, BLOCK):
            offs = block_start + tl.arange(0, BLOCK)
            mask = offs < limit
            p = tl.load(param_ptr + offs, mask=mask)
            g = _window_gradient(accum_ptr, factor_ptr, offs, mask, factor)
            if DECAY:
                g = g + weight_decay * p
            if MOMENTUM:
                if FIRST:
                    buf = g
                else:
                    buf = tl.load(buf_ptr + offs, mask=mask)
                    buf = buf * momentum + one_minus_dampening * g
                tl.store(buf_ptr + offs, buf, mask=mask)
                g = g + momentum * buf if NESTEROV else buf
            tl.store(param_ptr + offs, p + neg_lr * g, mask=mask)


@triton.jit
def _adam_kernel(
    tensor_table,
    item_table,
    param_ptr,
    accum_ptr,
    exp_avg_ptr,
    exp_avg_sq_ptr,
    max_exp_avg_sq_ptr,
    numel,
    factor_ptr,
    factor,
    weight_decay,
    decay,
    lerp_weight,
    beta2,
    one_minus_beta2,
    bias_correction2_sqrt,
    eps,
    neg_step_size,
    L2: tl.constexpr,
    DECOUPLED: tl.constexpr,
    SMALL_WEIGHT: tl.constexpr,
    AMSGRAD: tl.constexpr,
    TABLE: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
):
    """``torch.optim.Adam``/``AdamW``'s update of one work item; tables and arguments as
    ``_sgd_kernel``. ``lerp`` takes torch's form for the weight: ``m + w * (g - m)`` when
    ``|w| < 0.5`` (``SMALL_WEIGHT``), else ``g - (g - m) * (1 - w)``. ``AMSGRAD``: the
    denominator uses the running maximum of the second moment, kept in ``max_exp_avg_sq``."""
    row, chunk = _work_item(tensor_table, item_table, TABLE)
    if TABLE:
        numel = tl.load(tensor_table + COLUMNS * row)
        param_ptr = _row_pointer(tensor_table, row, 1, ALIGNED)
        accum_ptr = _row_pointer(tensor_table, row, 2, ALIGNED)
        exp_avg_ptr = _row_pointer(tensor_table, row, 3, ALIGNED)
        exp_avg_sq_ptr = _row_pointer(tensor_table, row, 4, ALIGNED)
        if AMSGRAD:
            max_exp_avg_sq_ptr = _row_pointer(tensor_table, row, 5, ALIGNED)
    start, full_end, end = _chunk_bounds(numel, chunk, BLOCK, ITERS)
    for part in tl.static_range(2):  # whole blocks, then the partial one: see _sgd_kernel
        limit = full_end if part == 0 else end
        for block_start in range(start if part == 0 else full_end, limit, BLOCK):
            offs = block_start + tl.arange(0, BLOCK)
            mask = offs < limit
            p = tl.load(param_ptr + offs, mask=mask)
            g = _window_gradient(accum_ptr, factor_ptr, offs, mask, factor)
            if DECOUPLED:
                p = p * decay
            if L2:
                g = g + weight_decay * p
            m = tl.load(exp_avg_ptr + offs, mask=mask)
            m = m + lerp_weight * (g - m) if SMALL_WEIGHT else g - (g - m) * (1.0 - lerp_weight)
            v = tl.load(exp_avg_sq_ptr + offs, mask=mask) * beta2 + one_minus_beta2 * g * g
            tl.store(exp_avg_sq_ptr + offs, v, mask=mask)
            if AMSGRAD:
                # torch.maximum: NaN when either side is NaN
                v0 = tl.load(max_exp_avg_sq_ptr + offs, mask=mask)
                v = tl.where((v < v0) | (v0 != v0), v0, v)
                tl.store(max_exp_avg_sq_ptr + offs, v, mask=mask)
            denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
            tl.store(exp_avg_ptr + offs, m, mask=mask)
            tl.store(param_ptr + offs, p + tl.div_rn(neg_step_size * m, denom), mask=mask)


# --------------------------------------------------------------------------- launchers


@functools.lru_cache(maxsize=8)
def _tables(
    device: torch.device, rows: tuple[tuple[int, ...], ...]
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Device tables of ``rows`` (numel, then addresses): ``(tensor_table int64 [T, 6],
    item_table int32 [P, 2], every address aligned)``, cached on the key alone."""
    rows = tuple(r for r in rows if r[0] > 0)
    padded = [list(r) + [0] * (TABLE_COLUMNS - len(r)) for r in rows]
    counts = torch.tensor([triton.cdiv(r[0], CHUNK) for r in rows], dtype=torch.int64)
    row_of_item = torch.repeat_interleave(torch.arange(len(rows)), counts)
    first_item = torch.cumsum(counts, 0) - counts
    chunk_of_item = torch.arange(len(row_of_item)) - first_item[row_of_item]
    item_table = torch.stack([row_of_item, chunk_of_item], dim=1).to(torch.int32)
    aligned = all(address % ALIGNMENT == 0 for r in rows for address in r[1:])
    tensor_table = torch.tensor(padded, dtype=torch.int64).reshape(len(rows), TABLE_COLUMNS)
    return _to_device(tensor_table, device), _to_device(item_table, device), aligned


def _launch(
    kernel: triton.JITFunction, n_pointers: int, lists: list[list[torch.Tensor]], *args, **meta
) -> None:
    """Run ``kernel`` (``n_pointers`` tensor arguments) over every element of ``lists``
    (params, accums, then the state lists; ``None`` fills the missing tensor arguments).

    Nothing runs for fake tensors (the op's fake kernel) or empty lists. With real tensors
    one launch reads the address tables; while tracing, one launch per tensor takes the
    tensors as arguments, so that torch sees what each launch writes.
    """
    params = lists[0]
    if not params or _is_fake(params[0]):
        return
    _check_launchable(params[0])
    with _on_device(params[0].device):
        if _has_addresses(params[0]):
            key = tuple(
                (int(row[0].numel()), *(t.data_ptr() for t in row))
                for row in zip(*lists, strict=True)
            )
            tensor_table, item_table, aligned = _tables(params[0].device, key)
            grid = (item_table.shape[0],)
            pointers: list[torch.Tensor | None] = [None] * n_pointers
            numel, tables = 0, (tensor_table, item_table)
            if grid[0]:
                wrap_triton(kernel)[grid](
                    *tables, *pointers, numel, *args, TABLE=True, ALIGNED=aligned, **meta
                )
            return
        for i, p in enumerate(params):
            numel = int(p.numel())  # pins a symbolic size to this call's value, with a guard
            if numel:
                pointers = [tensors[i] for tensors in lists] + [None] * (n_pointers - len(lists))
                wrap_triton(kernel)[(triton.cdiv(numel, CHUNK),)](
                    None, None, *pointers, numel, *args, TABLE=False, ALIGNED=False, **meta
                )


def _factor_pointer(factor_tensor: torch.Tensor | None) -> torch.Tensor | None:
    """``factor_tensor`` as one fp32 value read on the device (no .item(), no sync)."""
    return None if factor_tensor is None else factor_tensor.reshape(()).float()


# --------------------------------------------------------------------------- registrations


@torch.library.triton_op(
    "fastaccum::sgd_window_step_triton_", mutates_args={"params", "accums", "momentum_buffers"}
)
def _sgd_op(
    params: list[torch.Tensor],
    accums: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor],
    factor: float,
    factor_tensor: torch.Tensor | None,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    first_step: bool,
) -> None:
    """``sgd_window_step_`` with Triton: validate, then launch (nothing as the fake kernel)."""
    options = dict(zip(SGD_OPTIONS, (lr, momentum, dampening, weight_decay), strict=False))
    options |= {"nesterov": nesterov, "maximize": maximize, "first_step": first_step}
    params, accums, buffers, factor, _ = check_sgd_window_step_args(
        params, accums, momentum_buffers, factor, factor_tensor, options
    )
    lists = [params, accums] + ([buffers] if momentum != 0 else [])
    _launch(
        _sgd_kernel,
        3,
        lists,
        _factor_pointer(factor_tensor),
        -factor if maximize else factor,
        weight_decay,
        momentum,
        1.0 - dampening,
        -lr,
        DECAY=weight_decay != 0,
        MOMENTUM=momentum != 0,
        FIRST=first_step,
        NESTEROV=nesterov,
        BLOCK=BLOCK,
        ITERS=ITERS,
    )


@torch.library.triton_op(
    "fastaccum::adam_window_step_triton_",
    mutates_args={"params", "accums", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"},
)
def _adam_op(
    params: list[torch.Tensor],
    accums: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    max_exp_avg_sqs: list[torch.Tensor],
    factor: float,
    factor_tensor: torch.Tensor | None,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    maximize: bool,
    step: int,
) -> None:
    """``adam_window_step_`` with Triton: validate, then launch (nothing as the fake kernel)."""
    options = dict(zip(ADAM_OPTIONS, (lr, beta1, beta2, eps, weight_decay), strict=False))
    options |= {"decoupled_weight_decay": decoupled_weight_decay, "maximize": maximize}
    options["step"] = step
    lists, factor, _ = check_adam_window_step_args(
        params, accums, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, factor, factor_tensor, options
    )
    amsgrad = len(lists[4]) > 0
    # Python floats as torch.optim.adam computes them; Triton rounds each to fp32.
    lerp_weight = 1.0 - beta1
    _launch(
        _adam_kernel,
        5,
        list(lists) if amsgrad else list(lists[:4]),
        _factor_pointer(factor_tensor),
        -factor if maximize else factor,
        weight_decay,
        1.0 - lr * weight_decay,
        lerp_weight,
        beta2,
        1.0 - beta2,
        (1.0 - beta2**step) ** 0.5,
        eps,
        -(lr / (1.0 - beta1**step)),
        L2=weight_decay != 0 and not decoupled_weight_decay,
        DECOUPLED=weight_decay != 0 and decoupled_weight_decay,
        SMALL_WEIGHT=abs(lerp_weight) < 0.5,
        AMSGRAD=amsgrad,
        BLOCK=BLOCK,
        ITERS=ITERS,
    )
