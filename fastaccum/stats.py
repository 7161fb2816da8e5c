"""Gradient noise scale from what accumulation already measures.

McCandlish et al. (2018), "An Empirical Model of Large-Batch Training", model the gradient
of a batch of B items as the true gradient G plus noise of covariance Sigma / B, so that

    E |g_B|^2 = |G|^2 + tr(Sigma) / B.

The *simple noise scale* B_simple = tr(Sigma) / |G|^2 approximates the critical batch size:
below it, doubling the batch nearly halves the number of steps; far above it, extra batch
buys little.

An accumulation window measures this for free at two batch sizes. The fused accumulation
pass yields each micro-batch's squared gradient norm |g_k|^2 (b_k items each), and the
window's gradient norm is |g_B|^2 (B = sum b_k items). With mean-loss micro-batch
gradients, E[mean_k |g_k|^2] = |G|^2 + tr(Sigma) / b_h, where b_h is the harmonic mean of
the b_k (= b when micro-batches are equal), so two unbiased estimators follow:

    |G|^2     ~ (B |g_B|^2 - b_h mean_k |g_k|^2) / (B - b_h)
    tr(Sigma) ~ (mean_k |g_k|^2 - |g_B|^2) / (1 / b_h - 1 / B)

Both are sums over parameters, so disjoint sets of parameters can be estimated apart and
added (:meth:`NoiseScaleTracker.update_terms`), each set from the micro-batches it has a
norm for: the wrapper does so for fused-wgrad layers, measured on a window's first
micro-batch only.

Single windows are noisy (the |G|^2 estimate can even be negative), so the numerator and
denominator are smoothed separately with a bias-corrected exponential moving average and
only their ratio is reported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["NoiseScaleTracker", "noise_scale_terms", "pooled_terms"]


def noise_scale_terms(
    micro_sq_norms: Sequence[float],
    window_sq_norm: float,
    micro_sizes: Sequence[float] | None = None,
    window_size: float | None = None,
) -> tuple[float, float]:
    """Unbiased one-window estimates ``(|G|^2, tr(Sigma))``.

    Args:
        micro_sq_norms: squared norm of each micro-batch's mean-loss gradient.
        window_sq_norm: squared norm of the window's gradient (the item-weighted mean of
            the micro-batch gradients).
        micro_sizes: items per micro-batch (samples or tokens); None counts each
            micro-batch as one unit, so tr(Sigma) and the noise scale come out in
            micro-batches.
        window_size: items behind ``window_sq_norm`` when the window holds more than these
            micro-batches (data parallel: every rank's); default: the sum of
            ``micro_sizes``.

    Raises:
        ValueError: fewer than 2 micro-batches (and no larger window), sizes that do not
            match the norms or are not positive, or non-finite norms.
    """
    k = len(micro_sq_norms)
    if k < 1 or (k < 2 and window_size is None):
        raise ValueError(f"the noise scale needs at least 2 micro-batches per window, got {k}")
    sizes = [1.0] * k if micro_sizes is None else [float(s) for s in micro_sizes]
    if len(sizes) != k:
        raise ValueError(f"got {len(sizes)} micro-batch sizes for {k} squared norms")
    if any(not (s > 0 and math.isfinite(s)) for s in sizes):
        raise ValueError(f"micro-batch sizes must be positive and finite, got {sizes}")
    big = math.fsum(sizes) if window_size is None else float(window_size)
    return pooled_terms(
        k, math.fsum(micro_sq_norms), math.fsum(1.0 / s for s in sizes), window_sq_norm, big
    )


def pooled_terms(
    count: float,
    sum_sq: float,
    sum_inv_size: float,
    window_sq_norm: float,
    window_size: float,
) -> tuple[float, float]:
    """:func:`noise_scale_terms` from sums over the micro-batches, which add across
    processes: ``count`` micro-batches, ``sum_sq`` of their squared norms and
    ``sum_inv_size`` of 1 / their sizes, against a window of ``window_size`` items and
    squared norm ``window_sq_norm``.

    Raises:
        ValueError: no micro-batch, non-finite sums or norm, or a window that holds no
            more items than a micro-batch.
    """
    values = [count, sum_sq, sum_inv_size, window_sq_norm, window_size]
    if any(not math.isfinite(v) for v in values):
        raise ValueError("squared gradient norms and sizes must be finite")
    if not (count >= 1 and sum_inv_size > 0):
        raise ValueError(f"the noise scale needs at least 1 micro-batch, got {count:g}")
    small = count / sum_inv_size  # harmonic mean of the micro-batch sizes
    mean_small = sum_sq / count
    big = float(window_size)
    if not big - small > 0.0:
        raise ValueError(
            f"the window ({big:g} items) must hold more items than a micro-batch ({small:g})"
        )
    grad_sq = (big * window_sq_norm - small * mean_small) / (big - small)
    trace = (mean_small - window_sq_norm) / (1.0 / small - 1.0 / big)
    return grad_sq, trace


class NoiseScaleTracker:
    """Smoothed gradient noise scale across windows (see the module docs).

    Args:
        beta: EMA factor per window for |G|^2 and tr(Sigma), in [0, 1). 0 keeps only the
            last window.

    Raises:
        ValueError: ``beta`` outside [0, 1).
    """

    def __init__(self, beta: float = 0.95) -> None:
        if not (0.0 <= beta < 1.0):
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.beta = float(beta)
        self.windows = 0
        self._grad_sq = 0.0
        self._trace = 0.0
        self.units = "items"

    def update(
        self,
        micro_sq_norms: Sequence[float],
        window_sq_norm: float,
        micro_sizes: Sequence[float] | None = None,
        window_size: float | None = None,
        units: str | None = None,
    ) -> None:
        """Fold one window in (arguments as in :func:`noise_scale_terms`, which raises).
        ``units`` names the unit of the sizes (default: "items", or "micro-batches" when
        ``micro_sizes`` is None)."""
        grad_sq, trace = noise_scale_terms(micro_sq_norms, window_sq_norm, micro_sizes, window_size)
        if units is None:
            units = "micro-batches" if micro_sizes is None else "items"
        self.update_terms(grad_sq, trace, units)

    def update_terms(self, grad_sq: float, trace: float, units: str = "items") -> None:
        """Fold one window's unbiased estimates in: ``grad_sq`` of |G|^2 and ``trace`` of
        tr(Sigma) per item of ``units`` (for example the sum of
        :func:`noise_scale_terms` over disjoint sets of parameters).

        Raises:
            ValueError: a non-finite estimate.
        """
        if not (math.isfinite(grad_sq) and math.isfinite(trace)):
            raise ValueError(f"noise-scale terms must be finite, got {grad_sq}, {trace}")
        self._grad_sq = self.beta * self._grad_sq + (1.0 - self.beta) * grad_sq
        self._trace = self.beta * self._trace + (1.0 - self.beta) * trace
        self.windows += 1
        self.units = units

    def _debiased(self, value: float) -> float:
        return value / (1.0 - self.beta**self.windows)

    @property
    def grad_sq(self) -> float | None:
        """Smoothed |G|^2, or None before the first window."""
        return self._debiased(self._grad_sq) if self.windows else None

    @property
    def trace(self) -> float | None:
        """Smoothed tr(Sigma) (per item of ``units``), or None before the first window."""
        return self._debiased(self._trace) if self.windows else None

    @property
    def noise_scale(self) -> float | None:
        """B_simple = tr(Sigma) / |G|^2 in ``units``; None until the smoothed |G|^2 is
        positive (early windows of a noisy run can estimate it at or below zero)."""
        if not self.windows or self._grad_sq <= 0.0:
            return None
        return max(self._trace, 0.0) / self._grad_sq  # the debiasing factors cancel

    def hint(self, window_size: float) -> str | None:
        """One line comparing the window's size (in ``units``) with the noise scale."""
        scale = self.noise_scale
        if scale is None:
            return None
        ratio = window_size / scale if scale > 0 else math.inf
        if ratio < 0.5:
            advice = "a larger batch would still cut the number of steps nearly in proportion"
        elif ratio > 2.0:
            advice = "beyond the critical batch size: more batch buys little per item"
        else:
            advice = "near the critical batch size"
        return (
            f"window of {window_size:g} {self.units} vs noise scale {scale:.3g} "
            f"({ratio:.2g}x): {advice}"
        )

    def state_dict(self) -> dict[str, Any]:
        """The tracker's state, for checkpoints."""
        return {
            "beta": self.beta,
            "windows": self.windows,
            "grad_sq": self._grad_sq,
            "trace": self._trace,
            "units": self.units,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output.

        Raises:
            KeyError: a field is missing.
        """
        self.beta = float(state["beta"])
        self.windows = int(state["windows"])
        self._grad_sq = float(state["grad_sq"])
        self._trace = float(state["trace"])
        self.units = str(state["units"])
