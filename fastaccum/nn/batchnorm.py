"""BatchNorm that stays correct under gradient accumulation.

With K micro-batches of b samples per optimizer step, ``nn.BatchNorm`` feeds its running
statistics K noisy per-micro-batch estimates per window, and normalizes each micro-batch
with statistics from only b samples. :class:`AccumBatchNorm2d` (and the 1d/3d variants)
fixes the first problem in every mode and, in ``mode="renorm"``, the second one too.

Window statistics (every mode). Each micro-batch's per-channel (count, mean, M2) is merged
into the window's with Chan et al.'s pairwise update

    n = n_a + n_b,  delta = mean_b - mean_a,
    mean = mean_a + delta * n_b / n,
    M2 = M2_a + M2_b + delta^2 * n_a * n_b / n

(micro-batches may differ in size; variances are never averaged). The running statistics
are updated once per window, at :func:`end_window`, exactly as one large batch would have:
``running_var`` takes the unbiased ``M2 / (n - 1)``, as ``nn.BatchNorm`` does.
``num_batches_tracked`` counts windows.

``mode="merged"``. Training-time normalization uses the micro-batch's own statistics, as
BatchNorm does.

``mode="renorm"``. Batch Renormalization (Ioffe, 2017) against large-batch statistics.
The micro-batch is normalized with its own mean and standard deviation (mu_B, sigma_B),
then corrected toward reference statistics (mu_ref, sigma_ref):

    r = clip(sigma_B / sigma_ref, 1/rmax, rmax),  d = clip((mu_B - mu_ref) / sigma_ref, -dmax, dmax)
    y = weight * (xhat * r + d) + bias

with r and d treated as constants by autograd. Unclipped, ``xhat * r + d`` equals
``(x - mu_ref) / sigma_ref``. The reference is the Chan merge of the current window so far
(its earlier micro-batches and this one) with the previous completed window, so the first
micro-batch of a window is measured against about one window's worth of samples rather than
against itself. This is used instead of Ioffe's moving averages because those lag by many
steps while the previous window lags by one, and it costs only a per-channel merge. Before
any window was completed, the reference is the window so far (so the very first micro-batch
gets r = 1, d = 0). Variances here are biased (``M2 / n``) and both standard deviations
include ``eps``, which makes a reference equal to the micro-batch give r = 1, d = 0 exactly.

The clip limits follow a schedule measured in completed windows w (``num_batches_tracked``
when running statistics are tracked, so a resumed checkpoint continues its schedule; a
converted, already-trained ``nn.BatchNorm`` is past it):

    t = clamp((w - plain_windows) / warmup_windows, 0, 1)
    rmax(w) = 1 + t * (rmax - 1),   dmax(w) = t * dmax

so the first ``plain_windows`` windows train as plain BatchNorm (r = 1, d = 0) while the
weights move fast and the previous window is a stale reference, and the limits then open
linearly over ``warmup_windows`` windows. See :class:`RenormSchedule` for the defaults.

Activation checkpointing. A forward recomputed during backward (torch.utils.checkpoint) is
not merged into the window again, and in ``renorm`` mode it reuses the r and d of the
original forward, so the recomputed output equals the first one.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

MODES = ("merged", "renorm")


@dataclasses.dataclass(frozen=True)
class RenormSchedule:
    """Clip limits of ``mode="renorm"`` as a function of completed windows (see module docs).

    Defaults: ``rmax=3, dmax=5`` are Ioffe's final limits. ``plain_windows=100,
    warmup_windows=200`` keep the correction off while early training moves the weights a
    lot per window (the previous window's statistics then describe a different network) and
    open it gradually afterwards; the accuracy experiment in ``benchmarks/bn_accuracy.py``
    was run with them.

    Raises:
        ValueError: ``rmax < 1``, ``dmax < 0``, a non-finite limit, or a negative window count.
        TypeError: a window count that is not an int.
    """

    rmax: float = 3.0
    dmax: float = 5.0
    plain_windows: int = 100
    warmup_windows: int = 200

    def __post_init__(self) -> None:
        if not (isinstance(self.rmax, (int, float)) and math.isfinite(self.rmax)):
            raise ValueError(f"rmax must be a finite number >= 1, got {self.rmax!r}")
        if self.rmax < 1:
            raise ValueError(f"rmax must be >= 1 (r is clipped to [1/rmax, rmax]), got {self.rmax}")
        if not (isinstance(self.dmax, (int, float)) and math.isfinite(self.dmax)):
            raise ValueError(f"dmax must be a finite number >= 0, got {self.dmax!r}")
        if self.dmax < 0:
            raise ValueError(f"dmax must be >= 0 (d is clipped to [-dmax, dmax]), got {self.dmax}")
        for name in ("plain_windows", "warmup_windows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")

    def limits(self, windows: int) -> tuple[float, float]:
        """(rmax, dmax) in force after ``windows`` completed windows."""
        if windows < self.plain_windows:
            t = 0.0
        elif self.warmup_windows == 0:
            t = 1.0
        else:
            t = min(1.0, (windows - self.plain_windows) / self.warmup_windows)
        return 1.0 + t * (self.rmax - 1.0), t * self.dmax


RENORM_OPTIONS = tuple(f.name for f in dataclasses.fields(RenormSchedule))


def _renorm_schedule(mode: str, options: dict[str, object]) -> RenormSchedule | None:
    """Validate ``mode`` and its options; the schedule for ``renorm``, else None."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    unknown = sorted(set(options) - set(RENORM_OPTIONS))
    if unknown:
        raise TypeError(
            f"unknown BatchNorm option(s) {unknown}; mode 'renorm' takes {RENORM_OPTIONS}"
        )
    if mode != "renorm":
        if options:
            raise ValueError(
                f"options {sorted(options)} only apply to mode='renorm', got mode={mode!r}"
            )
        return None
    return RenormSchedule(**options)  # type: ignore[arg-type]


def chan_merge(
    n_a: int,
    mean_a: torch.Tensor,
    m2_a: torch.Tensor,
    n_b: int,
    mean_b: torch.Tensor,
    m2_b: torch.Tensor,
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Chan et al.'s merge of two sets' per-channel (count, mean, M2); either may be empty."""
    n = n_a + n_b
    if n_a == 0 or n_b == 0:
        return (n, mean_b, m2_b) if n_a == 0 else (n, mean_a, m2_a)
    delta = mean_b - mean_a
    return n, mean_a + delta * (n_b / n), m2_a + m2_b + delta.square() * (n_a * n_b / n)


class _AccumBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """Shared implementation; use :class:`AccumBatchNorm1d`/``2d``/``3d``."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        mode: str = "merged",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **options: float | int,
    ) -> None:
        """``options`` (``mode="renorm"`` only): ``rmax``, ``dmax``, ``plain_windows``,
        ``warmup_windows`` of :class:`RenormSchedule`. Raises ValueError/TypeError for an
        unknown mode, an unknown or out-of-range option."""
        schedule = _renorm_schedule(mode, options)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self._init_window(mode, schedule)

    def _init_window(self, mode: str, schedule: RenormSchedule | None) -> None:
        self.mode = mode
        self.renorm = schedule
        device = next(self.parameters(), next(self.buffers(), None))
        device = None if device is None else device.device
        # Window and previous-window statistics, per channel in float64 (a few numbers per
        # channel: the merge's mean differences lose digits in fp32 when the mean is large).
        # Not persistent, so state_dict keys stay those of nn.BatchNorm and existing
        # checkpoints load. Sample counts follow from shapes alone, so they live on the host
        # (no device sync).
        self.window_count = 0
        self.prev_count = 0
        for name in ("window_mean", "window_m2", "prev_mean", "prev_m2"):
            self.register_buffer(
                name,
                torch.zeros(self.num_features, dtype=torch.float64, device=device),
                persistent=False,
            )
        # (count, mean, r, d) of this window's training forwards under autograd, so that a
        # checkpoint recomputation reuses its original forward's r and d.
        self._renorm_log: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._windows_done: int | None = None  # host copy of the schedule's window count
        # (r, d) of the last renorm training forward, per channel, for inspection.
        self.renorm_factors: tuple[torch.Tensor, torch.Tensor] | None = None

    def _micro_stats(self, x: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
        """This micro-batch's per-channel (count, mean, M2), in float64."""
        dims = [0, *range(2, x.dim())]
        xf = x.detach().float()
        n_b = xf.numel() // self.num_features
        # Shift by one sample per channel before reducing: with a large mean (say 1e4 with
        # std 1) fp32 deviations from a shifted origin keep their digits.
        shift = xf[0].reshape(self.num_features, -1)[:, 0]
        shape = [1, self.num_features] + [1] * (x.dim() - 2)
        var_b, mean_b = torch.var_mean(xf - shift.view(shape), dim=dims, correction=0)
        return n_b, mean_b.double() + shift.double(), var_b.double() * n_b

    def _merge(self, n_b: int, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        """Chan-merge a micro-batch's statistics into the window."""
        n, mean, m2 = chan_merge(
            self.window_count, self.window_mean, self.window_m2, n_b, mean_b, m2_b
        )
        self.window_mean.copy_(mean)
        self.window_m2.copy_(m2)
        self.window_count = n

    def _windows_completed(self) -> int:
        if self._windows_done is None:
            tracked = self.num_batches_tracked
            # One host read per module, then counted on the host at end_window.
            self._windows_done = int(tracked.item()) if tracked is not None else 0
        return self._windows_done

    def _renorm_factors(
        self, n_b: int, mean_b: torch.Tensor, m2_b: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Clipped r and d of a micro-batch against merge(previous window, window so far)."""
        n, mean_ref, m2_ref = chan_merge(
            self.prev_count,
            self.prev_mean,
            self.prev_m2,
            self.window_count,
            self.window_mean,
            self.window_m2,
        )
        sigma_ref = (m2_ref / n + self.eps).sqrt()
        sigma_b = (m2_b / n_b + self.eps).sqrt()
        rmax, dmax = self.renorm.limits(self._windows_completed())
        r = (sigma_b / sigma_ref).clamp(1.0 / rmax, rmax)
        d = ((mean_b - mean_ref) / sigma_ref).clamp(-dmax, dmax)
        return r, d

    def _recorded_factors(
        self, n_b: int, mean_b: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """r and d of the original forward a recomputation repeats: the logged forward with
        the same count and the nearest mean (equal, unless the recomputation is not bitwise
        deterministic). None when no forward of this size was logged."""
        candidates = [entry for entry in self._renorm_log if entry[0] == n_b]
        if not candidates:
            return None
        if len(candidates) > 1:
            gaps = torch.stack([(entry[1] - mean_b).abs().max() for entry in candidates])
            candidates = [candidates[int(gaps.argmin())]]
        return candidates[0][2], candidates[0][3]

    def end_window(self) -> None:
        """Fold the window's merged statistics into the running statistics (once per window),
        keep them as the previous window for ``renorm``, and start a new window. A no-op when
        the window saw no training batch."""
        n = self.window_count
        if n == 0:
            return
        done = self._windows_completed()  # before num_batches_tracked moves
        with torch.no_grad():
            if self.track_running_stats:
                self.num_batches_tracked.add_(1)
                factor = (
                    1.0 / float(self.num_batches_tracked)
                    if self.momentum is None
                    else self.momentum
                )
                unbiased = self.window_m2 / max(n - 1.0, 1.0)
                self.running_mean.lerp_(self.window_mean.to(self.running_mean.dtype), factor)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
            self.prev_mean.copy_(self.window_mean)
            self.prev_m2.copy_(self.window_m2)
            self.prev_count = n
        self._windows_done = done + 1
        self.discard_window()

    def discard_window(self) -> None:
        """Drop the window's statistics without touching the running statistics or the
        previous window (used when the optimizer discards a window for non-finite
        gradients)."""
        self.window_count = 0
        self.window_mean.zero_()
        self.window_m2.zero_()
        self._renorm_log.clear()

    def _load_from_state_dict(self, *args: object, **kwargs: object) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._windows_done = None  # num_batches_tracked may have changed: read it again

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        weight, bias = self.weight, self.bias
        renorm = self.training and self.renorm is not None
        # -1: not inside a backward pass, so this is not a checkpoint recomputation.
        recomputing = torch._C._current_graph_task_id() != -1
        backward_follows = torch.is_grad_enabled() and not recomputing
        if renorm or (self.training and self.track_running_stats and not recomputing):
            with torch.no_grad():
                n_b, mean_b, m2_b = self._micro_stats(input)
                factors = self._recorded_factors(n_b, mean_b) if recomputing and renorm else None
                if not recomputing:
                    self._merge(n_b, mean_b, m2_b)
                if renorm and factors is None:
                    factors = self._renorm_factors(n_b, mean_b, m2_b)
                    if backward_follows:
                        self._renorm_log.append((n_b, mean_b, *factors))
            if renorm:
                self.renorm_factors = factors
                dtype = (
                    weight.dtype
                    if weight is not None
                    else torch.promote_types(input.dtype, torch.float32)
                )
                r, d = (f.to(dtype) for f in factors)
                # weight * (xhat * r + d) + bias as one batch_norm with a per-channel affine;
                # r and d come from no_grad, so autograd treats them as constants.
                weight, bias = (r, d) if weight is None else (weight * r, bias + weight * d)
        use_batch_stats = self.training or not self.track_running_stats
        return F.batch_norm(
            input,
            None if use_batch_stats else self.running_mean,
            None if use_batch_stats else self.running_var,
            weight,
            bias,
            use_batch_stats,
            0.0,
            self.eps,
        )

    def extra_repr(self) -> str:
        extra = f", mode={self.mode!r}"
        if self.renorm is not None:
            extra += "".join(f", {k}={getattr(self.renorm, k)}" for k in RENORM_OPTIONS)
        return super().extra_repr() + extra


class AccumBatchNorm1d(_AccumBatchNorm, torch.nn.BatchNorm1d):
    """``nn.BatchNorm1d`` that stays correct under accumulation (see module docs)."""


class AccumBatchNorm2d(_AccumBatchNorm, torch.nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that stays correct under accumulation (see module docs)."""


class AccumBatchNorm3d(_AccumBatchNorm, torch.nn.BatchNorm3d):
    """``nn.BatchNorm3d`` that stays correct under accumulation (see module docs)."""


_CONVERSIONS = {
    torch.nn.BatchNorm1d: AccumBatchNorm1d,
    torch.nn.BatchNorm2d: AccumBatchNorm2d,
    torch.nn.BatchNorm3d: AccumBatchNorm3d,
}


def convert_batchnorm(
    model: torch.nn.Module, mode: str = "merged", **options: float | int
) -> torch.nn.Module:
    """Switch every ``nn.BatchNorm1d/2d/3d`` of ``model`` (exact classes) to its
    accumulation-aware counterpart, in place, and return ``model``.

    Weights, buffers and ``state_dict`` keys are kept (the modules are the same objects),
    so existing checkpoints load and eval outputs are unchanged right after conversion.
    ``options`` go to ``mode="renorm"``: ``rmax``, ``dmax``, ``plain_windows``,
    ``warmup_windows`` (see :class:`RenormSchedule`).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or an unknown option.
        ValueError: unknown ``mode``, options given to a mode without any, or an
            out-of-range option (``rmax < 1``, ``dmax < 0``, a negative window count).
        Nothing is converted when it raises.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    schedule = _renorm_schedule(mode, options)
    for module in model.modules():
        target = _CONVERSIONS.get(type(module))
        if target is not None:
            module.__class__ = target
            module._init_window(mode, schedule)
    return model


def end_window(model: torch.nn.Module, *, discard: bool = False) -> None:
    """Close the accumulation window of every accumulation-aware BatchNorm in ``model``:
    fold its merged statistics into the running statistics, or drop them (``discard``).

    ``fastaccum.wrap(opt, K, model=model)`` calls it at each window boundary (discarding
    windows skipped for non-finite gradients); call it yourself without the wrapper.
    """
    for module in model.modules():
        if isinstance(module, _AccumBatchNorm):
            if discard:
                module.discard_window()
            else:
                module.end_window()
