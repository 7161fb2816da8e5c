"""Weight-gradient accumulation for Linear layers: ``accum += alpha * grad_out^T @ input``.

Megatron-LM's gradient-accumulation fusion: the weight-gradient GEMM writes into the fp32
accumulator with beta = 1, so no dW tensor is ever made and no separate add follows.

- CPU, fp32 inputs: ``accum.addmm_(grad_out.t(), input, alpha=alpha)``, a BLAS GEMM with
  beta = 1 (no temporary). bf16/fp16 inputs are upcast first (temporaries of the
  activations' size, never of the weight's).
- CUDA: fp32 the same (cuBLAS); bf16/fp16 through ``aten::addmm`` with an fp32
  ``out_dtype`` where the installed torch has it, else the Triton kernel
  (``fastaccum.triton.wgrad``), else the upcast.
- The reference (:func:`wgrad_accumulate_ref`) computes in float64.

The bias gradient, when ``bias_accum`` is given, is reduced into it in the same call:
``bias_accum += alpha * grad_out.sum(0)``.
"""

from __future__ import annotations

import torch

from fastaccum import _backend

LOW_PRECISION = (torch.bfloat16, torch.float16)
INPUT_DTYPES = (torch.float32, *LOW_PRECISION)


def check_wgrad_args(
    accum: torch.Tensor,
    grad_out: torch.Tensor,
    input: torch.Tensor,
    bias_accum: torch.Tensor | None,
) -> None:
    """Raise TypeError (dtypes, types) or ValueError (shapes, layout, devices); change nothing.

    ``alpha`` is not checked here: the op's schema (``float alpha``) already rejects what is
    not a number, and :func:`wgrad_accumulate_triton` rejects bools before the call.
    """
    for name, t in (("accum", accum), ("grad_out", grad_out), ("input", input)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if bias_accum is not None and not isinstance(bias_accum, torch.Tensor):
        raise TypeError(f"bias_accum must be a torch.Tensor or None, got {type(bias_accum)}")
    if grad_out.dim() != 2 or input.dim() != 2:
        raise ValueError(
            f"grad_out and input must be 2-D [tokens, features], got shapes "
            f"{tuple(grad_out.shape)} and {tuple(input.shape)}; flatten leading dims first "
            "(x.reshape(-1, x.shape[-1]))"
        )
    m, n = grad_out.shape
    k = input.shape[1]
    if input.shape[0] != m:
        raise ValueError(
            f"grad_out {tuple(grad_out.shape)} and input {tuple(input.shape)} must have the "
            "same number of rows (tokens)"
        )
    if tuple(accum.shape) != (n, k):
        raise ValueError(
            f"accum must have shape [out_features, in_features] = ({n}, {k}) for grad_out "
            f"{tuple(grad_out.shape)} and input {tuple(input.shape)}, got {tuple(accum.shape)}"
        )
    if grad_out.dtype not in INPUT_DTYPES or input.dtype != grad_out.dtype:
        raise TypeError(
            f"grad_out and input must have the same dtype, one of float32, bfloat16, float16; "
            f"got {grad_out.dtype} and {input.dtype}"
        )
    if accum.dtype != torch.float32:
        raise TypeError(f"accum must be float32, got {accum.dtype}")
    if not accum.is_contiguous():
        raise ValueError(
            f"accum must be contiguous (stride ({k}, 1)), got stride {tuple(accum.stride())}; "
            "the kernel writes it in place"
        )
    devices = [("accum", accum), ("grad_out", grad_out), ("input", input)]
    if bias_accum is not None:
        if bias_accum.dtype != torch.float32:
            raise TypeError(f"bias_accum must be float32, got {bias_accum.dtype}")
        if tuple(bias_accum.shape) != (n,):
            raise ValueError(
                f"bias_accum must have shape ({n},) (out_features), got {tuple(bias_accum.shape)}"
            )
        if not bias_accum.is_contiguous():
            raise ValueError(
                f"bias_accum must be contiguous, got stride {tuple(bias_accum.stride())}"
            )
        devices.append(("bias_accum", bias_accum))
    for name, t in devices[1:]:
        if t.device != accum.device:
            raise ValueError(
                f"all tensors must be on one device: accum is on {accum.device} but {name} "
                f"is on {t.device}"
            )


def wgrad_accumulate_ref(
    accum: torch.Tensor,
    grad_out: torch.Tensor,
    input: torch.Tensor,
    alpha: float = 1.0,
    bias_accum: torch.Tensor | None = None,
) -> None:
    """The spec, in float64: ``accum += alpha * grad_out^T @ input`` (and the bias sum)."""
    go = grad_out.double()
    accum.add_((go.t() @ input.double()) * alpha)
    if bias_accum is not None:
        bias_accum.add_(go.sum(0) * alpha)


def _aten_addmm_fp32_out(accum, go, x, alpha) -> bool:
    """cuBLAS GEMM from bf16/fp16 inputs straight into the fp32 accumulator, where torch
    has ``aten::addmm.dtype_out``; False when it does not."""
    overload = getattr(torch.ops.aten.addmm, "dtype_out", None)
    if overload is None:
        return False
    try:
        overload(accum, go.t(), x, torch.float32, beta=1, alpha=alpha, out=accum)
    except (RuntimeError, NotImplementedError):
        return False
    return True


def wgrad_accumulate_(
    accum: torch.Tensor,
    grad_out: torch.Tensor,
    input: torch.Tensor,
    alpha: float = 1.0,
    bias_accum: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> None:
    """``accum += alpha * grad_out^T @ input`` without materializing the product.

    Args:
        accum: fp32 [out_features, in_features] accumulator, updated in place.
        grad_out: [tokens, out_features] gradient of the layer output (any strides).
        input: [tokens, in_features] layer input, same dtype as ``grad_out``.
        alpha: scale of this contribution (for example ``num_items``).
        bias_accum: optional fp32 [out_features] accumulator of the bias gradient.
        backend: ``"reference"`` forces the float64 spec, ``"triton"`` the Triton GEMM.

    Raises:
        ValueError, TypeError: mismatched shapes, dtypes or devices; nothing is changed.
    """
    check_wgrad_args(accum, grad_out, input, bias_accum)
    if backend not in (None, *_backend.BACKENDS):
        raise ValueError(f"backend must be one of {_backend.BACKENDS}, got {backend!r}")
    wgrad_accumulate_unchecked(accum, grad_out, input, alpha, bias_accum, backend=backend)


def wgrad_accumulate_unchecked(
    accum: torch.Tensor,
    grad_out: torch.Tensor,
    input: torch.Tensor,
    alpha: float = 1.0,
    bias_accum: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> None:
    """:func:`wgrad_accumulate_` without the argument checks, for callers whose shapes,
    dtypes and devices hold by construction (the fused Linear's backward, once per layer
    and micro-batch, where the checks would cost as much as a small layer's GEMM)."""
    with torch.no_grad():
        if backend == _backend.REFERENCE:
            wgrad_accumulate_ref(accum, grad_out, input, alpha, bias_accum)
            return
        low_precision_cuda = accum.device.type == "cuda" and grad_out.dtype in LOW_PRECISION
        if backend == _backend.TRITON or (
            backend is None
            and low_precision_cuda
            and not hasattr(torch.ops.aten.addmm, "dtype_out")
            and _backend.triton_can_run(accum.device)
        ):
            from fastaccum.triton.wgrad import wgrad_accumulate_triton

            wgrad_accumulate_triton(accum, grad_out, input, alpha, bias_accum)
            return
        if not (low_precision_cuda and _aten_addmm_fp32_out(accum, grad_out, input, alpha)):
            go, x = grad_out, input
            if go.dtype != torch.float32:
                go, x = go.float(), x.float()  # activation-sized upcasts, never weight-sized
            accum.addmm_(go.t(), x, alpha=alpha)
        if bias_accum is not None:
            bias_accum.add_(grad_out.sum(0, dtype=torch.float32), alpha=alpha)
