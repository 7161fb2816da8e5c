"""BatchNorm that stays correct under gradient accumulation.

With K micro-batches of b samples per optimizer step, ``nn.BatchNorm`` feeds its running
statistics K noisy per-micro-batch estimates per window. :class:`AccumBatchNorm2d` (and the
1d/3d variants) in ``mode="merged"`` instead merges each micro-batch's per-channel
(count, mean, M2) into window statistics with Chan et al.'s pairwise update

    n = n_a + n_b,  delta = mean_b - mean_a,
    mean = mean_a + delta * n_b / n,
    M2 = M2_a + M2_b + delta^2 * n_a * n_b / n

(micro-batches may differ in size; variances are never averaged), and updates the running
statistics once per window, at :func:`end_window`, exactly as one large batch would have:
``running_var`` takes the unbiased ``M2 / (n - 1)``, as ``nn.BatchNorm`` does.

Training-time normalization still uses the micro-batch's own statistics (as BatchNorm
does). Forward passes recomputed by activation checkpointing during backward are not
counted again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MODES = ("merged",)


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
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self._init_window(mode)

    def _init_window(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        device = self.running_mean.device if self.running_mean is not None else None
        # Window statistics, per channel in float64 (a few numbers per channel: the merge's
        # mean differences lose digits in fp32 when the mean is large). Not persistent, so
        # state_dict keys stay those of nn.BatchNorm and existing checkpoints load. The
        # sample count follows from shapes alone, so it lives on the host (no device sync).
        self.window_count = 0
        for name in ("window_mean", "window_m2"):
            self.register_buffer(
                name,
                torch.zeros(self.num_features, dtype=torch.float64, device=device),
                persistent=False,
            )

    def _merge(self, x: torch.Tensor) -> None:
        """Chan-merge this micro-batch's per-channel (count, mean, M2) into the window."""
        dims = [0, *range(2, x.dim())]
        xf = x.detach().float()
        n_b = xf.numel() // self.num_features
        # Shift by one sample per channel before reducing: with a large mean (say 1e4 with
        # std 1) fp32 deviations from a shifted origin keep their digits.
        shift = xf[0].reshape(self.num_features, -1)[:, 0]
        shape = [1, self.num_features] + [1] * (x.dim() - 2)
        var_b, mean_b = torch.var_mean(xf - shift.view(shape), dim=dims, correction=0)
        mean_b = mean_b.double() + shift.double()
        m2_b = var_b.double() * n_b
        n_a = self.window_count
        n = n_a + n_b
        delta = mean_b - self.window_mean
        self.window_mean.add_(delta * (n_b / n))
        self.window_m2.add_(m2_b + delta.square() * (n_a * n_b / n))
        self.window_count = n

    def end_window(self) -> None:
        """Fold the window's merged statistics into the running statistics (once per window)
        and start a new window. A no-op when the window saw no training batch."""
        n = self.window_count
        if n == 0 or not self.track_running_stats:
            return
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            factor = (
                1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            )
            unbiased = self.window_m2 / max(n - 1.0, 1.0)
            self.running_mean.lerp_(self.window_mean.to(self.running_mean.dtype), factor)
            self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        self.discard_window()

    def discard_window(self) -> None:
        """Drop the window's statistics without touching the running statistics (used when
        the optimizer discards a window for non-finite gradients)."""
        self.window_count = 0
        self.window_mean.zero_()
        self.window_m2.zero_()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if self.training and self.track_running_stats and torch._C._current_graph_task_id() == -1:
            # -1: not inside a backward pass, so this is not a checkpoint recomputation.
            with torch.no_grad():
                self._merge(input)
        use_batch_stats = self.training or not self.track_running_stats
        return F.batch_norm(
            input,
            None if use_batch_stats else self.running_mean,
            None if use_batch_stats else self.running_var,
            self.weight,
            self.bias,
            use_batch_stats,
            0.0,
            self.eps,
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", mode={self.mode!r}"


class AccumBatchNorm1d(_AccumBatchNorm, torch.nn.BatchNorm1d):
    """``nn.BatchNorm1d`` with window-merged running statistics (see module docs)."""


class AccumBatchNorm2d(_AccumBatchNorm, torch.nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with window-merged running statistics (see module docs)."""


class AccumBatchNorm3d(_AccumBatchNorm, torch.nn.BatchNorm3d):
    """``nn.BatchNorm3d`` with window-merged running statistics (see module docs)."""


_CONVERSIONS = {
    torch.nn.BatchNorm1d: AccumBatchNorm1d,
    torch.nn.BatchNorm2d: AccumBatchNorm2d,
    torch.nn.BatchNorm3d: AccumBatchNorm3d,
}


def convert_batchnorm(model: torch.nn.Module, mode: str = "merged") -> torch.nn.Module:
    """Switch every ``nn.BatchNorm1d/2d/3d`` of ``model`` (exact classes) to its
    accumulation-aware counterpart, in place, and return ``model``.

    Weights, buffers and ``state_dict`` keys are kept (the modules are the same objects),
    so existing checkpoints load and eval outputs are unchanged right after conversion.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``. ValueError: unknown ``mode``.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    for module in model.modules():
        target = _CONVERSIONS.get(type(module))
        if target is not None:
            module.__class__ = target
            module._init_window(mode)
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
