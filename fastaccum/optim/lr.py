"""Learning rate for a new batch size: scaling rules and a warm-up that composes with
``torch.optim.lr_scheduler``.

Changing the effective batch from B to B' usually calls for a new learning rate:

- ``"linear"`` (Goyal et al. 2017, SGD): lr' = lr x B'/B, with a warm-up, since the
  scaled rate is too large for the first steps;
- ``"sqrt"`` (Krizhevsky 2014; common for Adam-type optimizers): lr' = lr x sqrt(B'/B),
  which keeps the variance of the update per item constant.

Neither rule holds far beyond the critical batch size; ``opt.stats()["noise_scale"]``
estimates where that is.
"""

from __future__ import annotations

import math

import torch

__all__ = ["scale_lr", "warmup"]

RULES = ("linear", "sqrt")


def scale_lr(base_lr: float, base_batch: int, new_batch: int, rule: str = "linear") -> float:
    """The learning rate for ``new_batch`` given ``base_lr`` tuned at ``base_batch``.

    Batches are in the same unit (samples or tokens) per optimizer step, i.e. the
    effective batch: micro-batch x accumulation steps (x ranks).

    Raises:
        TypeError: an argument that is not a real number (a bool, a string, None).
        ValueError: a non-positive or non-finite argument, or an unknown ``rule``.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    for name, value in (("base_lr", base_lr), ("base_batch", base_batch), ("new_batch", new_batch)):
        if isinstance(value, (bool, str, bytes)) or value is None:
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
        try:
            number = float(value)
        except OverflowError:
            raise ValueError(
                f"{name} must be a positive finite number, got one too large for a float"
            ) from None
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"{name} must be a real number, got {type(value).__name__}: {err}"
            ) from None
        if not (math.isfinite(number) and number > 0):
            raise ValueError(f"{name} must be a positive finite number, got {value}")
    ratio = new_batch / base_batch
    return base_lr * (ratio if rule == "linear" else math.sqrt(ratio))


def warmup(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    *,
    start_factor: float = 0.1,
    after: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> torch.optim.lr_scheduler.LRScheduler:
    """A linear warm-up from ``start_factor x lr`` to ``lr`` over ``warmup_steps``
    optimizer steps, then ``after`` (a scheduler built on the same optimizer), if given.

    Call ``.step()`` on the result once per optimizer step, i.e. when
    ``opt.step()`` returned True for a fastaccum wrapper. It is a plain
    ``LinearLR`` / ``SequentialLR``, so it saves and loads like any scheduler.

    Raises:
        TypeError: ``optimizer`` is not an optimizer, or ``after`` not a scheduler.
        ValueError: ``warmup_steps < 1`` or ``start_factor`` outside (0, 1], or ``after``
            schedules another optimizer.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer (or a fastaccum wrapper), got "
            f"{type(optimizer).__name__}"
        )
    if after is not None and not isinstance(after, torch.optim.lr_scheduler.LRScheduler):
        raise TypeError(
            "after must be a torch.optim.lr_scheduler scheduler built on the same optimizer "
            f"(for example CosineAnnealingLR(opt, T_max)), got {type(after).__name__}"
        )
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
        raise ValueError(f"warmup_steps must be an int >= 1, got {warmup_steps!r}")
    if not (0.0 < start_factor <= 1.0):
        raise ValueError(f"start_factor must be in (0, 1], got {start_factor}")
    if after is not None and after.optimizer is not optimizer:
        raise ValueError("after must be a scheduler of the same optimizer as the warm-up")
    ramp = torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=start_factor, end_factor=1.0, total_iters=warmup_steps
    )
    if after is None:
        return ramp
    return torch.optim.lr_scheduler.SequentialLR(
        optimizer, schedulers=[ramp, after], milestones=[warmup_steps]
    )
