"""Learning-rate scaling rules and the warm-up helper, against analytic values."""

import math

import pytest
import torch

import fastaccum
from fastaccum.optim.lr import scale_lr, warmup


def test_scale_rules():
    assert scale_lr(1e-3, 256, 1024) == pytest.approx(4e-3, rel=1e-15)
    assert scale_lr(1e-3, 256, 1024, rule="sqrt") == pytest.approx(2e-3, rel=1e-15)
    assert scale_lr(3e-4, 64, 16, rule="sqrt") == pytest.approx(1.5e-4, rel=1e-15)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((1e-3, 0, 8), "base_batch"),
        ((-1.0, 4, 8), "base_lr"),
        ((1e-3, 4, math.inf), "new_batch"),
        ((1e-3, 4, 8, "cubic"), "rule"),
        ((1e-3, 4, 10**400), "new_batch must be a positive finite number"),
    ],
)
def test_scale_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        scale_lr(*args)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((1e-3, "256", 512), "base_batch must be a real number, got str"),
        ((1e-3, 256, None), "new_batch must be a real number, got NoneType"),
        ((True, 256, 512), "base_lr must be a real number, got bool"),
    ],
)
def test_scale_refuses_what_is_not_a_number(args, match):
    with pytest.raises(TypeError, match=match):
        scale_lr(*args)


def test_scale_takes_numpy_and_tensor_numbers():
    np = pytest.importorskip("numpy")
    assert scale_lr(np.float32(0.5), np.int64(256), 1024) == pytest.approx(2.0, rel=1e-7)
    assert float(scale_lr(torch.tensor(0.5), 256, 1024)) == pytest.approx(2.0, rel=1e-7)


def test_warmup_then_cosine_on_a_wrapped_optimizer():
    model = torch.nn.Linear(3, 1)
    opt = fastaccum.wrap(torch.optim.SGD(model.parameters(), lr=0.4), 2)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=6)
    sched = warmup(opt, 4, start_factor=0.25, after=cosine)
    seen = []
    x = torch.randn(2, 3)
    for _ in range(20):  # 10 windows of 2 micro-batches
        model(x).sum().backward()
        if opt.step():
            seen.append(opt.optimizer.param_groups[0]["lr"])
            sched.step()
        opt.zero_grad()
    ramp = [0.4 * (0.25 + 0.75 * i / 4) for i in range(4)]
    cos = [0.2 * (1 + math.cos(math.pi * i / 6)) for i in range(6)]
    assert seen == pytest.approx(ramp + cos, rel=1e-12)


def test_warmup_bad_input():
    opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
    other = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup(opt, 0)
    with pytest.raises(ValueError, match="start_factor"):
        warmup(opt, 3, start_factor=0.0)
    with pytest.raises(ValueError, match="same optimizer"):
        warmup(opt, 3, after=torch.optim.lr_scheduler.StepLR(other, 2))
    with pytest.raises(TypeError, match=r"after must be a torch\.optim\.lr_scheduler scheduler"):
        warmup(opt, 3, after="cosine")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"optimizer must be a torch\.optim\.Optimizer"):
        warmup("sgd", 3)  # type: ignore[arg-type]
