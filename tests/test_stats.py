"""Gradient noise scale: estimators against a problem with a known answer."""

import math

import pytest
import torch

from fastaccum.stats import NoiseScaleTracker, noise_scale_terms


def _regression_truth(v: torch.Tensor, sigma: float) -> tuple[float, float]:
    """|G|^2 and tr(Sigma) of the per-sample gradient of 0.5 (x.w - y)^2 with x ~ N(0, I),
    y = x.w* + N(0, sigma^2) and v = w - w*: g = x (x.v - e), so G = v and
    Cov(g) = v v^T + (|v|^2 + sigma^2) I (Gaussian fourth moments)."""
    d = v.numel()
    v2 = float(v.double().square().sum())
    return v2, v2 + d * (v2 + sigma**2)


def _gradients(v, sigma, sizes, n_windows, gen):
    """Per window, in float64 (vectorized over windows): the micro-batches' mean-loss
    gradients ``[windows, K, d]`` and the window's item-weighted mean gradient
    ``[windows, d]``."""
    total, d = sum(sizes), v.numel()
    x = torch.randn(n_windows, total, d, generator=gen, dtype=torch.float64)
    e = torch.randn(n_windows, total, generator=gen, dtype=torch.float64) * sigma
    per_sample = x * (x @ v - e).unsqueeze(-1)
    micro = torch.stack([chunk.mean(1) for chunk in per_sample.split(sizes, dim=1)], dim=1)
    return micro, per_sample.mean(1)


def _windows(v, sigma, sizes, n_windows, gen):
    """Per window: the squared norms of :func:`_gradients`' micro-batch and window
    gradients."""
    micro, window = _gradients(v, sigma, sizes, n_windows, gen)
    return micro.square().sum(-1).tolist(), window.square().sum(-1).tolist()


@pytest.mark.parametrize("sizes", [[4] * 8, [1, 7, 3, 5, 2, 6]])
def test_estimators_are_unbiased(sizes):
    # Averaged over many windows, each one-window estimate converges to the truth.
    gen = torch.Generator().manual_seed(0)
    v, sigma = torch.tensor([1.0, -0.5, 0.25, 2.0], dtype=torch.float64), 1.5
    grad_sq_true, trace_true = _regression_truth(v, sigma)
    micro, window = _windows(v, sigma, sizes, 4000, gen)
    terms = [noise_scale_terms(m, w, sizes) for m, w in zip(micro, window, strict=True)]
    grad_sq = sum(t[0] for t in terms) / len(terms)
    trace = sum(t[1] for t in terms) / len(terms)
    assert grad_sq == pytest.approx(grad_sq_true, rel=0.05)
    assert trace == pytest.approx(trace_true, rel=0.05)


@pytest.mark.parametrize("sizes", [[4] * 8, [1, 7, 3, 5, 2, 6]])
def test_split_estimate_with_one_set_measured_on_the_first_micro_batch_is_unbiased(sizes):
    # What the wrapper does for fused-wgrad layers: coordinates 0-1 are measured on every
    # micro-batch, coordinates 2-3 on the first one only (against the whole window); the
    # two sets' terms, added, still average to the truth.
    gen = torch.Generator().manual_seed(4)
    v, sigma = torch.tensor([1.0, -0.5, 0.25, 2.0], dtype=torch.float64), 1.5
    grad_sq_true, trace_true = _regression_truth(v, sigma)
    total, n_windows = sum(sizes), 6000
    micro, window = _gradients(v, sigma, sizes, n_windows, gen)
    tracker = NoiseScaleTracker(beta=0.0)
    sums = [0.0, 0.0]
    for m, w in zip(micro, window, strict=True):
        a = noise_scale_terms(
            m[:, :2].square().sum(-1).tolist(), float(w[:2].square().sum()), sizes
        )
        b = noise_scale_terms(
            [float(m[0, 2:].square().sum())], float(w[2:].square().sum()), sizes[:1], total
        )
        sums[0] += a[0] + b[0]
        sums[1] += a[1] + b[1]
        tracker.update_terms(a[0] + b[0], a[1] + b[1])
    assert sums[0] / n_windows == pytest.approx(grad_sq_true, rel=0.05)
    assert sums[1] / n_windows == pytest.approx(trace_true, rel=0.05)
    assert tracker.windows == n_windows and tracker.grad_sq == pytest.approx(a[0] + b[0])


def test_update_terms_refuses_non_finite_terms_and_changes_nothing():
    tracker = NoiseScaleTracker()
    tracker.update_terms(2.0, 6.0, "items")
    for bad in ((math.nan, 1.0), (1.0, math.inf)):
        with pytest.raises(ValueError, match="finite"):
            tracker.update_terms(*bad)
    assert tracker.windows == 1 and tracker.noise_scale == pytest.approx(3.0)


def test_tracker_within_15_percent_of_analytic_noise_scale():
    gen = torch.Generator().manual_seed(1)
    v, sigma = torch.tensor([0.6, -0.3, 0.9], dtype=torch.float64), 0.8
    grad_sq_true, trace_true = _regression_truth(v, sigma)
    tracker = NoiseScaleTracker(beta=0.99)
    sizes = [8] * 4
    for micro, window in zip(*_windows(v, sigma, sizes, 1500, gen), strict=True):
        tracker.update(micro, window, sizes)
    assert tracker.units == "items"
    assert tracker.noise_scale == pytest.approx(trace_true / grad_sq_true, rel=0.15)
    assert tracker.grad_sq == pytest.approx(grad_sq_true, rel=0.15)


def test_equal_sizes_match_mccandlish_two_batch_formulas():
    # With equal micro-batches the estimators are McCandlish et al.'s, with b and B = K b.
    micro, window, b, k = [3.0, 2.5, 4.0, 3.5], 1.2, 16, 4
    big = b * k
    g_small = sum(micro) / k
    grad_sq, trace = noise_scale_terms(micro, window, [b] * k)
    assert grad_sq == pytest.approx((big * window - b * g_small) / (big - b), rel=1e-12)
    assert trace == pytest.approx((g_small - window) / (1 / b - 1 / big), rel=1e-12)
    # Without sizes, each micro-batch counts as one unit.
    grad_sq_units, trace_units = noise_scale_terms(micro, window)
    assert grad_sq_units == pytest.approx(grad_sq, rel=1e-12)
    assert trace_units == pytest.approx(trace / b, rel=1e-12)


def test_tracker_state_round_trip_and_hint():
    tracker = NoiseScaleTracker(beta=0.5)
    assert tracker.noise_scale is None and tracker.hint(32) is None
    tracker.update([2.0, 2.2, 1.8], 1.0)
    tracker.update([2.1, 2.0, 1.9], 1.1)
    assert tracker.units == "micro-batches"
    clone = NoiseScaleTracker()
    clone.load_state_dict(tracker.state_dict())
    assert clone.noise_scale == tracker.noise_scale
    assert clone.windows == 2
    assert "noise scale" in tracker.hint(3)


def test_negative_gradient_estimate_reports_none():
    tracker = NoiseScaleTracker(beta=0.0)
    # Micro-batch norms far above the window norm with a tiny window: |G|^2 estimate < 0.
    tracker.update([10.0, 10.0], 0.1, [1, 1])
    assert tracker.grad_sq is not None and tracker.grad_sq < 0
    assert tracker.noise_scale is None


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (([1.0], 1.0), "at least 2 micro-batches"),
        (([1.0, 2.0], 1.0, [1.0]), "sizes for 2"),
        (([1.0, 2.0], 1.0, [1.0, 0.0]), "positive"),
        (([1.0, math.nan], 1.0), "finite"),
    ],
)
def test_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        noise_scale_terms(*args)
    with pytest.raises(ValueError, match="beta"):
        NoiseScaleTracker(beta=1.0)
