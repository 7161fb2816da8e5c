"""fastaccum.nn.Linear / fuse_wgrad: same results as nn.Linear; under fastaccum.wrap +
opt.backward the weight gradient goes into the accumulator with no dW tensor made.

The model-level tests run for ``nn.Linear`` and for Hugging Face ``transformers``'
``Conv1D`` (weight stored [in, out]; ``kind="conv1d"``, skipped without transformers);
tests/nn/test_conv1d.py has the tests that only Conv1D needs."""

import copy

import pytest
import torch

import fastaccum
from fastaccum import _backend
from fastaccum.nn import fuse_wgrad
from fastaccum.nn._sink import SinkLink
from fastaccum.ops.wgrad import wgrad_accumulate_
from fastaccum.workloads import allocated_shapes
from tests.helpers import PythonRouteWrapper, assert_close_rel, split_windows

needs_ext = pytest.mark.skipif(
    not _backend.has_extension(), reason="C++ extension not built (FASTACCUM_NO_EXT=1)"
)


KINDS = ["linear", "conv1d"]


def layer(kind, n_in, n_out, bias=True):
    """``nn.Linear(n_in, n_out)``, or transformers' ``Conv1D(n_out, n_in)`` (always with a
    bias, drawn at random here since transformers starts it at zero)."""
    if kind == "linear":
        return torch.nn.Linear(n_in, n_out, bias=bias)
    assert bias, "transformers' Conv1D always has a bias"
    conv = pytest.importorskip("transformers.pytorch_utils").Conv1D(n_out, n_in)
    with torch.no_grad():
        conv.bias.normal_()
    return conv


def mlp(seed=0, bias=True, kind="linear"):
    """13 -> 33 -> 17 -> 5 features through three layers of ``kind`` (see :func:`layer`)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        layer(kind, 13, 33, bias),
        torch.nn.GELU(),
        layer(kind, 33, 17, bias),
        torch.nn.Tanh(),
        layer(kind, 17, 5, bias),
    )


def fused_layers(model):
    """The model's fused layers (fastaccum.nn.Linear, the fused Conv1D)."""
    return [m for m in model.modules() if isinstance(m, SinkLink)]


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


def float64_large_batch(make_opt, data, k, kind="linear"):
    """The reference: ``mlp(kind=kind)`` in float64, one backward per window of ``k``
    micro-batches on the mean over every position of the window, then
    ``make_opt(params)``'s step."""
    ref = mlp(kind=kind).double()
    ref_opt = make_opt(ref.parameters())
    for window in split_windows(data, k):
        total = sum(x.shape[0] * x.shape[1] for x, _ in window)
        loss = sum((ref(x.double()) - y.double()).square().mean(-1).sum() for x, y in window)
        (loss / total).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    return ref


@pytest.mark.parametrize("kind", KINDS)
def test_fuse_wgrad_keeps_parameters_keys_and_results(kind):
    model = mlp(kind=kind)
    ref = copy.deepcopy(model)
    params = list(model.parameters())
    keys = list(model.state_dict())
    assert fuse_wgrad(model) is model
    assert len(fused_layers(model)) == 3
    assert [p is q for p, q in zip(model.parameters(), params, strict=True)] == [True] * len(params)
    assert list(model.state_dict()) == keys
    x = torch.randn(4, 6, 13)
    assert torch.equal(model(x), ref(x))


@pytest.mark.parametrize("kind,bias", [("linear", True), ("linear", False), ("conv1d", True)])
def test_without_a_sink_gradients_match_nn_linear(bias, kind):
    model, ref = fuse_wgrad(mlp(bias=bias, kind=kind)), mlp(bias=bias, kind=kind)
    x = torch.randn(4, 7, 13, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    # a non-contiguous output gradient: the loss reads the output through a transpose
    w = torch.randn(5, 7, 4)
    (model(x).permute(2, 1, 0) * w).sum().backward()
    (ref(xr).permute(2, 1, 0) * w).sum().backward()
    assert_close_rel(x.grad, xr.grad, 1e-6)
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert_close_rel(p.grad, q.grad, 1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("max_grad_norm", [None, 0.3])
def test_fused_wrapper_training_matches_large_batch(optimizer, max_grad_norm, kind):
    def make_opt(params):
        if optimizer == "sgd":
            return torch.optim.SGD(params, lr=0.1, momentum=0.9)
        return torch.optim.AdamW(params, lr=1e-2)

    k = 4
    data = batches(3 * k - 1)
    # reference: one backward per window on the mean over all items (positions) of the window
    ref = mlp(kind=kind)
    ref_opt = make_opt(ref.parameters())
    for window in split_windows(data, k):
        total = sum(x.shape[0] * x.shape[1] for x, _ in window)
        loss = sum(((ref(x) - y).square().mean(-1)).sum() for x, y in window) / total
        loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(ref.parameters(), max_grad_norm)
        ref_opt.step()
        ref_opt.zero_grad()

    model = fuse_wgrad(mlp(kind=kind))
    opt = fastaccum.wrap(make_opt(model.parameters()), k, model=model, max_grad_norm=max_grad_norm)
    for x, y in data:
        items = x.shape[0] * x.shape[1]
        opt.backward((model(x) - y).square().mean(), num_items=items)
        assert all(p.grad is None for p in model.parameters())  # nothing lands in .grad
        opt.step()
    opt.flush()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert_close_rel(p, q, 1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_loss_backward_path_stays_correct_unfused(kind):
    """With loss.backward() the micro-batch weight is unknown during backward, so the layer
    produces .grad as nn.Linear does and step() folds it."""
    data = batches(4, seed=2)
    model = fuse_wgrad(mlp(kind=kind))
    opt = fastaccum.wrap(torch.optim.SGD(model.parameters(), lr=0.1), 4, model=model)
    ref = mlp(kind=kind)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for x, y in data:
        mse(model, x, y).backward()
        assert model[0].weight.grad is not None
        opt.step()
        (mse(ref, x, y) / 4).backward()
    ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert_close_rel(p, q, 1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fused", [True, False])
def test_no_weight_gradient_tensor_is_made(fused, kind):
    """The fused path allocates no weight-shaped tensor during backward; the unfused one
    does (which shows the check can fail)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(layer(kind, 48, 80), torch.nn.ReLU(), layer(kind, 80, 48))
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


@pytest.mark.parametrize("kind", KINDS)
def test_autocast_bf16_fused_matches_unfused(kind):
    data = batches(4, seed=3)
    results = []
    for fused in (True, False):
        model = mlp(kind=kind)
        if fused:
            fuse_wgrad(model)
        opt = fastaccum.wrap(torch.optim.SGD(model.parameters(), lr=0.1), 4, model=model)
        for x, y in data:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
            assert out.dtype == torch.bfloat16
            opt.backward((out.float() - y).square().mean())
            opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        assert_close_rel(a, b, 2e-2)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_counts_each_micro_batch_once(kind, reentrant):
    """Checkpointed layers recompute their forward during backward; the weight gradient
    still enters the accumulator once per micro-batch, with either implementation of
    torch.utils.checkpoint (the reentrant one needs an input that requires grad, which
    Hugging Face's gradient checkpointing arranges)."""
    from torch.utils.checkpoint import checkpoint

    data = batches(2, seed=4)
    results = []
    for ckpt in (True, False):
        model = fuse_wgrad(mlp(kind=kind))
        opt = fastaccum.wrap(torch.optim.SGD(model.parameters(), lr=0.1), 2, model=model)
        for x, y in data:
            x = x.clone().requires_grad_(reentrant)
            out = checkpoint(model, x, use_reentrant=reentrant) if ckpt else model(x)
            opt.backward((out - y).square().mean())
            assert all(p.grad is None for p in model.parameters())
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


# --------------------------------------------------------------------------- linear_wgrad


def _linear_wgrad_case(seed, shape, n_out, bias=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen, requires_grad=True)
    w = torch.randn(n_out, shape[-1], generator=gen, requires_grad=True)
    b = torch.randn(n_out, generator=gen, requires_grad=True) if bias else None
    # a non-contiguous output gradient
    go = torch.randn(n_out, *shape[:-1], generator=gen).movedim(0, -1)
    return x, w, b, go


@needs_ext
@pytest.mark.parametrize("shape,n_out", [((1, 1), 1), ((5, 7), 3), ((2, 9, 65), 130)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_wgrad_op_off_is_nn_linear(shape, n_out, bias):
    """control[0] == 0: output and all gradients as F.linear's, in float64."""
    x, w, b, go = _linear_wgrad_case(len(shape) * n_out, shape, n_out, bias)
    acc_w, acc_b = torch.zeros_like(w), torch.zeros(n_out) if bias else None
    control = torch.zeros(4, dtype=torch.float64)
    out = torch.ops.fastaccum.linear_wgrad(x, w, b, acc_w, acc_b, control, 1)
    out.backward(go)
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    bd = None if b is None else b.detach().double().requires_grad_()
    ref = torch.nn.functional.linear(xd, wd, bd)
    ref.backward(go.double())
    assert_close_rel(out, ref, 1e-6)
    for got, want in [(x.grad, xd.grad), (w.grad, wd.grad)] + ([(b.grad, bd.grad)] if bias else []):
        assert_close_rel(got, want, 1e-6)
    assert not acc_w.any() and control.tolist() == [0.0] * 4


@needs_ext
@pytest.mark.parametrize("shape,n_out", [((1, 1), 1), ((5, 7), 3), ((2, 9, 65), 130)])
def test_linear_wgrad_op_on_accumulates_and_counts(shape, n_out):
    """control[0] = alpha: the accumulators gain alpha x the float64 weight and bias
    gradients, no weight or bias gradient is returned, the input gradient is unchanged, and
    the call is counted in control[1] and its slot."""
    x, w, b, go = _linear_wgrad_case(n_out, shape, n_out)
    gen = torch.Generator().manual_seed(7)
    acc_w, acc_b = torch.randn(w.shape, generator=gen), torch.randn(n_out, generator=gen)
    start_w, start_b = acc_w.clone(), acc_b.clone()
    control = torch.tensor([0.75, 0.0, 0.0, 0.0], dtype=torch.float64)
    out = torch.ops.fastaccum.linear_wgrad(x, w, b, acc_w, acc_b, control, 1)
    out.backward(go)
    go2 = go.double().reshape(-1, n_out)
    x2 = x.detach().double().reshape(-1, shape[-1])
    assert_close_rel(acc_w, start_w.double() + 0.75 * go2.t() @ x2, 1e-6)
    assert_close_rel(acc_b, start_b.double() + 0.75 * go2.sum(0), 1e-6)
    assert w.grad is None and b.grad is None
    assert_close_rel(x.grad, go.double() @ w.detach().double(), 1e-6)
    assert control.tolist() == [0.75, 1.0, 0.0, 1.0]


@needs_ext
def test_linear_wgrad_op_bad_input_raises_and_changes_nothing():
    x, w, b, _ = _linear_wgrad_case(0, (4, 5), 3)
    acc_w, acc_b = torch.zeros(3, 5), torch.zeros(3)
    ok = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    cases = [
        ((x, w, b, acc_w, acc_b, ok.float(), 0), "control must be a contiguous 1-D float64"),
        ((x, w, b, acc_w, acc_b, ok, 1), "slot 1 is out of range"),
        ((x, w, b, torch.zeros(5, 3), acc_b, ok, 0), "weight_accum must match"),
        ((x, w, b, acc_w.double(), acc_b, ok, 0), "weight_accum must be float32"),
        ((x, w, b, acc_w, torch.zeros(4), ok, 0), "bias_accum must match"),
        ((x, w, None, acc_w, acc_b, ok, 0), "bias_accum given for a layer without bias"),
        ((x, w, b, acc_w, None, ok, 0), "the bias requires grad but no bias_accum"),
    ]
    for args, match in cases:
        with pytest.raises(RuntimeError, match=match):
            torch.ops.fastaccum.linear_wgrad(*args)
        assert not acc_w.any() and not acc_b.any() and ok.tolist() == [1.0, 0.0, 0.0]


@needs_ext
def test_opcheck_linear_wgrad():
    """Schema, autograd registration and fake tensors. The AOT tests are left out: the
    backward reads control on the host, which tracing cannot do (under torch.compile the
    layer runs eagerly, between two graphs)."""
    x, w, b, _ = _linear_wgrad_case(3, (2, 3, 4), 5)
    control = torch.zeros(3, dtype=torch.float64)  # off: opcheck compares plain gradients
    args = (x, w, b, torch.zeros(5, 4), torch.zeros(5), control, 0)
    torch.library.opcheck(
        torch.ops.fastaccum.linear_wgrad.default,
        args,
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("route", ["cpp", "python", "no_extension"])
def test_both_routes_train_as_the_large_batch(route, kind, monkeypatch):
    """The C++ route (fastaccum::linear_wgrad) and the Python route give the same training
    as one large batch in float64, and neither leaves a weight gradient behind. Without
    the C++ extension (a FASTACCUM_NO_EXT=1 install, simulated here) the layers take the
    Python route."""
    if route == "cpp" and not _backend.has_extension():
        pytest.skip("C++ extension not built (FASTACCUM_NO_EXT=1)")
    if route == "no_extension":
        monkeypatch.setattr(_backend, "_EXTENSION", None)
    k = 3
    data = batches(2 * k, seed=8)
    ref = float64_large_batch(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), data, k, kind)

    model = fuse_wgrad(mlp(kind=kind))
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if route == "python":
        opt = PythonRouteWrapper(inner, k, model=model)
    else:
        opt = fastaccum.wrap(inner, k, model=model)
    for x, y in data:
        out = model(x)
        assert ("CppFunction" in type(out.grad_fn).__name__) == (route == "cpp")
        opt.backward((out - y).square().mean(), num_items=x.shape[0] * x.shape[1])
        assert all(p.grad is None for p in model.parameters())
        opt.step()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert_close_rel(p, q, 1e-5)


def test_frozen_weight_and_no_grad_forward_take_plain_linear():
    """No accumulator is made for a layer that needs no weight gradient: a frozen weight,
    or a forward under torch.no_grad (evaluation)."""
    model = fuse_wgrad(mlp())
    model[2].weight.requires_grad_(False)
    opt = fastaccum.wrap(torch.optim.SGD(model.parameters(), lr=0.1), 2, model=model)
    with torch.no_grad():
        model(torch.randn(2, 3, 13))
    assert opt._accums == {}
    opt.backward(model(torch.randn(2, 3, 13)).square().mean())
    opt.step()
    assert model[2].weight not in opt._accums and model[0].weight in opt._accums


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_model_trains_as_the_large_batch(backend, kind):
    """``torch.compile(model)`` handed to the wrapper: micro-batches under ``opt.backward``
    write the accumulators from the fused layers (no weight gradient made), those under
    ``loss.backward()`` + ``step(num_items=...)`` fold theirs, and training matches one
    large batch in float64."""
    k = 3
    data = batches(3 * k, seed=9)
    ref = float64_large_batch(lambda p: torch.optim.AdamW(p, lr=1e-2), data, k, kind)

    model = fuse_wgrad(mlp(kind=kind))
    compiled = torch.compile(model, backend=backend)
    opt = fastaccum.wrap(torch.optim.AdamW(model.parameters(), lr=1e-2), k, model=compiled)
    for i, (x, y) in enumerate(data):
        items = x.shape[0] * x.shape[1]
        loss = (compiled(x) - y).square().mean()
        if i % 2:
            opt.backward(loss, num_items=items)
            assert all(m.weight.grad is None for m in fused_layers(model))
            opt.step()
        else:
            loss.backward()
            assert all(p.grad is not None for p in model.parameters())
            opt.step(num_items=items)
    # The fused layers wrote the accumulators themselves (opt.backward folding a .grad
    # made by a traced backward would pass the checks above as well).
    assert {id(m.weight) for m in fused_layers(model)} <= opt._fused_seen
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert_close_rel(p, q, 1e-5)
