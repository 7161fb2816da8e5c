"""opt.stats()["noise_scale"]: the wrapper's plumbing against float64 norms, and the
estimate against the analytic noise scale of a linear regression."""

import copy
import math

import pytest
import torch

import fastaccum
from fastaccum.stats import NoiseScaleTracker, noise_scale_terms
from tests.helpers import resume


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


def _sq(tensors) -> float:
    """Squared norm of a set of tensors."""
    return float(sum(t.square().sum() for t in tensors))


class _Tied(torch.nn.Module):
    """Linear -> LayerNorm -> Linear; with ``tied``, the first weight is used once more
    outside its layer, as a tied weight whose other use is not fused."""

    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(5, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 1)
        )
        self.tied = tied

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if self.tied:
            out = out + torch.nn.functional.linear(x, self.net[0].weight).sum(1, True)
        return out


@pytest.mark.parametrize("tied", [False, True], ids=["separate", "tied"])
def test_fused_wgrad_window_feeds_the_tracker_exactly(tied):
    # Fused Linear layers write no per-micro-batch gradient: their first micro-batch's norm
    # (read from the accumulators) stands for theirs, and their |G|^2 and tr(Sigma) are
    # estimated apart from the unfused LayerNorm's, with uneven num_items; both sets
    # against float64 gradients taken one micro-batch at a time. A tied weight's ordinary
    # gradient belongs to the fused set: from the second window on (once the wrapper knows
    # the weight is fused) it is kept out of the per-micro-batch norms.
    torch.manual_seed(0)
    plain = _Tied(tied)
    ref = copy.deepcopy(plain).double()
    model = fastaccum.fuse_wgrad(plain)
    opt = fastaccum.wrap(torch.optim.SGD(model.parameters(), lr=0.0), 3, model=model)
    fused = [p for m in (ref.net[0], ref.net[2]) for p in m.parameters()]
    unfused = list(ref.net[1].parameters())
    reference = NoiseScaleTracker()
    gen = torch.Generator().manual_seed(3)
    v_true = torch.randn(5, generator=gen)
    for window in range(5):
        sizes = [7, 2, 12]
        grads = []
        for (x, y), n in zip(_regression_batches(v_true, 0.5, sizes, gen), sizes, strict=True):
            opt.backward(_loss(model, x, y), num_items=n)
            opt.step()
            loss = _loss(ref, x.double(), y.double())
            grads.append(torch.autograd.grad(loss, fused + unfused))
        if tied and window == 0:
            continue  # the tied weight's first window: left out
        mean = [
            sum(n * g[i] for n, g in zip(sizes, grads, strict=True)) / sum(sizes)
            for i in range(len(fused) + len(unfused))
        ]
        f = len(fused)
        grad_sq, trace = noise_scale_terms([_sq(g[f:]) for g in grads], _sq(mean[f:]), sizes)
        fused_grad_sq, fused_trace = noise_scale_terms(
            [_sq(grads[0][:f])], _sq(mean[:f]), sizes[:1], window_size=sum(sizes)
        )
        reference.update_terms(grad_sq + fused_grad_sq, trace + fused_trace)
    assert opt.stats()["windows"] == 5
    assert opt.noise_scale_tracker.windows == reference.windows == (4 if tied else 5)
    assert opt.noise_scale_tracker.grad_sq == pytest.approx(reference.grad_sq, rel=1e-4)
    assert opt.noise_scale_tracker.trace == pytest.approx(reference.trace, rel=1e-4)
    assert opt.stats()["noise_scale"] == pytest.approx(reference.noise_scale, rel=1e-4)


def test_fused_wgrad_noise_scale_within_25_percent_of_analytic():
    # The regression of the test above with the weight in a fused layer: only the first
    # micro-batch of each window measures it, so the estimate is noisier but unbiased.
    d, sigma, b, k = 4, 1.0, 8, 4
    model = fastaccum.fuse_wgrad(torch.nn.Sequential(torch.nn.Linear(d, 1, bias=False)))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.5, -0.5, 0.25, 0.75]]))
    v = model[0].weight.detach().squeeze(0)
    truth = (1 + d) + d * sigma**2 / float(v.square().sum())
    opt = fastaccum.wrap(torch.optim.SGD(model.parameters(), lr=0.0), k, model=model)
    opt.noise_scale_tracker.beta = 0.995
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(800 * k, b, d, generator=gen)
    y = sigma * torch.randn(800 * k, b, generator=gen)
    for i in range(800 * k):
        opt.backward(_loss(model, x[i], y[i]), num_items=b)
        opt.step()
    assert opt.noise_scale_tracker.windows == 800
    assert opt.stats()["noise_scale"] == pytest.approx(truth, rel=0.25)


def test_noise_scale_state_round_trips():
    torch.manual_seed(0)
    plain = torch.nn.Linear(3, 2)
    opt2 = fastaccum.wrap(torch.optim.SGD(plain.parameters(), lr=0.1), 2)
    for _ in range(6):
        plain(torch.randn(4, 3)).square().mean().backward()
        opt2.step()
    clone = fastaccum.wrap(torch.optim.SGD(plain.parameters(), lr=0.1), 2)
    clone.load_state_dict(opt2.state_dict())
    assert clone.noise_scale_tracker.windows == opt2.noise_scale_tracker.windows == 3
    assert clone.stats()["noise_scale"] == opt2.stats()["noise_scale"]


def test_fused_wgrad_window_resumed_mid_window_keeps_its_noise_scale():
    # The first micro-batch's norm of the fused layers travels in the state dict: a run
    # checkpointed after it and resumed in a new model and wrapper ends bit-identical.
    gen = torch.Generator().manual_seed(4)
    batches = _regression_batches(torch.randn(5, generator=gen), 0.5, [6, 3, 5] * 4, gen)

    def build(seed: int = 0) -> tuple[torch.nn.Module, fastaccum.AccumulatingOptimizer]:
        torch.manual_seed(seed)
        model = fastaccum.fuse_wgrad(_Tied(tied=False))
        return model, fastaccum.wrap(torch.optim.SGD(model.parameters(), lr=0.05), 3, model=model)

    def run(checkpoint_at: int | None):
        model, opt = build()
        for i, (x, y) in enumerate(batches):
            if i == checkpoint_at:  # into a differently initialized model
                model, opt = resume(model, opt, lambda: build(seed=99))
            opt.backward(_loss(model, x, y), num_items=len(y))
            opt.step()
        return model, opt

    straight, s_opt = run(None)
    resumed, r_opt = run(7)  # one micro-batch into the third window
    for p, q in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
    assert r_opt.noise_scale_tracker.windows == s_opt.noise_scale_tracker.windows == 4
    assert r_opt.stats() == s_opt.stats()
