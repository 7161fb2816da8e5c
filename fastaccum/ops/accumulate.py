"""Fused multi-tensor gradient accumulation: ``accumulate_``, ``finalize_`` and ``sumsq``.

This module holds, for this op family:

- the typed wrappers users and the optimizer call (:func:`accumulate_`, :func:`finalize_`),
  which validate, then route through :mod:`fastaccum._backend`;
- the fake (meta) kernels of ``torch.ops.fastaccum.accumulate_`` / ``finalize_``, so that
  ``torch.compile`` and ``torch.library.opcheck`` can trace them;
- the pure-PyTorch references (:func:`accumulate_ref`, :func:`finalize_ref`). They are the
  spec every backend is tested against, and the fallback when no kernel can run.

Semantics (per pair ``i``, arithmetic in fp32, reductions in fp32 or wider):

``accumulate_(accums, grads, scale, zero_grads)``
    ``accums[i] += scale * grads[i]``; the same pass also yields ``sum(grads[i]**2)``
    per tensor and in total, ``sum(accums[i]**2)`` of the updated accumulators in total,
    and whether any gradient element is NaN or +-Inf. ``zero_grads`` zeroes each gradient
    after it is read. Gradient sums of squares are of the gradients as passed, before
    ``scale``. Non-finite gradients are still accumulated (the caller decides whether to
    discard the window); the flag is how it finds out without another read.

``finalize_(accums, outs, factor, factor_tensor, zero_accums)``
    ``r = accums[i] * factor * factor_tensor``; ``outs[i] = r`` cast to ``outs[i].dtype``
    when ``outs`` is given; then ``accums[i] = 0`` if ``zero_accums`` else ``r``.

``sumsq(tensors)``
    ``sum(tensors[i]**2)`` over every element of every tensor, accumulated in double and
    returned as an f32 scalar, like ``accumulate_``'s ``accum_sumsq``: the window norm of
    accumulators that no ``accumulate_`` pass measured (fused weight-gradient layers).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from fastaccum import _backend

GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Gradient dtypes the kernels accept."""


class AccumulateResult(NamedTuple):
    """What one :func:`accumulate_` pass measured, all on the tensors' device.

    ``grad_sumsq`` (f32 scalar) and ``grad_sumsq_per_tensor`` (f32, one per pair) are sums
    of squares of the gradients as passed (before ``scale``); ``accum_sumsq`` (f32 scalar)
    is the sum of squares of the accumulators after the update; ``found_nonfinite``
    (bool scalar) is True when any gradient element was NaN or +-Inf.
    """

    grad_sumsq: torch.Tensor
    grad_sumsq_per_tensor: torch.Tensor
    accum_sumsq: torch.Tensor
    found_nonfinite: torch.Tensor


# --------------------------------------------------------------------------- validation


def _as_tensor_list(name: str, value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a list or tuple of tensors, got {type(value).__name__}")
    for i, t in enumerate(value):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
    return list(value)


def _check_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python float, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def _check_same_device(lists: dict[str, list[torch.Tensor]]) -> None:
    device = None
    first = None
    for name, tensors in lists.items():
        for i, t in enumerate(tensors):
            if device is None:
                device, first = t.device, f"{name}[{i}]"
            elif t.device != device:
                raise ValueError(
                    f"all tensors of one call must be on one device: {first} is on {device} "
                    f"but {name}[{i}] is on {t.device}; group tensors by device and call "
                    "once per device"
                )


def _check_contiguous(name: str, tensors: list[torch.Tensor]) -> None:
    for i, t in enumerate(tensors):
        if not t.is_contiguous():
            raise ValueError(
                f"{name}[{i}] is not contiguous (shape {tuple(t.shape)}, stride "
                f"{tuple(t.stride())}); the kernels update memory in place and need "
                "contiguous tensors"
            )


def check_accumulate_args(
    accums: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], scale: float
) -> tuple[list[torch.Tensor], list[torch.Tensor], float]:
    """Validate :func:`accumulate_`'s arguments; raise TypeError/ValueError, change nothing."""
    accums = _as_tensor_list("accums", accums)
    grads = _as_tensor_list("grads", grads)
    scale = _check_number("scale", scale)
    if len(accums) != len(grads):
        raise ValueError(
            f"accums and grads must have the same length, got {len(accums)} and {len(grads)}"
        )
    for i, (a, g) in enumerate(zip(accums, grads, strict=True)):
        if g.dtype not in GRAD_DTYPES:
            raise TypeError(
                f"grads[{i}] has dtype {g.dtype}; expected one of float32, bfloat16, float16"
            )
        if a.dtype not in (torch.float32, g.dtype):
            raise TypeError(
                f"accums[{i}] has dtype {a.dtype}; expected float32 or the gradient's dtype "
                f"({g.dtype})"
            )
        if a.shape != g.shape:
            raise ValueError(
                f"accums[{i}] has shape {tuple(a.shape)} but grads[{i}] has shape "
                f"{tuple(g.shape)}; each accumulator must match its gradient"
            )
        if a is g:
            raise ValueError(f"accums[{i}] and grads[{i}] are the same tensor")
    _check_same_device({"accums": accums, "grads": grads})
    _check_contiguous("accums", accums)
    _check_contiguous("grads", grads)
    return accums, grads, scale


def check_finalize_args(
    accums: Sequence[torch.Tensor],
    outs: Sequence[torch.Tensor] | None,
    factor: float,
    factor_tensor: torch.Tensor | None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], float]:
    """Validate :func:`finalize_`'s arguments; raise TypeError/ValueError, change nothing."""
    accums = _as_tensor_list("accums", accums)
    outs = [] if outs is None else _as_tensor_list("outs", outs)
    factor = _check_number("factor", factor)
    if outs and len(outs) != len(accums):
        raise ValueError(
            f"outs must be empty or as long as accums, got {len(outs)} and {len(accums)}"
        )
    for i, a in enumerate(accums):
        if a.dtype not in GRAD_DTYPES:
            raise TypeError(
                f"accums[{i}] has dtype {a.dtype}; expected one of float32, bfloat16, float16"
            )
    for i, (o, a) in enumerate(zip(outs, accums, strict=False)):
        if o.dtype not in GRAD_DTYPES:
            raise TypeError(
                f"outs[{i}] has dtype {o.dtype}; expected one of float32, bfloat16, float16"
            )
        if o.shape != a.shape:
            raise ValueError(
                f"outs[{i}] has shape {tuple(o.shape)} but accums[{i}] has shape {tuple(a.shape)}"
            )
        if o is a:
            raise ValueError(f"outs[{i}] and accums[{i}] are the same tensor")
    lists = {"accums": accums, "outs": outs}
    if factor_tensor is not None:
        if not isinstance(factor_tensor, torch.Tensor):
            raise TypeError(
                f"factor_tensor must be a tensor or None, got {type(factor_tensor).__name__}"
            )
        if factor_tensor.numel() != 1 or not factor_tensor.is_floating_point():
            raise ValueError(
                "factor_tensor must be a floating-point tensor with one element, got "
                f"shape {tuple(factor_tensor.shape)} and dtype {factor_tensor.dtype}"
            )
        if accums:
            lists["factor_tensor"] = [factor_tensor]
    _check_same_device(lists)
    _check_contiguous("accums", accums)
    _check_contiguous("outs", outs)
    return accums, outs, factor


# --------------------------------------------------------------------------- references


def accumulate_ref(
    accums: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    scale: float = 1.0,
    zero_grads: bool = False,
) -> AccumulateResult:
    """Pure-PyTorch ``accumulate_``: the spec. Arguments and results as :func:`accumulate_`."""
    device = accums[0].device if accums else torch.device("cpu")
    per_tensor = []
    accum_sumsq = torch.zeros((), dtype=torch.float64, device=device)
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    for a, g in zip(accums, grads, strict=True):
        g32 = g.float()
        per_tensor.append(g32.double().square().sum())
        nonfinite = nonfinite | ~torch.isfinite(g32).all()
        updated = a.float() + scale * g32
        a.copy_(updated)
        # Of the values stored: with bf16/fp16 accumulators, after rounding.
        accum_sumsq = accum_sumsq + a.double().square().sum()
        if zero_grads:
            g.zero_()
    if per_tensor:
        per = torch.stack(per_tensor)
    else:
        per = torch.zeros(0, dtype=torch.float64, device=device)
    return AccumulateResult(
        per.sum().float(), per.float(), accum_sumsq.float(), nonfinite.reshape(())
    )


def finalize_ref(
    accums: Sequence[torch.Tensor],
    outs: Sequence[torch.Tensor] | None = None,
    factor: float = 1.0,
    factor_tensor: torch.Tensor | None = None,
    zero_accums: bool = True,
) -> None:
    """Pure-PyTorch ``finalize_``: the spec. Arguments as :func:`finalize_`."""
    outs = list(outs or [])
    for i, a in enumerate(accums):
        r = a.float() * factor
        if factor_tensor is not None:
            r = r * factor_tensor.float().reshape(())
        if outs:
            outs[i].copy_(r)
        if zero_accums:
            a.zero_()
        else:
            a.copy_(r)


# --------------------------------------------------------------------------- fake kernels


def _register_fakes() -> None:
    @torch.library.register_fake("fastaccum::accumulate_")
    def _accumulate_fake(accums, grads, scale, zero_grads=False):
        device = accums[0].device if accums else torch.device("cpu")
        f32 = torch.float32
        return (
            torch.empty((), dtype=f32, device=device),
            torch.empty((len(accums),), dtype=f32, device=device),
            torch.empty((), dtype=f32, device=device),
            torch.empty((), dtype=torch.bool, device=device),
        )

    @torch.library.register_fake("fastaccum::finalize_")
    def _finalize_fake(accums, outs, factor, factor_tensor=None, zero_accums=True):
        return None

    @torch.library.register_fake("fastaccum::sumsq")
    def _sumsq_fake(tensors):
        device = tensors[0].device if tensors else torch.device("cpu")
        return torch.empty((), dtype=torch.float32, device=device)


if _backend.has_extension():
    _register_fakes()


# --------------------------------------------------------------------------- wrappers


def accumulate_(
    accums: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    scale: float = 1.0,
    *,
    zero_grads: bool = False,
    backend: str | None = None,
) -> AccumulateResult:
    """Add ``scale * grads[i]`` into ``accums[i]`` for every pair, in one pass per gradient.

    Args:
        accums: accumulators, updated in place; float32, or the gradient's dtype.
        grads: gradients, float32/bfloat16/float16, same shapes as ``accums``.
        scale: multiplier applied to each gradient (for example ``num_items``).
        zero_grads: zero each gradient after it is read.
        backend: force ``"native"``, ``"triton"`` or ``"reference"`` (default: chosen by
            :mod:`fastaccum._backend` from the tensors' device).

    Returns:
        :class:`AccumulateResult` with sums of squares and the non-finite flag.

    Raises:
        TypeError, ValueError: on mismatched lengths, shapes, dtypes or devices, on
            non-contiguous tensors or a non-finite ``scale``. Nothing is modified then.
        RuntimeError: when a forced ``backend`` cannot run on the tensors' device.
    """
    accums, grads, scale = check_accumulate_args(accums, grads, scale)
    return accumulate_unchecked(accums, grads, scale, zero_grads=zero_grads, backend=backend)


def accumulate_unchecked(
    accums: list[torch.Tensor],
    grads: list[torch.Tensor],
    scale: float,
    *,
    zero_grads: bool = False,
    backend: str | None = None,
) -> AccumulateResult:
    """:func:`accumulate_` without the Python-side argument checks, for callers that build
    the lists themselves (the optimizer wrapper, once per micro-step). The native and
    Triton ops still validate before they modify anything; the reference does not."""
    if not accums:
        return accumulate_ref(accums, grads, scale, zero_grads)
    choice = _backend.select(accums[0].device, backend, op="accumulate_")
    if choice == _backend.NATIVE:
        out = torch.ops.fastaccum.accumulate_(accums, grads, scale, zero_grads)
    elif choice == _backend.TRITON:
        from fastaccum.triton.accumulate import accumulate_triton

        out = accumulate_triton(accums, grads, scale, zero_grads)
    else:
        return accumulate_ref(accums, grads, scale, zero_grads)
    return AccumulateResult(*out)


def finalize_(
    accums: Sequence[torch.Tensor],
    outs: Sequence[torch.Tensor] | None = None,
    factor: float = 1.0,
    *,
    factor_tensor: torch.Tensor | None = None,
    zero_accums: bool = True,
    backend: str | None = None,
) -> None:
    """Scale the accumulators by ``factor`` (x ``factor_tensor``), write them out, reset them.

    One pass over each accumulator: ``r = accums[i] * factor * factor_tensor``; ``outs[i] =
    r`` (cast to ``outs[i].dtype``) when ``outs`` is given; then ``accums[i]`` becomes 0
    (``zero_accums=True``) or ``r``.

    Args:
        accums: accumulators (float32/bfloat16/float16), read and updated in place.
        outs: optional destinations such as ``param.grad``; same shapes, any of the
            three float dtypes.
        factor: host-side multiplier (normalization such as ``1 / num_items``).
        factor_tensor: optional one-element tensor on the accumulators' device, for
            multipliers computed on the device (clip coefficient, unscale) without a sync.
        zero_accums: reset the accumulators for the next window.
        backend: as in :func:`accumulate_`.

    Raises:
        TypeError, ValueError: on mismatched lengths, shapes, dtypes or devices, or a
            non-finite ``factor``. Nothing is modified then.
    """
    accums, outs, factor = check_finalize_args(accums, outs, factor, factor_tensor)
    if not accums:
        return
    choice = _backend.select(accums[0].device, backend, op="finalize_")
    if choice == _backend.NATIVE:
        torch.ops.fastaccum.finalize_(accums, outs, factor, factor_tensor, zero_accums)
    elif choice == _backend.TRITON:
        from fastaccum.triton.accumulate import finalize_triton

        finalize_triton(accums, outs, factor, factor_tensor, zero_accums)
    else:
        finalize_ref(accums, outs, factor, factor_tensor, zero_accums)


def sumsq_ref(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The spec of :func:`sumsq`: per-tensor float64 norms from one multi-tensor reduction
    (``torch._foreach_norm``, no float64 copies), squared and summed, as an f32 scalar."""
    if not tensors:
        return torch.zeros((), dtype=torch.float32)
    norms = torch._foreach_norm(list(tensors), 2, dtype=torch.float64)
    return torch.stack(norms).square().sum().float()


def sumsq(tensors: Sequence[torch.Tensor], *, backend: str | None = None) -> torch.Tensor:
    """Sum of squares of all elements of ``tensors``, in one read of each.

    Args:
        tensors: float32/bfloat16/float16 tensors, contiguous, all on one device.
        backend: ``"native"`` (the C++ CPU kernel) or ``"reference"``. Other devices use
            the reference, whose ``torch._foreach_norm`` is itself one multi-tensor pass.

    Returns:
        f32 scalar on the tensors' device, accumulated in double (inf when it overflows
        f32, NaN when an element is NaN).

    Raises:
        TypeError, ValueError: a tensor of another dtype, on another device, or not
            contiguous.
    """
    tensors = _as_tensor_list("tensors", tensors)
    for i, t in enumerate(tensors):
        if t.dtype not in GRAD_DTYPES:
            raise TypeError(
                f"tensors[{i}] has dtype {t.dtype}; expected one of float32, bfloat16, float16"
            )
    _check_same_device({"tensors": tensors})
    _check_contiguous("tensors", tensors)
    if not tensors:
        return sumsq_ref(tensors)
    return sumsq_unchecked(tensors, backend=backend)


# --------------------------------------------------------------------------- float64


def accumulate_wide(
    accums: list[torch.Tensor], grads: list[torch.Tensor], scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``accums[i] += scale * grads[i]`` for float64 accumulators and gradients, which the
    kernels do not take (the optimizer wrapper's float64 and complex128 parameters), in
    two multi-tensor passes of torch's foreach ops. No checks.

    Returns:
        The gradients' total sum of squares (float64 scalar) and its non-finite flag
        (NaN or Inf in a gradient, or a norm past 1e154). The accumulators' sum of squares
        is left to :func:`sumsq_wide`, once per window.
    """
    total = torch.stack(torch._foreach_norm(grads, 2)).square().sum()
    torch._foreach_add_(accums, grads, alpha=scale)
    return total, ~torch.isfinite(total)


def sumsq_wide(tensors: list[torch.Tensor]) -> torch.Tensor:
    """:func:`sumsq` of float64 tensors, as a float64 scalar (one foreach pass). No checks."""
    return torch.stack(torch._foreach_norm(tensors, 2)).square().sum()


def sumsq_unchecked(tensors: list[torch.Tensor], *, backend: str | None = None) -> torch.Tensor:
    """:func:`sumsq` without the Python-side checks, for the optimizer wrapper."""
    choice = _backend.select(tensors[0].device, backend, op="sumsq")
    if choice == _backend.NATIVE:
        return torch.ops.fastaccum.sumsq(tensors)
    return sumsq_ref(tensors)
