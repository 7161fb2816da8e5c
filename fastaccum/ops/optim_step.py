"""Fused window-boundary optimizer steps: ``sgd_window_step_`` and ``adam_window_step_``.

At the last micro-batch of a window, :mod:`fastaccum.optim`'s drop-in ``SGD``, ``Adam`` and
``AdamW`` turn each fp32 accumulator into the window gradient and apply the optimizer
update in one pass over accumulator, optimizer state and parameter (each read once and
written once), where ``finalize_`` followed by ``torch.optim``'s ``step()`` reads the
accumulator, writes ``.grad``, then reads ``.grad`` again with the state and parameter.

Per parameter ``i`` (all tensors float32; arithmetic in fp32 as in ``torch.optim``):

1. ``g = accums[i] * factor * factor_tensor``; ``g = -g`` with ``maximize``. ``factor`` is
   the host-side product of the normalization (``1 / sum(num_items)``), the clip
   coefficient and the GradScaler unscale; ``factor_tensor`` is an optional one-element
   device tensor for multipliers that live on the device.
2. The update of ``torch.optim.SGD`` / ``Adam`` / ``AdamW`` for gradient ``g``, as their
   single-tensor code path writes it (``torch/optim/sgd.py``, ``adam.py``):

   - SGD: ``g += wd * p``; with momentum, ``buf = g`` on the first step, else
     ``buf = momentum * buf + (1 - dampening) * g``, and ``g = g + momentum * buf``
     (nesterov) or ``buf``; then ``p -= lr * g``.
   - Adam: ``g += wd * p`` (L2), or ``p *= 1 - lr * wd`` (AdamW, decoupled);
     ``m = lerp(m, g, 1 - beta1)``; ``v = beta2 * v + (1 - beta2) * g * g``;
     with amsgrad, ``vmax = maximum(vmax, v)`` (NaN propagating, as ``torch.maximum``)
     stands for ``v`` below; ``denom = sqrt(v) / sqrt(1 - beta2**step) + eps``;
     ``p -= lr / (1 - beta1**step) * m / denom``.
3. ``accums[i] = 0``, ready for the next window.

What is not fused: gradient clipping and the non-finite check need the window's global
norm before any parameter changes. The wrapper gets both from the last micro-batch's
``accumulate_`` pass, which reads that micro-batch's gradient and writes the accumulator;
this op then reads the accumulator once more. A norm must be complete before the first
update, so that second read cannot be avoided without giving up exact clipping.

This module holds the typed wrappers (validation, then routing through
:mod:`fastaccum._backend`), the fake kernels of ``torch.ops.fastaccum.sgd_window_step_`` /
``adam_window_step_``, and the pure-PyTorch references (the spec every backend is tested
against, and the fallback).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import torch

from fastaccum import _backend
from fastaccum.ops.accumulate import (
    _as_tensor_list,
    _check_contiguous,
    _check_number,
    _check_same_device,
    check_finalize_args,
)

# --------------------------------------------------------------------------- validation


def _check_fp32_companions(
    params: list[torch.Tensor], lists: dict[str, list[torch.Tensor]]
) -> None:
    """Every list as long as ``params``, float32, same shapes, no tensor given twice."""
    for name, tensors in {"params": params, **lists}.items():
        if len(tensors) != len(params):
            raise ValueError(
                f"{name} must be as long as params, got {len(tensors)} and {len(params)}"
            )
        for i, t in enumerate(tensors):
            if t.dtype != torch.float32:
                raise TypeError(
                    f"{name}[{i}] has dtype {t.dtype}; the fused optimizer steps need float32 "
                    "parameters, accumulators and state (use fastaccum.wrap for other dtypes)"
                )
            if t.shape != params[i].shape:
                raise ValueError(
                    f"{name}[{i}] has shape {tuple(t.shape)} but params[{i}] has shape "
                    f"{tuple(params[i].shape)}"
                )
    names = ["params", *lists]
    columns = [params, *lists.values()]
    for i in range(len(params)):
        for a in range(len(columns)):
            for b in range(a + 1, len(columns)):
                if columns[a][i] is columns[b][i]:
                    raise ValueError(f"{names[a]}[{i}] and {names[b]}[{i}] are the same tensor")


SGD_OPTIONS = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize", "first_step")
"""Scalar arguments of ``sgd_window_step_`` after ``factor_tensor``, in schema order."""
ADAM_OPTIONS = (
    "lr",
    "beta1",
    "beta2",
    "eps",
    "weight_decay",
    "decoupled_weight_decay",
    "maximize",
    "step",
)
"""Scalar arguments of ``adam_window_step_`` after ``factor_tensor``, in schema order."""

_FLAGS = ("nesterov", "maximize", "first_step", "decoupled_weight_decay")


def _check_options(names: tuple[str, ...], options: Mapping[str, Any]) -> tuple[Any, ...]:
    """The scalar options in schema order, as floats (bools for flags, int for ``step``)."""
    values: list[float | int | bool] = []
    for name in names:
        value = options[name]
        if name in _FLAGS:
            values.append(bool(value))
        elif name == "step":
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"step must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(
                    f"step must be >= 1 (the step count after its increment), got {value}"
                )
            values.append(value)
        else:
            values.append(_check_number(name, value))
    return tuple(values)


def _check_tensor_lists(
    params: Sequence[torch.Tensor],
    accums: Sequence[torch.Tensor],
    states: dict[str, Sequence[torch.Tensor]],
    factor: float,
    factor_tensor: torch.Tensor | None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[list[torch.Tensor]], float]:
    """Validate the tensor arguments shared by both ops; raise TypeError/ValueError."""
    accums, _, factor = check_finalize_args(accums, None, factor, factor_tensor)
    params = _as_tensor_list("params", params)
    state_lists = {name: _as_tensor_list(name, value) for name, value in states.items()}
    _check_fp32_companions(params, {"accums": accums, **state_lists})
    lists = {"params": params, "accums": accums, **state_lists}
    if factor_tensor is not None and params:
        lists["factor_tensor"] = [factor_tensor]
    _check_same_device(lists)
    _check_contiguous("params", params)
    for name, tensors in state_lists.items():
        _check_contiguous(name, tensors)
    return params, accums, list(state_lists.values()), factor


def check_sgd_window_step_args(
    params: Sequence[torch.Tensor],
    accums: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor] | None,
    factor: float,
    factor_tensor: torch.Tensor | None,
    options: Mapping[str, Any],
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], float, tuple]:
    """Validate :func:`sgd_window_step_`'s arguments (``options``: the :data:`SGD_OPTIONS`
    by name); raise TypeError/ValueError and change nothing.

    Returns ``(params, accums, momentum_buffers, factor, scalars)``: lists, a float and
    the options in schema order.
    """
    scalars = _check_options(SGD_OPTIONS, options)
    _, momentum, dampening, _, nesterov, _, _ = scalars
    buffers = [] if momentum_buffers is None else momentum_buffers
    if momentum == 0 and len(buffers):
        raise ValueError(
            f"momentum_buffers must be empty when momentum is 0, got {len(buffers)} tensors"
        )
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError(
            f"nesterov needs momentum > 0 and dampening == 0, got momentum={momentum} and "
            f"dampening={dampening}"
        )
    states = {"momentum_buffers": buffers} if momentum != 0 else {}
    params, accums, state_lists, factor = _check_tensor_lists(
        params, accums, states, factor, factor_tensor
    )
    return params, accums, state_lists[0] if state_lists else [], factor, scalars


def check_adam_window_step_args(
    params: Sequence[torch.Tensor],
    accums: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    max_exp_avg_sqs: Sequence[torch.Tensor] | None,
    factor: float,
    factor_tensor: torch.Tensor | None,
    options: Mapping[str, Any],
) -> tuple[tuple[list[torch.Tensor], ...], float, tuple]:
    """Validate :func:`adam_window_step_`'s arguments (``options``: the :data:`ADAM_OPTIONS`
    by name; ``max_exp_avg_sqs`` None or empty without amsgrad); raise TypeError/ValueError
    and change nothing.

    Returns ``((params, accums, exp_avgs, exp_avg_sqs, max_exp_avg_sqs), factor, scalars)``,
    ``max_exp_avg_sqs`` an empty list without amsgrad.
    """
    scalars = _check_options(ADAM_OPTIONS, options)
    for name, value in zip(("beta1", "beta2"), scalars[1:3], strict=True):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    states = {"exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}
    if max_exp_avg_sqs is not None and len(max_exp_avg_sqs) > 0:
        states["max_exp_avg_sqs"] = max_exp_avg_sqs
    amsgrad = "max_exp_avg_sqs" in states
    params, accums, state_lists, factor = _check_tensor_lists(
        params, accums, states, factor, factor_tensor
    )
    maxima = state_lists[2] if amsgrad else []
    return (params, accums, state_lists[0], state_lists[1], maxima), factor, scalars


# --------------------------------------------------------------------------- references


def _window_gradient(
    accum: torch.Tensor, factor: float, factor_tensor: torch.Tensor | None, maximize: bool
) -> torch.Tensor:
    """``accum * factor * factor_tensor``, negated with ``maximize`` (fp32)."""
    g = accum * factor
    if factor_tensor is not None:
        g = g * factor_tensor.float().reshape(())
    return -g if maximize else g


@torch.no_grad()
def sgd_window_step_ref(
    params: Sequence[torch.Tensor],
    accums: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor] | None,
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
    """Pure-PyTorch ``sgd_window_step_``: the spec. Arguments as :func:`sgd_window_step_`."""
    for i, (p, a) in enumerate(zip(params, accums, strict=True)):
        g = _window_gradient(a, factor, factor_tensor, maximize)
        if weight_decay != 0:
            g = g.add(p, alpha=weight_decay)
        if momentum != 0:
            buf = cast(Sequence[torch.Tensor], momentum_buffers)[i]  # required with momentum
            if first_step:
                buf.copy_(g)
            else:
                buf.mul_(momentum).add_(g, alpha=1 - dampening)
            g = g.add(buf, alpha=momentum) if nesterov else buf
        p.add_(g, alpha=-lr)
        a.zero_()


@torch.no_grad()
def adam_window_step_ref(
    params: Sequence[torch.Tensor],
    accums: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    max_exp_avg_sqs: Sequence[torch.Tensor] | None,
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
    """Pure-PyTorch ``adam_window_step_``: the spec. Arguments as :func:`adam_window_step_`."""
    # Python floats, as torch.optim.adam computes them, each rounded to fp32 by the ops.
    step_size = lr / (1 - beta1**step)
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    maxima = max_exp_avg_sqs if max_exp_avg_sqs else [None] * len(params)
    for p, a, m, v, vmax in zip(params, accums, exp_avgs, exp_avg_sqs, maxima, strict=True):
        g = _window_gradient(a, factor, factor_tensor, maximize)
        if weight_decay != 0:
            if decoupled_weight_decay:
                p.mul_(1 - lr * weight_decay)
            else:
                g = g.add(p, alpha=weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        if vmax is not None:  # amsgrad: the largest second moment so far
            torch.maximum(vmax, v, out=vmax)
            v = vmax
        denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
        p.addcdiv_(m, denom, value=-step_size)
        a.zero_()


# --------------------------------------------------------------------------- fake kernels


def _register_fakes() -> None:
    @torch.library.register_fake("fastaccum::sgd_window_step_")
    def _sgd_fake(params, accums, momentum_buffers, factor, factor_tensor, *args):
        return None

    @torch.library.register_fake("fastaccum::adam_window_step_")
    def _adam_fake(params, accums, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, *args):
        return None


if _backend.has_extension():
    _register_fakes()


# --------------------------------------------------------------------------- routing


# --------------------------------------------------------------------------- wrappers


def _run(
    op: str,
    tensor_lists: tuple[list[torch.Tensor], ...],
    factor: float,
    factor_tensor: torch.Tensor | None,
    scalars: tuple,
    backend: str | None,
    reference: Callable[..., None],
) -> None:
    """Run validated, non-empty arguments on the chosen backend, without autograd."""
    choice = _backend.select(tensor_lists[0][0].device, backend, op=op)
    args = (*tensor_lists, factor, factor_tensor, *scalars)
    with torch.no_grad():
        if choice == _backend.NATIVE:
            getattr(torch.ops.fastaccum, op)(*args)
        elif choice == _backend.TRITON:
            import fastaccum.triton.optim_step  # noqa: F401  (registers the *_triton_ ops)

            getattr(torch.ops.fastaccum, op.removesuffix("_") + "_triton_")(*args)
        else:
            reference(*args)


def window_step_unchecked(
    op: str,
    tensor_lists: tuple[list[torch.Tensor], ...],
    factor: float,
    options: Mapping[str, Any],
) -> None:
    """:func:`sgd_window_step_` (``op="sgd_window_step_"``, lists ``(params, accums,
    momentum_buffers)``) or :func:`adam_window_step_` (``(params, accums, exp_avgs,
    exp_avg_sqs, max_exp_avg_sqs)``, the last empty without amsgrad) with the options
    checked but not the tensor lists, for callers that build the lists from tensors they
    made (the fused optimizers, once per window, where the Python list checks cost a fifth
    of the kernel). The native op still validates the lists before it writes; the
    reference does not.

    Raises:
        TypeError, ValueError: a bad option (as the checked functions).
    """
    reference: Callable[..., None]
    if op == "sgd_window_step_":
        scalars, reference = _check_options(SGD_OPTIONS, options), sgd_window_step_ref
    elif op == "adam_window_step_":
        scalars, reference = _check_options(ADAM_OPTIONS, options), adam_window_step_ref
    else:
        raise ValueError(f"op must be sgd_window_step_ or adam_window_step_, got {op!r}")
    if tensor_lists[0]:
        _run(op, tensor_lists, float(factor), None, scalars, None, reference)


def sgd_window_step_(
    params: Sequence[torch.Tensor],
    accums: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor] | None,
    factor: float,
    *,
    factor_tensor: torch.Tensor | None = None,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    first_step: bool = False,
    backend: str | None = None,
) -> None:
    """One ``torch.optim.SGD`` step on every parameter with gradient ``accums[i] * factor``,
    fused with the reset of the accumulators (one pass over each tensor).

    Args:
        params: float32 parameters, updated in place.
        accums: float32 accumulators (same shapes); read, then zeroed.
        momentum_buffers: float32 momentum buffers, updated in place; ``None`` or empty
            when ``momentum == 0``.
        factor: host-side gradient multiplier (normalization x clip x unscale).
        factor_tensor: optional one-element tensor on the parameters' device, multiplied
            in as well (device-side multipliers, no sync).
        lr, momentum, dampening, weight_decay, nesterov, maximize: as ``torch.optim.SGD``.
        first_step: the buffers hold no history yet: set each to the gradient (as torch
            does for a parameter without ``momentum_buffer``) instead of decaying it.
        backend: force ``"native"``, ``"triton"`` or ``"reference"``.

    Raises:
        TypeError, ValueError: mismatched lengths, shapes or devices, a non-float32 tensor,
            a tensor passed twice, non-contiguous tensors, a non-finite scalar, buffers
            given without momentum (or missing with it), nesterov without momentum or with
            dampening. Nothing is modified then.
        RuntimeError: a forced ``backend`` cannot run on the tensors' device.
    """
    options = {"lr": lr, "momentum": momentum, "dampening": dampening}
    options |= {"weight_decay": weight_decay, "nesterov": nesterov, "maximize": maximize}
    options["first_step"] = first_step
    params, accums, buffers, factor, scalars = check_sgd_window_step_args(
        params, accums, momentum_buffers, factor, factor_tensor, options
    )
    if params:
        lists = (params, accums, buffers)
        _run(
            "sgd_window_step_", lists, factor, factor_tensor, scalars, backend, sgd_window_step_ref
        )


def adam_window_step_(
    params: Sequence[torch.Tensor],
    accums: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    factor: float,
    *,
    max_exp_avg_sqs: Sequence[torch.Tensor] | None = None,
    factor_tensor: torch.Tensor | None = None,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
    step: int,
    backend: str | None = None,
) -> None:
    """One ``torch.optim.Adam`` (or, with ``decoupled_weight_decay``, ``AdamW``) step on every
    parameter with gradient ``accums[i] * factor``, fused with the reset of the accumulators.

    Args:
        params: float32 parameters, updated in place.
        accums: float32 accumulators (same shapes); read, then zeroed.
        exp_avgs, exp_avg_sqs: float32 first and second moments, updated in place.
        factor, factor_tensor: as :func:`sgd_window_step_`.
        max_exp_avg_sqs: float32 running maxima of the second moments (``torch.optim.Adam``
            with ``amsgrad=True``), updated in place and used in the denominator; None or
            empty without amsgrad.
        lr, beta1, beta2, eps, weight_decay, maximize: as ``torch.optim.Adam``.
        decoupled_weight_decay: AdamW's weight decay (``p *= 1 - lr * wd``) instead of
            Adam's L2 term in the gradient.
        step: the step count after this step's increment (1 on the first step), for the
            bias corrections.
        backend: force ``"native"``, ``"triton"`` or ``"reference"``.

    Raises:
        TypeError, ValueError: as :func:`sgd_window_step_`, plus ``step < 1`` or a beta
            outside ``[0, 1)``. Nothing is modified then.
        RuntimeError: a forced ``backend`` cannot run on the tensors' device.
    """
    options = {"lr": lr, "beta1": beta1, "beta2": beta2, "eps": eps, "weight_decay": weight_decay}
    options |= {"decoupled_weight_decay": decoupled_weight_decay, "maximize": maximize}
    options["step"] = step
    lists, factor, scalars = check_adam_window_step_args(
        params, accums, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, factor, factor_tensor, options
    )
    if lists[0]:
        _run(
            "adam_window_step_",
            lists,
            factor,
            factor_tensor,
            scalars,
            backend,
            adam_window_step_ref,
        )
