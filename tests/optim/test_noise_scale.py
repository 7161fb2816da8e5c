"""opt.stats()["noise_scale"]: the wrapper's plumbing against float64 norms, and the
estimate against the analytic noise scale of a linear regression."""

import math

import pytest
import torch

import fastaccum
from fastaccum.stats import NoiseScaleTracker


def _regression_batches(v_true, sigma, sizes, gen):
    d = v_true.numel()
    out = []
    for b in sizes:
        x = torch.randn(b, d, generator=gen)
        y = x @ v_true + sigma * torch.randn(b, generator=gen)
        out.append((x, y))
    return out


def _loss(model, x, y):
    return 0.5 * (model(x).squeeze(1) - y).square().mean()


def test_wrapper_feeds_the_tracker_exactly():
    # Uneven num_items and a GradScaler-free fp32 run: the wrapper's estimate equals a
    # tracker fed with float64 norms of the same micro-batch and window gradients.
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 1, bias=False)
    opt = fastaccum.wrap(torch.optim.SGD(model.parameters(), lr=0.0), 4)
    reference = NoiseScaleTracker()
    gen = torch.Generator().manual_seed(1)
    w = model.weight.detach().double()
    v_true = model.weight.detach().squeeze(0) + 1.0  # |G| well above the noise
    for _ in range(6):
        sizes = [3, 9, 1, 6]
        batches = _regression_batches(v_true, 0.5, sizes, gen)
        grads = []
        for (x, y), n in zip(batches, sizes, strict=True):
            _loss(model, x, y).backward()
            grads.append((x.double() * (x.double() @ w.t() - y.double()[:, None])).mean(0))
            opt.step(num_items=n)
            opt.zero_grad()
        window = sum(n * g for n, g in zip(sizes, grads, strict=True)) / sum(sizes)
        reference.update(
            [float(g.square().sum()) for g in grads], float(window.square().sum()), sizes
        )
    stats = opt.stats()
    assert stats["noise_scale_units"] == "items"
    assert reference.noise_scale is not None
    assert stats["noise_scale"] == pytest.approx(reference.noise_scale, rel=1e-4)
    assert "noise scale" in stats["critical_batch_hint"]


def test_noise_scale_within_15_percent_of_analytic():
    # g = x (x.v - e) per sample with x ~ N(0, I), e ~ N(0, sigma^2): G = v and
    # tr(Sigma) = |v|^2 + d (|v|^2 + sigma^2), so B_simple = (1 + d) + d sigma^2 / |v|^2.
    torch.manual_seed(0)
    d, sigma, b, k = 4, 1.0, 8, 4
    model = torch.nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, -0.5, 0.25, 0.75]]))
    v = model.weight.detach().squeeze(0)  # w* = 0, so v = w
    truth = (1 + d) + d * sigma**2 / float(v.square().sum())
    opt = fastaccum.wrap(torch.optim.SGD(model.parameters(), lr=0.0), k)
    opt.noise_scale_tracker.beta = 0.995
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(800 * k, b, d, generator=gen)
    y = sigma * torch.randn(800 * k, b, generator=gen)  # targets of w* = 0
    for i in range(800 * k):
        _loss(model, x[i], y[i]).backward()
        opt.step(num_items=b)
        opt.zero_grad()
    assert opt.stats()["noise_scale"] == pytest.approx(truth, rel=0.15)
    assert math.isfinite(opt.stats()["noise_scale"])


def test_fused_wgrad_windows_are_left_out_and_state_round_trips():
    torch.manual_seed(0)
    model = fastaccum.fuse_wgrad(torch.nn.Sequential(torch.nn.Linear(3, 2)))
    opt = fastaccum.wrap(torch.optim.SGD(model.parameters(), lr=0.1), 2, model=model)
    for _ in range(4):
        opt.backward(model(torch.randn(4, 3)).square().mean())
        opt.step()
    assert opt.stats()["noise_scale"] is None
    assert opt.noise_scale_tracker.windows == 0
    plain = torch.nn.Linear(3, 2)
    opt2 = fastaccum.wrap(torch.optim.SGD(plain.parameters(), lr=0.1), 2)
    for _ in range(6):
        plain(torch.randn(4, 3)).square().mean().backward()
        opt2.step()
    clone = fastaccum.wrap(torch.optim.SGD(plain.parameters(), lr=0.1), 2)
    clone.load_state_dict(opt2.state_dict())
    assert clone.noise_scale_tracker.windows == opt2.noise_scale_tracker.windows == 3
    assert clone.stats()["noise_scale"] == opt2.stats()["noise_scale"]
