"""fastaccum.nn.Linear / fuse_wgrad: same results as nn.Linear; under fastaccum.wrap +
opt.backward the weight gradient goes into the accumulator with no dW tensor made."""

import copy

import pytest
import torch

import fastaccum
from fastaccum.nn import Linear, fuse_wgrad
from fastaccum.ops.wgrad import wgrad_accumulate_
from fastaccum.workloads import allocated_shapes
from tests.helpers import assert_close_rel, split_windows


def mlp(seed=0, bias=True):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(13, 33, bias=bias),
        torch.nn.GELU(),
        torch.nn.Linear(33, 17, bias=bias),
        torch.nn.Tanh(),
        torch.nn.Linear(17, 5, bias=bias),
    )


def batches(n, seed=1):
    """(x of shape (batch, seq, 13), y of shape (batch, seq, 5)) with varying seq."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        seq = int(torch.randint(1, 9, (1,), generator=gen))
        out.append((torch.randn(3, seq, 13, generator=gen), torch.randn(3, seq, 5, generator=gen)))
    return out


def mse(model, x, y):
    return (model(x) - y).square().mean()


def test_fuse_wgrad_keeps_parameters_keys_and_results():
    model = mlp()
    ref = copy.deepcopy(model)
    params = list(model.parameters())
    keys = list(model.state_dict())
    assert fuse_wgrad(model) is model
    assert all(type(m) is Linear for m in model if isinstance(m, torch.nn.Linear))
    assert [p is q for p, q in zip(model.parameters(), params, strict=True)] == [True] * len(params)
    assert list(model.state_dict()) == keys
    x = torch.randn(4, 6, 13)
    assert torch.equal(model(x), ref(x))


@pytest.mark.parametrize("bias", [True, False])
def test_without_a_sink_gradients_match_nn_linear(bias):
    model, ref = fuse_wgrad(mlp(bias=bias)), mlp(bias=bias)
    x = torch.randn(4, 7, 13, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    # a non-contiguous output gradient: the loss reads the output through a transpose
    w = torch.randn(5, 7, 4)
    (model(x).permute(2, 1, 0) * w).sum().backward()
    (ref(xr).permute(2, 1, 0) * w).sum().backward()
    assert_close_rel(x.grad, xr.grad, 1e-6)
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert_close_rel(p.grad, q.grad, 1e-6)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize("max_grad_norm", [None, 0.3])
def test_fused_wrapper_training_matches_large_batch(kind, max_grad_norm):
    def make_opt(params):
        if kind == "sgd":
            return torch.optim.SGD(params, lr=0.1, momentum=0.9)
        return torch.optim.AdamW(params, lr=1e-2)

    k = 4
    data = batches(3 * k - 1)
    # reference: one backward per window on the mean over all items (positions) of the window
    torch.manual_seed(0)
    ref = mlp()
    ref_opt = make_opt(ref.parameters())
    for window in split_windows(data, k):
        total = sum(x.shape[0] * x.shape[1] for x, _ in window)
        loss = sum(((ref(x) - y).square().mean(-1)).sum() for x, y in window) / total
        loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(ref.parameters(), max_grad_norm)
        ref_opt.step()
        ref_opt.zero_grad()

    model = fuse_wgrad(mlp())
    opt = fastaccum.wrap(make_opt(model.parameters()), k, model=model, max_grad_norm=max_grad_norm)
    for x, y in data:
        items = x.shape[0] * x.shape[1]
        opt.backward((model(x) - y).square().mean(), num_items=items)
        assert all(p.grad is None for p in model.parameters())  # nothing lands in .grad
        opt.step()
    opt.flush()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert_close_rel(p, q, 1e-5)


def test_loss_backward_path_stays_correct_unfused():
    """With loss.backward() the micro-batch weight is unknown during backward, so the layer
    produces .grad as nn.Linear does and step() folds it."""
    data = batches(4, seed=2)
    model = fuse_wgrad(mlp())
    opt = fastaccum.wrap(torch.optim.SGD(model.parameters(), lr=0.1), 4, model=model)
    ref = mlp()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for x, y in data:
        mse(model, x, y).backward()
        assert model[0].weight.grad is not None
        opt.step()
        (mse(ref, x, y) / 4).backward()
    ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert_close_rel(p, q, 1e-6)


@pytest.mark.parametrize("fused", [True, False])
def test_no_weight_gradient_tensor_is_made(fused):
    """The fused path allocates no (out, in)-shaped tensor during backward; the unfused one
    does (which shows the check can fail)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(48, 80), torch.nn.ReLU(), torch.nn.Linear(80, 48))
    if fused:
        fuse_wgrad(model)
    opt = fastaccum.wrap(torch.optim.SGD(model.parameters(), lr=0.1), 2, model=model)
    x = torch.randn(6, 48)
    opt.backward(model(x).square().mean())  # first call creates the accumulators
    opt.step()
    loss = model(x).square().mean()
    shapes = [shape for shape, _ in allocated_shapes(lambda: opt.backward(loss))]
    weight_shaped = [s for s in shapes if s in {(80, 48), (48, 80)}]
    if fused:
        assert weight_shaped == []
    else:
        assert len(weight_shaped) >= 2


def test_autocast_bf16_fused_matches_unfused():
    data = batches(4, seed=3)
    results = []
    for fused in (True, False):
        model = mlp()
        if fused:
            fuse_wgrad(model)
        opt = fastaccum.wrap(torch.optim.SGD(model.parameters(), lr=0.1), 4, model=model)
        for x, y in data:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = (model(x).float() - y).square().mean()
            opt.backward(loss)
            opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        assert_close_rel(a, b, 2e-2)


def test_activation_checkpointing_counts_each_micro_batch_once():
    from torch.utils.checkpoint import checkpoint

    data = batches(2, seed=4)
    results = []
    for ckpt in (True, False):
        model = fuse_wgrad(mlp())
        opt = fastaccum.wrap(torch.optim.SGD(model.parameters(), lr=0.1), 2, model=model)
        for x, y in data:
            out = checkpoint(model, x, use_reentrant=False) if ckpt else model(x)
            opt.backward((out - y).square().mean())
            opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        assert_close_rel(a, b, 1e-6)


# --------------------------------------------------------------------------- the op


@pytest.mark.parametrize(
    "dtype,rtol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-6), (torch.float16, 1e-6)]
)
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (7, 3, 65), (129, 130, 3)])
def test_wgrad_accumulate_matches_float64(dtype, rtol, m, n, k):
    gen = torch.Generator().manual_seed(m * n + k)
    go = torch.randn(n, m, generator=gen).to(dtype).t()  # non-contiguous
    x = torch.randn(m, k, generator=gen).to(dtype)
    accum = torch.randn(n, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    want = accum.double() + 0.5 * (go.double().t() @ x.double())
    want_b = bias.double() + 0.5 * go.double().sum(0)
    wgrad_accumulate_(accum, go, x, 0.5, bias)
    # inputs are exact in fp32 after upcasting, so only fp32 rounding remains
    assert_close_rel(accum, want, rtol if m * k < 1000 else 1e-5)
    assert_close_rel(bias, want_b, 1e-6)


def test_wgrad_accumulate_bad_input_changes_nothing():
    accum = torch.randn(3, 4)
    before = accum.clone()
    cases = [
        ((accum, torch.randn(5, 3), torch.randn(6, 4)), ValueError, "same number of rows"),
        ((accum, torch.randn(5, 2), torch.randn(5, 4)), ValueError, "accum must have shape"),
        ((accum, torch.randn(5, 3), torch.randn(5, 4).double()), TypeError, "same dtype"),
        ((accum.t(), torch.randn(5, 4), torch.randn(5, 3)), ValueError, "contiguous"),
        ((accum, torch.randn(5, 3, 1), torch.randn(5, 4)), ValueError, "2-D"),
    ]
    for args, exc, match in cases:
        with pytest.raises(exc, match=match):
            wgrad_accumulate_(*args)
        assert torch.equal(accum, before)


def test_grad_scaler_with_fused_layers_matches_unfused():
    data = batches(4, seed=5)
    results = []
    for fused in (True, False):
        model = mlp()
        if fused:
            fuse_wgrad(model)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        opt = fastaccum.wrap(
            torch.optim.SGD(model.parameters(), lr=0.1), 2, model=model, scaler=scaler
        )
        for x, y in data:
            opt.backward(scaler.scale(mse(model, x, y)), num_items=x.shape[1])
            opt.step()
        assert opt.stats()["windows"] == 2 and opt.stats()["skipped_windows"] == 0
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        assert_close_rel(a, b, 1e-6)


def test_window_norm_of_fused_layers_matches_float64():
    """Fused layers write no gradient that accumulate_ could measure: the wrapper reads
    their accumulators once at the boundary (fastaccum.ops.sumsq). Its grad_norm equals
    the float64 norm of the window gradient."""
    k = 3
    data = batches(k, seed=5)
    ref = mlp().double()
    total = sum(x.shape[0] * x.shape[1] for x, _ in data)
    loss = sum((ref(x.double()) - y.double()).square().mean(-1).sum() for x, y in data) / total
    loss.backward()
    want = torch.sqrt(sum(p.grad.square().sum() for p in ref.parameters())).item()

    model = fuse_wgrad(mlp())
    opt = fastaccum.wrap(torch.optim.SGD(model.parameters(), lr=0.1), k, model=model)
    for x, y in data:
        opt.backward((model(x) - y).square().mean(), num_items=x.shape[0] * x.shape[1])
        stepped = opt.step()
    assert stepped
    assert opt.stats()["grad_norm"] == pytest.approx(want, rel=1e-5)
