"""Optimizer-side API: :func:`wrap`, :class:`AccumulatingOptimizer`, the fused classes and
:class:`ChainedOptimizer`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from fastaccum.optim.chained import ChainedOptimizer
from fastaccum.optim.fused import SGD, Adam, AdamW
from fastaccum.optim.wrapper import AccumulatingOptimizer

if TYPE_CHECKING:
    from fastaccum.memory.policy import ActivationPolicy


def wrap(
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
    accum_steps: int,
    *,
    model: torch.nn.Module | None = None,
    max_grad_norm: float | None = None,
    accum_dtype: torch.dtype = torch.float32,
    master_weights: bool = False,
    scaler: torch.amp.GradScaler | None = None,
    reduce_scatter_every_micro_step: bool = False,
    activations: ActivationPolicy | None = None,
    fused_update: bool | None = None,
) -> AccumulatingOptimizer:
    """Wrap ``optimizer`` so that it steps once per window of ``accum_steps`` micro-batches.

    Args:
        optimizer: any ``torch.optim.Optimizer``; it keeps its param groups and state. Or
            a list of them over disjoint parameters (``[muon, adamw]``), stepped together
            as one :class:`ChainedOptimizer`: one window, one clip by the norm over all
            their parameters, one GradScaler decision, one checkpoint. A member may be a
            fused class (``fastaccum.optim.AdamW(params, lr=...)``, built without the
            window's options): its kernel updates its parameters at the boundary.
        accum_steps: micro-batches per window (K >= 1); ``opt.accum_steps = K2`` changes it
            later (a batch-size schedule).
        model: the module whose parameters ``optimizer`` updates; used to check them and
            to name parameters in messages.
        max_grad_norm: clip the window gradient to this global L2 norm (None: no clip).
        accum_dtype: accumulator dtype, ``torch.float32`` (default) or the parameters' own.
        master_weights: keep fp32 master copies of bf16/fp16 parameters for the update.
        scaler: a ``torch.amp.GradScaler``; its scale is held for a window, unscaling and
            the inf check happen once at the boundary, and its update runs per window.
        reduce_scatter_every_micro_step: FSDP2 models only: reduce-scatter every
            micro-batch and accumulate fp32 shards (less memory, K reduce-scatters per
            window) instead of keeping unsharded gradients for one reduce-scatter per
            window (see :mod:`fastaccum.distributed`).
        activations: a :class:`fastaccum.ActivationPolicy` applied to every forward pass
            of ``model`` (which must then be given): the tensors saved for backward are
            compressed, stored as masks or offloaded as the policy says.
        fused_update: for a ``torch.optim.SGD``, ``Adam`` or ``AdamW`` (the class itself,
            not a subclass), run each window's update in fastaccum's fused kernel, as the
            ``fastaccum.optim`` classes do, instead of writing ``.grad`` and calling the
            optimizer's ``step()``: the same math on the same state (torch's format),
            with each tensor read once. It applies to windows whose parameters (or fp32
            masters) are float32 and dense, whose groups' options the kernel takes (not
            ``capturable`` or ``differentiable``), and while no step hook is registered
            on the optimizer or globally; other windows take ``step()``. In a list, each
            such member takes it for its own parameters. The optimizer's
            ``foreach``/``fused`` flags are then not used. ``None`` (default): on CPU
            parameters only, until the GPU kernels have run on a GPU; ``True``: on every
            device; ``False``: always ``step()``. ``opt.stats()["fused_update"]`` says
            which the last window took.

    Returns:
        The :class:`AccumulatingOptimizer`, usable wherever an optimizer is expected.

    Raises:
        TypeError, ValueError: a non-optimizer, optimizers in a list that share a
            parameter, a fused member built with the window's options or holding a
            partial window, ``accum_steps < 1``, a parameter missing
            from ``model``, a bad ``max_grad_norm`` or ``accum_dtype``, or an unsupported
            distributed configuration, a ``fused_update`` that is not None or a bool.
        RuntimeError: a DDP model that already has a communication hook.
    """
    return AccumulatingOptimizer(
        optimizer,
        accum_steps,
        model=model,
        max_grad_norm=max_grad_norm,
        accum_dtype=accum_dtype,
        master_weights=master_weights,
        scaler=scaler,
        reduce_scatter_every_micro_step=reduce_scatter_every_micro_step,
        activations=activations,
        fused_update=fused_update,
    )


__all__ = ["SGD", "AccumulatingOptimizer", "Adam", "AdamW", "ChainedOptimizer", "wrap"]
