"""sgd_window_step_ / adam_window_step_: every backend (reference, native C++, Triton under
the interpreter without a GPU) against torch.optim's own SGD/Adam/AdamW run in float64,
plus bad input, opcheck and the Triton per-tensor launch path.
"""

import os

import pytest
import torch

import fastaccum
from fastaccum import _backend
from fastaccum.ops import adam_window_step_, sgd_window_step_
from tests.helpers import assert_close_rel

SIZES = [1, 3, 1023, 65537]
# fp32 results against float64 truth: a few roundings of fp32 per element.
STATE_RTOL = 1e-6
# The update alone (new param - old param), beyond the rounding of the stored parameter.
UPDATE_RTOL = 1e-5


@pytest.fixture(params=["reference", "native", "triton"])
def backend(request, device):
    name = request.param
    if name == "native":
        _native_only(device)
    if name == "triton":
        pytest.importorskip("triton")
        if not _backend.triton_can_run(device):
            pytest.skip("Triton cannot run here (no GPU and no TRITON_INTERPRET=1)")
    return name


def random_tensors(device, seed, sizes=SIZES, positive=False):
    gen = torch.Generator().manual_seed(seed)
    out = [torch.randn(n, generator=gen) for n in sizes]
    if positive:
        out = [t.abs() * 0.1 for t in out]
    return [t.to(device) for t in out]


def clones(tensors):
    return [t.clone() for t in tensors]


def torch_optim_float64(cls, params, grads, states, **options):
    """One step of the torch.optim class on float64 copies; returns (params, state list)."""
    p64 = [p.detach().double().cpu().requires_grad_() for p in params]
    opt = cls(p64, **options)
    for p, g, state in zip(p64, grads, states, strict=True):
        p.grad = g.double().cpu()
        if state:
            opt.state[p] = {k: v.double().cpu().clone() for k, v in state.items()}
    opt.step()
    return [p.detach() for p in p64], [opt.state[p] for p in p64]


def window_gradients(accums, factor, factor_tensor):
    ft = 1.0 if factor_tensor is None else factor_tensor.double().cpu().item()
    return [a.double().cpu() * factor * ft for a in accums]


def assert_update_close(new, old, want):
    """The parameter agrees with the float64 truth, and so does its change: to UPDATE_RTOL
    of the change, plus the one fp32 rounding of the stored parameter."""
    assert_close_rel(new, want, STATE_RTOL)
    new, old = new.double().cpu(), old.double().cpu()
    err = torch.linalg.vector_norm(new - want).item()
    change = torch.linalg.vector_norm(want - old).item()
    rounding = 2.0**-24 * torch.linalg.vector_norm(want).item()
    assert err <= UPDATE_RTOL * change + 2 * rounding, (err, change, rounding)


# --------------------------------------------------------------------------- SGD

SGD_CASES = {
    "plain": {},
    "momentum first step": {"momentum": 0.9, "first_step": True, "weight_decay": 0.01},
    "momentum dampening": {"momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01},
    "nesterov maximize": {"momentum": 0.8, "nesterov": True, "maximize": True},
    "decay maximize": {"weight_decay": 0.05, "maximize": True},
}


@pytest.mark.parametrize("case", SGD_CASES)
@pytest.mark.parametrize("with_factor_tensor", [False, True])
def test_sgd_matches_torch_optim_float64(backend, device, case, with_factor_tensor):
    options = {"lr": 0.1, **SGD_CASES[case]}
    first_step = options.pop("first_step", False)
    momentum = options.get("momentum", 0.0)
    params, accums = random_tensors(device, 0), random_tensors(device, 1)
    buffers = random_tensors(device, 2) if momentum else None
    factor_tensor = torch.tensor(0.75, device=device) if with_factor_tensor else None
    grads = window_gradients(accums, 0.3, factor_tensor)
    states = [
        {"momentum_buffer": b} if momentum and not first_step else {}
        for b in (buffers or [None] * len(params))
    ]
    want_params, want_states = torch_optim_float64(
        torch.optim.SGD, params, grads, states, **options
    )
    old = clones(params)

    sgd_window_step_(
        params,
        accums,
        buffers,
        0.3,
        factor_tensor=factor_tensor,
        first_step=first_step,
        backend=backend,
        **options,
    )

    for i, p in enumerate(params):
        assert p.dtype == torch.float32 and p.device.type == device.type
        assert_update_close(p, old[i], want_params[i])
        assert torch.count_nonzero(accums[i]).item() == 0
        if momentum:
            assert_close_rel(buffers[i], want_states[i]["momentum_buffer"], STATE_RTOL)


# --------------------------------------------------------------------------- Adam

ADAM_CASES = {
    "first step": ({}, 1),
    "adam l2": ({"weight_decay": 0.1}, 3),
    "adamw": ({"weight_decay": 0.1, "decoupled_weight_decay": True}, 7),
    # beta1 = 0.3: lerp weight 0.7 takes torch's other lerp form.
    "adamw maximize small beta1": (
        {
            "weight_decay": 0.05,
            "decoupled_weight_decay": True,
            "maximize": True,
            "betas": (0.3, 0.99),
        },
        2,
    ),
    "amsgrad adam l2": ({"amsgrad": True, "weight_decay": 0.1}, 4),
    "amsgrad adamw maximize": (
        {"amsgrad": True, "weight_decay": 0.05, "decoupled_weight_decay": True, "maximize": True},
        6,
    ),
    "amsgrad first step": ({"amsgrad": True}, 1),
}


@pytest.mark.parametrize("case", ADAM_CASES)
@pytest.mark.parametrize("with_factor_tensor", [False, True])
def test_adam_matches_torch_optim_float64(backend, device, case, with_factor_tensor):
    extra, step = ADAM_CASES[case]
    options = {"lr": 0.01, "eps": 1e-6, **extra}
    params, accums = random_tensors(device, 3), random_tensors(device, 4)
    exp_avgs = random_tensors(device, 5)
    exp_avg_sqs = random_tensors(device, 6, positive=True)
    # amsgrad's maxima: as large as the second moments, so that about half of each tensor
    # keeps its maximum and half takes the new moment
    maxima = random_tensors(device, 7, positive=True) if extra.get("amsgrad") else None
    if step == 1:  # torch's first step starts from zeroed moments
        exp_avgs = [torch.zeros_like(m) for m in exp_avgs]
        exp_avg_sqs = [torch.zeros_like(v) for v in exp_avg_sqs]
        maxima = maxima and [torch.zeros_like(v) for v in maxima]
    factor_tensor = torch.tensor(1.5, device=device) if with_factor_tensor else None
    grads = window_gradients(accums, 0.2, factor_tensor)
    states = [
        {"step": torch.tensor(float(step - 1)), "exp_avg": m, "exp_avg_sq": v}
        for m, v in zip(exp_avgs, exp_avg_sqs, strict=True)
    ]
    if maxima:
        for state, vmax in zip(states, maxima, strict=True):
            state["max_exp_avg_sq"] = vmax
    want_params, want_states = torch_optim_float64(
        torch.optim.Adam, params, grads, states, **options
    )
    old, old_maxima = clones(params), maxima and clones(maxima)
    beta1, beta2 = options.pop("betas", (0.9, 0.999))
    options.pop("amsgrad", None)

    adam_window_step_(
        params,
        accums,
        exp_avgs,
        exp_avg_sqs,
        0.2,
        max_exp_avg_sqs=maxima,
        factor_tensor=factor_tensor,
        beta1=beta1,
        beta2=beta2,
        step=step,
        backend=backend,
        **options,
    )

    for i, p in enumerate(params):
        assert_update_close(p, old[i], want_params[i])
        assert torch.count_nonzero(accums[i]).item() == 0
        assert_close_rel(exp_avgs[i], want_states[i]["exp_avg"], STATE_RTOL)
        assert_close_rel(exp_avg_sqs[i], want_states[i]["exp_avg_sq"], STATE_RTOL)
        if maxima:
            assert_close_rel(maxima[i], want_states[i]["max_exp_avg_sq"], STATE_RTOL)
    if maxima and step > 1:  # both sides of the maximum are taken in the large tensors
        for new, kept in zip(maxima[-2:], old_maxima[-2:], strict=True):
            assert 0.2 < (new == kept).float().mean().item() < 0.8


def test_amsgrad_propagates_nan_as_torch_maximum(backend, device):
    """A NaN in the new second moment or in the stored maximum stays NaN in the maximum and
    in the parameter, as torch.maximum has it (a plain fmax would drop it)."""
    p, a, m = random_tensors(device, 40, sizes=[4, 4, 4])
    v, vmax = random_tensors(device, 41, sizes=[4, 4], positive=True)
    a[0] = float("nan")  # the new second moment of element 0 is NaN
    vmax[1] = float("nan")  # the stored maximum of element 1 is NaN
    want = [t.clone() for t in (p, a, m, v, vmax)]
    options = {"lr": 0.1, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0}
    options |= {"decoupled_weight_decay": False, "maximize": False, "step": 3}
    fastaccum.ops.adam_window_step_ref(*([t] for t in want), 1.0, None, *options.values())
    adam_window_step_([p], [a], [m], [v], 1.0, max_exp_avg_sqs=[vmax], backend=backend, **options)
    assert vmax[:2].isnan().all() and not vmax[2:].isnan().any()
    assert p[:2].isnan().all() and not p[2:].isnan().any()
    for got, ref in zip((p, m, v, vmax), (want[0], want[2], want[3], want[4]), strict=True):
        assert torch.equal(got.isnan(), ref.isnan())
        assert_close_rel(got[2:], ref[2:], STATE_RTOL)


def test_empty_lists_are_a_no_op(backend):
    sgd_window_step_([], [], None, 1.0, lr=0.1, backend=backend)
    adam_window_step_([], [], [], [], 1.0, lr=0.1, step=1, backend=backend)


def test_multidimensional_and_zero_size_tensors(backend, device):
    shapes = [(7, 0), (5, 13), (2, 3, 4)]
    gen = torch.Generator().manual_seed(7)
    params = [torch.randn(s, generator=gen).to(device) for s in shapes]
    accums = [torch.randn(s, generator=gen).to(device) for s in shapes]
    want = [p.double() - 0.5 * a.double() for p, a in zip(params, accums, strict=True)]
    sgd_window_step_(params, accums, None, 1.0, lr=0.5, backend=backend)
    for p, w in zip(params, want, strict=True):
        assert p.shape == w.shape
        assert_close_rel(p, w, STATE_RTOL)


# --------------------------------------------------------------------------- bad input


def _sgd_cases(device):
    def f32(n=6):
        return torch.randn(n, device=device)

    return {
        "length": (([f32(), f32()], [f32()], None), {}, ValueError, "as long as params"),
        "shape": (([f32(6)], [f32(7)], None), {}, ValueError, "shape"),
        "bf16 param": (([f32().bfloat16()], [f32()], None), {}, TypeError, "float32"),
        "fp64 buffer": (
            ([f32()], [f32()], [f32().double()]),
            {"momentum": 0.9},
            TypeError,
            "float32",
        ),
        "same tensor": "same",
        "non-contiguous": (
            ([torch.randn(3, 4, device=device).t()], [torch.randn(4, 3, device=device)], None),
            {},
            ValueError,
            "contiguous",
        ),
        "meta accum": (
            ([f32()], [torch.empty(6, device="meta")], None),
            {},
            ValueError,
            "one device",
        ),
        "nan lr": (([f32()], [f32()], None), {"lr": float("nan")}, ValueError, "lr must be finite"),
        "buffers without momentum": (([f32()], [f32()], [f32()]), {}, ValueError, "must be empty"),
        "momentum without buffers": (
            ([f32()], [f32()], None),
            {"momentum": 0.9},
            ValueError,
            "as long as",
        ),
        "nesterov with dampening": (
            ([f32()], [f32()], [f32()]),
            {"momentum": 0.9, "dampening": 0.1, "nesterov": True},
            ValueError,
            "nesterov",
        ),
        "factor tensor shape": (
            ([f32()], [f32()], None),
            {"factor_tensor": torch.ones(2, device=device)},
            ValueError,
            "one element",
        ),
    }


@pytest.mark.parametrize("case", list(_sgd_cases(torch.device("cpu"))))
def test_sgd_bad_input_changes_nothing(backend, device, case):
    spec = _sgd_cases(device)[case]
    if spec == "same":
        p = torch.randn(6, device=device)
        spec = (([p], [p], None), {}, ValueError, "same tensor")
    (params, accums, buffers), options, exc, match = spec
    touched = [t for t in [*params, *accums, *(buffers or [])] if not t.is_meta]
    before = [t.clone() for t in touched]
    with pytest.raises(exc, match=match):
        sgd_window_step_(params, accums, buffers, 1.0, backend=backend, **{"lr": 0.1, **options})
    for t, b in zip(touched, before, strict=True):
        assert torch.equal(t, b)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"step": 0}, "step must be >= 1"),
        ({"beta1": 1.0}, r"beta1 must be in \[0, 1\)"),
        ({"eps": float("inf")}, "eps must be finite"),
        ({"lr": "0.1"}, "lr must be a Python float"),
    ],
)
def test_adam_bad_scalars_change_nothing(backend, device, options, match):
    tensors = random_tensors(device, 8, sizes=[5, 6, 7, 8])
    tensors[3] = tensors[3].abs()
    before = clones(tensors)
    params, accums, m, v = ([t] for t in tensors)
    with pytest.raises((TypeError, ValueError), match=match):
        adam_window_step_(
            params, accums, m, v, 1.0, backend=backend, **{"lr": 0.1, "step": 1, **options}
        )
    for t, b in zip(tensors, before, strict=True):
        assert torch.equal(t, b)


def test_adam_state_shape_mismatch_changes_nothing(backend, device):
    p, a, m = random_tensors(device, 9, sizes=[6, 6, 6])
    v = torch.rand(5, device=device)
    before = clones([p, a, m, v])
    with pytest.raises(ValueError, match=r"exp_avg_sqs\[0\] has shape"):
        adam_window_step_([p], [a], [m], [v], 1.0, lr=0.1, step=1, backend=backend)
    for t, b in zip([p, a, m, v], before, strict=True):
        assert torch.equal(t, b)


@pytest.mark.parametrize(
    ("maxima", "match"),
    [
        (lambda p: [p.clone(), p.clone()], "max_exp_avg_sqs must be as long as params"),
        (lambda p: [p.clone().bfloat16()], r"max_exp_avg_sqs\[0\] has dtype"),
        (lambda p: [p[:5].clone()], r"max_exp_avg_sqs\[0\] has shape"),
        (lambda p: [p], r"params\[0\] and max_exp_avg_sqs\[0\] are the same tensor"),
    ],
)
def test_amsgrad_bad_maxima_change_nothing(backend, device, maxima, match):
    p, a, m = random_tensors(device, 9, sizes=[6, 6, 6])
    v = torch.rand(6, device=device)
    vmax = maxima(p)
    before = clones([p, a, m, v, *vmax])
    with pytest.raises((TypeError, ValueError), match=match):
        adam_window_step_(
            [p], [a], [m], [v], 1.0, max_exp_avg_sqs=vmax, lr=0.1, step=2, backend=backend
        )
    for t, b in zip([p, a, m, v, *vmax], before, strict=True):
        assert torch.equal(t, b)


# --------------------------------------------------------------------------- native op


def _native_only(device):
    """Skip unless fastaccum._C has kernels for both fused steps on ``device`` (a CUDA build
    has them on CUDA since csrc/cuda/optim_step.cu)."""
    if os.environ.get("FASTACCUM_NO_EXT") == "1":
        pytest.skip("FASTACCUM_NO_EXT=1: pure-Python install")
    assert _backend.has_extension(), "fastaccum._C failed to build or import"
    ops = ("sgd_window_step_", "adam_window_step_")
    if not all(_backend.native_can_run(device, op) for op in ops):
        pytest.skip(f"this fastaccum._C has no {device.type} kernels for the fused steps")


def test_native_ops_check_their_own_input(device):
    """Direct torch.ops callers get the C++ checks, before anything is touched."""
    _native_only(device)
    p, a, b = random_tensors(device, 10, sizes=[6, 6, 6])
    before = clones([p, a, b])
    sgd = torch.ops.fastaccum.sgd_window_step_
    adam = torch.ops.fastaccum.adam_window_step_
    calls = [
        lambda: sgd([p], [a], [b], 1.0, None, 0.1, 0.0, 0.0, 0.0, False, False, False),
        lambda: sgd([p], [a[:5]], [], 1.0, None, 0.1, 0.0, 0.0, 0.0, False, False, False),
        lambda: sgd([p], [p], [], 1.0, None, 0.1, 0.0, 0.0, 0.0, False, False, False),
        lambda: sgd([p], [a.double()], [], 1.0, None, 0.1, 0.0, 0.0, 0.0, False, False, False),
        lambda: sgd([p], [a], [], float("nan"), None, 0.1, 0.0, 0.0, 0.0, False, False, False),
        lambda: adam([p], [a], [b], [], [], 1.0, None, 0.1, 0.9, 0.999, 1e-8, 0.0, False, False, 1),
        lambda: adam(
            [p], [a], [b], [b.abs()], [], 1.0, None, 0.1, 0.9, 0.999, 1e-8, 0.0, False, False, 0
        ),
        lambda: adam(
            [p],
            [a],
            [b],
            [b.abs()],
            [a[:5]],
            1.0,
            None,
            0.1,
            0.9,
            0.999,
            1e-8,
            0.0,
            False,
            False,
            1,
        ),
        lambda: adam(
            [p], [a], [b], [b.abs()], [b], 1.0, None, 0.1, 0.9, 0.999, 1e-8, 0.0, False, False, 1
        ),
    ]
    for call in calls:
        with pytest.raises(RuntimeError):
            call()
    for t, b0 in zip([p, a, b], before, strict=True):
        assert torch.equal(t, b0)


def test_opcheck_sgd_window_step(device):
    _native_only(device)
    params, accums, buffers = (random_tensors(device, s, sizes=[3, 1023]) for s in (11, 12, 13))
    ft = torch.tensor(0.5, device=device)
    op = torch.ops.fastaccum.sgd_window_step_.default
    torch.library.opcheck(
        op, (params, accums, buffers, 2.0, ft, 0.1, 0.9, 0.0, 0.01, True, False, False)
    )
    torch.library.opcheck(
        op, (params, accums, [], 2.0, None, 0.1, 0.0, 0.0, 0.0, False, True, False)
    )


def test_opcheck_adam_window_step(device):
    _native_only(device)
    params, accums, m = (random_tensors(device, s, sizes=[3, 1023]) for s in (14, 15, 16))
    v = random_tensors(device, 17, sizes=[3, 1023], positive=True)
    ft = torch.tensor(0.5, device=device)
    vmax = random_tensors(device, 18, sizes=[3, 1023], positive=True)
    for maxima in ([], vmax):
        torch.library.opcheck(
            torch.ops.fastaccum.adam_window_step_.default,
            (params, accums, m, v, maxima, 2.0, ft, 1e-3, 0.9, 0.999, 1e-8, 0.01, True, False, 3),
        )


def test_native_sgd_without_kernel_for_device_falls_back(monkeypatch):
    """A device whose native build lacks these ops (a CUDA build of fastaccum._C) routes to
    Triton or the reference instead of failing; a forced native backend says why it can't."""
    from fastaccum.ops import optim_step

    if not _backend.has_extension():
        pytest.skip("about a built extension without one op; none is built here")
    kernels = {k for k in _backend._NATIVE_KERNELS if k[0] != "sgd_window_step_"}
    monkeypatch.setattr(_backend, "_NATIVE_KERNELS", frozenset(kernels))
    monkeypatch.delenv("FASTACCUM_BACKEND", raising=False)
    p, a = torch.ones(4), torch.ones(4)
    optim_step.sgd_window_step_([p], [a], None, 1.0, lr=0.5)
    assert torch.equal(p, torch.full((4,), 0.5))
    with pytest.raises(RuntimeError, match="no cpu kernel for sgd_window_step_"):
        optim_step.sgd_window_step_([p], [a], None, 1.0, lr=0.5, backend="native")


# --------------------------------------------------------------------------- Triton


def test_triton_per_tensor_launches_match_tables(monkeypatch):
    """The launch path torch.compile traces (one launch per tensor, tensors as arguments)
    gives the same bits as the pointer-table launch."""
    pytest.importorskip("triton")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not _backend.triton_can_run(device):
        pytest.skip("Triton cannot run here")
    from fastaccum.triton import optim_step as tri

    runs = []
    for tables in (True, False):
        monkeypatch.setattr(tri, "_has_addresses", lambda t, tables=tables: tables)
        sizes = [1, 1023, 20000]
        p, a, m = (random_tensors(device, s, sizes=sizes) for s in (20, 21, 22))
        v, vmax, w = (random_tensors(device, s, sizes=sizes, positive=True) for s in (23, 27, 28))
        adam = (0.01, 0.9, 0.999, 1e-8, 0.1, True, False, 4)
        torch.ops.fastaccum.adam_window_step_triton_(p, a, m, v, [], 0.5, None, *adam)
        torch.ops.fastaccum.adam_window_step_triton_(p, a, m, w, vmax, 0.5, None, *adam)
        q, g, b = (random_tensors(device, s, sizes=sizes) for s in (24, 25, 26))
        sgd = (0.1, 0.9, 0.0, 0.01, True, False, False)
        torch.ops.fastaccum.sgd_window_step_triton_(q, g, b, 0.5, None, *sgd)
        runs.append(p + a + m + v + w + vmax + q + g + b)
    for x, y in zip(*runs, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend_name", ["reference", "native"])
def test_torch_compile_fullgraph(device, backend_name):
    """A compiled window end (accumulate_, then the fused step with a device-side clip
    coefficient) is one graph and equals eager: to the bit with the native op on the CPU, to
    fp32 rounding with the reference (which Inductor fuses and reorders) and on CUDA (where
    Inductor's Triton code for the clip coefficient may round differently from eager's)."""
    if backend_name == "native":
        _native_only(device)

    def window_end(p, a, m, v, g):
        r = fastaccum.accumulate_(a, g, 1.0)
        clip = torch.clamp(1.0 / (r.accum_sumsq.sqrt() + 1e-6), max=1.0)
        adam_window_step_(
            p, a, m, v, 0.5, factor_tensor=clip, lr=1e-3, step=2, backend=backend_name
        )
        return r.grad_sumsq

    def run(fn):
        sizes = [3, 1025]
        p, a, m, g = (random_tensors(device, s, sizes=sizes) for s in (30, 31, 32, 33))
        v = random_tensors(device, 34, sizes=sizes, positive=True)
        total = fn(p, a, m, v, g)
        return [*p, *a, *m, *v, total]

    torch._dynamo.reset()
    eager = run(window_end)
    compiled = run(torch.compile(window_end, fullgraph=True))
    for e, c in zip(eager, compiled, strict=True):
        if backend_name == "native" and device.type == "cpu":
            assert torch.equal(e, c)
        else:
            assert_close_rel(c, e, STATE_RTOL)


def test_window_step_unchecked_matches_checked_and_checks_options():
    """The fused optimizers' entry point gives the checked ops' results bit for bit, and
    still rejects bad options (and unknown ops) before changing anything."""
    from fastaccum.ops.optim_step import window_step_unchecked

    def _flat(lists):
        return [t for ts in lists for t in ts]

    def tensors():
        g = torch.Generator().manual_seed(4)
        lists = [[torch.randn(n, generator=g) for n in (5, 1031)] for _ in range(4)]
        lists[3] = [t.abs() for t in lists[3]]  # exp_avg_sqs are >= 0
        return lists

    options = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.99, "eps": 1e-8, "weight_decay": 0.1}
    options |= {"decoupled_weight_decay": True, "maximize": False, "step": 3}
    for amsgrad in (False, True):
        want, got = tensors(), tensors()
        maxima = [[t.abs().flip(0) for t in v] if amsgrad else [] for v in (want[3], got[3])]
        adam_window_step_(*want, 0.5, max_exp_avg_sqs=maxima[0], **options)
        window_step_unchecked("adam_window_step_", (*got, maxima[1]), 0.5, options)
        for a, b in zip(_flat([*want, maxima[0]]), _flat([*got, maxima[1]]), strict=True):
            assert torch.equal(a, b)

    sgd = {"lr": 0.1, "momentum": 0.9, "dampening": 0.0, "weight_decay": 0.0}
    sgd |= {"nesterov": True, "maximize": False, "first_step": False}
    want, got = tensors()[:3], tensors()[:3]
    sgd_window_step_(*want, 0.5, **sgd)
    window_step_unchecked("sgd_window_step_", tuple(got), 0.5, sgd)
    for a, b in zip(_flat(want), _flat(got), strict=True):
        assert torch.equal(a, b)

    before = [t.clone() for t in _flat(got)]
    with pytest.raises(ValueError, match="lr"):
        window_step_unchecked("sgd_window_step_", tuple(got), 0.5, {**sgd, "lr": float("nan")})
    with pytest.raises(ValueError, match="op must be"):
        window_step_unchecked("adamw_step_", tuple(got), 0.5, sgd)
    assert all(torch.equal(a, b) for a, b in zip(before, _flat(got), strict=True))
