"""Fused batch norm (fastaccum.ops.batchnorm): the reference and the native C++ CPU kernels
against float64 truth, batch_norm_train's gradients against float64 autograd through
F.batch_norm, bad input, opcheck and torch.compile.

The Triton kernels have their own file (tests/triton/test_batchnorm.py), which reuses the
float64 truths and inputs defined here.
"""

import os

import pytest
import torch
import torch.nn.functional as F

from fastaccum import _backend
from fastaccum.ops import batchnorm as bn
from tests.helpers import assert_close_rel

BACKENDS = ["reference", "native"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LAYOUTS = ["contiguous", "channels_last", "strided"]
# One rounding to the output dtype, with margin (fp32: a few fp32 operations).
Y_RTOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}
# fp32 statistics and sums: error bound relative to the scale of what is summed.
STATS_RTOL = 1e-5
SUMS_RTOL = 1e-5
EPS = 1e-5


# --------------------------------------------------------------------------- inputs


def make_x(shape, dtype=torch.float32, layout="contiguous", *, mean=0.0, std=1.0, seed=0):
    """Random x of ``shape`` laid out as ``layout``: contiguous, channels_last (channels
    innermost, any rank) or strided (a view the kernels cannot read in place)."""
    gen = torch.Generator().manual_seed(seed)
    if layout == "strided":
        # Every other element of the last dim (2-D: a transposed buffer).
        if len(shape) == 2:
            return (torch.randn(shape[::-1], generator=gen) * std + mean).to(dtype).t()
        big = torch.randn((*shape[:-1], 2 * shape[-1]), generator=gen) * std + mean
        return big.to(dtype)[..., ::2]
    x = (torch.randn(shape, generator=gen) * std + mean).to(dtype)
    if layout == "channels_last":
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    return x


def per_channel(c, seed, *, low=-1.0, high=1.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(c, generator=gen) * (high - low) + low


def make_params(x, seed=1, *, affine=True):
    """(mean, invstd, weight, bias): float32 per-channel values near x's statistics."""
    c = x.shape[1]
    with torch.no_grad():
        m, m2 = truth_stats(x)
        count = x.numel() // c
    mean = (m + per_channel(c, seed, low=-0.1, high=0.1).double()).float()
    invstd = torch.rsqrt(m2 / count + EPS).float() * per_channel(c, seed + 1, low=0.8, high=1.2)
    if not affine:
        return mean, invstd, None, None
    return mean, invstd, per_channel(c, seed + 2, low=0.5, high=1.5), per_channel(c, seed + 3)


def view_c(t, x):
    return t.double().view(1, -1, *([1] * (x.dim() - 2)))


def dims_of(x):
    return [0, *range(2, x.dim())]


# --------------------------------------------------------------------------- float64 truths


def truth_stats(x):
    """(mean, m2) per channel in float64, of the values x stores."""
    xd = x.double()
    mean = xd.mean(dims_of(x))
    return mean, (xd - view_c(mean, x)).square().sum(dims_of(x))


def truth_pre_activation(x, mean, invstd, weight, bias):
    mul = invstd.double() * (1.0 if weight is None else weight.double())
    z = (x.double() - view_c(mean, x)) * view_c(mul, x)
    return z if bias is None else z + view_c(bias, x)


def truth_apply(x, mean, invstd, weight, bias, relu):
    z = truth_pre_activation(x, mean, invstd, weight, bias)
    return z.clamp_min(0) if relu else z


def truth_masked_grad(grad_y, x, mean, invstd, weight, bias, relu):
    g = grad_y.double()
    if relu:
        g = g * (truth_pre_activation(x, mean, invstd, weight, bias) > 0)
    return g


def truth_grad_sums(grad_y, x, mean, invstd, weight, bias, relu):
    """(sum_dy, sum_dy_xhat, sum|dy|, sum|dy xhat|) per channel in float64."""
    g = truth_masked_grad(grad_y, x, mean, invstd, weight, bias, relu)
    gx = g * (x.double() - view_c(mean, x)) * view_c(invstd, x)
    d = dims_of(x)
    return g.sum(d), gx.sum(d), g.abs().sum(d), gx.abs().sum(d)


def truth_grad_input(grad_y, x, mean, invstd, weight, bias, sum_dy, sum_dy_xhat, count, relu):
    g = truth_masked_grad(grad_y, x, mean, invstd, weight, bias, relu)
    xhat = (x.double() - view_c(mean, x)) * view_c(invstd, x)
    mul = invstd.double() * (1.0 if weight is None else weight.double())
    return view_c(mul, x) * (g - view_c(sum_dy, x) / count - xhat * view_c(sum_dy_xhat, x) / count)


def make_grad(x, mean, invstd, weight, bias, seed=5):
    """A random incoming gradient, zero where the ReLU's pre-activation is within 1e-3 of 0:
    there fp32 and float64 may disagree on the mask, and a zero gradient makes that moot."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(x.shape, generator=gen)
    near = truth_pre_activation(x, mean, invstd, weight, bias).abs() < 1e-3
    return g.masked_fill(near, 0.0).to(x.dtype)


def over_cases(shapes):
    """Parametrize a test over ``shapes`` x DTYPES x LAYOUTS x ReLU off/on."""
    marks = [
        pytest.mark.parametrize("shape", shapes, ids=str),
        pytest.mark.parametrize("dtype", DTYPES),
        pytest.mark.parametrize("layout", LAYOUTS),
        pytest.mark.parametrize("relu", [False, True]),
    ]

    def decorate(test):
        for mark in marks:
            test = mark(test)
        return test

    return decorate


def case_inputs(shape, dtype, layout):
    """x (mean 1, std 2), its (mean, invstd, weight, bias) and an incoming gradient."""
    x = make_x(shape, dtype, layout, mean=1.0, std=2.0)
    params = make_params(x)
    return x, *params, make_grad(x, *params)


# --------------------------------------------------------------------------- assertions


def assert_stats_close(got, x):
    """Per channel: |mean - truth| <= rtol (|truth| + std), |m2 - truth| <= rtol truth
    (+ 1e-6 per element, for channels whose values are all equal)."""
    want_mean, want_m2 = truth_stats(x)
    count = x.numel() // x.shape[1]
    mean, m2 = got
    assert mean.dtype == torch.float32 and m2.dtype == torch.float32
    assert mean.shape == (x.shape[1],) and m2.shape == (x.shape[1],)
    std = (want_m2 / count).sqrt()
    mean_err = (mean.double() - want_mean).abs()
    assert (mean_err <= STATS_RTOL * (want_mean.abs() + std)).all(), (mean, want_mean)
    m2_err = (m2.double() - want_m2).abs()
    assert (m2_err <= STATS_RTOL * want_m2 + 1e-6 * count).all(), (m2, want_m2)


def assert_sums_close(got, want):
    """Each sum within SUMS_RTOL of the sum of its terms' magnitudes (a summation bound)."""
    for value, exact, scale in ((got[0], want[0], want[2]), (got[1], want[1], want[3])):
        assert value.dtype == torch.float32
        err = (value.double() - exact).abs()
        assert (err <= SUMS_RTOL * scale + 1e-12).all(), (value, exact)


def assert_same_layout(out, x):
    """out is laid out as the kernels promise: channels-last when x is, else contiguous."""
    if x.is_contiguous() or not bn.is_channels_last_like(x):
        assert out.is_contiguous()
    else:
        assert bn.is_channels_last_like(out)


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param == "native" and not _backend.native_can_run(torch.device("cpu"), "bn_stats"):
        if os.environ.get("FASTACCUM_NO_EXT") == "1":
            pytest.skip("FASTACCUM_NO_EXT=1: pure-Python install")
        pytest.fail("fastaccum._C has no bn_stats kernel; the build is broken or stale")
    return request.param


# --------------------------------------------------------------------------- stats

STATS_SHAPES = [
    (1, 3),  # one sample per channel: m2 = 0
    (7, 3),
    (2, 3, 1, 1),  # H * W = 1
    (1, 3, 1023),
    (1, 2, 65537),  # planes longer than one work item
    (16, 2, 4099),  # a channel over several work items
    (65537, 3),  # many rows, few channels
    (3, 130, 7),  # channels not a multiple of the vector width
    (4, 3, 5, 7),
    (2, 3, 2, 3, 5),
]


@pytest.mark.parametrize("shape", STATS_SHAPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_stats_matches_float64(backend, shape, layout):
    x = make_x(shape, layout=layout, mean=0.5, std=2.0)
    assert_stats_close(bn.batch_norm_stats(x, backend=backend), x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("std", [1.0, 100.0])
def test_stats_large_mean(backend, dtype, layout, std):
    """Mean 1e4: a one-pass sum of squares in fp32 loses every digit of the variance.
    (In bf16 and fp16, 1e4 +- 1 all round to one value, so M2 must come out 0.)"""
    x = make_x((8, 4, 33, 31), dtype, layout, mean=1e4, std=std, seed=3)
    assert_stats_close(bn.batch_norm_stats(x, backend=backend), x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_stats_of_low_precision_inputs(backend, dtype):
    x = make_x((5, 6, 17, 3), dtype, "channels_last", mean=-3.0, std=0.5, seed=2)
    assert_stats_close(bn.batch_norm_stats(x, backend=backend), x)


def test_stats_nan_stays_in_its_channel(backend):
    x = make_x((4, 3, 50))
    x[2, 1, 7] = float("nan")
    mean, m2 = bn.batch_norm_stats(x, backend=backend)
    assert mean[1].isnan() and m2[1].isnan()
    keep = torch.tensor([0, 2])
    assert torch.isfinite(mean[keep]).all() and torch.isfinite(m2[keep]).all()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_native_results_do_not_depend_on_thread_count(layout):
    # A property of the C++ kernels' work split, so only the native backend is checked.
    backend = "native"
    if not _backend.native_can_run(torch.device("cpu"), "bn_stats"):
        pytest.skip("fastaccum._C is not built (FASTACCUM_NO_EXT=1)")
    x = make_x((6, 32, 45, 45), layout=layout, std=3.0, seed=4)
    mean, invstd, weight, bias = make_params(x)
    grad = make_grad(x, mean, invstd, weight, bias)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            stats = bn.batch_norm_stats(x, backend=backend)
            sums = bn.batch_norm_backward_reduce(grad, x, mean, invstd, weight, bias, True)
            results.append((*stats, *sums))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- apply / backward

SHAPES = [(1, 3), (5, 4, 1, 1), (3, 5, 7, 9), (2, 7, 1023), (2, 3, 2, 5, 3)]


@over_cases(SHAPES)
def test_apply_matches_float64(backend, shape, dtype, layout, relu):
    x, mean, invstd, weight, bias, _ = case_inputs(shape, dtype, layout)
    y = bn.batch_norm_apply(x, mean, invstd, weight, bias, relu, backend=backend)
    assert y.dtype == dtype and y.shape == x.shape
    assert_same_layout(y, x)
    assert_close_rel(y, truth_apply(x, mean, invstd, weight, bias, relu), Y_RTOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_without_affine_and_bf16_params(backend, dtype):
    x = make_x((4, 6, 11), dtype, "channels_last", seed=7)
    mean, invstd, weight, bias = make_params(x)
    y = bn.batch_norm_apply(x, mean, invstd, backend=backend)
    assert_close_rel(y, truth_apply(x, mean, invstd, None, None, False), Y_RTOL[dtype])
    # Parameters in the module's dtype are read as fp32.
    w16, b16 = weight.bfloat16(), bias.bfloat16()
    y = bn.batch_norm_apply(x, mean, invstd, w16, b16, True, backend=backend)
    assert_close_rel(y, truth_apply(x, mean, invstd, w16, b16, True), Y_RTOL[dtype])


def test_apply_large_mean(backend):
    """(x - mean) first: x * a + b with a folded shift would cancel 1e4 against 1e4."""
    x = make_x((4, 3, 20, 20), mean=1e4, std=1.0, seed=8)
    mean, invstd, weight, bias = make_params(x)
    y = bn.batch_norm_apply(x, mean, invstd, weight, bias, backend=backend)
    assert_close_rel(y, truth_apply(x, mean, invstd, weight, bias, False), 1e-5)


@over_cases(SHAPES)
def test_backward_reduce_matches_float64(backend, shape, dtype, layout, relu):
    x, mean, invstd, weight, bias, grad = case_inputs(shape, dtype, layout)
    got = bn.batch_norm_backward_reduce(grad, x, mean, invstd, weight, bias, relu, backend=backend)
    assert isinstance(got, bn.BatchNormGradSums)
    assert_sums_close(got, truth_grad_sums(grad, x, mean, invstd, weight, bias, relu))


@over_cases(SHAPES)
def test_backward_apply_matches_float64(backend, shape, dtype, layout, relu):
    x, mean, invstd, weight, bias, grad = case_inputs(shape, dtype, layout)
    count = x.numel() // x.shape[1]
    sum_dy, sum_dy_xhat = (per_channel(x.shape[1], 9 + i) * count for i in range(2))
    got = bn.batch_norm_backward_apply(
        grad, x, mean, invstd, weight, bias, sum_dy, sum_dy_xhat, count, relu, backend=backend
    )
    assert got.dtype == dtype
    assert_same_layout(got, x)
    want = truth_grad_input(grad, x, mean, invstd, weight, bias, sum_dy, sum_dy_xhat, count, relu)
    assert_close_rel(got, want, Y_RTOL[dtype])


def test_backward_with_gradient_in_another_layout(backend):
    """grad_y arrives contiguous while x is channels-last (or the reverse)."""
    for x_layout, g_layout in (("channels_last", "contiguous"), ("contiguous", "channels_last")):
        x = make_x((3, 8, 6, 5), layout=x_layout)
        mean, invstd, weight, bias = make_params(x)
        grad = make_grad(x, mean, invstd, weight, bias)
        grad = make_x(grad.shape, layout=g_layout).copy_(grad)
        sums = bn.batch_norm_backward_reduce(grad, x, mean, invstd, weight, bias, backend=backend)
        assert_sums_close(sums, truth_grad_sums(grad, x, mean, invstd, weight, bias, False))
        gx = bn.batch_norm_backward_apply(
            grad, x, mean, invstd, weight, bias, *sums, 90, backend=backend
        )
        assert_same_layout(gx, x)
        want = truth_grad_input(grad, x, mean, invstd, weight, bias, *sums, 90, False)
        assert_close_rel(gx, want, 1e-5)


# --------------------------------------------------------------------------- batch_norm_train


def train_inputs(shape, dtype, layout, *, affine=True, seed=0):
    x = make_x(shape, dtype, layout, mean=0.3, std=1.7, seed=seed)
    c = shape[1]
    weight = per_channel(c, seed + 1, low=0.5, high=1.5) if affine else None
    bias = per_channel(c, seed + 2) if affine else None
    return x, weight, bias


def run_train(x, weight, bias, relu, backend, *, scale=None, offset=None, grad=None):
    """batch_norm_train forward + backward; returns (y, grad_x, grad_weight, grad_bias)."""
    x = x.detach().requires_grad_()
    params = [p.detach().requires_grad_() if p is not None else None for p in (weight, bias)]
    stats = bn.batch_norm_stats(x.detach(), backend=backend)
    count = x.numel() // x.shape[1]
    invstd = torch.rsqrt(stats.m2 / count + EPS)
    y = bn.batch_norm_train(
        x, stats.mean, invstd, *params, scale=scale, offset=offset, relu=relu, backend=backend
    )
    y.backward(grad)
    return y, x.grad, *(p.grad if p is not None else None for p in params)


def torch_float64(x, weight, bias, relu, grad):
    """y and gradients of F.batch_norm (training, no running stats) (+ ReLU) in float64."""
    x = x.detach().double().requires_grad_()
    params = [
        p.detach().double().requires_grad_() if p is not None else None for p in (weight, bias)
    ]
    y = F.batch_norm(x, None, None, *params, training=True, eps=EPS)
    if relu:
        y = F.relu(y)
    y.backward(grad.double())
    return y, x.grad, *(p.grad if p is not None else None for p in params)


TRAIN_RTOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("shape", [(6, 5), (4, 3, 7, 9), (2, 4, 3, 5, 2)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("relu", [False, True])
def test_train_matches_float64_autograd(backend, shape, dtype, layout, relu):
    x, weight, bias = train_inputs(shape, dtype, layout)
    with torch.no_grad():
        m, m2 = truth_stats(x)
        invstd = torch.rsqrt(m2 / (x.numel() // shape[1]) + EPS)
    grad = make_grad(x, m.float(), invstd.float(), weight, bias)
    got = run_train(x, weight, bias, relu, backend, grad=grad)
    want = torch_float64(x, weight, bias, relu, grad)
    assert got[0].dtype == dtype
    assert_same_layout(got[0], x)
    assert got[1].dtype == dtype and got[1].shape == x.shape
    for g, w in zip(got, want, strict=True):
        assert_close_rel(g, w, TRAIN_RTOL[dtype])


@pytest.mark.parametrize("relu", [False, True])
def test_train_without_affine(backend, relu):
    x, _, _ = train_inputs((5, 4, 6, 3), torch.float32, "channels_last", affine=False)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    if relu:  # keep the upstream gradient away from the ReLU's kink (see make_grad)
        with torch.no_grad():
            m, m2 = truth_stats(x)
            invstd = torch.rsqrt(m2 / (x.numel() // 4) + EPS)
        grad = make_grad(x, m.float(), invstd.float(), None, None)
    got = run_train(x, None, None, relu, backend, grad=grad)
    want = torch_float64(x, None, None, relu, grad)
    assert got[2] is None and got[3] is None
    for g, w in zip(got[:2], want[:2], strict=True):
        assert_close_rel(g, w, 2e-5)


def renorm_float64(x, weight, bias, scale, offset, relu, grad):
    """Batch Renormalization in float64 autograd, r and d detached."""
    x = x.detach().double().requires_grad_()
    w, b = (p.detach().double().requires_grad_() for p in (weight, bias))
    dims = dims_of(x)
    mean = x.mean(dims, keepdim=True)
    var = (x - mean).square().mean(dims, keepdim=True)
    xhat = (x - mean) / (var + EPS).sqrt()
    y = view_c(w, x) * (xhat * view_c(scale, x) + view_c(offset, x)) + view_c(b, x)
    if relu:
        y = y.clamp_min(0)
    y.backward(grad.double())
    return y, x.grad, w.grad, b.grad


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("relu", [False, True])
def test_train_renorm_matches_float64_autograd(backend, layout, relu):
    x, weight, bias = train_inputs((6, 5, 4, 7), torch.float32, layout, seed=11)
    scale = per_channel(5, 20, low=0.7, high=1.4)
    offset = per_channel(5, 21, low=-0.5, high=0.5)
    with torch.no_grad():
        m, m2 = truth_stats(x)
        invstd = torch.rsqrt(m2 / (x.numel() // 5) + EPS)
    # The pre-activation is weight' * xhat + bias' with the renorm folded into the affine.
    grad = make_grad(x, m.float(), invstd.float(), weight * scale, weight * offset + bias)
    got = run_train(x, weight, bias, relu, backend, scale=scale, offset=offset, grad=grad)
    want = renorm_float64(x, weight, bias, scale, offset, relu, grad)
    for g, w in zip(got, want, strict=True):
        assert_close_rel(g, w, 2e-5)


def test_train_renorm_scale_and_offset_get_no_gradient(backend):
    x, weight, bias = train_inputs((4, 3, 5), torch.float32, "contiguous")
    scale = per_channel(3, 1, low=0.9, high=1.1).requires_grad_()
    offset = per_channel(3, 2, low=-0.1, high=0.1).requires_grad_()
    run_train(x, weight, bias, False, backend, scale=scale, offset=offset, grad=torch.ones(x.shape))
    assert scale.grad is None and offset.grad is None


def test_train_bf16_parameters_get_bf16_gradients(backend):
    x, weight, bias = train_inputs((4, 3, 5, 5), torch.bfloat16, "channels_last")
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).bfloat16()
    got = run_train(x, weight.bfloat16(), bias.bfloat16(), False, backend, grad=grad)
    want = torch_float64(x, weight.bfloat16(), bias.bfloat16(), False, grad)
    assert got[2].dtype == torch.bfloat16 and got[3].dtype == torch.bfloat16
    for g, w in zip(got, want, strict=True):
        assert_close_rel(g, w, 1e-2)


@pytest.mark.parametrize("relu", [False, True])
def test_apply_gradient_with_constant_statistics(backend, relu):
    """Eval mode: batch_norm_apply with running statistics differentiates x, weight, bias."""
    x, weight, bias = train_inputs((5, 4, 3, 3), torch.float32, "channels_last", seed=6)
    mean, invstd = per_channel(4, 30, low=0.0, high=0.5), per_channel(4, 31, low=0.5, high=2.0)
    grad = make_grad(x, mean, invstd, weight, bias)
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]
    y = bn.batch_norm_apply(*leaves[:1], mean, invstd, *leaves[1:], relu, backend=backend)
    y.backward(grad)
    ref = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    want = truth_apply(ref[0], mean, invstd, ref[1], ref[2], relu)
    want.backward(grad.double())
    assert_close_rel(y, want, 1e-5)
    for got, w in zip(leaves, ref, strict=True):
        assert_close_rel(got.grad, w.grad, 2e-5)


def penalty_grads(fn, x, weight, bias, c):
    """Gradients of a gradient penalty, ||dL/dx||^2 + ||dL/dweight||^2 with L = sum(y * c),
    with respect to x, weight and bias (double backward through ``fn(x, weight, bias)``)."""
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]
    y = fn(*leaves)
    gx, gw = torch.autograd.grad((y * c).sum(), leaves[:2], create_graph=True)
    (gx.square().sum() + gw.square().sum()).backward()
    return [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]


@pytest.mark.parametrize("kind", ["train", "train-renorm", "apply"])
@pytest.mark.parametrize("relu", [False, True])
def test_double_backward_matches_float64(backend, kind, relu):
    """backward(create_graph=True) gives gradients that differentiate again (a gradient
    penalty), equal to float64 autograd through F.batch_norm: batch statistics, Batch
    Renormalization's r and d (constants), and constant statistics."""
    x, weight, bias = train_inputs((6, 3, 4, 5), torch.float32, "channels_last", seed=8)
    c = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    scale = per_channel(3, 40, low=0.7, high=1.4) if kind == "train-renorm" else None
    offset = per_channel(3, 41, low=-0.5, high=0.5) if kind == "train-renorm" else None
    mean, invstd = per_channel(3, 42, low=0.0, high=0.5), per_channel(3, 43, low=0.5, high=2.0)

    def ours(x, w, b):
        if kind == "apply":
            return bn.batch_norm_apply(x, mean, invstd, w, b, relu, backend=backend)
        stats = bn.batch_norm_stats(x.detach(), backend=backend)
        inv = torch.rsqrt(stats.m2 / (x.numel() // 3) + EPS)
        return bn.batch_norm_train(
            x, stats.mean, inv, w, b, scale=scale, offset=offset, relu=relu, backend=backend
        )

    def float64(x, w, b):
        if kind == "apply":
            var = invstd.double() ** -2 - EPS
            y = F.batch_norm(x, mean.double(), var, w, b, False, 0.0, EPS)
        else:
            if scale is not None:
                w, b = w * scale.double(), b + w * offset.double()
            y = F.batch_norm(x, None, None, w, b, True, 0.0, EPS)
        return torch.relu(y) if relu else y

    got = penalty_grads(ours, x, weight, bias, c)
    want = penalty_grads(float64, *(t.double() for t in (x, weight, bias)), c.double())
    assert want[0].abs().max() > 0 and want[1].abs().max() > 0
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.float32
        assert_close_rel(g, w, 1e-4)


def test_apply_of_empty_batch(backend):
    x = torch.empty(0, 3, 4, 4, requires_grad=True)
    mean, invstd = torch.zeros(3), torch.ones(3)
    weight = torch.ones(3, requires_grad=True)
    y = bn.batch_norm_apply(x, mean, invstd, weight, None, backend=backend)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.count_nonzero(weight.grad) == 0


# --------------------------------------------------------------------------- bad input


def test_bad_input_is_a_clear_error(backend):
    x = make_x((4, 3, 5))
    mean, invstd, weight, bias = make_params(x)
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
        bn.batch_norm_apply(x, mean, invstd, torch.ones(4), bias, backend=backend)
    with pytest.raises(ValueError, match=r"mean must have shape \(3,\)"):
        bn.batch_norm_train(x, mean[:2], invstd, weight, bias, backend=backend)
    with pytest.raises(TypeError, match="expected one of float32, bfloat16, float16"):
        bn.batch_norm_stats(x.to(torch.int32), backend=backend)
    with pytest.raises(TypeError, match="float64"):
        bn.batch_norm_stats(x.double(), backend=backend)
    with pytest.raises(ValueError, match="no channels"):
        bn.batch_norm_stats(torch.empty(4, 0, 5), backend=backend)
    with pytest.raises(ValueError, match="no elements per channel"):
        bn.batch_norm_stats(torch.empty(0, 3, 5), backend=backend)
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        bn.batch_norm_stats(torch.randn(5), backend=backend)
    with pytest.raises(ValueError, match="is on meta but x is on cpu"):
        bn.batch_norm_apply(x, mean, invstd, weight.to("meta"), bias, backend=backend)
    with pytest.raises(TypeError, match="floating-point"):
        bn.batch_norm_apply(x, mean, invstd.to(torch.int64), backend=backend)
    with pytest.raises(ValueError, match="grad_y"):
        bn.batch_norm_backward_reduce(x[:2], x, mean, invstd, backend=backend)
    with pytest.raises(ValueError, match="count must be >= 1"):
        bn.batch_norm_backward_apply(x, x, mean, invstd, None, None, mean, mean, 0)
    with pytest.raises(ValueError, match="must not require grad"):
        bn.batch_norm_train(x, mean.requires_grad_(), invstd, weight, bias, backend=backend)


def test_native_ops_check_their_input():
    """Called directly (no Python wrapper), the C++ ops reject bad input with a message."""
    if not _backend.native_can_run(torch.device("cpu"), "bn_apply"):
        pytest.skip("fastaccum._C not built")
    x = make_x((4, 3, 5))
    ops = torch.ops.fastaccum
    with pytest.raises(RuntimeError, match=r"weight must have shape \(3,\)"):
        ops.bn_apply(x, torch.zeros(3), torch.ones(3), torch.ones(2), None, False)
    with pytest.raises(RuntimeError, match="expected one of float32, bfloat16, float16"):
        ops.bn_stats(x.to(torch.int16))
    with pytest.raises(RuntimeError, match="no elements per channel"):
        ops.bn_backward_reduce(x[:0], x[:0], torch.zeros(3), torch.ones(3), None, None, False)
    with pytest.raises(RuntimeError, match="grad_y has shape"):
        ops.bn_backward_reduce(x[:2], x, torch.zeros(3), torch.ones(3), None, None, False)


def test_backend_choice():
    """No CUDA kernels for these ops: CUDA tensors go to Triton (when it can run there)."""
    if os.environ.get("FASTACCUM_BACKEND"):
        pytest.skip("FASTACCUM_BACKEND forces the choice")
    cuda = torch.device("cuda")
    assert not _backend.native_can_run(cuda, "bn_stats")
    expected = _backend.TRITON if _backend.triton_can_run(cuda) else _backend.REFERENCE
    assert _backend.select(cuda, op="bn_stats") == expected
    if _backend.has_extension():
        assert _backend.select("cpu", op="bn_backward_apply") == _backend.NATIVE


# --------------------------------------------------------------------------- torch.library


def native_samples():
    x32 = make_x((3, 4, 5, 6), layout="channels_last")
    x16 = make_x((5, 3, 7), torch.bfloat16)
    samples = []
    for x, affine in ((x32, True), (x16, False)):
        mean, invstd, weight, bias = make_params(x, affine=affine)
        grad = make_grad(x, mean, invstd, weight, bias)
        sums = bn.batch_norm_backward_reduce_ref(grad, x, mean, invstd, weight, bias, True)
        count = x.numel() // x.shape[1]
        samples += [
            ("bn_stats", (x,)),
            ("bn_apply", (x, mean, invstd, weight, bias, True)),
            ("bn_backward_reduce", (grad, x, mean, invstd, weight, bias, True)),
            ("bn_backward_apply", (grad, x, mean, invstd, weight, bias, *sums, count, True)),
        ]
    return samples


def test_opcheck_native_ops():
    if not _backend.native_can_run(torch.device("cpu"), "bn_stats"):
        pytest.skip("fastaccum._C not built")
    for name, args in native_samples():
        torch.library.opcheck(getattr(torch.ops.fastaccum, name).default, args)


def test_compile_fullgraph(backend):
    """Statistics, forward and backward traced as one graph with the ops as nodes."""

    def step(x, weight, bias):
        stats = bn.batch_norm_stats(x.detach(), backend=backend)
        invstd = torch.rsqrt(stats.m2 / (x.numel() // x.shape[1]) + EPS)
        y = bn.batch_norm_train(x, stats.mean, invstd, weight, bias, relu=True, backend=backend)
        return y.square().sum()

    x, weight, bias = train_inputs((4, 3, 5, 5), torch.float32, "channels_last")
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]
    step(*leaves).backward()
    want = [t.grad for t in leaves]
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]
    compiled(*leaves).backward()
    torch._dynamo.reset()
    for got, w in zip(leaves, want, strict=True):
        torch.testing.assert_close(got.grad, w, rtol=1e-5, atol=1e-6)
