"""BatchNorm that stays correct under gradient accumulation.

With K micro-batches of b samples per optimizer step, ``nn.BatchNorm`` feeds its running
statistics K noisy per-micro-batch estimates per window, and normalizes each micro-batch
with statistics from only b samples. :class:`AccumBatchNorm2d` (and the 1d/3d variants)
fixes the first problem in every mode; ``mode="renorm"`` and ``mode="window"`` also correct
the training-time normalization toward large-batch statistics.

Window statistics (every mode). Each micro-batch's per-channel (count, mean, M2) is merged
into the window's with Chan et al.'s pairwise update

    n = n_a + n_b,  delta = mean_b - mean_a,
    mean = mean_a + delta * n_b / n,
    M2 = M2_a + M2_b + delta^2 * n_a * n_b / n

(micro-batches may differ in size; variances are never averaged). The running statistics
are updated once per window, at :func:`end_window`, exactly as one large batch would have:
``running_var`` takes the unbiased ``M2 / (n - 1)``, as ``nn.BatchNorm`` does.
``num_batches_tracked`` counts windows. Each micro-batch's statistics come in float64 (a
float32 mean of 1e4 would be off by up to 5e-4, an error the merge's mean differences
carry into M2). Under DDP or FSDP2 each rank's window is its own until the optimizer
wrapper's once-per-window exchange merges it: the window lives in plain float64 tensor
attributes, not buffers, which DDP would overwrite with rank 0's at a forward.

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

``mode="window"``. Normalization against the same reference in both directions, in the
spirit of moving-average BatchNorm (MABN, Yan et al., 2020), with the previous window and
the window so far as the averaging horizon. The forward is
``y = weight * (x - mu_ref) / sqrt(var_ref + eps) + bias``. The backward is BatchNorm's,

    dL/dx = (g - mean(g) - xhat * mean(g * xhat)) / sqrt(var_ref + eps),   g = dL/dxhat,

with the two means taken over the samples of the previous window's backward passes and of
this window's so far (this one included), rather than over the b samples of the micro-batch.
This is BatchNorm's gradient for one batch made of the reference's samples, except that the
other micro-batches' gradients and statistics are up to one window old. Where a channel has
only two values per micro-batch (BatchNorm1d at micro-batch 2), BatchNorm's own backward is
degenerate: xhat is +-1 and the gradient to x nearly vanishes; ``renorm``'s is the same
scaled by r, while ``window`` does not use the micro-batch's statistics at all. Its gradient
means mix micro-batches on the assumption that every sample's gradient has the same scale:
true for equal micro-batch sizes or summed losses; approximate when per-micro-batch mean
losses come from micro-batches of different sizes, and for one window after a GradScaler
scale change. The first micro-batch of training (no reference yet) gets plain
BatchNorm.

Activation checkpointing. A forward recomputed during backward (torch.utils.checkpoint,
reentrant or not) is not merged into the window again, and in ``renorm`` and ``window`` modes
it reuses the r and d (the statistics) of the original forward, so the recomputed output
equals the first one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Protocol, cast

import torch
import torch.nn.functional as F

from fastaccum.nn._sink import ModuleT
from fastaccum.ops import batchnorm as bn_ops

MODES = ("merged", "renorm", "window")
_WINDOW_COUNTS = ("window_count", "prev_count", "window_grad_count", "prev_grad_count")
_WINDOW_TENSORS = ("window_mean", "window_m2", "prev_mean", "prev_m2", "window_grad", "prev_grad")
_Pair = tuple[torch.Tensor, torch.Tensor]


def _kernel_input(x: torch.Tensor) -> bool:
    """Whether the fused BatchNorm kernels of :mod:`fastaccum.ops.batchnorm` take ``x``:
    float32/bfloat16/float16 with at least one element (float64 goes through torch ops)."""
    return x.dtype in bn_ops.X_DTYPES and x.numel() > 0


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


def _renorm_schedule(mode: str, options: Mapping[str, object]) -> RenormSchedule | None:
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


def _check_window_state(state: object, num_features: int, where: str = "") -> None:
    """Raise ValueError unless ``state`` is a window state for ``num_features`` channels."""
    keys = {"num_features", "windows_done", *_WINDOW_COUNTS, *_WINDOW_TENSORS}
    if not isinstance(state, dict) or set(state) != keys:
        got = list(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"not an AccumBatchNorm window state{where}: expected the keys {sorted(keys)}, "
            f"got {got}"
        )
    if state["num_features"] != num_features:
        raise ValueError(
            f"window state{where} is for {state['num_features']} channels, but the module "
            f"has {num_features}"
        )
    for name in _WINDOW_TENSORS:
        shape = (num_features,) if name.endswith(("mean", "m2")) else (2, num_features)
        value = state[name]
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
            raise ValueError(f"window state{where}: {name} should be a tensor of shape {shape}")
    for name in ("windows_done", *_WINDOW_COUNTS):
        if not isinstance(state[name], int) or state[name] < 0:
            raise ValueError(f"window state{where}: {name} should be an int >= 0")


class _AccumBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """Shared implementation; use :class:`AccumBatchNorm1d`/``2d``/``3d`` (or
    :class:`AccumBatchNormNd`, what a converted ``nn.SyncBatchNorm`` becomes)."""

    # Per-channel window statistics and gradient sums, float64 (see _init_window).
    window_mean: torch.Tensor
    window_m2: torch.Tensor
    prev_mean: torch.Tensor
    prev_m2: torch.Tensor
    window_grad: torch.Tensor
    prev_grad: torch.Tensor

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
        """``mode``: ``"merged"``, ``"renorm"`` or ``"window"`` (see module docs).
        ``options`` (``mode="renorm"`` only): ``rmax``, ``dmax``, ``plain_windows``,
        ``warmup_windows`` of :class:`RenormSchedule`. Raises ValueError/TypeError for an
        unknown mode, an unknown or out-of-range option."""
        schedule = _renorm_schedule(mode, options)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self._init_window(mode, schedule)

    def _init_window(self, mode: str, schedule: RenormSchedule | None) -> None:
        self.mode = mode
        self.renorm = schedule
        first = next(self.parameters(), next(self.buffers(), None))
        device = None if first is None else first.device
        # Window and previous-window statistics, per channel in float64 (a few numbers per
        # channel: the merge's mean differences lose digits in fp32 when the mean is large).
        # Sample counts follow from shapes alone, so they live on the host (no device sync).
        # mode="window" adds per-channel sums of g = dL/dxhat and of g * xhat over the
        # window's backward passes so far and over the previous window's, with their
        # sample counts.
        #
        # Plain tensor attributes, not buffers: these are each rank's own until the
        # window's exchange merges them, and DDP (broadcast_buffers=True, its default)
        # copies rank 0's buffers over every rank's at each forward after a synced
        # backward. Out of state_dict too, so its keys stay those of nn.BatchNorm (the
        # optimizer wrapper saves them). _apply moves them with the module.
        self.window_count = 0
        self.prev_count = 0
        self.window_grad_count = 0
        self.prev_grad_count = 0
        for name in _WINDOW_TENSORS:
            shape = (2, self.num_features) if name.endswith("grad") else (self.num_features,)
            self._buffers.pop(name, None)  # a module pickled when these were buffers
            setattr(self, name, torch.zeros(shape, dtype=torch.float64, device=device))
        # (count, mean, what the forward used) of this window's training forwards, so that a
        # checkpoint recomputation reuses its original forward's r and d (or statistics).
        self._forward_log: list[tuple[int, torch.Tensor, _Pair]] = []
        self._windows_done: int | None = None  # host copy of the schedule's window count
        # (r, d) of the last renorm training forward, per channel, for inspection.
        self.renorm_factors: tuple[torch.Tensor, torch.Tensor] | None = None

    def _apply(
        self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True
    ) -> _AccumBatchNorm:
        """``nn.Module._apply`` (``to``, ``cuda``, ``half``, ``to_empty``, ...), then the
        window tensors follow the module to ``fn``'s device. They stay float64: a cast such
        as ``.half()`` applies to the module's own tensors, not to the statistics that
        merge micro-batches. Values are kept (a window on the meta device starts empty)."""
        super()._apply(fn, recurse)
        for name in _WINDOW_TENSORS:
            window = getattr(self, name)
            self._window_to(fn(window).device, (name,))
        return self

    def _window_to(self, device: torch.device, names: tuple[str, ...] = _WINDOW_TENSORS) -> None:
        """Move the window tensors to ``device``, keeping their values (zeros from the meta
        device). The forward calls it too: FSDP2's ``fully_shard`` moves a module's
        parameters and buffers by assigning their ``.data``, which plain attributes do not
        see, so the first forward on the new device brings them along."""
        for name in names:
            window = getattr(self, name)
            if window.device.type == "meta":
                setattr(self, name, torch.zeros_like(window, device=device))
            else:
                setattr(self, name, window.to(device))

    def __setstate__(self, state: dict[str, object]) -> None:
        super().__setstate__(state)
        # A module pickled when the window tensors were buffers: make them attributes.
        for name in _WINDOW_TENSORS:
            if name in self._buffers:
                setattr(self, name, self._buffers.pop(name))

    def _micro_stats(self, x: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
        """This micro-batch's per-channel (count, mean, M2), in float64."""
        n_b = x.numel() // self.num_features
        if _kernel_input(x):  # one read of x, no temporary the size of x
            # float64: a float32 mean of 1e4 is off by up to 5e-4, and _merge's mean
            # differences between micro-batches would carry that error into the window's M2.
            mean_b, m2_b = bn_ops.batch_norm_stats(x.detach(), dtype=torch.float64)
            return n_b, mean_b, m2_b
        dims = [0, *range(2, x.dim())]
        xf = x.detach().to(torch.promote_types(x.dtype, torch.float32))
        # Shift by one sample per channel before reducing: with a large mean (say 1e4 with
        # std 1) fp32 deviations from a shifted origin keep their digits. The kernel does
        # the same.
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

    def _reference(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and biased variance of merge(previous window, window so far)."""
        n, mean_ref, m2_ref = chan_merge(
            self.prev_count,
            self.prev_mean,
            self.prev_m2,
            self.window_count,
            self.window_mean,
            self.window_m2,
        )
        return mean_ref, m2_ref / n

    def _window_statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """mode="window": the reference mean and 1/sqrt(var + eps) the forward normalizes with."""
        mean_ref, var_ref = self._reference()
        return mean_ref, (var_ref + self.eps).rsqrt()

    def _gradient_means(self, n_b: int, sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mode="window": add a backward pass's per-channel sums of (g, g * xhat) to the
        window and return their means over the previous window and the window so far."""
        self.window_grad.add_(sums)
        self.window_grad_count += n_b
        total = (self.prev_grad + self.window_grad) / (
            self.prev_grad_count + self.window_grad_count
        )
        return total[0], total[1]

    def _renorm_factors(
        self, n_b: int, mean_b: torch.Tensor, m2_b: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Clipped r and d of a micro-batch against merge(previous window, window so far)."""
        mean_ref, var_ref = self._reference()
        sigma_ref = (var_ref + self.eps).sqrt()
        sigma_b = (m2_b / n_b + self.eps).sqrt()
        schedule = self.renorm
        assert schedule is not None  # mode="renorm" has one
        rmax, dmax = schedule.limits(self._windows_completed())
        r = (sigma_b / sigma_ref).clamp(1.0 / rmax, rmax)
        d = ((mean_b - mean_ref) / sigma_ref).clamp(-dmax, dmax)
        return r, d

    def _recorded(self, n_b: int, mean_b: torch.Tensor) -> _Pair | None:
        """What the original forward that a recomputation repeats used: the logged forward
        with the same count and the nearest mean (equal, unless the recomputation is not
        bitwise deterministic). None when no forward of this size was logged."""
        candidates = [entry for entry in self._forward_log if entry[0] == n_b]
        if not candidates:
            return None
        if len(candidates) > 1:
            gaps = torch.stack([(entry[1] - mean_b).abs().max() for entry in candidates])
            candidates = [candidates[int(gaps.argmin())]]
        return candidates[0][2]

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
                tracked = self.num_batches_tracked
                assert tracked is not None  # registered with track_running_stats
                tracked.add_(1)
                factor = 1.0 / float(tracked) if self.momentum is None else self.momentum
                unbiased = self.window_m2 / max(n - 1.0, 1.0)
                running_mean, running_var = self.running_mean, self.running_var
                assert running_mean is not None
                running_mean.lerp_(self.window_mean.to(running_mean.dtype), factor)
                assert running_var is not None
                running_var.lerp_(unbiased.to(running_var.dtype), factor)
            self.prev_mean.copy_(self.window_mean)
            self.prev_m2.copy_(self.window_m2)
            self.prev_count = n
            self.prev_grad.copy_(self.window_grad)
            self.prev_grad_count = self.window_grad_count
        self._windows_done = done + 1
        self.discard_window()

    def _window_in_progress(self) -> bool:
        """Whether a window has begun: merged statistics, gradient sums or recorded
        forwards since the last boundary."""
        return self.window_count > 0 or self.window_grad_count > 0 or bool(self._forward_log)

    def discard_window(self) -> None:
        """Drop the window's statistics without touching the running statistics or the
        previous window (used when the optimizer discards a window for non-finite
        gradients)."""
        self.window_count = 0
        self.window_mean.zero_()
        self.window_m2.zero_()
        self.window_grad_count = 0
        self.window_grad.zero_()
        self._forward_log.clear()

    def _load_from_state_dict(self, *args: object, **kwargs: object) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        if self.num_batches_tracked is not None:
            self._windows_done = None  # num_batches_tracked may have changed: read it again

    def window_state_dict(self) -> dict[str, object]:
        """The accumulation-window state that ``state_dict()`` leaves out (it keeps
        ``nn.BatchNorm``'s keys): the window so far and the previous window's statistics
        and gradient sums, and the completed-window count. Copies, in float64, on the
        module's device. ``fastaccum.wrap(..., model=model).state_dict()`` includes it."""
        state: dict[str, object] = {
            "num_features": self.num_features,
            "windows_done": self._windows_completed(),
        }
        for name in _WINDOW_COUNTS:
            state[name] = getattr(self, name)
        for name in _WINDOW_TENSORS:
            state[name] = getattr(self, name).detach().clone()
        return state

    def load_window_state_dict(self, state: dict[str, object]) -> None:
        """Restore a :meth:`window_state_dict`, so a run checkpointed mid-window folds the
        same window into the running statistics (and normalizes against the same reference
        in ``renorm`` and ``window`` modes) as if it had never stopped.

        Raises:
            ValueError: not a window state, or one of another channel count. Nothing is
                changed then.
        """
        _check_window_state(state, self.num_features)
        with torch.no_grad():
            for name in _WINDOW_TENSORS:
                getattr(self, name).copy_(state[name])
        for name in _WINDOW_COUNTS:
            setattr(self, name, int(cast(int, state[name])))  # checked above
        self._windows_done = int(cast(int, state["windows_done"]))
        self._forward_log.clear()  # forwards before the checkpoint are never recomputed

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        # Both None or both tensors (affine); torch types them as always Parameters.
        weight: torch.Tensor | None = self.weight
        bias: torch.Tensor | None = self.bias
        corrected = self.training and self.mode != "merged"
        # -1: not inside a backward pass, so this is not a checkpoint recomputation.
        recomputing = torch._C._current_graph_task_id() != -1
        # Into the window: for the running statistics, and as the corrected modes' reference.
        merge = not recomputing and (corrected or (self.training and self.track_running_stats))
        use_batch_stats = self.training or not self.track_running_stats
        # Batch statistics: the kernels normalize with the ones read below instead of
        # reading x again (F.batch_norm keeps nn.BatchNorm's error for one value per
        # channel, and takes float64).
        fused = use_batch_stats and _kernel_input(input) and input.numel() > self.num_features
        if not (corrected or merge or fused):
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
        if (corrected or merge) and self.window_mean.device != input.device:
            self._window_to(input.device)
        with torch.no_grad():
            n_b, mean_b, m2_b = self._micro_stats(input)
            used = self._recorded(n_b, mean_b) if recomputing and corrected else None
            if merge:
                self._merge(n_b, mean_b, m2_b)
            if corrected and used is None:
                if self.mode == "renorm":
                    used = self._renorm_factors(n_b, mean_b, m2_b)
                else:
                    used = self._window_statistics()
                if not recomputing:
                    self._forward_log.append((n_b, mean_b, used))
        # From here on, used is not None when corrected (recorded or computed above).
        if corrected and self.mode == "window":
            return _WindowNorm.apply(input, weight, bias, *cast(_Pair, used), self)
        if corrected:
            self.renorm_factors = used
        if fused:
            invstd = (m2_b / n_b + self.eps).rsqrt()
            r, d = (None, None) if not corrected else (f.float() for f in cast(_Pair, used))
            return bn_ops.train_unchecked(input, mean_b.float(), invstd.float(), weight, bias, r, d)
        if corrected:
            dtype = (
                weight.dtype
                if weight is not None
                else torch.promote_types(input.dtype, torch.float32)
            )
            r, d = (f.to(dtype) for f in cast(_Pair, used))
            # weight * (xhat * r + d) + bias as one batch_norm with a per-channel affine;
            # r and d come from no_grad, so autograd treats them as constants. A weight
            # comes with a bias.
            if weight is None:
                weight, bias = r, d
            else:
                weight, bias = weight * r, cast(torch.Tensor, bias) + weight * d
        return F.batch_norm(input, None, None, weight, bias, True, 0.0, self.eps)

    def extra_repr(self) -> str:
        extra = f", mode={self.mode!r}"
        if self.renorm is not None:
            extra += "".join(f", {k}={getattr(self.renorm, k)}" for k in RENORM_OPTIONS)
        return super().extra_repr() + extra


class _WindowNormCtx(Protocol):
    """What :class:`_WindowNorm` uses of its autograd context. torch types the context as
    ``FunctionCtx``, which declares neither ``saved_tensors`` nor ``needs_input_grad`` and
    whose ``save_for_backward`` is typed tensors-only, though it takes None as well."""

    module: _AccumBatchNorm

    def save_for_backward(self, *tensors: torch.Tensor | None) -> None: ...

    @property
    def saved_tensors(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """(x, weight or None, mean, invstd) as given to save_for_backward."""
        ...

    @property
    def needs_input_grad(self) -> tuple[bool, ...]: ...


class _WindowNorm(torch.autograd.Function):
    """mode="window": y = weight * xhat + bias with xhat = (x - mean) * invstd from the
    reference statistics, and BatchNorm's backward

        dL/dx = invstd * (g - mean(g) - xhat * mean(g * xhat)),   g = dL/dxhat

    whose two means are taken over the previous window's and this window's backward passes
    so far (this one included) instead of over the micro-batch alone.

    The float32/bfloat16/float16 path runs the fused kernels of
    :mod:`fastaccum.ops.batchnorm`: one pass for the forward, and in the backward one for
    the gradient sums and one for the input gradient, with no temporary the size of x."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: _WindowNormCtx,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        mean: torch.Tensor,
        invstd: torch.Tensor,
        module: _AccumBatchNorm,
    ) -> torch.Tensor:
        compute = torch.promote_types(x.dtype, torch.float32)
        mean_c, invstd_c = mean.to(compute), invstd.to(compute)
        ctx.save_for_backward(x, weight, mean_c, invstd_c)
        ctx.module = module
        if _kernel_input(x):
            return bn_ops.apply_unchecked(x, mean_c, invstd_c, weight, bias)
        shape = [1, -1] + [1] * (x.dim() - 2)
        xhat = (x.to(compute) - mean_c.view(shape)) * invstd_c.view(shape)
        if weight is None:
            y = xhat
        else:  # a weight comes with a bias (affine)
            y = xhat * weight.view(shape) + cast(torch.Tensor, bias).view(shape)
        # Not y.to(x.dtype) when that is y itself: see batch_norm_apply_ref.
        return y if y.dtype == x.dtype else y.to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: _WindowNormCtx, grad_y: torch.Tensor) -> tuple:
        x, weight, mean, invstd = ctx.saved_tensors
        shape = [1, -1] + [1] * (x.dim() - 2)
        if _kernel_input(x):
            x = bn_ops.in_kernel_layout(x)
            grad_y = bn_ops.like_layout(grad_y, x)
            grad_bias, grad_weight = bn_ops.backward_reduce_unchecked(grad_y, x, mean, invstd)
        else:
            dims = [0, *range(2, x.dim())]
            gy = grad_y.to(mean.dtype)
            grad_bias = gy.sum(dims)
            grad_weight = (gy * (x - mean.view(shape)) * invstd.view(shape)).sum(dims)
        w = torch.ones_like(mean) if weight is None else weight.to(mean.dtype)
        sums = torch.stack([grad_bias * w, grad_weight * w]).double()  # of g and g * xhat
        with torch.no_grad():  # recorded even when x needs no gradient
            g_mean, gx_mean = ctx.module._gradient_means(x.numel() // x.shape[1], sums)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = _window_input_grad(grad_y, x, weight, w, mean, invstd, g_mean, gx_mean)
        if weight is None:
            return grad_x, None, None, None, None, None
        return grad_x, grad_weight.to(weight.dtype), grad_bias.to(weight.dtype), None, None, None


def _window_input_grad(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    w: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    g_mean: torch.Tensor,
    gx_mean: torch.Tensor,
) -> torch.Tensor:
    """``invstd * (w * grad_y - g_mean - xhat * gx_mean)`` in x's dtype, ``w`` the weight (or
    ones), the means float64 per channel, the rest in the compute dtype.

    The backward-apply kernel computes ``weight * invstd * (dy - s1 - xhat * s2)``, so it
    takes ``s1 = g_mean / w``, ``s2 = gx_mean / w``. A channel whose weight is exactly 0 (a
    zero-initialised or pruned gamma) cannot be written that way, while its input gradient
    need not be 0 (the previous window's gradient means); checking for one reads the weight
    on the host, free on the CPU but a device sync elsewhere (and a graph break under
    torch.compile). So the kernel runs on the CPU when no weight is 0, and everywhere
    without weight; otherwise three in-place torch ops on one temporary compute the same."""
    host_check = x.device.type == "cpu" and not torch.compiler.is_compiling()
    kernel = _kernel_input(x) and (weight is None or (host_check and bool((w != 0).all())))
    if kernel:
        sums = ((g_mean / w).float(), (gx_mean / w).float())
        return bn_ops.backward_apply_unchecked(grad_y, x, mean, invstd, w, sums)
    shape = [1, -1] + [1] * (x.dim() - 2)
    g_mean, gx_mean = g_mean.to(mean.dtype), gx_mean.to(mean.dtype)
    grad_x = x - mean.view(shape)  # compute dtype: the only temporary the size of x
    grad_x.mul_((-invstd * invstd * gx_mean).view(shape))
    grad_x.addcmul_(grad_y, (invstd * w).view(shape))
    grad_x.sub_((invstd * g_mean).view(shape))
    return grad_x if grad_x.dtype == x.dtype else grad_x.to(x.dtype)


class AccumBatchNorm1d(_AccumBatchNorm, torch.nn.BatchNorm1d):
    """``nn.BatchNorm1d`` that stays correct under accumulation (see module docs)."""


class AccumBatchNorm2d(_AccumBatchNorm, torch.nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that stays correct under accumulation (see module docs)."""


class AccumBatchNorm3d(_AccumBatchNorm, torch.nn.BatchNorm3d):
    """``nn.BatchNorm3d`` that stays correct under accumulation (see module docs)."""


class AccumBatchNormNd(_AccumBatchNorm):
    """Accumulation-aware BatchNorm for ``(N, C)`` or ``(N, C, *spatial)`` inputs of any
    rank, as ``nn.SyncBatchNorm`` takes them: what :func:`convert_batchnorm` turns an
    ``nn.SyncBatchNorm`` into (see there)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")


_CONVERSIONS: dict[type[torch.nn.Module], type[_AccumBatchNorm]] = {
    torch.nn.BatchNorm1d: AccumBatchNorm1d,
    torch.nn.BatchNorm2d: AccumBatchNorm2d,
    torch.nn.BatchNorm3d: AccumBatchNorm3d,
    torch.nn.SyncBatchNorm: AccumBatchNormNd,
}


def _describe_mode(mode: str, schedule: RenormSchedule | None) -> str:
    """``mode='window'``, or with the renorm options: ``mode='renorm' (rmax=3.0, ...)``."""
    if schedule is None:
        return f"mode={mode!r}"
    options = ", ".join(f"{k}={getattr(schedule, k)}" for k in RENORM_OPTIONS)
    return f"mode={mode!r} ({options})"


def convert_batchnorm(model: ModuleT, mode: str = "merged", **options: float | int) -> ModuleT:
    """Switch every ``nn.BatchNorm1d/2d/3d`` and ``nn.SyncBatchNorm`` of ``model`` (exact
    classes) to its accumulation-aware counterpart, in place, and return ``model``.

    Weights, buffers and ``state_dict`` keys are kept (the modules are the same objects),
    so existing checkpoints load and eval outputs are unchanged right after conversion.
    ``mode`` is ``"merged"``, ``"renorm"`` or ``"window"`` (see the module docs; ``window``
    is the one that matched true large-batch accuracy at micro-batch 2 in
    ``benchmarks/bn_accuracy.py``). ``options`` go to ``mode="renorm"``: ``rmax``,
    ``dmax``, ``plain_windows``, ``warmup_windows`` (see :class:`RenormSchedule`).

    ``nn.SyncBatchNorm`` becomes :class:`AccumBatchNormNd`. It no longer all-reduces
    statistics at every forward: under ``fastaccum.wrap(..., model=ddp)`` its window
    statistics are merged across the ranks at each window boundary, as every
    AccumBatchNorm's are, so the running statistics are those of all ranks' window samples
    together; training-time normalization is the mode's (``merged``: the micro-batch's own
    statistics, not the ranks' pooled ones). Its ``process_group`` is dropped.

    Modules that are accumulation-aware already (converted before) take ``mode`` and
    ``options`` at a window boundary: calling it again right after the optimizer step
    that closed a window (or after :func:`end_window`) switches the mode, keeping the
    previous window's statistics.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or an unknown option.
        ValueError: unknown ``mode``, options given to a mode without any, an out-of-range
            option (``rmax < 1``, ``dmax < 0``, a negative window count), or an
            accumulation-aware module of another mode (or other renorm options) in the
            middle of a window. Nothing is converted when it raises.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    schedule = _renorm_schedule(mode, options)
    fresh: list[tuple[torch.nn.Module, type[_AccumBatchNorm]]] = []
    switched: list[_AccumBatchNorm] = []
    for name, module in model.named_modules():
        target = _CONVERSIONS.get(type(module))
        if target is not None:
            fresh.append((module, target))
        elif isinstance(module, _AccumBatchNorm):
            if (module.mode, module.renorm) == (mode, schedule):
                continue
            if module._window_in_progress():
                raise ValueError(
                    f"cannot switch AccumBatchNorm {name or type(model).__name__!r} from "
                    f"{_describe_mode(module.mode, module.renorm)} to "
                    f"{_describe_mode(mode, schedule)} in the middle of a window "
                    f"({module.window_count} samples so far): the window's statistics and "
                    "its recorded forwards belong to the old mode. Convert at a window "
                    "boundary: right after the optimizer step that closes a window, or after "
                    "fastaccum.nn.end_window(model)"
                )
            switched.append(module)
    for module, target in fresh:
        module.__dict__.pop("process_group", None)  # nn.SyncBatchNorm's; unused here
        module.__class__ = target
        cast(_AccumBatchNorm, module)._init_window(mode, schedule)
    for module in switched:
        module.mode = mode
        module.renorm = schedule
        module.renorm_factors = None
    return model


def accum_batchnorms(model: torch.nn.Module) -> list[_AccumBatchNorm]:
    """The accumulation-aware BatchNorm modules of ``model``, in ``model.modules()`` order.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return [m for m in model.modules() if isinstance(m, _AccumBatchNorm)]


def window_state_dict(model: torch.nn.Module) -> list[dict[str, object]]:
    """Every AccumBatchNorm's :meth:`~_AccumBatchNorm.window_state_dict`, in module order
    (what a mid-window checkpoint needs beyond ``model.state_dict()``; the wrapper's
    ``state_dict()`` holds it when it was given ``model=``)."""
    return [m.window_state_dict() for m in accum_batchnorms(model)]


def load_window_state_dict(model: torch.nn.Module, states: list[dict[str, object]]) -> None:
    """Restore :func:`window_state_dict` into the same architecture. Modules are matched by
    position, so a model saved under ``torch.compile`` or DDP loads into a plain one.

    Raises:
        ValueError: another number of AccumBatchNorm modules, another channel count, or not
            a window state. Nothing is changed then.
    """
    for module, state in zip(check_window_states(model, states), states, strict=True):
        module.load_window_state_dict(state)


def check_window_states(model: torch.nn.Module, states: object) -> list[_AccumBatchNorm]:
    """Raise ValueError unless :func:`load_window_state_dict` would accept ``states``;
    return the modules they go to."""
    modules = accum_batchnorms(model)
    if not isinstance(states, (list, tuple)) or len(states) != len(modules):
        got = len(states) if isinstance(states, (list, tuple)) else type(states).__name__
        raise ValueError(
            f"BatchNorm window states for {got} module(s), but the model has "
            f"{len(modules)} AccumBatchNorm module(s)"
        )
    for i, (module, state) in enumerate(zip(modules, states, strict=True)):
        _check_window_state(state, module.num_features, f" of AccumBatchNorm #{i}")
    return modules


def end_window(model: torch.nn.Module, *, discard: bool = False) -> None:
    """Close the accumulation window of every accumulation-aware BatchNorm in ``model``:
    fold its merged statistics into the running statistics, or drop them (``discard``).

    ``fastaccum.wrap(opt, K, model=model)`` calls it at each window boundary (discarding
    windows skipped for non-finite gradients); call it yourself without the wrapper.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
    """
    for module in accum_batchnorms(model):
        if discard:
            module.discard_window()
        else:
            module.end_window()
