"""Non-reentrant activation checkpointing inside the activation policy's pipeline.

During the forward of a region, every tensor the region saves for backward (except
parameters) is replaced by a placeholder, and the region's inputs are saved through the
hooks active around the call, so an enclosing :class:`~fastaccum.ActivationPolicy` compresses
or offloads them. When backward first needs a placeholder, the region runs again (same RNG
state, same autocast state) on those inputs, and each recomputed tensor is stored through
the policy's encoder, whose rounding seeds are fixed at forward time: repeated
recomputations (``retain_graph=True``) store bit-identical values.

Gradients flow through the graph recorded in the original forward; the recomputation only
supplies the saved values.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any, cast

import torch
from torch.autograd.graph import saved_tensors_hooks

from fastaccum.memory.policy import (
    ActivationPolicy,
    Encoder,
    _is_parameter_like,
    _Kept,
    active_session,
    keep_as_is,
)

_local = threading.local()


def _in_region() -> bool:
    return getattr(_local, "depth", 0) > 0


@contextlib.contextmanager
def _region() -> Any:
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1


class _SaveInputs(torch.autograd.Function):
    """Saves the region's tensor inputs through whatever saved-tensor hooks are active."""

    @staticmethod
    def forward(ctx: Any, dummy: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(*tensors)
        return torch.empty((0,))

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> tuple[None, ...]:
        return (None,) * (1 + len(ctx.saved_tensors))


class _Placeholder:
    __slots__ = ("frame", "index")

    def __init__(self, frame: _Frame, index: int) -> None:
        self.frame = frame
        self.index = index


def _autocast_states() -> list[tuple[str, torch.dtype]]:
    return [
        (device, torch.get_autocast_dtype(device))
        for device in ("cpu", "cuda")
        if torch.is_autocast_enabled(device)
    ]


class _Frame:
    """One call of a checkpointed region: what is needed to run it again."""

    def __init__(
        self,
        fn: Callable[..., Any],
        args: tuple,
        kwargs: dict,
        policy: ActivationPolicy | None,
        seed_base: int,
        preserve_rng_state: bool,
    ) -> None:
        self.fn = fn
        self.kwargs = kwargs
        self.policy = policy
        self.seed_base = seed_base
        self.positions = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        self.requires_grad = [args[i].requires_grad for i in self.positions]
        self.others = [None if isinstance(a, torch.Tensor) else a for a in args]
        tensors = [args[i] for i in self.positions]
        dummy = torch.empty((0,), requires_grad=True)
        # The (empty) output is kept: torch 2.11 frees a custom Function's saved tensors
        # once its outputs are gone, which would lose the inputs before the recomputation.
        self.input_out = _SaveInputs.apply(dummy, *tensors)
        self.cuda_devices = sorted({t.device.index or 0 for t in tensors if t.is_cuda})
        self.preserve_rng_state = preserve_rng_state
        if preserve_rng_state:
            self.cpu_rng = torch.get_rng_state()
            self.cuda_rng = [torch.cuda.get_rng_state(d) for d in self.cuda_devices]
        self.autocast = _autocast_states()
        self.saved = 0  # tensors the region saved in its forward
        self.placeholders: set[int] = set()
        self.values: dict[int, Any] = {}
        self.encoder: Encoder | None = None

    def pack(self, t: torch.Tensor) -> Any:
        index = self.saved
        self.saved += 1
        if _is_parameter_like(t):
            # Held as it is (not recomputed), with its version checked when unpacked.
            return keep_as_is(t)
        self.placeholders.add(index)
        return _Placeholder(self, index)

    def unpack(self, stored: Any) -> torch.Tensor:
        if isinstance(stored, _Kept):
            return stored.get()
        frame: _Frame = stored.frame
        if stored.index not in frame.values:
            frame.recompute()
        value = frame.values.pop(stored.index)
        # recompute() sets the encoder together with the values it filled.
        return cast(Encoder, frame.encoder).decode(value)

    def recompute(self) -> None:
        tensors = self.input_out.grad_fn.saved_tensors
        args = list(self.others)
        for i, t, grad in zip(self.positions, tensors, self.requires_grad, strict=True):
            args[i] = t.detach().requires_grad_(grad)
        encoder = Encoder(self.policy, self.seed_base)
        values: dict[int, Any] = {}
        count = 0

        def pack(t: torch.Tensor) -> None:
            nonlocal count
            if count in self.placeholders:
                values[count] = encoder.encode(t)
            count += 1

        def unpack(_: None) -> torch.Tensor:
            raise RuntimeError("the recomputed graph of a checkpoint is not differentiated")

        with contextlib.ExitStack() as stack:
            if self.preserve_rng_state:
                stack.enter_context(torch.random.fork_rng(devices=self.cuda_devices))
                torch.set_rng_state(self.cpu_rng)
                for d, state in zip(self.cuda_devices, self.cuda_rng, strict=True):
                    torch.cuda.set_rng_state(state, d)
            for device, dtype in self.autocast:
                stack.enter_context(torch.autocast(device, dtype=dtype))
            stack.enter_context(torch.enable_grad())
            stack.enter_context(_region())
            stack.enter_context(saved_tensors_hooks(pack, unpack))
            self.fn(*args, **self.kwargs)
        if count != self.saved:
            raise RuntimeError(
                f"the checkpointed function saved {count} tensors when recomputed but "
                f"{self.saved} in its forward; it must run the same ops each time (no "
                "data-dependent control flow that changed between the calls)"
            )
        self.encoder = encoder
        self.values = values


def checkpoint(
    fn: Callable[..., Any],
    *args: Any,
    policy: ActivationPolicy | None = None,
    preserve_rng_state: bool = True,
    **kwargs: Any,
) -> Any:
    """Run ``fn(*args, **kwargs)`` without keeping its saved tensors; recompute them in backward.

    Non-reentrant (gradients flow through the original graph, ``torch.autograd.grad`` and
    inputs that need no gradient work). The region's tensor inputs are saved through the
    active :class:`~fastaccum.ActivationPolicy` (compressed or offloaded like any saved
    tensor), and the recomputed tensors are stored through ``policy`` (default: the
    policy of the innermost open session, or none: kept as they are).

    Args:
        fn: the region; must run the same ops each time it is called with the same inputs.
        args, kwargs: its arguments (tensor positional arguments are saved for recomputation;
            tensors inside ``kwargs`` or containers are held as they are).
        policy: the policy the recomputation stores its tensors with.
        preserve_rng_state: replay the CPU (and CUDA, for CUDA inputs) RNG state, so that
            dropout masks match.

    Returns:
        ``fn``'s output. A call nested in another checkpointed region runs as part of it.

    Raises:
        TypeError: when ``fn`` is not callable or ``policy`` is not a policy.
        RuntimeError: in backward, when the recomputation saved a different number of tensors.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if policy is not None and not isinstance(policy, ActivationPolicy):
        raise TypeError(f"policy must be an ActivationPolicy or None, got {type(policy).__name__}")
    if _in_region() or not torch.is_grad_enabled():
        return fn(*args, **kwargs)
    session = active_session()
    if policy is None and session is not None:
        policy = session.policy
    if session is not None:
        seed_base = session.encoder.next_seed_base()
    else:
        seed_base = policy._next_seed_base() if policy is not None else 0
    frame = _Frame(fn, args, kwargs, policy, seed_base, preserve_rng_state)
    with _region(), saved_tensors_hooks(frame.pack, frame.unpack):
        return fn(*args, **kwargs)
