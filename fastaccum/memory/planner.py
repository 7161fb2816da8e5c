"""Batch planning: the largest micro-batch that fits, and the accumulation that follows.

``plan_batch`` answers "which micro-batch b and how many accumulation steps K give my
target batch on this device" by measuring real training steps of the user's own model:

- **Prediction.** The peak of a training step is, to a good approximation,
  ``fixed + per_sample x b``: the fixed part is the parameters, the accumulators or
  gradients and the optimizer state; the per-sample part is the activations saved for
  backward and the transient buffers that scale with the batch. Two probes (b = 1 and
  b = 4) give both numbers, and the usable memory (the budget less ``headroom``) gives a
  first guess for the largest b.
- **Search by real steps.** The guess is then checked with a real window and refined:
  secant steps through the two largest probes that fit (the peak is not quite linear in
  b), then a bisection to the exact largest b that fits: a fine search, not halving.
  On CUDA a probe that runs out of memory (``torch.OutOfMemoryError``) counts as not
  fitting; its memory is released and the search goes on.

A probe is one accumulation window of two micro-batches through fastaccum's wrapper:
forward, backward and fold into the fp32 accumulators, then the boundary step of the
optimizer. Memory is tensor memory: on CUDA the allocator's peak
(``max_memory_allocated``), on the CPU the same figure counted op by op
(:class:`fastaccum.memory.peak.LiveTensorBytes`).

Nothing the user had changes: the model's parameters, gradients, buffers and plain
attributes, the optimizer's state and hyperparameters (and a fastaccum wrapper's
accumulation state and GradScaler), and the torch, CUDA, ``random`` and NumPy random
states are saved before the first probe and restored afterwards, also when a probe fails.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import math
import random
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch

from fastaccum.memory.peak import peak_bytes, tensor_bytes

if TYPE_CHECKING:
    from fastaccum.optim import AccumulatingOptimizer

__all__ = ["BatchPlan", "PlanningError", "plan_batch"]


def _size(n_bytes: float) -> str:
    """``n_bytes`` in binary units (B, KiB, MiB, GiB, TiB), the first that keeps it below
    1000, to 3 significant digits: ``_size(1536) == "1.50 KiB"``."""
    value, unit = float(n_bytes), "B"
    for larger in ("KiB", "MiB", "GiB", "TiB"):
        if abs(float(f"{value:.3g}")) < 1000:  # as printed: 999.9 would print as 1e+03
            break
        value, unit = value / 1024, larger
    if unit == "B":
        return f"{value:.0f} B"
    return f"{value:.3g} {unit}" if abs(value) >= 100 else f"{value:#.3g} {unit}"


class PlanningError(RuntimeError):
    """No micro-batch fits: the message says how much memory is missing."""


@dataclass
class BatchPlan:
    """What ``plan_batch`` chose, and why. Sizes are in samples, memory in bytes.

    ``max_micro_batch_size`` is the largest micro-batch found to fit (capped at the
    target); ``micro_batch_size`` may be smaller, to split the target evenly into the same
    number of steps.
    """

    target_batch_size: int
    micro_batch_size: int
    accum_steps: int
    last_micro_batch_size: int
    device: str
    budget_bytes: int
    usable_bytes: int
    fixed_bytes: int
    per_sample_bytes: float
    predicted_peak_bytes: int
    measured_peak_bytes: int
    max_micro_batch_size: int
    reasons: list[str] = field(default_factory=list)

    @property
    def effective_batch_size(self) -> int:
        """Samples per optimizer step: ``micro_batch_size * (accum_steps - 1) +
        last_micro_batch_size``, which is always the target."""
        return self.micro_batch_size * (self.accum_steps - 1) + self.last_micro_batch_size

    def micro_batch_sizes(self) -> list[int]:
        """The size of each micro-batch of one window."""
        return [self.micro_batch_size] * (self.accum_steps - 1) + [self.last_micro_batch_size]

    def __str__(self) -> str:
        lines = [
            f"batch plan on {self.device}: target {self.target_batch_size} = "
            + (
                f"{self.accum_steps} x {self.micro_batch_size}"
                if self.last_micro_batch_size == self.micro_batch_size
                else f"{self.accum_steps - 1} x {self.micro_batch_size} + "
                f"{self.last_micro_batch_size}"
            ),
            f"  micro_batch_size {self.micro_batch_size}, accum_steps {self.accum_steps}",
            f"  memory: budget {_size(self.budget_bytes)}, usable "
            f"{_size(self.usable_bytes)}; fixed {_size(self.fixed_bytes)} + "
            f"{_size(self.per_sample_bytes)} per sample",
            f"  peak: predicted {_size(self.predicted_peak_bytes)}, measured "
            f"{_size(self.measured_peak_bytes)}",
        ]
        lines += [f"  - {r}" for r in self.reasons]
        return "\n".join(lines)


# ------------------------------------------------------------------------------ state


def _to_cpu(tree: Any) -> Any:
    """A deep copy of ``tree`` with every tensor copied to the CPU."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {k: _to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_to_cpu(v) for v in tree)
    return copy.deepcopy(tree)


class _Saved:
    """Everything a probe may change, saved to the CPU and put back in place."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        from fastaccum.optim import AccumulatingOptimizer

        self.model = model
        self.tensors: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.grads: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self.attrs: list[tuple[torch.nn.Module, dict[str, Any]]] = []
        for module in model.modules():
            for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
                self.tensors.append((t, t.detach().to("cpu", copy=True)))
            for p in module.parameters(recurse=False):
                self.grads.append(
                    (p, None if p.grad is None else p.grad.detach().to("cpu", copy=True))
                )
            plain: dict[str, Any] = {}
            for name, value in vars(module).items():
                if isinstance(value, torch.Tensor):
                    plain[name] = (value, value.detach().to("cpu", copy=True))
                elif isinstance(value, (bool, int, float, str, type(None))):
                    plain[name] = value
            self.attrs.append((module, plain))
        self.optimizer = optimizer
        self.wrapper_state = None
        self.scaler_state = None
        self.optim_state = None
        if isinstance(optimizer, AccumulatingOptimizer):
            self.wrapper_state = _to_cpu(optimizer.state_dict())
            if optimizer.scaler is not None:
                self.scaler_state = copy.deepcopy(optimizer.scaler.state_dict())
        elif optimizer is not None:
            # Saved and restored in place (not with load_state_dict, which replaces the
            # param_groups list that wrappers and schedulers may share).
            self.optim_state = {
                p: (_to_cpu(s), {k: v.device for k, v in s.items() if torch.is_tensor(v)})
                for p, s in optimizer.state.items()
            }
            self.groups = [
                {k: copy.deepcopy(v) for k, v in g.items() if k != "params"}
                for g in optimizer.param_groups
            ]
        self.rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        self.py_rng = random.getstate()
        np = sys.modules.get("numpy")
        self.np_rng = np.random.get_state() if np is not None else None

    def restore(self) -> None:
        with torch.no_grad():
            for t, saved in self.tensors:
                t.copy_(saved)
            for p, grad in self.grads:
                p.grad = None if grad is None else grad.to(p.device)
            for module, plain in self.attrs:
                for name, value in plain.items():
                    if isinstance(value, tuple):
                        tensor, saved = value
                        tensor.copy_(saved)
                        setattr(module, name, tensor)
                    else:
                        setattr(module, name, value)
        opt = self.optimizer
        if self.wrapper_state is not None:
            wrapper = cast("AccumulatingOptimizer", opt)  # its state is saved only for one
            wrapper.load_state_dict(self.wrapper_state)
            if self.scaler_state is not None:
                # Saved only when the wrapper has a scaler.
                cast(torch.amp.GradScaler, wrapper.scaler).load_state_dict(self.scaler_state)
        elif self.optim_state is not None:
            assert opt is not None  # optim_state is saved only for an optimizer
            opt.state.clear()
            for p, (state, devices) in self.optim_state.items():
                opt.state[p] = {
                    k: v.to(devices[k]) if k in devices else v for k, v in state.items()
                }
            for group, hyper in zip(opt.param_groups, self.groups, strict=True):
                group.update(hyper)
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        random.setstate(self.py_rng)
        if self.np_rng is not None:
            sys.modules["numpy"].random.set_state(self.np_rng)


# ------------------------------------------------------------------------------ probes


def _default_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    if isinstance(batch, Mapping):  # keyword inputs, as Hugging Face models take them
        out = model(**batch)
    elif isinstance(batch, (tuple, list)):
        out = model(*batch)
    else:
        out = model(batch)
    if isinstance(out, dict):
        out = out.get("loss", next(iter(out.values())))
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"the model returned {type(out).__name__}; pass loss_fn(model, batch) -> Tensor"
        )
    return out if out.dim() == 0 else out.float().mean()


class _Prober:
    def __init__(self, model, make_batch, optimizer, loss_fn, policy, device) -> None:
        from fastaccum.optim import AccumulatingOptimizer, wrap

        self.model, self.make_batch, self.loss_fn = model, make_batch, loss_fn
        self.policy, self.device = policy, device
        self.opt: AccumulatingOptimizer | None
        if isinstance(optimizer, AccumulatingOptimizer):
            self.opt = optimizer
            if optimizer.micro_step > 0:
                # Mid-window: the probes run whole windows of their own (without num_items);
                # the user's window comes back with the rest of the saved state.
                optimizer._drop_window()
        elif optimizer is not None:
            self.opt = wrap(optimizer, 2)
        else:
            self.opt = None

    def _resident(self) -> int:
        """Bytes of the tensors a probe finds already allocated (CPU accounting)."""
        model, opt = self.model, self.opt
        tensors = [*model.parameters(), *model.buffers()]
        tensors += [p.grad for p in model.parameters() if p.grad is not None]
        if opt is not None:
            state = opt.optimizer.state.values()
            tensors += [v for s in state for v in s.values() if torch.is_tensor(v)]
            tensors += [*opt._accums.values(), *opt._masters.values()]
        return tensor_bytes(tensors)

    def _window(self, b: int) -> None:
        """Two micro-batches of b samples and the boundary step."""
        opt = self.opt
        for _ in range(2):
            batch = self.make_batch(b)
            _check_samples(batch, b)
            session: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
            if self.policy is not None:
                from fastaccum.memory import save_activations

                session = save_activations(self.policy)
            with session:
                loss = self.loss_fn(self.model, batch)
            loss.backward()
            del loss, batch
            if opt is None:
                continue
            if opt.step():
                break
            opt.zero_grad()
        if opt is not None and opt.micro_step > 0:
            opt.flush()
        self.model.zero_grad(set_to_none=True)

    def peak(self, b: int) -> int | None:
        """Measured peak bytes of one probe window at micro-batch b, or None on OOM.

        Raises:
            PlanningError: the window raised anything else; the message names b and the
                original error, which is chained.
        """
        if self.device.type == "cuda":
            before = torch.cuda.memory_allocated(self.device)
        else:
            before = self._resident()
        try:
            measured, _ = peak_bytes(lambda: self._window(b), self.device)
        except torch.OutOfMemoryError:
            self.model.zero_grad(set_to_none=True)
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return None
        except _BatchSizeError as err:
            raise ValueError(str(err)) from None
        except Exception as err:
            hint = ""
            if b == 1 and "value per channel" in str(err):
                hint = (
                    "; a model that cannot train on one sample (BatchNorm on (N, C) inputs) "
                    "needs plan_batch(..., min_micro_batch_size=2)"
                )
            raise PlanningError(
                f"plan_batch's probe window at micro-batch {b} raised "
                f"{type(err).__name__}: {err}{hint}"
            ) from err
        return before + measured


class _BatchSizeError(ValueError):
    """``make_batch(n)`` returned a batch that does not hold n samples."""


def _check_samples(batch: Any, n: int) -> None:
    """Raise when no tensor of ``make_batch(n)``'s batch holds n samples in its first
    (batch-first) or second (sequence-first) dimension; batches without tensors pass.

    Raises:
        ValueError: the batch's tensors, with their shapes.
    """
    from torch.utils._pytree import tree_leaves

    # a UserDict batch (Hugging Face's BatchEncoding) is no pytree node: take its dict
    leaves = tree_leaves(dict(batch) if isinstance(batch, Mapping) else batch)
    shapes = [tuple(t.shape) for t in leaves if isinstance(t, torch.Tensor)]
    if not shapes or any(n in shape[:2] for shape in shapes):
        return
    if isinstance(batch, (list, tuple)) and len(batch) == n:
        return  # n samples as n tensors (sequences of different lengths, say)
    shown = ", ".join(str(list(shape)) for shape in shapes[:4])
    raise _BatchSizeError(
        f"make_batch({n}) returned tensors of shapes {shown}: none holds {n} samples in its "
        f"first or second dimension; make_batch(n) must return a batch of n samples, since "
        "the plan measures memory against the micro-batch size"
    )


# ------------------------------------------------------------------------------ planning


def _split(target: int, largest: int, smallest: int = 1) -> tuple[int, int, int] | None:
    """(micro, accum_steps, last): the fewest micro-batches of ``smallest`` to ``largest``
    samples, all but the last of one size and as even as possible, summing to
    ``target``; None when there is no such split."""
    for k in range(math.ceil(target / largest), target // smallest + 1):
        micro = math.ceil(target / k)
        last = target - micro * (k - 1)
        if smallest <= last <= micro <= largest:
            return micro, k, last
    return None


def _default_budget(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        # Memory the caching allocator holds but has not handed out is reusable too.
        free = torch.cuda.mem_get_info(device)[0]
        return free + torch.cuda.memory_reserved(device), "free CUDA memory plus this process's"
    if device.type == "cpu":
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024, "MemAvailable of /proc/meminfo"
    raise ValueError(f"plan_batch plans for CPU or CUDA devices, got {device}")


@contextlib.contextmanager
def _train_mode(model: torch.nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    model.train()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def plan_batch(
    model: torch.nn.Module,
    make_batch: Callable[[int], Any],
    target_batch_size: int,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor] | None = None,
    memory_budget: int | float | None = None,
    headroom: float = 0.1,
    policy: Any = None,
    verbose: bool = True,
    min_micro_batch_size: int = 1,
) -> BatchPlan:
    """Choose the micro-batch size and accumulation steps for ``target_batch_size``.

    Args:
        model: the model, on the device to plan for (its first parameter's device).
        make_batch: ``make_batch(n)`` returns a batch of n samples, as the training loop
            feeds the model.
        target_batch_size: samples per optimizer step (the effective batch).
        optimizer: the optimizer to be used (a ``torch.optim`` optimizer or a fastaccum
            wrapper); its state counts in the fixed memory. None plans forward and backward
            with plain ``.grad`` only.
        loss_fn: ``loss_fn(model, batch)`` returns the scalar loss; default: the model's
            output if scalar, else its mean (enough to exercise backward, but pass the real
            loss for the exact footprint).
        memory_budget: bytes of tensor memory to plan for; None takes what the device has
            (CUDA: free plus already allocated; CPU: MemAvailable).
        headroom: fraction of the budget kept free (allocator fragmentation, stray
            buffers), in [0, 1).
        policy: a ``fastaccum.ActivationPolicy`` to probe under, or None.
        verbose: print each probe to stderr.
        min_micro_batch_size: the smallest micro-batch to probe and to plan, for models
            that cannot train on fewer samples (2 for BatchNorm on (N, C) inputs).

    Returns:
        A :class:`BatchPlan`. ``micro_batch_size * (accum_steps - 1) +
        last_micro_batch_size == target_batch_size`` always; when the last micro-batch is
        smaller the reasons say so (pass ``num_items`` to ``opt.step`` so it weighs right).

    Raises:
        TypeError: a model that is not an ``nn.Module``, a ``make_batch`` or ``loss_fn``
            that is not callable, an optimizer that is not a ``torch.optim.Optimizer``,
            non-numeric sizes, budget or headroom.
        ValueError: target < 1, min_micro_batch_size outside [1, target], headroom
            outside [0, 1), a budget that is not positive and finite, no parameters or
            none that requires grad, a ``make_batch(n)`` whose tensors hold no n samples.
        PlanningError: even the smallest micro-batch does not fit (the message says how
            much memory is missing), a probe window raised (the error is chained), or no
            split of the target into micro-batches of the allowed sizes exists.
    """
    from fastaccum.optim import AccumulatingOptimizer
    from fastaccum.optim.wrapper import _as_int

    target_batch_size = _as_int("target_batch_size", target_batch_size)
    min_micro_batch_size = _as_int("min_micro_batch_size", min_micro_batch_size)
    if target_batch_size < 1:
        raise ValueError(f"target_batch_size must be >= 1, got {target_batch_size}")
    if not 1 <= min_micro_batch_size <= target_batch_size:
        raise ValueError(
            f"min_micro_batch_size must be in [1, target_batch_size={target_batch_size}], "
            f"got {min_micro_batch_size}"
        )
    if isinstance(headroom, bool) or not isinstance(headroom, (int, float)):
        raise TypeError(f"headroom must be a float in [0, 1), got {type(headroom).__name__}")
    if not (0.0 <= headroom < 1.0):
        raise ValueError(f"headroom must be in [0, 1), got {headroom}")
    if memory_budget is not None:
        if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float)):
            raise TypeError(
                "memory_budget must be a number of bytes (int or float) or None, got "
                f"{type(memory_budget).__name__}"
            )
        if not (memory_budget > 0 and math.isfinite(memory_budget)):
            raise ValueError(
                f"memory_budget must be a positive, finite number of bytes, got {memory_budget}"
            )
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(make_batch):
        raise TypeError(f"make_batch must be callable as make_batch(n), got {make_batch!r}")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(model, batch), got {loss_fn!r}")
    if optimizer is not None and not isinstance(
        optimizer, (torch.optim.Optimizer, AccumulatingOptimizer)
    ):
        raise TypeError(
            "optimizer must be a torch.optim.Optimizer, a fastaccum wrapper or None, got "
            f"{type(optimizer).__name__}"
        )
    if policy is not None:
        from fastaccum.memory.policy import ActivationPolicy

        if not isinstance(policy, ActivationPolicy):
            raise TypeError(
                f"policy must be a fastaccum.ActivationPolicy or None, got {type(policy).__name__}"
            )
    params = list(model.parameters())
    if not params:
        raise ValueError("model has no parameters to plan for")
    if not any(p.requires_grad for p in params):
        raise ValueError(
            "no parameter of the model requires grad: a frozen model has no training step "
            "to plan; unfreeze the parameters to be trained first"
        )
    device = params[0].device
    if memory_budget is None:
        budget, budget_source = _default_budget(device)
    else:
        budget, budget_source = int(memory_budget), "memory_budget"
    usable = int(budget * (1.0 - headroom))
    reasons = [f"budget {_size(budget)} from {budget_source}; {headroom:.0%} kept free"]

    def say(msg: str) -> None:
        if verbose:
            print(f"fastaccum plan: {msg}", file=sys.stderr, flush=True)

    saved = _Saved(model, optimizer)
    try:
        with _train_mode(model):
            prober = _Prober(model, make_batch, optimizer, loss_fn or _default_loss, policy, device)
            measured: dict[int, int | None] = {}

            def probe(b: int) -> int | None:
                if b not in measured:
                    measured[b] = prober.peak(b)
                    peak = measured[b]
                    state = "out of memory" if peak is None else f"peak {_size(peak)}"
                    fits = peak is not None and peak <= usable
                    say(f"micro-batch {b}: {state} ({'fits' if fits else 'does not fit'})")
                return measured[b]

            def fits(b: int) -> bool:
                peak = probe(b)
                return peak is not None and peak <= usable

            least = min_micro_batch_size
            small = probe(least)
            if small is None or small > usable:
                detail = "out of memory" if small is None else _size(small)
                missing = "" if small is None else f", {_size(small - usable)} missing"
                in_bytes = ""
                if memory_budget is not None and memory_budget < 2**20:
                    in_bytes = f" (memory_budget is in bytes: {memory_budget!r} was given)"
                raise PlanningError(
                    f"micro-batch {least} does not fit: it needs {detail} against "
                    f"{_size(usable)} "
                    f"usable ({_size(budget)} budget, headroom {headroom:.0%}){in_bytes}"
                    f"{missing}; lower the model's memory (an activation policy, a smaller "
                    "model or dtype) or raise the budget"
                )
            b2 = min(target_batch_size, max(4, 2 * least))
            per_sample = 0.0
            if b2 > least:
                big = probe(b2)
                if big is not None:
                    per_sample = max((big - small) / (b2 - least), 0.0)
            fixed = int(small - per_sample * least)
            if per_sample > 0:
                predicted_max = int((usable - fixed) // per_sample)
            else:
                predicted_max = target_batch_size
            best = max(least, min(target_batch_size, predicted_max))
            reasons.append(
                f"measured: fixed {_size(fixed)} + {_size(per_sample)} per sample"
                f" -> at most {predicted_max} samples per micro-batch predicted"
            )
            best = _largest_fitting(fits, measured, usable, best, target_batch_size, least)
            reasons.append(
                f"largest micro-batch that fits, found by real steps: {best} "
                f"({len(measured)} probes)"
            )
            split = _split(target_batch_size, best, least)
            if split is None:
                raise PlanningError(
                    f"no split of target {target_batch_size} into micro-batches of "
                    f"{least} to {best} samples (all of one size but a smaller last one "
                    f"of at least {least}); choose a target that is a multiple of a size in "
                    "that range"
                )
            micro, k, last = split
            if micro not in measured:
                probe(micro)
            micro_peak = measured[micro]
            if micro_peak is None or micro_peak > usable:
                raise PlanningError(
                    f"micro-batch {micro} did not fit when verified; plan again with a "
                    "larger headroom"
                )
            if last == micro:
                reasons.append(f"{target_batch_size} = {k} x {micro}: an exact split")
            else:
                reasons.append(
                    f"{target_batch_size} = {k - 1} x {micro} + {last}: no exact split with "
                    f"micro-batches of at most {best}; the last is smaller, so give "
                    "opt.step(num_items=...) the sample counts to weigh it right"
                )
            if micro < best:
                reasons.append(
                    f"micro-batch {micro} rather than {best}: the same {k} steps, evenly split"
                )
            plan = BatchPlan(
                target_batch_size=target_batch_size,
                micro_batch_size=micro,
                accum_steps=k,
                last_micro_batch_size=last,
                device=str(device),
                budget_bytes=budget,
                usable_bytes=usable,
                fixed_bytes=fixed,
                per_sample_bytes=per_sample,
                predicted_peak_bytes=int(fixed + per_sample * micro),
                measured_peak_bytes=int(micro_peak),
                max_micro_batch_size=best,
                reasons=reasons,
            )
    finally:
        saved.restore()
    say(str(plan).splitlines()[0])
    return plan


def _largest_fitting(
    fits: Callable[[int], bool],
    measured: dict[int, int | None],
    usable: int,
    guess: int,
    target: int,
    least: int = 1,
) -> int:
    """The largest b in [least, target] with ``fits(b)``, given that ``least`` fits.

    Secant steps first: each guess is where the line through the two largest fitting
    probes reaches the usable memory (peaks grow about linearly with b). Once a guess
    fails, or the guesses stop moving, the answer is bracketed (by doubling the step if
    need be) and bisected to the exact integer.
    """
    lo, hi = least, target + 1  # fits(lo) holds; hi is the smallest known failure (or beyond)
    b = max(least, min(guess, target))
    for _ in range(6):
        if not lo < b < hi:
            break
        if fits(b):
            lo = b
        else:
            hi = b
            break
        points = sorted((x, p) for x, p in measured.items() if p is not None and p <= usable)
        if len(points) < 2:
            break
        (b1, p1), (b2, p2) = points[-2], points[-1]
        slope = (p2 - p1) / (b2 - b1)
        b = target if slope <= 0 else b2 + int((usable - p2) // slope)
        b = min(b, target)
    step = 1
    while hi == target + 1 and lo < target:  # never failed yet: bracket from above
        b = min(target, lo + step)
        if fits(b):
            lo = b
            step *= 2
        else:
            hi = b
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo
