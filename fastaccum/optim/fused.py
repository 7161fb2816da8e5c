"""Drop-in ``SGD``, ``Adam`` and ``AdamW`` whose window boundary is one fused pass.

``fastaccum.optim.AdamW(params, lr=..., accum_steps=K)`` takes ``torch.optim.AdamW``'s
arguments and behaves as ``fastaccum.wrap(torch.optim.AdamW(params, ...), K)``: each
``step()`` folds one micro-batch's gradients into fp32 accumulators with ``accumulate_``,
and the K-th steps the optimizer. There, instead of ``finalize_`` into ``.grad`` followed by
``torch.optim``'s ``step()`` (which reads the accumulator, writes ``.grad``, and reads it
back with the state and the parameter), one ``sgd_window_step_`` / ``adam_window_step_``
call per (param group, device) normalizes, clips and unscales the accumulator, updates
parameter and state with ``torch.optim``'s math, and zeroes the accumulator: accumulator,
state and parameter are each read once and written once.

What is not fused: clipping and the non-finite check need the window's global gradient
norm before the first parameter changes. It comes from the last micro-batch's
``accumulate_`` pass, which reads that micro-batch's gradient and writes the accumulator;
the fused step then reads the accumulator once more.

Parameter groups, state (``'step'``, ``'exp_avg'``, ``'exp_avg_sq'``, with amsgrad
``'max_exp_avg_sq'``, ``'momentum_buffer'``, in ``torch.optim``'s own format) and
learning-rate schedulers are those of a real ``torch.optim`` optimizer held in
``.optimizer``.

Under FSDP2 (``model=`` a ``fully_shard`` model) the update runs on each rank's local
shards of the parameters, accumulators and states; the states stay sharded DTensors, as
``torch.optim`` makes them. In a list given to ``fastaccum.wrap([...], K)`` a fused class
hands its ``torch.optim`` optimizer to the list's chain, and the list's wrapper runs this
class's update for its parameters at the shared boundary (``_fused_window_update``).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Container, Iterable
from typing import Any

import torch
from torch.optim import optimizer as torch_optimizer

from fastaccum.ops.optim_step import window_step_unchecked
from fastaccum.optim.wrapper import (
    AccumulatingOptimizer,
    ParamMap,
    _memory_order,
    _same_layout,
)

ParamsT = Iterable[torch.Tensor] | Iterable[dict[str, Any]]


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a sharded (FSDP2 / DTensor) tensor, the same memory; ``t`` itself
    otherwise."""
    dtensor = sys.modules.get("torch.distributed.tensor")  # imported once DTensors exist
    return t.to_local() if dtensor is not None and isinstance(t, dtensor.DTensor) else t


def _window_step(
    name: str, lists: tuple[list[torch.Tensor], ...], factor: float, options: dict[str, Any]
) -> None:
    """``window_step_unchecked`` on tensors that share their parameter's memory layout,
    passed in memory order: channels_last tensors go in as the same memory, uncopied.
    Sharded parameters and their states go in as their local shards."""
    dense = tuple([_memory_order(_local(t)) for t in tensors] for tensors in lists)
    window_step_unchecked(name, dense, factor, options)


def _state_like(state: dict[str, Any], key: str, p: torch.Tensor) -> torch.Tensor:
    """``state[key]`` in ``p``'s memory layout (copied once, and kept, when it is not:
    loaded from a checkpoint of another format, or the model's format changed)."""
    value = state[key]
    if not _same_layout(_local(value), _local(p)):
        value = state[key] = torch.empty_like(p).copy_(value)
    return value


_WRAPPING = (
    "accum_steps",
    "max_grad_norm",
    "scaler",
    "model",
    "activations",
    "reduce_scatter_every_micro_step",
    "master_weights",
)


def _wrapping(arguments: dict[str, Any]) -> dict[str, Any]:
    """The :class:`AccumulatingOptimizer` options among a fused class constructor's
    ``arguments`` (its ``locals()``)."""
    return {key: arguments[key] for key in _WRAPPING}


def _reject(name: str, value: object, why: str) -> None:
    if value:
        raise ValueError(
            f"{name}={value!r} is not supported by fastaccum's fused optimizers: {why}"
        )


State = dict[Any, Any]
Group = dict[str, Any]
Tensors = list[torch.Tensor]
GroupUpdate = Callable[[State, Group, Tensors, Tensors, float], None]
"""One fused update of a param group's parameters on one device: ``(optimizer state,
group, parameters, their accumulators, factor)``."""


def sgd_update(state: State, group: Group, params: Tensors, accums: Tensors, scale: float) -> None:
    """``torch.optim.SGD``'s update of ``params`` with ``scale x accums`` as gradients, in
    one ``sgd_window_step_`` call per momentum-buffer state; ``state`` is the optimizer's
    (``momentum_buffer`` in torch's format). The accumulators are zeroed."""
    options = {
        "lr": float(group["lr"]),
        "momentum": float(group["momentum"]),
        "dampening": float(group["dampening"]),
        "weight_decay": float(group["weight_decay"]),
        # torch's SGD without momentum has no buffer, Nesterov or not
        "nesterov": bool(group["nesterov"]) and float(group["momentum"]) != 0,
        "maximize": bool(group["maximize"]),
    }
    # The lists below are float32 dense parameters (checked by the caller), their
    # accumulators and states: only the options need checking.
    if options["momentum"] == 0:
        _window_step(
            "sgd_window_step_", (params, accums, []), scale, {**options, "first_step": False}
        )
        return
    # torch starts a parameter's buffer as a copy of its first gradient: the parameters
    # with a buffer and those without take one call each.
    for first_step in (False, True):
        members = [
            i
            for i, p in enumerate(params)
            if (state[p].get("momentum_buffer") is None) == first_step
        ]
        if not members:
            continue
        chosen = [params[i] for i in members]
        buffers = [
            torch.empty_like(p) if first_step else _state_like(state[p], "momentum_buffer", p)
            for p in chosen
        ]
        _window_step(
            "sgd_window_step_",
            (chosen, [accums[i] for i in members], buffers),
            scale,
            {**options, "first_step": first_step},
        )
        for p, buf in zip(chosen, buffers, strict=True):
            state[p]["momentum_buffer"] = buf


def _check_adam_options(capturable: bool, differentiable: bool) -> None:
    _reject("capturable", capturable, "the step count is kept on the host")
    _reject("differentiable", differentiable, "the fused update is not differentiable")


def _step_counts(counts: list[torch.Tensor]) -> list[float]:
    """The values of Adam's ``state['step']`` tensors, in one read per device."""
    devices = {c.device for c in counts}
    if len(devices) == 1:
        return torch.stack(counts).tolist()
    return [float(c) for c in counts]


def adam_update(state: State, group: Group, params: Tensors, accums: Tensors, scale: float) -> None:
    """``torch.optim.Adam``'s (``AdamW``'s) update of ``params`` with ``scale x accums``
    as gradients, one ``adam_window_step_`` call per step count; ``state`` is the
    optimizer's, in torch's format (created as torch creates it). The accumulators are
    zeroed. The caller checked the group (:func:`adam_refusal`).
    """
    amsgrad = bool(group["amsgrad"])
    beta1, beta2 = (float(b) for b in group["betas"])
    options = {
        "lr": float(group["lr"]),
        "beta1": beta1,
        "beta2": beta2,
        "eps": float(group["eps"]),
        "weight_decay": float(group["weight_decay"]),
        "decoupled_weight_decay": bool(group["decoupled_weight_decay"]),
        "maximize": bool(group["maximize"]),
    }
    # torch's fused Adam keeps its step counts on the parameters' device, in float32.
    on_device = bool(group.get("fused"))
    # Parameters normally share a step count; those that joined later (no gradient in
    # the first windows) have their own, and each count is one call.
    states = [state[p] for p in params]
    for p, s in zip(params, states, strict=True):
        if len(s) == 0:
            if on_device:
                s["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            else:
                s["step"] = torch.tensor(0.0, dtype=_adam_step_dtype())
            s["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            s["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if amsgrad and "max_exp_avg_sq" not in s:
            # torch.optim creates it with the state; a group switched to amsgrad after
            # its first step starts it here from zeros (torch.optim raises KeyError).
            s["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    counts = [s["step"] for s in states]
    by_step: dict[int, list[int]] = {}
    for i, count in enumerate(_step_counts(counts)):  # one read, not one each
        by_step.setdefault(int(count) + 1, []).append(i)
    for step, members in by_step.items():
        lists = (
            [params[i] for i in members],
            [accums[i] for i in members],
            [_state_like(states[i], "exp_avg", params[i]) for i in members],
            [_state_like(states[i], "exp_avg_sq", params[i]) for i in members],
            [_state_like(states[i], "max_exp_avg_sq", params[i]) for i in members]
            if amsgrad
            else [],
        )
        _window_step("adam_window_step_", lists, scale, {**options, "step": step})
    torch._foreach_add_(counts, 1.0)  # torch.optim's per-parameter step counts


def _not_finite(group: Group, keys: tuple[str, ...]) -> str | None:
    for key in keys:
        value = float(group[key])
        if not math.isfinite(value):
            return f"{key}={value}"
    return None


def sgd_refusal(group: Group) -> str | None:
    """What in ``group`` the fused kernel cannot update as ``torch.optim.SGD`` does, or
    None."""
    if group.get("differentiable"):
        return "differentiable=True"
    bad = _not_finite(group, ("lr", "momentum", "dampening", "weight_decay"))
    if bad is not None:
        return bad
    momentum = float(group["momentum"])
    if group["nesterov"] and momentum != 0 and (momentum < 0 or float(group["dampening"]) != 0):
        return "nesterov=True with a negative momentum or a dampening"
    return None


def adam_refusal(group: Group) -> str | None:
    """What in ``group`` the fused kernel cannot update as ``torch.optim.Adam``/``AdamW``
    does, or None."""
    for flag in ("capturable", "differentiable"):
        if group.get(flag):
            return f"{flag}=True"
    bad = _not_finite(group, ("lr", "eps", "weight_decay"))
    if bad is not None:
        return bad
    for i, beta in enumerate(group["betas"]):
        if not 0.0 <= float(beta) < 1.0:
            return f"betas[{i}]={float(beta)} (outside [0, 1))"
    return None


def _refusal(
    step_group: GroupUpdate, optimizer: torch.optim.Optimizer, targets: Container[torch.Tensor]
) -> str | None:
    """The first reason the fused update cannot run ``step_group`` on a group of
    ``optimizer`` holding one of ``targets`` (a set or dict of its parameters), or None."""
    refusal = _REFUSALS.get(step_group)
    if refusal is None:
        return None
    for i, group in enumerate(optimizer.param_groups):
        if any(p in targets for p in group["params"]):
            why = refusal(group)
            if why is not None:
                return f"param group {i} has {why}"
    return None


def fused_window_update(
    opt: AccumulatingOptimizer,
    step_group: GroupUpdate,
    window: ParamMap,
    factor: float,
    accums: ParamMap,
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Update ``window``'s parameters (model parameter -> accumulator) with ``factor x
    accumulator`` by ``step_group`` on ``optimizer``'s groups and state (default
    ``opt.optimizer``; a list member's own), one call per (param group, device); the
    accumulators are zeroed. ``accums`` is the dict that holds them (``opt``'s own, or a
    list's wrapper's), updated when a parameter's memory format changed mid-run."""
    for p, acc in window.items():
        local = _local(p)
        if not _same_layout(acc, local):  # the parameter's memory format changed mid-run
            window[p] = accums[p] = torch.empty_like(local).copy_(acc)
    # The optimizer's groups hold the fp32 masters of low-precision parameters.
    targets = {opt._masters.get(p, p): acc for p, acc in window.items()}
    optimizer = opt.optimizer if optimizer is None else optimizer
    for group in optimizer.param_groups:
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for p in group["params"]:
            if p in targets:
                by_device.setdefault(p.device, []).append(p)
        for params in by_device.values():
            step_group(optimizer.state, group, params, [targets[p] for p in params], factor)
    opt._refresh_from_masters(window)  # the model's bf16/fp16 parameters


_REFUSALS: dict[GroupUpdate, Callable[[Group], str | None]] = {
    sgd_update: sgd_refusal,
    adam_update: adam_refusal,
}

_AUTO_STEPS: dict[type, GroupUpdate] = {
    torch.optim.SGD: sgd_update,
    torch.optim.Adam: adam_update,
    torch.optim.AdamW: adam_update,
}


def auto_update(optimizer: torch.optim.Optimizer) -> GroupUpdate | None:
    """The fused update that can stand in for ``optimizer.step()``: for a
    ``torch.optim.SGD``, ``Adam`` or ``AdamW`` itself (not a subclass, whose step may
    differ), else None."""
    return _AUTO_STEPS.get(type(optimizer))


def auto_fusable(
    opt: AccumulatingOptimizer,
    window: ParamMap,
    optimizer: torch.optim.Optimizer,
    update: GroupUpdate,
) -> bool:
    """Whether ``update`` (:func:`auto_update` of ``optimizer``) gives ``window`` (model
    parameter -> accumulator, of ``opt``) what ``optimizer.step()`` would: no step hooks, on the optimizer or torch's
    global ones (they see ``.grad``, which the fused update never writes), and no step of
    its own patched in (but a learning-rate scheduler's counter); groups whose options the
    kernel takes (not ``capturable``/``differentiable``, finite scalars, ...); float32 dense
    parameters (or fp32 masters) with float32 accumulators, on the CPU unless
    ``opt.fused_update`` is True."""
    if optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks:
        return False
    if torch_optimizer._global_optimizer_pre_hooks or torch_optimizer._global_optimizer_post_hooks:
        return False
    patched = vars(optimizer).get("step")
    if patched is not None and not hasattr(patched, "_wrapped_by_lr_sched"):
        return False
    if _refusal(update, optimizer, {opt._masters.get(p, p) for p in window}) is not None:
        return False
    for p, acc in window.items():
        target = _local(opt._masters.get(p, p))
        if target.dtype != torch.float32 or acc.dtype != torch.float32:
            return False
        if opt.fused_update is None and target.device.type != "cpu":
            return False  # the default: GPU kernels not yet run on a GPU
        if not _memory_order(target).is_contiguous():
            return False
    return True


class _FusedWindowOptimizer(AccumulatingOptimizer):
    """An :class:`AccumulatingOptimizer` whose boundary runs a fused update kernel.

    Subclasses build the ``torch.optim`` optimizer and implement :meth:`_step_group`.
    """

    _steps_wrapped_optimizer = False  # the kernel updates; torch's global hooks run here
    _fused_update = True  # a list's wrapper can run _fused_window_update for it

    def __init__(self, optimizer: torch.optim.Optimizer, **wrapping: Any) -> None:
        """``wrapping``: the :class:`AccumulatingOptimizer` options of the subclass's
        constructor (see :func:`_wrapping`)."""
        for group in optimizer.param_groups:
            self._check_params(group["params"], wrapping["master_weights"])
        super().__init__(optimizer, **wrapping)

    def _check_params(self, params: list[torch.Tensor], master_weights: bool) -> None:
        """Raise TypeError (not float32, nor bf16/fp16 with ``master_weights``) or
        ValueError (not dense: a view with gaps) for any parameter; a sharded (FSDP2)
        parameter is checked by its local shard."""
        name = type(self).__name__
        for p in params:
            local = _local(p)
            low = local.dtype in (torch.bfloat16, torch.float16)
            if local.dtype != torch.float32 and not (low and master_weights):
                if low:
                    hint = f"{name}(..., master_weights=True) (fp32 masters)"
                else:
                    hint = f"fastaccum.wrap(torch.optim.{name}(...), K)"
                raise TypeError(
                    f"{name} needs float32 parameters, got one of dtype {local.dtype} (shape "
                    f"{tuple(p.shape)}); for {local.dtype} parameters use {hint}"
                )
            if not _memory_order(local).is_contiguous():
                raise ValueError(
                    f"{name} needs dense parameters (contiguous or in a memory format such "
                    f"as channels_last), got one of shape {tuple(local.shape)} and stride "
                    f"{tuple(local.stride())} (a view with gaps); make it a parameter of its "
                    f"own with .contiguous(), or use fastaccum.wrap(torch.optim.{name}(...), K)"
                )

    def _check_new_dtype(self, p: torch.Tensor, name: str) -> None:
        self._check_params([p], self.master_weights)
        super()._check_new_dtype(p, name)

    def _check_group_params(self, params: list[torch.Tensor]) -> None:
        """As the wrapper's, and as the constructor checks: float32 (or bf16/fp16 with
        ``master_weights``) and dense, before anything is added."""
        self._check_params(params, self.master_weights)
        super()._check_group_params(params)

    def _apply_and_step(self, factor: float) -> None:
        """One fused update per (param group, device): every parameter that received a
        gradient in the window steps with ``factor x accumulator``; the accumulators are
        zeroed."""
        self._fused_window_update(self.window_accums(), factor, self._accums)

    def _fused_window_update(self, window: ParamMap, factor: float, accums: ParamMap) -> None:
        """:meth:`_apply_and_step` for ``window`` (parameter of this optimizer ->
        accumulator): this optimizer's own, or, once it joined a list, the window of the
        list's wrapper, whose ``accums`` dict holds the accumulators.

        Raises:
            ValueError: a group's options are ones the kernel does not take (checked for
                every group before any is updated).
        """
        targets = {self._masters.get(p, p) for p in window}
        why = _refusal(self._step_group, self.optimizer, targets)
        if why is not None:
            raise ValueError(
                f"{why}, which fastaccum's fused update does not support; no parameter was updated"
            )
        fused_window_update(self, self._step_group, window, factor, accums)

    # The update of one (param group, device): sgd_update or adam_update.
    _step_group: GroupUpdate


class SGD(_FusedWindowOptimizer):
    """``torch.optim.SGD`` with gradient accumulation over ``accum_steps`` micro-batches and a
    fused window boundary (see :mod:`fastaccum.optim.fused`).

    Args:
        params, lr, momentum, dampening, weight_decay, nesterov, maximize: as
            ``torch.optim.SGD``.
        foreach, fused: accepted for drop-in compatibility and ignored: the update always
            runs in fastaccum's fused kernel.
        accum_steps: micro-batches per optimizer step (K >= 1).
        max_grad_norm: clip the window gradient to this global L2 norm (None: no clip).
        scaler: a ``torch.amp.GradScaler``, unscaled and checked once per window.
        model: the module owning ``params``, to check them and name them in messages;
            DDP, or FSDP2 (``fully_shard``; the update then runs on the local shards).
        activations: a :class:`fastaccum.ActivationPolicy` for ``model``'s forward passes.
        reduce_scatter_every_micro_step: FSDP2 only, as in :func:`fastaccum.wrap`.
        master_weights: for bf16/fp16 parameters: the update runs on fp32 master copies
            (which the optimizer's groups and state hold), and the parameters are cast
            from them after each window.

    ``step(num_items=n)`` returns True when the parameters were updated; see
    :class:`fastaccum.AccumulatingOptimizer`.

    Raises:
        TypeError: a parameter (a sharded one: its local shard) is not float32, nor
            bf16/fp16 with ``master_weights=True``.
        ValueError: torch's own argument checks, ``differentiable=True``, parameters that
            are views with gaps (channels_last is fine), an invalid ``accum_steps`` /
            ``max_grad_norm``, or sharded parameters without their FSDP2 ``model``.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | torch.Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | torch.Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        accum_steps: int = 1,
        max_grad_norm: float | None = None,
        scaler: torch.amp.GradScaler | None = None,
        model: torch.nn.Module | None = None,
        activations: Any = None,
        reduce_scatter_every_micro_step: bool = False,
        master_weights: bool = False,
    ) -> None:
        _reject("differentiable", differentiable, "the fused update is not differentiable")
        inner = torch.optim.SGD(
            params, lr, momentum, dampening, weight_decay, nesterov, maximize=maximize
        )
        super().__init__(inner, **_wrapping(locals()))

    _step_group = staticmethod(sgd_update)


def _adam_step_dtype() -> torch.dtype:
    """dtype of Adam's ``state['step']``, as torch.optim creates it (float64 only when that is
    the default dtype)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class Adam(_FusedWindowOptimizer):
    """``torch.optim.Adam`` with gradient accumulation over ``accum_steps`` micro-batches and a
    fused window boundary (see :mod:`fastaccum.optim.fused`).

    Args:
        params, lr, betas, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay: as
            ``torch.optim.Adam`` (amsgrad keeps ``state["max_exp_avg_sq"]``, as torch does).
        capturable, differentiable: must be False (not supported; ValueError).
        foreach, fused: accepted for drop-in compatibility and ignored: the update always
            runs in fastaccum's fused kernel.
        accum_steps, max_grad_norm, scaler, model, activations,
            reduce_scatter_every_micro_step, master_weights: as :class:`SGD`.

    Raises:
        TypeError: a parameter is not float32.
        ValueError: torch's own argument checks, an unsupported option, parameters that
            are views with gaps (channels_last is fine), or an invalid ``accum_steps`` /
            ``max_grad_norm``.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        accum_steps: int = 1,
        max_grad_norm: float | None = None,
        scaler: torch.amp.GradScaler | None = None,
        model: torch.nn.Module | None = None,
        activations: Any = None,
        reduce_scatter_every_micro_step: bool = False,
        master_weights: bool = False,
    ) -> None:
        _check_adam_options(capturable, differentiable)
        inner = torch.optim.Adam(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            maximize=maximize,
            decoupled_weight_decay=decoupled_weight_decay,
        )
        _FusedWindowOptimizer.__init__(self, inner, **_wrapping(locals()))

    _step_group = staticmethod(adam_update)


class AdamW(Adam):
    """``torch.optim.AdamW`` (Adam with decoupled weight decay, default 1e-2) with gradient
    accumulation over ``accum_steps`` micro-batches and a fused window boundary.

    Arguments and errors as :class:`Adam`, without ``decoupled_weight_decay`` (always on).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        accum_steps: int = 1,
        max_grad_norm: float | None = None,
        scaler: torch.amp.GradScaler | None = None,
        model: torch.nn.Module | None = None,
        activations: Any = None,
        reduce_scatter_every_micro_step: bool = False,
        master_weights: bool = False,
    ) -> None:
        _check_adam_options(capturable, differentiable)
        inner = torch.optim.AdamW(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize)
        _FusedWindowOptimizer.__init__(self, inner, **_wrapping(locals()))
