"""AccumBatchNorm (merged mode): running statistics equal one large batch's, computed in
float64 from the same data, across micro-batches of different sizes."""

import pytest
import torch

import fastaccum
from fastaccum.nn import AccumBatchNorm1d, AccumBatchNorm2d, convert_batchnorm, end_window
from fastaccum.nn.batchnorm import RenormSchedule
from tests.helpers import assert_close_rel

SIZES = [2, 5, 1, 7, 3]


def micro_batches(mean=0.0, std=1.0, seed=0, shape=(6, 4, 5)):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, *shape, generator=gen) * std + mean for n in SIZES]


def expected_running(xs, init_mean, init_var, momentum):
    """float64 truth: one running-statistics update from the whole window's samples."""
    x = torch.cat(xs).double()
    dims = [0, *range(2, x.dim())]
    mean = x.mean(dims)
    var = x.var(dims, correction=1)
    return (1 - momentum) * init_mean + momentum * mean, (1 - momentum) * init_var + momentum * var


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (1e4, 1.0)])
def test_merged_running_stats_match_one_large_batch(mean, std):
    xs = micro_batches(mean, std)
    bn = AccumBatchNorm2d(6, momentum=0.1)
    for x in xs:
        bn(x)
    assert bn.num_batches_tracked.item() == 0  # nothing folded before the window ends
    end_window(bn)
    want_mean, want_var = expected_running(xs, torch.zeros(6).double(), torch.ones(6).double(), 0.1)
    assert_close_rel(bn.running_mean, want_mean, 1e-6)
    assert_close_rel(bn.running_var, want_var, 1e-6)
    assert bn.num_batches_tracked.item() == 1


def test_native_batchnorm_does_not_match_under_accumulation():
    """The problem being solved: nn.BatchNorm fed the same micro-batches drifts away."""
    xs = micro_batches(seed=1)
    bn = torch.nn.BatchNorm2d(6, momentum=0.1)
    for x in xs:
        bn(x)
    want_mean, _ = expected_running(xs, torch.zeros(6).double(), torch.ones(6).double(), 0.1)
    rel = (bn.running_mean.double() - want_mean).norm() / want_mean.norm()
    assert rel > 1e-2


def test_cumulative_average_when_momentum_is_none():
    windows = [micro_batches(seed=s) for s in (2, 3)]
    bn = AccumBatchNorm2d(6, momentum=None)
    stats = []
    for xs in windows:
        for x in xs:
            bn(x)
        end_window(bn)
        x = torch.cat(xs).double()
        stats.append((x.mean((0, 2, 3)), x.var((0, 2, 3), correction=1)))
    assert_close_rel(bn.running_mean, (stats[0][0] + stats[1][0]) / 2, 1e-6)
    assert_close_rel(bn.running_var, (stats[0][1] + stats[1][1]) / 2, 1e-6)


def test_training_output_is_batchnorm_output():
    x = micro_batches(seed=4)[3]
    bn, ref = AccumBatchNorm2d(6), torch.nn.BatchNorm2d(6)
    torch.nn.init.normal_(bn.weight)
    ref.load_state_dict(bn.state_dict())
    assert_close_rel(bn(x), ref(x), 1e-6)


def test_1d_with_sequence_dimension():
    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(n, 3, 9, generator=gen) for n in SIZES]
    bn = AccumBatchNorm1d(3)
    for x in xs:
        bn(x)
    end_window(bn)
    want_mean, want_var = expected_running(xs, torch.zeros(3).double(), torch.ones(3).double(), 0.1)
    assert_close_rel(bn.running_mean, want_mean, 1e-6)
    assert_close_rel(bn.running_var, want_var, 1e-6)


def cnn(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3),
        torch.nn.BatchNorm2d(6),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(6 * 4 * 4, 2),
    )


def test_conversion_round_trips_state_dict_and_keeps_eval_outputs():
    model = cnn()
    for _ in range(3):  # give it non-trivial running statistics
        model(torch.randn(4, 3, 6, 6))
    model.eval()
    x = torch.randn(2, 3, 6, 6)
    before = model(x)
    keys = list(model.state_dict())
    convert_batchnorm(model)
    assert type(model[1]) is AccumBatchNorm2d
    assert list(model.state_dict()) == keys
    assert torch.equal(model(x), before)
    plain = cnn(seed=1)
    plain.load_state_dict(model.state_dict())  # and back into plain nn.BatchNorm
    plain.eval()
    assert torch.equal(plain(x), before)


def test_checkpoint_recomputation_is_not_counted_twice():
    from torch.utils.checkpoint import checkpoint

    counts = []
    for ckpt in (False, True):
        model = convert_batchnorm(cnn())
        x = torch.randn(5, 3, 6, 6, requires_grad=True)
        out = checkpoint(model, x, use_reentrant=False) if ckpt else model(x)
        out.sum().backward()
        counts.append((model[1].window_count, model[1].window_mean.clone()))
    assert counts[0][0] == counts[1][0] == 5 * 4 * 4
    assert torch.equal(counts[0][1], counts[1][1])


def test_wrapper_closes_the_window_at_each_boundary():
    model = convert_batchnorm(cnn())
    opt = fastaccum.wrap(torch.optim.SGD(model.parameters(), lr=0.0), len(SIZES), model=model)
    gen = torch.Generator().manual_seed(6)
    xs = [torch.randn(n, 3, 6, 6, generator=gen) for n in SIZES]
    conv_outs = []
    for x in xs:
        with torch.no_grad():
            conv_outs.append(model[0](x))
        model(x).sum().backward()
        opt.step()
    assert model[1].num_batches_tracked.item() == 1
    want_mean, want_var = expected_running(
        conv_outs, torch.zeros(6).double(), torch.ones(6).double(), 0.1
    )
    assert_close_rel(model[1].running_mean, want_mean, 1e-6)
    assert_close_rel(model[1].running_var, want_var, 1e-6)


def test_bad_mode_is_refused():
    with pytest.raises(ValueError, match="mode must be one of"):
        AccumBatchNorm2d(4, mode="average")
    with pytest.raises(ValueError, match="mode must be one of"):
        convert_batchnorm(cnn(), mode="average")


# ---------------------------------------------------------------------------- renorm mode

EPS = 1e-5


def renorm_windows(seed=7, channels=4):
    """Two windows of micro-batches of uneven size, each with its own offset and scale, so
    that r and d differ per micro-batch and clipping engages."""
    gen = torch.Generator().manual_seed(seed)
    windows = []
    for sizes in ([2, 5, 1, 7, 3], [3, 1, 4]):
        window = []
        for n in sizes:
            scale = torch.rand(1, channels, 1, 1, generator=gen) * 3 + 0.2
            shift = torch.randn(1, channels, 1, 1, generator=gen) * 2
            window.append(torch.randn(n, channels, 3, 2, generator=gen) * scale + shift)
        windows.append(window)
    return windows


def batch_moments(x):
    """float64 per-channel mean and biased variance."""
    x = x.double()
    dims = [0, *range(2, x.dim())]
    return x.mean(dims), x.var(dims, correction=0)


def expected_factors(x, reference, rmax, dmax):
    """float64 r, d of micro-batch x against all samples in ``reference``."""
    mean_b, var_b = batch_moments(x)
    mean_ref, var_ref = batch_moments(torch.cat(reference))
    sigma_ref = (var_ref + EPS).sqrt()
    r = ((var_b + EPS).sqrt() / sigma_ref).clamp(1 / rmax, rmax)
    d = ((mean_b - mean_ref) / sigma_ref).clamp(-dmax, dmax)
    return r, d


def expected_output(x, weight, bias, r, d):
    """float64 y = weight * (xhat * r + d) + bias with micro-batch statistics."""
    mean_b, var_b = batch_moments(x)
    view = (1, -1, 1, 1)
    xhat = (x.double() - mean_b.view(view)) / (var_b.view(view) + EPS).sqrt()
    return weight.double().view(view) * (xhat * r.view(view) + d.view(view)) + bias.double().view(
        view
    )


def renorm_bn(channels=4, seed=0, **options):
    options = {"plain_windows": 0, "warmup_windows": 0, **options}
    bn = AccumBatchNorm2d(channels, mode="renorm", **options)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(channels, generator=gen))
        bn.bias.copy_(torch.randn(channels, generator=gen))
    return bn


@pytest.mark.parametrize("rmax,dmax", [(1.5, 0.4), (100.0, 100.0)])
def test_renorm_factors_match_float64_reference_statistics(rmax, dmax):
    """Reference = previous window + this window so far (incl. the current micro-batch);
    before the first window ends, only the window so far."""
    bn = renorm_bn(rmax=rmax, dmax=dmax)
    previous = []
    clipped = 0
    for window in renorm_windows():
        for i, x in enumerate(window):
            y = bn(x)
            want_r, want_d = expected_factors(x, previous + window[: i + 1], rmax, dmax)
            r, d = bn.renorm_factors
            assert_close_rel(r, want_r, 1e-6)
            assert_close_rel(d, want_d, 1e-6)
            assert_close_rel(y, expected_output(x, bn.weight, bn.bias, want_r, want_d), 1e-5)
            clipped += int(((want_r - rmax).abs() < 1e-12).sum() + (want_d.abs() == dmax).sum())
        end_window(bn)
        previous = window
    if rmax < 2:
        assert clipped > 0  # the data does exercise the clip


def test_renorm_first_micro_batch_is_plain_batchnorm():
    x = renorm_windows()[0][0]
    bn = renorm_bn()
    bn(x)
    r, d = bn.renorm_factors
    assert torch.allclose(r, torch.ones_like(r), rtol=0, atol=1e-12)
    assert torch.equal(d, torch.zeros_like(d))


def test_renorm_without_correction_equals_batchnorm_outputs_and_grads():
    """rmax=1, dmax=0 (r=1, d=0) is plain BatchNorm, for outputs and all gradients (to
    float32 rounding: the fused kernels do not add in F.batch_norm's order)."""
    bn = renorm_bn(rmax=1.0, dmax=0.0)
    ref = torch.nn.BatchNorm2d(4)
    ref.load_state_dict(bn.state_dict())
    for window in renorm_windows():
        for x in window:
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            ya, yb = bn(xa), ref(xb)
            assert_close_rel(ya, yb, 1e-6)
            g = torch.randn_like(ya)
            ya.backward(g)
            yb.backward(g)
            assert_close_rel(xa.grad, xb.grad, 1e-5)
        end_window(bn)
    assert_close_rel(bn.weight.grad, ref.weight.grad, 1e-5)
    assert_close_rel(bn.bias.grad, ref.bias.grad, 1e-5)


def test_renorm_gradients_treat_r_and_d_as_constants():
    """Autograd gradients equal a float64 computation with r and d detached: gradients flow
    through the micro-batch statistics only."""
    bn = renorm_bn(rmax=2.0, dmax=1.0)
    windows = renorm_windows(seed=8)
    for x in windows[0]:
        bn(x)
    end_window(bn)
    for i, x in enumerate(windows[1]):
        want_r, want_d = expected_factors(x, windows[0] + windows[1][: i + 1], 2.0, 1.0)
        assert ((want_r - 1).abs() > 1e-3).all()  # a real correction, not r = 1
        xa = x.clone().requires_grad_()
        bn.weight.grad = bn.bias.grad = None
        y = bn(xa)
        g = torch.randn_like(y)
        y.backward(g)
        x64 = x.double().requires_grad_()
        w64 = bn.weight.detach().double().requires_grad_()
        b64 = bn.bias.detach().double().requires_grad_()
        expected_output(x64, w64, b64, want_r, want_d).backward(g.double())
        assert_close_rel(xa.grad, x64.grad, 1e-5)
        assert_close_rel(bn.weight.grad, w64.grad, 1e-5)
        assert_close_rel(bn.bias.grad, b64.grad, 1e-5)


def test_renorm_schedule_opens_limits_linearly_in_windows():
    schedule = RenormSchedule(rmax=3.0, dmax=5.0, plain_windows=2, warmup_windows=4)
    got = [limit for w in range(8) for limit in schedule.limits(w)]
    want = [(1, 0), (1, 0), (1, 0), (1.5, 1.25), (2, 2.5), (2.5, 3.75), (3, 5), (3, 5)]
    assert got == pytest.approx([limit for pair in want for limit in pair])
    assert RenormSchedule(plain_windows=1, warmup_windows=0).limits(1) == (3.0, 5.0)


def test_renorm_module_follows_the_schedule_and_resumes_it_from_a_checkpoint():
    # d would be far beyond 0.5 with the limits fully open; the schedule caps it.
    bn = renorm_bn(rmax=3.0, dmax=4.0, plain_windows=1, warmup_windows=8)
    window = [torch.randn(4, 4, 3, 2) + 10 * i for i in range(3)]
    for x in window:
        bn(x)
        assert torch.equal(bn.renorm_factors[1], torch.zeros(4, dtype=torch.float64))
    end_window(bn)
    end_window(bn)  # an empty window does not count
    bn(window[0])
    assert bn.renorm_factors[1].abs().max().item() == pytest.approx(0.0)  # t = 0 at w = 1
    end_window(bn)
    bn(window[0] - 50)
    assert bn.renorm_factors[1].abs().max().item() == pytest.approx(0.5)  # t = 1/8 at w = 2
    resumed = renorm_bn(rmax=3.0, dmax=4.0, plain_windows=1, warmup_windows=8)
    resumed(window[0])  # reads the (zero) window count before the checkpoint loads
    resumed.load_state_dict(bn.state_dict())
    resumed.discard_window()
    for x in window:
        resumed(x)
    end_window(resumed)  # the third window: t = 2/8
    resumed(window[0] - 50)
    assert resumed.renorm_factors[1].abs().max().item() == pytest.approx(1.0)


def test_renorm_discarded_window_keeps_the_previous_window():
    bn = renorm_bn()
    windows = renorm_windows(seed=11)
    for x in windows[0]:
        bn(x)
    end_window(bn)
    bn(windows[1][0] * 5)
    end_window(bn, discard=True)
    x = windows[1][1]
    bn(x)
    want_r, want_d = expected_factors(x, windows[0] + [x], 3.0, 5.0)
    assert_close_rel(bn.renorm_factors[0], want_r, 1e-6)
    assert_close_rel(bn.renorm_factors[1], want_d, 1e-6)


def test_renorm_conversion_keeps_state_dict_and_eval_outputs():
    model = cnn()
    for _ in range(3):
        model(torch.randn(4, 3, 6, 6))
    model.eval()
    x = torch.randn(2, 3, 6, 6)
    before, keys = model(x), list(model.state_dict())
    convert_batchnorm(model, mode="renorm", rmax=2.0, dmax=1.0)
    assert model[1].renorm == RenormSchedule(rmax=2.0, dmax=1.0)
    assert list(model.state_dict()) == keys
    assert torch.equal(model(x), before)
    model.train()
    model(torch.randn(3, 3, 6, 6))
    end_window(model)
    plain = cnn(seed=1)
    plain.load_state_dict(model.state_dict())
    model.eval()
    plain.eval()
    assert torch.equal(plain(x), model(x))


@pytest.mark.parametrize(
    "options,error,match",
    [
        ({"rmax": 0.5}, ValueError, "rmax must be >= 1"),
        ({"dmax": -1.0}, ValueError, "dmax must be >= 0"),
        ({"rmax": float("inf")}, ValueError, "rmax must be a finite number"),
        ({"plain_windows": -1}, ValueError, "plain_windows must be >= 0"),
        ({"warmup_windows": 2.5}, TypeError, "warmup_windows must be an int"),
        ({"rmin": 2.0}, TypeError, "unknown BatchNorm option"),
    ],
)
def test_bad_renorm_options_are_refused(options, error, match):
    with pytest.raises(error, match=match):
        AccumBatchNorm2d(4, mode="renorm", **options)
    model = cnn()
    with pytest.raises(error, match=match):
        convert_batchnorm(model, mode="renorm", **options)
    assert type(model[1]) is torch.nn.BatchNorm2d  # nothing converted


def test_renorm_options_with_merged_mode_are_refused():
    with pytest.raises(ValueError, match="only apply to mode='renorm'"):
        AccumBatchNorm2d(4, mode="merged", rmax=2.0)


# ---------------------------------------------------------------------------- window mode


def window_bn(channels=4, seed=0, **kwargs):
    bn = AccumBatchNorm2d(channels, mode="window", **kwargs)
    if bn.affine:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            bn.weight.copy_(torch.randn(channels, generator=gen))
            bn.bias.copy_(torch.randn(channels, generator=gen))
    return bn


def test_window_first_micro_batch_is_plain_batchnorm():
    """With no earlier samples, the reference is the micro-batch: BatchNorm exactly."""
    bn, ref = window_bn(), torch.nn.BatchNorm2d(4)
    ref.load_state_dict(bn.state_dict())
    x = renorm_windows()[0][1]
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = bn(xa), ref(xb)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    assert_close_rel(ya, yb, 1e-6)
    assert_close_rel(xa.grad, xb.grad, 1e-5)
    assert_close_rel(bn.weight.grad, ref.weight.grad, 1e-6)
    assert_close_rel(bn.bias.grad, ref.bias.grad, 1e-6)


WINDOW_PATHS = {
    # (x dtype, module dtype, memory format, zero a weight in window 2, rtol)
    "fp32": (torch.float32, torch.float32, torch.contiguous_format, False, 1e-5),
    "fp32-channels_last": (torch.float32, torch.float32, torch.channels_last, False, 1e-5),
    # A weight exactly 0 while the previous window's gradient means are not: the input
    # gradient of that channel is not 0, which the backward-apply kernel cannot express.
    "fp32-zero-weight": (torch.float32, torch.float32, torch.contiguous_format, True, 1e-5),
    "fp64": (torch.float64, torch.float64, torch.contiguous_format, True, 1e-12),
    "bf16": (torch.bfloat16, torch.float32, torch.contiguous_format, False, 1e-2),
    "fp16-channels_last": (torch.float16, torch.float32, torch.channels_last, True, 2e-3),
}


@pytest.mark.parametrize("path", list(WINDOW_PATHS))
@pytest.mark.parametrize("affine", [True, False])
def test_window_forward_and_backward_match_float64_reference(affine, path, device):
    """Forward: normalized with merge(previous window, window so far). Backward: BatchNorm's
    backward with mean(g) and mean(g * xhat) over the previous window's and this window's
    backward passes so far. Every path: the fused kernels (float32, bfloat16, float16, both
    layouts), the torch ops (float64, a zero weight, and off the CPU)."""
    dtype, module_dtype, memory_format, zero_weight, rtol = WINDOW_PATHS[path]
    bn = window_bn(affine=affine).to(device, module_dtype)
    view = (1, -1, 1, 1)
    gen = torch.Generator().manual_seed(12)
    previous, prev_sums = [], []
    for k, window in enumerate(renorm_windows(seed=13)):
        if zero_weight and affine and k == 1:
            with torch.no_grad():
                bn.weight[1] = 0.0
        w = bn.weight.detach().double() if affine else torch.ones(4, dtype=torch.float64)
        b = bn.bias.detach().double() if affine else torch.zeros(4, dtype=torch.float64)
        w, b = w.to(device), b.to(device)
        window = [x.to(device, dtype).contiguous(memory_format=memory_format) for x in window]
        sums = []
        for i, x in enumerate(window):
            mean, var = batch_moments(torch.cat(previous + window[: i + 1]))
            invstd = (var + EPS).rsqrt()
            xhat = (x.double() - mean.view(view)) * invstd.view(view)
            xa = x.clone().requires_grad_()
            if affine:
                bn.weight.grad = bn.bias.grad = None
            y = bn(xa)
            assert y.dtype == dtype
            assert y.is_contiguous(memory_format=memory_format)
            assert_close_rel(y, w.view(view) * xhat + b.view(view), rtol)
            gy = torch.randn(y.shape, generator=gen).to(device, dtype)
            y.backward(gy)
            g = gy.double() * w.view(view)
            sums.append(torch.stack([g.sum((0, 2, 3)), (g * xhat).sum((0, 2, 3))]))
            count = sum(t.numel() // 4 for t in previous + window[: i + 1])
            g_mean, gx_mean = sum(prev_sums + sums) / count
            want = (g - g_mean.view(view) - xhat * gx_mean.view(view)) * invstd.view(view)
            assert xa.grad.dtype == dtype
            assert_close_rel(xa.grad, want, rtol)
            for c in range(4):  # per channel: a wrong channel cannot hide in the norm
                assert_close_rel(xa.grad[:, c], want[:, c], 2 * rtol)
            if affine:
                assert_close_rel(bn.weight.grad, (gy.double() * xhat).sum((0, 2, 3)), rtol)
                assert_close_rel(bn.bias.grad, gy.double().sum((0, 2, 3)), rtol)
        end_window(bn)
        previous, prev_sums = window, sums


def test_window_records_gradient_sums_when_the_input_needs_no_gradient():
    """A first layer's BatchNorm (input without grad) still feeds the window's gradient
    means, and its parameter gradients are BatchNorm's."""
    bn, ref = window_bn(), window_bn()
    x = renorm_windows()[0][1]
    gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    bn(x).backward(gy)
    ref(x.clone().requires_grad_()).backward(gy)
    assert bn.window_grad_count == ref.window_grad_count == x.numel() // 4
    assert torch.equal(bn.window_grad, ref.window_grad)
    assert torch.equal(bn.weight.grad, ref.weight.grad)
    assert torch.equal(bn.bias.grad, ref.bias.grad)


@pytest.mark.parametrize("mode", ["merged", "window"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_training_step_holds_no_more_memory_than_batchnorm(mode, dtype, memory_format):
    """Forward + backward of a training micro-batch peaks where nn.BatchNorm2d's does (output
    and input gradient): the statistics and the window normalization make no temporary the
    size of x (counted by LiveTensorBytes). The margin, a quarter of x, is for per-channel
    tensors (about 1 KiB here)."""
    from fastaccum import _backend
    from fastaccum.memory.peak import peak_bytes

    if _backend.select("cpu", op="bn_stats") == _backend.REFERENCE:
        pytest.skip("the pure-PyTorch references make temporaries; this is the kernels' property")
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 16, 12, 10, generator=gen).to(dtype)
    x = x.contiguous(memory_format=memory_format).requires_grad_()
    gy = torch.randn(x.shape, generator=gen).to(dtype).contiguous(memory_format=memory_format)
    peaks = {}
    for name, layer in (("native", torch.nn.BatchNorm2d(16)), ("fastaccum", None)):
        if layer is None:
            layer = AccumBatchNorm2d(16, mode=mode)
            layer(x.detach()).sum().backward()  # a previous window, for the reference
            end_window(layer)
        layer.to(dtype)

        def step(layer=layer):
            layer(x).backward(gy)
            x.grad = None
            layer.zero_grad()

        peaks[name] = peak_bytes(step, "cpu")[0]
    x_bytes = x.numel() * x.element_size()
    assert peaks["native"] >= 2 * x_bytes
    assert peaks["fastaccum"] < peaks["native"] + x_bytes / 4


@pytest.mark.parametrize("mode", ["renorm", "window"])
def test_checkpoint_recomputation_repeats_the_original_forward(mode):
    """Three micro-batches go forward before any goes backward, so a recomputation that
    read the window's current state would use other statistics; with and without
    reentrant checkpointing, outputs, gradients and counts equal the plain run's."""
    from torch.utils.checkpoint import checkpoint

    options = {"plain_windows": 0, "warmup_windows": 0} if mode == "renorm" else {}
    gen = torch.Generator().manual_seed(14)
    warm = [torch.randn(n, 3, 6, 6, generator=gen) for n in (3, 2)]
    xs = [torch.randn(n, 3, 6, 6, generator=gen) * (1 + i) for i, n in enumerate((2, 2, 5))]
    results = []
    for reentrant in (None, False, True):
        model = convert_batchnorm(cnn(seed=4), mode, **options)
        model[1].weight.data.normal_(generator=torch.Generator().manual_seed(9))
        for x in warm:  # a completed previous window
            model(x).sum().backward()
        end_window(model)
        model.zero_grad()
        if reentrant is None:
            outs = [model(x) for x in xs]
        else:
            outs = [checkpoint(model, x.requires_grad_(), use_reentrant=reentrant) for x in xs]
        for out in outs:
            out.square().sum().backward()
        bn = model[1]
        grads = [p.grad.clone() for p in model.parameters()]
        results.append((outs, grads, bn.window_count, bn.window_grad_count))
    outs0, grads0, n0, ng0 = results[0]
    assert n0 == sum(x.shape[0] for x in xs) * 4 * 4
    assert ng0 == (n0 if mode == "window" else 0)
    for outs, grads, n, ng in results[1:]:
        assert (n, ng) == (n0, ng0)
        for a, b in zip(outs0, outs, strict=True):
            assert torch.equal(a, b)
        for a, b in zip(grads0, grads, strict=True):
            assert_close_rel(b, a, 1e-6)


def test_window_bfloat16_input_keeps_its_dtype():
    bn = window_bn()
    x = renorm_windows()[0][3]
    y = bn(x.bfloat16().requires_grad_())
    assert y.dtype == torch.bfloat16
    assert_close_rel(y.float(), window_bn()(x), 1e-2)


@pytest.mark.parametrize("mode", ["merged", "renorm"])
def test_double_backward_matches_batchnorm(mode):
    """A gradient penalty through the layer (double backward) works in merged and renorm
    modes, which normalize with F.batch_norm, and equals nn.BatchNorm2d's on the first
    micro-batch (where renorm is plain BatchNorm); window mode's backward is
    once-differentiable and says so."""
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(4, 3, 5, 5, generator=gen)
    c = torch.randn(4, 3, 5, 5, generator=gen)
    grads = []
    for layer in (AccumBatchNorm2d(3, mode=mode), torch.nn.BatchNorm2d(3)):
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
        xa = x.clone().requires_grad_()
        (g,) = torch.autograd.grad((layer(xa) * c).sum(), xa, create_graph=True)
        g.square().sum().backward()
        grads.append(layer.weight.grad)
    assert grads[1].abs().max() > 0
    assert_close_rel(grads[0], grads[1], 1e-5)
    xa = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(window_bn(3)(xa).square().sum(), xa, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.square().sum().backward()


@pytest.mark.parametrize("mode", ["merged", "renorm", "window"])
def test_torch_compile_matches_eager(mode):
    """A compiled model (aot_eager) with AccumBatchNorm trains as the eager one: outputs,
    gradients, window counts and running statistics, over two windows."""
    import copy

    options = {"plain_windows": 0, "warmup_windows": 1} if mode == "renorm" else {}
    eager = convert_batchnorm(cnn(seed=6), mode, **options)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend="aot_eager")
    gen = torch.Generator().manual_seed(23)
    for _ in range(2):
        for n in (3, 2, 4):
            x = torch.randn(n, 3, 6, 6, generator=gen) * 2 + 1
            ya, yb = eager(x), compiled(x)
            assert_close_rel(yb, ya, 1e-6)
            ya.square().sum().backward()
            yb.square().sum().backward()
        end_window(eager)
        end_window(compiled_model)
    bn_a, bn_b = eager[1], compiled_model[1]
    assert bn_b.num_batches_tracked == bn_a.num_batches_tracked == 2
    assert_close_rel(bn_b.running_mean, bn_a.running_mean, 1e-6)
    assert_close_rel(bn_b.running_var, bn_a.running_var, 1e-6)
    for p, q in zip(compiled_model.parameters(), eager.parameters(), strict=True):
        assert_close_rel(p.grad, q.grad, 1e-5)


# ------------------------------------------------------------ window tensors, not buffers

WINDOW_TENSORS = ("window_mean", "window_m2", "prev_mean", "prev_m2", "window_grad", "prev_grad")


def mid_window_bn(mode="window"):
    """An AccumBatchNorm2d with one completed window and one micro-batch of the next."""
    bn = AccumBatchNorm2d(6, mode=mode)
    xs = micro_batches(mean=3.0, seed=8)
    for x in xs[:3]:
        bn(x.requires_grad_()).square().sum().backward()
    end_window(bn)
    bn(xs[3].requires_grad_()).square().sum().backward()
    assert bn.window_count > 0 and bn.prev_count > 0
    return bn


def window_of(bn):
    return {name: getattr(bn, name).clone() for name in WINDOW_TENSORS}


def test_window_tensors_are_not_buffers():
    """DDP broadcasts every buffer of rank 0 over the other ranks' (broadcast_buffers=True,
    its default), so the per-rank window tensors must not be buffers; state_dict keeps
    nn.BatchNorm's keys."""
    bn = mid_window_bn()
    names = {name for name, _ in bn.named_buffers()}
    assert names == {"running_mean", "running_var", "num_batches_tracked"}
    assert set(bn.state_dict()) == set(torch.nn.BatchNorm2d(6).state_dict())


def test_window_tensors_follow_module_moves_and_stay_float64():
    bn = mid_window_bn()
    before = window_of(bn)
    bn.half()
    assert bn.weight.dtype == torch.float16
    for name, value in before.items():
        assert getattr(bn, name).dtype == torch.float64, name
        assert torch.equal(getattr(bn, name), value), name
    bn.to(torch.float32)
    bn.to("meta")
    assert all(getattr(bn, name).is_meta for name in WINDOW_TENSORS)
    bn.to_empty(device="cpu")  # deferred initialization: the window starts empty
    for name in WINDOW_TENSORS:
        window = getattr(bn, name)
        assert window.device.type == "cpu" and window.dtype == torch.float64
        assert not window.any(), name


def test_window_tensors_survive_deepcopy_and_pickle():
    import copy
    import io

    bn = mid_window_bn()
    before = window_of(bn)
    buf = io.BytesIO()
    torch.save(bn, buf)
    for other in (copy.deepcopy(bn), torch.load(io.BytesIO(buf.getvalue()), weights_only=False)):
        assert {name for name, _ in other.named_buffers()} == {
            "running_mean",
            "running_var",
            "num_batches_tracked",
        }
        assert other.window_count == bn.window_count
        for name, value in before.items():
            assert torch.equal(getattr(other, name), value), name
            assert getattr(other, name) is not getattr(bn, name)


def test_module_pickled_with_window_buffers_loads_them_as_attributes():
    """A module pickled when the window tensors were (non-persistent) buffers."""
    import io

    bn = mid_window_bn()
    before = window_of(bn)
    for name in WINDOW_TENSORS:
        bn._buffers[name] = bn.__dict__.pop(name)
    buf = io.BytesIO()
    torch.save(bn, buf)
    loaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    assert not set(WINDOW_TENSORS) & set(loaded._buffers)
    for name, value in before.items():
        assert torch.equal(getattr(loaded, name), value), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_window_follows_a_move_of_parameters_and_buffers_by_data():
    """FSDP2's fully_shard moves parameters and buffers by assigning ``.data``; the window
    tensors follow at the next forward."""
    bn = mid_window_bn()
    before = window_of(bn)
    for t in [*bn.parameters(), *bn.buffers()]:
        t.data = t.data.cuda()
    x = micro_batches(mean=3.0, seed=8)[4].cuda()
    bn(x)
    assert all(getattr(bn, name).is_cuda for name in WINDOW_TENSORS)
    assert torch.equal(bn.prev_mean.cpu(), before["prev_mean"])


# ------------------------------------------------------------ a large mean, small micro-batches


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("mode", ["merged", "window"])
@pytest.mark.parametrize("mean,std", [(1e4, 1.0), (1e4, 0.05), (1e3, 0.01)])
def test_window_statistics_keep_their_digits_at_a_large_mean(mean, std, mode, backend, monkeypatch):
    """16 micro-batches of 2-5 samples with a mean of 1e4: running statistics within 1e-6
    of float64 statistics of the same float32 inputs. A micro-batch mean rounded to float32
    (off by up to 5e-4 at 1e4) made the merged variance 5.7e-5 off at std 1, 1e-3 at 0.05."""
    from fastaccum import _backend

    if backend == "native" and not _backend.native_can_run(torch.device("cpu"), "bn_stats"):
        pytest.skip("fastaccum._C is not built")
    monkeypatch.setenv("FASTACCUM_BACKEND", backend)
    bn = AccumBatchNorm1d(3, momentum=None, mode=mode)
    gen = torch.Generator().manual_seed(1)
    scale = torch.tensor([std, 2 * std, std / 2], dtype=torch.float64)
    xs = []
    for m in range(16):
        n = 2 + (m * 5) % 4
        x = (torch.randn(n, 3, generator=gen, dtype=torch.float64) * scale + mean).float()
        xs.append(x)
        bn(x)
    bn.end_window()
    full = torch.cat(xs).double()
    assert_close_rel(bn.running_mean, full.mean(0), 1e-6)
    assert_close_rel(bn.running_var, full.var(0), 1e-6)


# ------------------------------------------------------------ conversion: SyncBatchNorm, twice


def sync_cnn(seed=0):
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(cnn(seed))


def test_sync_batchnorm_is_converted():
    """nn.SyncBatchNorm becomes AccumBatchNormNd: same state_dict keys and eval outputs,
    and one window of micro-batches gives one large batch's running statistics."""
    from fastaccum.nn.batchnorm import AccumBatchNormNd

    model = sync_cnn()
    assert type(model[1]) is torch.nn.SyncBatchNorm
    model.eval()
    x = torch.randn(2, 3, 6, 6)
    before = model(x)
    keys = list(model.state_dict())
    convert_batchnorm(model, mode="window")
    assert type(model[1]) is AccumBatchNormNd and model[1].mode == "window"
    assert not hasattr(model[1], "process_group")
    assert list(model.state_dict()) == keys
    assert torch.equal(model(x), before)

    model.train()
    gen = torch.Generator().manual_seed(6)
    xs = [torch.randn(n, 3, 6, 6, generator=gen) * 2 + 5 for n in SIZES]
    with torch.no_grad():
        conv_outs = [model[0](x) for x in xs]
    opt = fastaccum.wrap(torch.optim.SGD(model.parameters(), lr=0.0), len(SIZES), model=model)
    for x in xs:
        model(x).sum().backward()
        opt.step()
    want_mean, want_var = expected_running(
        conv_outs, torch.zeros(6).double(), torch.ones(6).double(), 0.1
    )
    assert_close_rel(model[1].running_mean, want_mean, 1e-6)
    assert_close_rel(model[1].running_var, want_var, 1e-6)


def test_sync_batchnorm_conversion_takes_any_rank_from_2d():
    from fastaccum.nn.batchnorm import AccumBatchNormNd

    bn = convert_batchnorm(torch.nn.Sequential(torch.nn.SyncBatchNorm(3)))[0]
    assert isinstance(bn, AccumBatchNormNd)
    references = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d}
    for shape in [(4, 3), (4, 3, 5), (2, 3, 4, 5), (2, 3, 2, 2, 2)]:
        x = torch.randn(shape)
        ref = references.get(len(shape), torch.nn.BatchNorm3d)(3)
        ref.load_state_dict(bn.state_dict())
        assert_close_rel(bn(x), ref(x), 1e-6)
    with pytest.raises(ValueError, match="expected at least 2D input"):
        bn(torch.randn(3))


def train_window(model, seed, sizes=(3, 2, 4)):
    gen = torch.Generator().manual_seed(seed)
    for n in sizes:
        model(torch.randn(n, 3, 6, 6, generator=gen) * 2 + 1).square().sum().backward()
    end_window(model)


def test_second_conversion_switches_mode_at_a_window_boundary():
    """window -> merged between windows: the module then trains as a module converted to
    merged with the same history (its training output is BatchNorm's on the micro-batch),
    and keeps the previous window for a switch back."""
    model = convert_batchnorm(cnn(seed=3), mode="window")
    train_window(model, seed=1)
    twin = convert_batchnorm(cnn(seed=3), mode="merged")
    twin.load_state_dict(model.state_dict())
    prev = model[1].prev_mean.clone()
    assert convert_batchnorm(model, mode="merged") is model
    assert model[1].mode == "merged" and model[1].renorm is None
    assert torch.equal(model[1].prev_mean, prev)
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    assert torch.equal(model(x), twin(x))

    end_window(model)
    convert_batchnorm(model, mode="renorm", rmax=2.0, plain_windows=0, warmup_windows=0)
    assert model[1].mode == "renorm" and model[1].renorm == RenormSchedule(2.0, 5.0, 0, 0)


def test_second_conversion_in_the_middle_of_a_window_is_refused():
    model = torch.nn.Sequential(cnn(seed=3), torch.nn.BatchNorm1d(2))
    convert_batchnorm(model[0], mode="window")
    model[0](torch.randn(3, 3, 6, 6))
    window = model[0][1].window_count
    with pytest.raises(ValueError, match=r"from mode='window' to mode='merged' in the middle"):
        convert_batchnorm(model, mode="merged")
    assert model[0][1].mode == "window" and model[0][1].window_count == window
    assert type(model[1]) is torch.nn.BatchNorm1d  # nothing converted
    # The same mode again changes nothing, mid-window too.
    convert_batchnorm(model[0], mode="window")
    assert model[0][1].window_count == window
    # Other renorm options count as another mode.
    renorm = convert_batchnorm(cnn(), mode="renorm")
    renorm(torch.randn(2, 3, 6, 6))
    with pytest.raises(ValueError, match=r"mode='renorm' \(rmax=3.0.*\) to mode='renorm' \(rmax=2"):
        convert_batchnorm(renorm, mode="renorm", rmax=2.0)


def test_functions_taking_a_model_refuse_other_objects():
    from fastaccum.nn import load_window_state_dict, window_state_dict

    for call in (
        lambda: end_window("model"),
        lambda: window_state_dict("model"),
        lambda: load_window_state_dict("model", []),
    ):
        with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got str"):
            call()
