"""Triton GEMM that accumulates a Linear layer's weight gradient into an fp32 accumulator.

``accum[N, K] += alpha * grad_out[M, N]^T @ input[M, K]``, and optionally
``bias_accum[N] += alpha * grad_out.sum(0)``: Megatron-LM's gradient-accumulation fusion
(``fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32``), where the weight-gradient GEMM
adds into the fp32 main-grad buffer, so no dW tensor is made and no separate add follows.

Top to bottom: the ``@triton.jit`` kernel, the argument check and the launcher, the
``torch.library.triton_op`` registration (``fastaccum::wgrad_accumulate_triton_``), and the
public function.

Tiling. One program owns one ``[BLOCK_N, BLOCK_K]`` tile of ``accum`` and streams the whole
``M`` (token) dimension through it in ``BLOCK_M`` steps, ``tl.dot`` accumulating in fp32
registers; the epilogue then loads the accumulator tile once, adds ``alpha * tile`` and
stores it. Every element of ``accum`` is read and written exactly once per call and no
program shares a tile, so there are no atomics and the result is deterministic. Programs are
ordered in groups of ``GROUP_N`` row tiles (as in Triton's matmul tutorial), so that
programs running at the same time share ``input`` column tiles in L2.

Bias. Fused into the same kernel: the programs of the first column tile (``pid_k == 0``)
already load every ``grad_out[:, n-tile]`` block to feed the dot, so they also sum those
blocks over ``M`` (fp32) and add ``alpha * sum`` into ``bias_accum`` in their epilogue. No
second pass over ``grad_out``, no second launch; the other programs skip the sum.
"""

from typing import Any

import torch
import triton
import triton.language as tl

from fastaccum import _backend
from fastaccum.ops.wgrad import check_wgrad_args
from fastaccum.triton.accumulate import _check_launchable, _is_fake, _on_device, wrap_triton

"""dtypes ``grad_out`` and ``input`` may have (both the same)."""

INTERPRETER_BLOCKS = {"BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_M": 32, "GROUP_N": 8}
"""Fixed tile sizes under ``TRITON_INTERPRET=1``: small tiles keep the interpreter's
per-program numpy work short, and autotuning there would run every config for nothing."""


def _gpu_configs() -> list[triton.Config]:
    """Autotuning candidates for H100/H200-class GPUs (Hopper; they also compile for sm_80).

    Large tiles for large layers, small ones so that small layers still fill the SMs. A
    config that needs more shared memory than the GPU has raises OutOfResources at launch,
    which the autotuner counts as infinitely slow (the largest, with fp32 inputs, needs
    196 KiB: it fits an H100's 227 KiB but not an A100's 163 KiB).
    """
    shapes = [  # BLOCK_N, BLOCK_K, BLOCK_M, num_warps, num_stages
        (128, 256, 64, 8, 3),
        (128, 128, 64, 8, 3),
        (128, 128, 32, 4, 4),
        (128, 64, 32, 4, 4),
        (64, 128, 32, 4, 4),
        (64, 64, 32, 4, 4),
    ]
    return [
        triton.Config(
            {"BLOCK_N": n, "BLOCK_K": k, "BLOCK_M": m, "GROUP_N": 8},
            num_warps=warps,
            num_stages=stages,
        )
        for n, k, m, warps, stages in shapes
    ]


# --------------------------------------------------------------------------- kernel


@triton.jit
def _wgrad_accumulate_kernel(
    accum_ptr,
    grad_out_ptr,
    input_ptr,
    bias_ptr,
    M,
    N,
    K,
    M_BUCKET,
    stride_go_m,
    stride_go_n,
    stride_in_m,
    stride_in_k,
    alpha,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    GROUP_N: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    """``accum[n, k] += alpha * sum_m grad_out[m, n] * input[m, k]`` for one accum tile.

    ``accum`` is fp32 contiguous ``[N, K]``; ``grad_out`` ``[M, N]`` and ``input``
    ``[M, K]`` are addressed through their strides (any layout, stride 0 included). When
    ``bias_ptr`` is not None (fp32 contiguous ``[N]``), the programs with ``pid_k == 0``
    also do ``bias[n] += alpha * sum_m grad_out[m, n]``. ``M_BUCKET`` is unused by the body:
    it is the autotuning key for ``M`` (see :func:`launch_wgrad_accumulate`).
    ``DOT_IN_FP32`` makes the dot take fp32 operands with IEEE (not TF32) products.
    """
    # Grouped order: GROUP_N consecutive row tiles run over the column tiles together.
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_k = tl.cdiv(K, BLOCK_K)
    per_group = GROUP_N * tiles_k
    first_n = (pid // per_group) * GROUP_N
    group_size = tl.minimum(tiles_n - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_size
    pid_k = (pid % per_group) // group_size

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    k_mask = offs_k < K
    # Element offsets in int64: M * stride and N * K may pass 2**31 (256k tokens, or a
    # 256k-row vocabulary head, times 8k features).
    # grad_out is read transposed, as the [BLOCK_N, BLOCK_M] left operand of the dot.
    go_ptrs = (
        grad_out_ptr
        + offs_n.to(tl.int64)[:, None] * stride_go_n
        + offs_m.to(tl.int64)[None, :] * stride_go_m
    )
    in_ptrs = (
        input_ptr
        + offs_m.to(tl.int64)[:, None] * stride_in_m
        + offs_k.to(tl.int64)[None, :] * stride_in_k
    )
    go_step = tl.cast(stride_go_m, tl.int64) * BLOCK_M
    in_step = tl.cast(stride_in_m, tl.int64) * BLOCK_M

    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    bias_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for m_start in range(0, M, BLOCK_M):
        m_mask = offs_m < M - m_start
        go = tl.load(go_ptrs, mask=n_mask[:, None] & m_mask[None, :], other=0.0)
        x = tl.load(in_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if DOT_IN_FP32:
            acc = tl.dot(go.to(tl.float32), x.to(tl.float32), acc, input_precision="ieee")
        else:
            # bf16/fp16 products are exact in fp32, and the tensor cores accumulate in fp32.
            acc = tl.dot(go, x, acc)
        # Two ifs, not one `and`: the outer is decided at compile time (a None pointer is a
        # constexpr), so the kernel without a bias has no trace of it; the inner at run time.
        if bias_ptr is not None:  # noqa: SIM102
            if pid_k == 0:
                bias_acc += tl.sum(go.to(tl.float32), axis=1)
        go_ptrs += go_step
        in_ptrs += in_step

    accum_ptrs = accum_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]
    tile_mask = n_mask[:, None] & k_mask[None, :]
    old = tl.load(accum_ptrs, mask=tile_mask)
    # One rounding for old + alpha * acc (explicit fma: Triton's own contraction default
    # differs between versions).
    tl.store(accum_ptrs, tl.fma(acc, alpha, old), mask=tile_mask)
    if bias_ptr is not None:  # noqa: SIM102 (compile-time, then run-time, as in the loop)
        if pid_k == 0:
            old_bias = tl.load(bias_ptr + offs_n, mask=n_mask)
            tl.store(bias_ptr + offs_n, tl.fma(bias_acc, alpha, old_bias), mask=n_mask)


def _autotuned(restore_value: list[str]) -> Any:
    # Keyed on the power-of-two bucket of M, not M: with variable-length micro-batches M
    # changes every step, and each new key would benchmark every config again. The kernel
    # adds into accum and bias, so the autotuner must restore them after each trial.
    return triton.autotune(
        configs=_gpu_configs(), key=["M_BUCKET", "N", "K"], restore_value=restore_value
    )(_wgrad_accumulate_kernel)


if _backend.triton_interpreted():
    _wgrad_with_bias = _wgrad_without_bias = _wgrad_accumulate_kernel
else:
    # Two tuners: Triton 3.6's clones every restore_value argument, None included.
    _wgrad_with_bias = _autotuned(["accum_ptr", "bias_ptr"])
    _wgrad_without_bias = _autotuned(["accum_ptr"])


# --------------------------------------------------------------------------- launcher


def launch_wgrad_accumulate(
    accum: torch.Tensor,
    grad_out: torch.Tensor,
    input: torch.Tensor,
    alpha: float,
    bias_accum: torch.Tensor | None = None,
) -> None:
    """Launch the kernel on validated arguments (see :func:`check_wgrad_triton_args`).

    One launch, ``cdiv(N, BLOCK_N) * cdiv(K, BLOCK_K)`` programs. Nothing is launched
    when ``M``, ``N`` or ``K`` is 0: the product is then empty or all zeros, and the
    accumulators keep their values.
    """
    m, n = grad_out.shape
    k = input.shape[1]
    if m == 0 or n == 0 or k == 0:
        return
    # A plain int during eager calls; under torch.compile(dynamic=True) M stays symbolic
    # rather than being pinned by int() (the key only matters to the eager autotuner).
    m_bucket = triton.next_power_of_2(m) if isinstance(m, int) else m

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(k, meta["BLOCK_K"]),)

    interpreted = _backend.triton_interpreted()
    blocks = INTERPRETER_BLOCKS if interpreted else {}
    # fp32 inputs: no TF32, so that the products are fp32 ones, as torch's matmul gives by
    # default (torch.backends.cuda.matmul.allow_tf32 is False) and an fp32 reference expects.
    # bf16 under the interpreter: its tl.dot multiplies bf16's uint16 storage as integers
    # (triton 3.9, triton-lang/triton#11584, checked 2026-11); fp32 operands give the same
    # exact products there.
    dot_in_fp32 = grad_out.dtype == torch.float32 or (
        interpreted and grad_out.dtype == torch.bfloat16
    )
    launchable = _wgrad_without_bias if bias_accum is None else _wgrad_with_bias
    wrap_triton(launchable)[grid](
        accum,
        grad_out,
        input,
        bias_accum,
        m,
        n,
        k,
        m_bucket,
        grad_out.stride(0),
        grad_out.stride(1),
        input.stride(0),
        input.stride(1),
        float(alpha),
        DOT_IN_FP32=dot_in_fp32,
        **blocks,
    )


# --------------------------------------------------------------------------- registration


@torch.library.triton_op(
    "fastaccum::wgrad_accumulate_triton_", mutates_args={"accum", "bias_accum"}
)
def _wgrad_accumulate_op(
    accum: torch.Tensor,
    grad_out: torch.Tensor,
    input: torch.Tensor,
    alpha: float,
    bias_accum: torch.Tensor | None,
) -> None:
    """Validate, then launch (nothing to do as the fake kernel).

    ``bias_accum`` has no default in the schema: torch 2.11 drops a trailing argument that
    equals its default before counting the mutated arguments, and then fails on it."""
    check_wgrad_args(accum, grad_out, input, bias_accum)
    if _is_fake(accum):
        return
    _check_launchable(accum)
    with _on_device(accum.device):
        launch_wgrad_accumulate(accum, grad_out, input, alpha, bias_accum)


# --------------------------------------------------------------------------- public


def wgrad_accumulate_triton(
    accum: torch.Tensor,
    grad_out: torch.Tensor,
    input: torch.Tensor,
    alpha: float,
    bias_accum: torch.Tensor | None = None,
) -> None:
    """``accum += alpha * grad_out^T @ input`` (and ``bias_accum += alpha * grad_out.sum(0)``).

    With Triton, through ``fastaccum::wgrad_accumulate_triton_``; no ``[N, K]`` temporary.

    Args:
        accum: fp32 contiguous ``[N, K]`` (out_features, in_features), updated in place.
        grad_out: ``[M, N]`` gradient of the layer's output, float32/bfloat16/float16, any
            strides (a transposed or expanded view is read as is).
        input: ``[M, K]`` the layer's input, same dtype as ``grad_out``, any strides.
        alpha: scale of this micro-batch's contribution (rounded to fp32 in the kernel).
        bias_accum: optional fp32 contiguous ``[N]``, updated in place.

    The products and sums are fp32 (fp32 inputs: IEEE fp32, no TF32), and each accumulator
    element gets one rounding for ``old + alpha * sum``.

    Raises:
        TypeError, ValueError: wrong dtypes, shapes, layout or devices; nothing is written.
        RuntimeError: Triton cannot run on the tensors' device.
    """
    # The dispatcher would turn True into 1.0 without a word.
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a Python float, got {type(alpha).__name__}")
    torch.ops.fastaccum.wgrad_accumulate_triton_(accum, grad_out, input, alpha, bias_accum)
