"""fastaccum.wrap on float64 and complex parameters.

float64 accumulators (float64 and complex128 parameters) go through torch's foreach ops;
complex64 parameters go through the kernels as their fp32 real views. References are
plain torch on the concatenated batch, in the parameters' own dtype.
"""

import math
import warnings

import pytest
import torch

import fastaccum
from tests.helpers import (
    assert_close_rel,
    large_batch_run,
    large_batch_windows,
    make_model,
    make_opt,
    mean_loss,
    run_with_checkpoint,
    split_windows,
    token_batches,
)


def train(model, opt, batches, mode):
    for x, y in batches:
        loss = mean_loss(model, x, y)
        if mode == "backward":
            opt.backward(loss, num_items=len(y))
            opt.step()
        else:
            loss.backward()
            opt.step(num_items=len(y))
        opt.zero_grad()


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize("mode", ["step", "backward", "backward+fuse_wgrad"])
def test_float64_matches_large_batch_training_in_float64(kind, mode):
    k = 4
    batches = token_batches(3 * k - 1, seed=5)  # 2 full windows, then a partial one
    want, _ = large_batch_run(
        lambda p: make_opt(kind, p), split_windows(batches, k), 0.5, dtype=torch.float64
    )
    model = make_model(dtype=torch.float64)
    if mode.endswith("fuse_wgrad"):
        fastaccum.fuse_wgrad(model)  # float64 layers take the unfused route
    opt = fastaccum.wrap(make_opt(kind, model.parameters()), k, model=model, max_grad_norm=0.5)
    train(model, opt, batches, mode.split("+")[0])
    assert opt.flush() is True
    for p, q in zip(model.parameters(), want.parameters(), strict=True):
        assert p.dtype == torch.float64
        assert_close_rel(p, q, 1e-12)
    assert all(acc.dtype == torch.float64 for acc in opt.window_accums().values())


def complex_model(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(3)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 8, dtype=dtype), torch.nn.Linear(8, 2, dtype=dtype)
    )


def complex_batches(dtype: torch.dtype, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(4)
    sizes = torch.randint(2, 9, (n,), generator=gen).tolist()
    return [
        (
            torch.randn(s, 6, dtype=dtype, generator=gen),
            torch.randn(s, 2, dtype=dtype, generator=gen),
        )
        for s in sizes
    ]


def complex_loss(model, x, y):
    return (model(x) - y).abs().square().sum(1).mean()


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.complex64, 1e-5), (torch.complex128, 1e-12)])
@pytest.mark.parametrize("mode", ["step", "backward", "backward+fuse_wgrad"])
def test_complex_matches_large_batch_training(dtype, rtol, mode):
    k = 3
    batches = complex_batches(dtype, 2 * k)
    want = complex_model(dtype)
    want_opt = torch.optim.AdamW(want.parameters(), lr=1e-2)
    want_norms = []
    for window in split_windows(batches, k):
        x = torch.cat([b[0] for b in window])
        y = torch.cat([b[1] for b in window])
        complex_loss(want, x, y).backward()
        want_norms.append(torch.nn.utils.clip_grad_norm_(want.parameters(), 0.5).item())
        want_opt.step()
        want_opt.zero_grad()

    model = complex_model(dtype)
    if mode.endswith("fuse_wgrad"):  # complex layers run as nn.Linear
        fastaccum.fuse_wgrad(model)
    opt = fastaccum.wrap(
        torch.optim.AdamW(model.parameters(), lr=1e-2), k, model=model, max_grad_norm=0.5
    )
    norms = []
    for x, y in batches:
        loss = complex_loss(model, x, y)
        if mode.startswith("backward"):
            opt.backward(loss, num_items=len(y))
        else:
            loss.backward()
        if opt.step(num_items=len(y)):
            norms.append(opt.stats()["grad_norm"])
            assert all(p.grad is None for p in model.parameters())
        opt.zero_grad()
    assert len(norms) == 2
    assert_close_rel(torch.tensor(norms), torch.tensor(want_norms), rtol)
    for p, q in zip(model.parameters(), want.parameters(), strict=True):
        assert p.dtype == dtype
        assert_close_rel(torch.view_as_real(p), torch.view_as_real(q), rtol)


def test_float64_nonfinite_window_is_skipped_and_changes_nothing():
    model = make_model(dtype=torch.float64)
    opt = fastaccum.wrap(make_opt("adamw", model.parameters()), 2, model=model)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = token_batches(1)[0]
    mean_loss(model, x, y).backward()
    opt.step()
    mean_loss(model, x, y).backward()
    model[4].bias.grad[1] = math.inf
    with pytest.warns(RuntimeWarning, match=r"1 parameter\(s\) \(4\.bias\)"):
        assert opt.step() is False
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)
    assert len(opt.optimizer.state) == 0
    assert opt.stats()["skipped_windows"] == 1


def test_float64_resume_mid_window_is_bit_identical():
    batches = token_batches(8, seed=6)
    straight, _ = run_with_checkpoint(None, batches, k=3, dtype=torch.float64)
    resumed, _ = run_with_checkpoint(4, batches, k=3, dtype=torch.float64)  # window 2, 1 in
    for p, q in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


def test_state_dict_with_other_accumulator_dtypes_changes_nothing():
    x, y = token_batches(1)[0]
    f32 = make_model()
    saved = fastaccum.wrap(torch.optim.SGD(f32.parameters(), lr=0.1), 4)
    mean_loss(f32, x, y).backward()
    saved.step()

    model = make_model(dtype=torch.float64)  # the same shapes
    opt = fastaccum.wrap(torch.optim.SGD(model.parameters(), lr=0.1), 4)
    mean_loss(model, x, y).backward()
    opt.step()
    before = [a.clone() for a in opt.state_dict()["fastaccum"]["accums"]]
    with pytest.raises(
        ValueError, match=r"accumulator of param 0 .*float32.*accumulates it in torch.float64"
    ):
        opt.load_state_dict(saved.state_dict())
    assert opt.micro_step == 1
    after = opt.state_dict()["fastaccum"]["accums"]
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))


def test_complex32_parameters_are_refused():
    with warnings.catch_warnings():  # torch: "ComplexHalf support is experimental"
        warnings.simplefilter("ignore", UserWarning)
        half = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64).to(torch.complex32))
    with pytest.raises(TypeError, match="complex32"):
        fastaccum.wrap(torch.optim.SGD([half], lr=0.1), 2)
    model = make_model()
    opt = fastaccum.wrap(torch.optim.SGD(model.parameters(), lr=0.1), 2)
    groups = len(opt.param_groups)
    with pytest.raises(TypeError, match="complex32"):
        opt.add_param_group({"params": [half]})
    assert len(opt.param_groups) == len(opt.optimizer.param_groups) == groups


# A model cast to or from float64 after some windows (model.double() / .float()). torch.optim
# steps such a model while it holds no state for its parameters (SGD without momentum), so
# fastaccum does too; with state in the old dtype torch's own step fails, and fastaccum
# refuses before folding, with the window and everything else intact.


def cast_halfway(model, opt, windows: list[list], dtype: torch.dtype, step) -> None:
    """``step(model, opt, window)`` on the first window, then cast the model to ``dtype``
    and step on the others."""
    step(model, opt, windows[0])
    model.to(dtype)
    for window in windows[1:]:
        step(model, opt, window)


def large_batch_step(model, opt, window) -> None:
    large_batch_windows(model, opt, [window])


@pytest.mark.parametrize("mode", ["step", "backward"])
@pytest.mark.parametrize(
    ("start", "cast"), [(torch.float32, torch.float64), (torch.float64, torch.float32)]
)
def test_cast_between_windows_trains_like_torch(start, cast, mode):
    windows = split_windows(token_batches(12, seed=7), 4)
    want = make_model(dtype=start)
    cast_halfway(want, torch.optim.SGD(want.parameters(), lr=0.5), windows, cast, large_batch_step)
    model = make_model(dtype=start)
    opt = fastaccum.wrap(torch.optim.SGD(model.parameters(), lr=0.5), 4, model=model)
    cast_halfway(model, opt, windows, cast, lambda m, o, w: train(m, o, w, mode))
    assert opt.stats()["windows"] == 3
    for p, q in zip(model.parameters(), want.parameters(), strict=True):
        assert p.dtype == cast
        assert_close_rel(p, q, 1e-6)
    wide = cast == torch.float64
    assert all((acc.dtype == torch.float64) == wide for acc in opt.window_accums().values())


@pytest.mark.parametrize("mode", ["step", "backward"])
def test_cast_with_optimizer_state_is_refused_and_changes_nothing(mode):
    batches = token_batches(5, seed=8)
    model = make_model()
    opt = fastaccum.wrap(make_opt("adamw", model.parameters()), 4, model=model)
    train(model, opt, batches[:4], mode)  # one window: AdamW has float32 state now
    model.double()
    params = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in opt.optimizer.state[model[1].weight].items()}
    x, y = batches[4]
    loss = mean_loss(model, x, y)
    with pytest.raises(
        TypeError, match=r"\d\.(weight|bias) is torch\.float64 now.*already holds state"
    ):
        if mode == "backward":
            opt.backward(loss, num_items=len(y))
        else:
            loss.backward()
            opt.step(num_items=len(y))
    assert opt.micro_step == 0 and opt.stats()["windows"] == 1
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params, strict=True))
    after = opt.optimizer.state[model[1].weight]
    assert all(torch.equal(after[k], v) for k, v in state.items())
    assert all(not acc.any() for acc in opt._accums.values())


def test_cast_mid_window_is_refused_and_the_window_goes_on_after_casting_back():
    windows = split_windows(token_batches(8, seed=9), 4)
    want = make_model()
    large_batch_windows(want, torch.optim.SGD(want.parameters(), lr=0.5), windows)
    model = make_model()
    opt = fastaccum.wrap(torch.optim.SGD(model.parameters(), lr=0.5), 4, model=model)
    train(model, opt, windows[0] + windows[1][:2], "step")
    model.double()
    x, y = windows[1][2]
    mean_loss(model, x, y).backward()
    with pytest.raises(TypeError, match=r"current window already holds its float32"):
        opt.step(num_items=len(y))
    assert opt.micro_step == 2
    opt.zero_grad()
    model.float()
    train(model, opt, windows[1][2:], "step")
    assert opt.stats()["windows"] == 2
    for p, q in zip(model.parameters(), want.parameters(), strict=True):
        assert_close_rel(p, q, 1e-6)


def test_fused_class_refuses_a_model_cast_to_float64():
    batches = token_batches(5, seed=10)
    model = make_model()
    opt = fastaccum.optim.SGD(model.parameters(), lr=0.5, accum_steps=4, model=model)
    train(model, opt, batches[:4], "step")
    model.double()
    x, y = batches[4]
    mean_loss(model, x, y).backward()
    with pytest.raises(TypeError, match=r"SGD needs float32 parameters, got one of dtype"):
        opt.step(num_items=len(y))
    assert opt.micro_step == 0
    assert all(p.grad is not None for p in model.parameters())  # left for the user
