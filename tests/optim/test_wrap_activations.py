"""wrap(..., activations=policy): every forward pass of the model runs inside the policy."""

import pytest
import torch

import fastaccum
import fastaccum.optim


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
        torch.nn.Linear(64, 4),
    )  # fmt: skip


def _window_grads(activations, bits_model=None):
    model = _model()
    params = list(model.parameters())
    opt = fastaccum.wrap(torch.optim.SGD(params, lr=0.0), 4, model=model, activations=activations)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(32, 16, generator=gen)
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return [acc.clone() for acc in opt.window_accums().values()], opt


def test_policy_applies_to_every_forward():
    exact, _ = _window_grads(None)
    lossless, _ = _window_grads(fastaccum.ActivationPolicy(bits=None, min_bytes=0))
    for a, b in zip(lossless, exact, strict=True):
        assert torch.equal(a, b)
    eight, opt = _window_grads(fastaccum.ActivationPolicy(bits=8, min_bytes=0))
    errors = [float((a - b).norm() / b.norm()) for a, b in zip(eight, exact, strict=True)]
    assert max(errors) < 0.02  # 8-bit activations: close to exact ...
    assert max(errors) > 0.0  # ... but not exact, so the policy really ran
    assert opt.activations is not None


def test_fused_classes_take_a_policy():
    model = _model()
    opt = fastaccum.optim.AdamW(
        model.parameters(), lr=1e-3, accum_steps=2, model=model,
        activations=fastaccum.ActivationPolicy(bits=4, min_bytes=0),
    )  # fmt: skip
    before = [p.clone() for p in model.parameters()]
    for _ in range(2):
        model(torch.randn(8, 16)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def test_forward_error_leaves_no_policy_open():
    model = _model()
    fastaccum.wrap(
        torch.optim.SGD(model.parameters(), lr=0.1), 2, model=model,
        activations=fastaccum.ActivationPolicy(bits=8, min_bytes=0),
    )  # fmt: skip
    with pytest.raises(RuntimeError):
        model(torch.randn(4, 3))  # wrong feature size
    # Outside the model, nothing is compressed: a plain graph keeps its exact values.
    w = torch.randn(64, 64, requires_grad=True)
    x = torch.randn(64, 64)
    (x @ w).tanh().sum().backward()
    expected = x.t() @ (1 - (x @ w).tanh().square())
    assert torch.allclose(w.grad, expected, rtol=1e-6, atol=1e-6)


def test_bad_arguments():
    model = _model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="pass model="):
        fastaccum.wrap(sgd, 2, activations=fastaccum.ActivationPolicy())
    with pytest.raises(TypeError, match="ActivationPolicy"):
        fastaccum.wrap(sgd, 2, model=model, activations={"bits": 8})
