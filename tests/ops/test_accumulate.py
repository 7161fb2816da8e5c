"""accumulate_ / finalize_: the reference and the native (C++ CPU / CUDA) backends against
float64, plus bad input, opcheck and torch.compile.

The Triton backend has its own file (tests/triton/test_accumulate.py); the CUDA-specific
cases (launch tables, vector alignment) are in tests/cuda/test_accumulate_cuda.py.
"""

import os

import pytest
import torch

import fastaccum
from fastaccum import _backend
from fastaccum.ops import accumulate_, finalize_
from tests.helpers import assert_close_rel

BACKENDS = ["reference", "native"]
SIZES = [1, 3, 1023, 65537]
GRAD_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Relative error bound of one rounding to each accumulator dtype, with margin.
ACCUM_RTOL = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}
SUMSQ_RTOL = 1e-5


def random_pairs(sizes, grad_dtype, accum_dtype, device, *, offset=0, seed=0):
    """Random accumulators and gradients; ``offset`` makes each a view that starts
    ``offset`` elements into a larger buffer (so vector loads are misaligned)."""
    gen = torch.Generator().manual_seed(seed)
    accums, grads = [], []
    for n in sizes:
        a = torch.randn(n + offset, generator=gen).to(accum_dtype)[offset:]
        g = (torch.randn(n + offset, generator=gen) * 3).to(grad_dtype)[offset:]
        accums.append(a.to(device))
        grads.append(g.to(device))
    return accums, grads


def expected_accumulate(accums, grads, scale):
    """float64 truth: the updated accumulators and the per-tensor gradient sums of squares."""
    acc = [a.double() + scale * g.double() for a, g in zip(accums, grads, strict=True)]
    sumsq = torch.stack([g.double().square().sum() for g in grads])
    return acc, sumsq


@pytest.fixture(params=BACKENDS)
def backend(request, device):
    if request.param == "native" and not _backend.native_can_run(device):
        if os.environ.get("FASTACCUM_NO_EXT") == "1":
            pytest.skip("FASTACCUM_NO_EXT=1: pure-Python install")
        pytest.fail(f"fastaccum._C has no {device.type} kernel; the build is broken")
    return request.param


def test_extension_is_built():
    """CI installs the C++ extension: its absence is a build failure, not a skip."""
    if os.environ.get("FASTACCUM_NO_EXT") == "1":
        assert not _backend.has_extension()
    else:
        assert _backend.has_extension(), "fastaccum._C failed to build or import"
        assert hasattr(torch.ops.fastaccum, "accumulate_")


@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES)
@pytest.mark.parametrize("accum_same_dtype", [False, True])
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("zero_grads", [False, True])
def test_accumulate_matches_float64(
    backend, device, grad_dtype, accum_same_dtype, offset, zero_grads
):
    accum_dtype = grad_dtype if accum_same_dtype else torch.float32
    accums, grads = random_pairs(SIZES, grad_dtype, accum_dtype, device, offset=offset)
    scale = 0.37
    want_acc, want_sumsq = expected_accumulate(accums, grads, scale)
    grads_before = [g.clone() for g in grads]

    res = accumulate_(accums, grads, scale, zero_grads=zero_grads, backend=backend)

    for a, w in zip(accums, want_acc, strict=True):
        assert a.dtype == accum_dtype and a.device.type == device.type
        assert_close_rel(a, w, ACCUM_RTOL[accum_dtype])
    assert res.grad_sumsq_per_tensor.dtype == torch.float32
    assert res.grad_sumsq_per_tensor.shape == (len(SIZES),)
    assert_close_rel(res.grad_sumsq_per_tensor, want_sumsq, SUMSQ_RTOL)
    assert_close_rel(res.grad_sumsq, want_sumsq.sum(), SUMSQ_RTOL)
    # The accumulator sum of squares is of the values actually stored.
    stored_sumsq = sum(a.double().square().sum() for a in accums)
    assert_close_rel(res.accum_sumsq, stored_sumsq, SUMSQ_RTOL)
    assert res.found_nonfinite.dtype == torch.bool and not res.found_nonfinite.item()
    for g, before in zip(grads, grads_before, strict=True):
        if zero_grads:
            assert torch.count_nonzero(g).item() == 0
        else:
            assert torch.equal(g, before)


def test_accumulate_mixed_dtypes_keep_order(backend, device):
    """One call with every supported (grad, accum) pairing; results stay in input order."""
    pairs = [
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float32),
        (torch.float16, torch.float16),
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.bfloat16),
    ]
    gen = torch.Generator().manual_seed(1)
    sizes = [5, 4099, 1, 300, 70001]
    accums = [
        torch.randn(n, generator=gen).to(ad).to(device)
        for n, (_, ad) in zip(sizes, pairs, strict=True)
    ]
    grads = [
        (torch.randn(n, generator=gen) * (i + 1)).to(gd).to(device)
        for i, (n, (gd, _)) in enumerate(zip(sizes, pairs, strict=True))
    ]
    want_acc, want_sumsq = expected_accumulate(accums, grads, -1.5)
    res = accumulate_(accums, grads, -1.5, backend=backend)
    for a, w, (_, ad) in zip(accums, want_acc, pairs, strict=True):
        assert_close_rel(a, w, ACCUM_RTOL[ad])
    assert_close_rel(res.grad_sumsq_per_tensor, want_sumsq, SUMSQ_RTOL)


def test_accumulate_over_many_micro_steps(backend, device):
    """32 bf16 micro-steps into fp32 accumulators track the float64 sum closely."""
    gen = torch.Generator().manual_seed(2)
    shapes = [(257, 129), (1000,), (7,)]
    accums = [torch.zeros(s, device=device) for s in shapes]
    truth = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    for _ in range(32):
        grads = [torch.randn(s, generator=gen).bfloat16().to(device) for s in shapes]
        accumulate_(accums, grads, 1 / 32, backend=backend)
        for t, g in zip(truth, grads, strict=True):
            t += g.double().cpu() / 32
    for a, t in zip(accums, truth, strict=True):
        assert_close_rel(a, t, 1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_accumulate_flags_nonfinite(backend, device, bad):
    accums, grads = random_pairs([100, 2000, 9], torch.bfloat16, torch.float32, device, seed=3)
    grads[1][1234] = bad
    res = accumulate_(accums, grads, 1.0, backend=backend)
    assert res.found_nonfinite.item()
    # The other tensors are still accumulated; the caller decides to discard the window.
    want_acc, _ = expected_accumulate(
        *random_pairs([100], torch.bfloat16, torch.float32, "cpu", seed=3), 1.0
    )
    assert_close_rel(accums[0], want_acc[0], 1e-6)


def test_accumulate_finite_extremes_are_not_flagged(backend, device):
    """Largest finite values and subnormals are finite: no false positive."""
    g = torch.tensor([65504.0, -65504.0, 6e-8, 0.0], dtype=torch.float16, device=device)
    res = accumulate_([torch.zeros(4, device=device)], [g], 1.0, backend=backend)
    assert not res.found_nonfinite.item()


def test_accumulate_empty_lists(backend):
    res = accumulate_([], [], 2.0, backend=backend)
    assert res.grad_sumsq.item() == 0.0
    assert res.grad_sumsq_per_tensor.shape == (0,)
    assert not res.found_nonfinite.item()


def test_accumulate_is_deterministic_across_thread_counts(backend, device):
    accums, grads = random_pairs([300_001, 5], torch.float32, torch.float32, device, seed=4)
    start = [a.clone() for a in accums]
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            for a, s in zip(accums, start, strict=True):
                a.copy_(s)
            results.append(accumulate_(accums, grads, 0.5, backend=backend))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0].grad_sumsq_per_tensor, results[1].grad_sumsq_per_tensor)
    assert torch.equal(results[0].accum_sumsq, results[1].accum_sumsq)


# --------------------------------------------------------------------------- finalize_


@pytest.mark.parametrize("accum_dtype", GRAD_DTYPES)
@pytest.mark.parametrize("out_dtype", [None, *GRAD_DTYPES])
@pytest.mark.parametrize("zero_accums", [True, False])
def test_finalize_matches_float64(backend, device, accum_dtype, out_dtype, zero_accums):
    gen = torch.Generator().manual_seed(5)
    accums = [torch.randn(n, generator=gen).to(accum_dtype).to(device) for n in SIZES]
    outs = (
        None
        if out_dtype is None
        else [torch.full((n,), 123.0, dtype=out_dtype, device=device) for n in SIZES]
    )
    factor_tensor = torch.tensor(0.75, device=device)
    want = [a.double() * 0.125 * 0.75 for a in accums]

    finalize_(
        accums,
        outs,
        0.125,
        factor_tensor=factor_tensor,
        zero_accums=zero_accums,
        backend=backend,
    )

    rounding = max(ACCUM_RTOL[accum_dtype], ACCUM_RTOL[out_dtype or torch.float32])
    for i, w in enumerate(want):
        if outs is not None:
            assert outs[i].dtype == out_dtype
            assert_close_rel(outs[i], w, 2 * rounding)
        if zero_accums:
            assert torch.count_nonzero(accums[i]).item() == 0
        else:
            assert_close_rel(accums[i], w, 2 * rounding)


def test_finalize_without_factor_tensor(backend, device):
    accums, _ = random_pairs([17, 4096], torch.float32, torch.float32, device, seed=6)
    outs = [torch.empty_like(a, dtype=torch.bfloat16) for a in accums]
    want = [a.double() * 3.0 for a in accums]
    finalize_(accums, outs, 3.0, backend=backend)
    for o, w in zip(outs, want, strict=True):
        assert_close_rel(o, w, ACCUM_RTOL[torch.bfloat16])


# --------------------------------------------------------------------------- bad input


def _bad_accumulate_cases(device):
    acc = lambda n=8: torch.randn(n, device=device)  # noqa: E731
    grad = lambda n=8: torch.randn(n, device=device)  # noqa: E731
    return {
        "length": (([acc(), acc()], [grad()]), ValueError, "same length"),
        "shape": (([acc(8)], [grad(9)]), ValueError, "shape"),
        "grad dtype": (
            ([acc()], [torch.ones(8, dtype=torch.int32, device=device)]),
            TypeError,
            "dtype",
        ),
        "accum dtype": (([acc().double()], [grad()]), TypeError, "float32 or the gradient"),
        "bf16 accum for fp16 grad": (
            ([acc().bfloat16()], [grad().half()]),
            TypeError,
            "float32 or the gradient",
        ),
        "non-contiguous grad": (
            ([acc(12).view(3, 4)], [torch.randn(4, 3, device=device).t()]),
            ValueError,
            "contiguous",
        ),
        "non-contiguous accum": (
            ([torch.randn(4, 3, device=device).t()], [grad(12).view(3, 4)]),
            ValueError,
            "contiguous",
        ),
        "wrong device": (([acc()], [torch.empty(8, device="meta")]), ValueError, "one device"),
        "not a list": ((acc(), grad()), TypeError, "list or tuple"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "length",
        "shape",
        "grad dtype",
        "accum dtype",
        "bf16 accum for fp16 grad",
        "non-contiguous grad",
        "non-contiguous accum",
        "wrong device",
        "not a list",
    ],
)
def test_accumulate_bad_input_changes_nothing(backend, device, case):
    (accums, grads), exc, match = _bad_accumulate_cases(device)[case]
    listed = [accums] if isinstance(accums, torch.Tensor) else accums
    before = [a.clone() for a in listed]
    with pytest.raises(exc, match=match):
        accumulate_(accums, grads, 1.0, backend=backend)
    for a, b in zip(listed, before, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("scale", [float("nan"), float("inf")])
def test_accumulate_rejects_nonfinite_scale(backend, device, scale):
    a = torch.randn(4, device=device)
    before = a.clone()
    with pytest.raises(ValueError, match="scale must be finite"):
        accumulate_([a], [torch.randn(4, device=device)], scale, backend=backend)
    assert torch.equal(a, before)


@pytest.mark.parametrize(
    "case",
    ["length", "shape", "grad dtype", "accum dtype", "non-contiguous grad"],
)
def test_native_op_checks_its_own_input(device, case):
    """The C++ op validates too (for direct torch.ops callers), before touching anything.

    (A meta tensor mixed in is routed by the dispatcher to the fake kernel, so the device
    mismatch case of the C++ check is covered on CUDA in tests/cuda.)
    """
    if not _backend.native_can_run(device):
        pytest.skip("native kernels not built (FASTACCUM_NO_EXT=1)")
    (accums, grads), _, _ = _bad_accumulate_cases(device)[case]
    before = [a.clone() for a in accums]
    with pytest.raises(RuntimeError):
        torch.ops.fastaccum.accumulate_(accums, grads, 1.0, False)
    for a, b in zip(accums, before, strict=True):
        assert torch.equal(a, b)


def test_finalize_bad_input_changes_nothing(backend, device):
    a = torch.randn(6, device=device)
    before = a.clone()
    cases = [
        (([a], [torch.empty(5, device=device)], 1.0, None), ValueError, "shape"),
        (
            ([a], [torch.empty(6, device=device), torch.empty(6, device=device)], 1.0, None),
            ValueError,
            "as long as",
        ),
        (([a], None, 1.0, torch.ones(2, device=device)), ValueError, "one element"),
        (([a], None, float("nan"), None), ValueError, "finite"),
        (([a], [torch.empty(6, dtype=torch.int64, device=device)], 1.0, None), TypeError, "dtype"),
        (([a], None, 1.0, torch.ones((), device="meta")), ValueError, "one device"),
    ]
    for (accums, outs, factor, ft), exc, match in cases:
        with pytest.raises(exc, match=match):
            finalize_(accums, outs, factor, factor_tensor=ft, backend=backend)
        assert torch.equal(a, before)


# --------------------------------------------------------------------------- torch.library


def _native_only(device):
    if not _backend.native_can_run(device):
        pytest.skip("native kernels not built (FASTACCUM_NO_EXT=1)")


def test_opcheck_accumulate(device):
    _native_only(device)
    for grad_dtype in GRAD_DTYPES:
        accums, grads = random_pairs([3, 1023], grad_dtype, torch.float32, device, seed=7)
        for zero in (False, True):
            torch.library.opcheck(
                torch.ops.fastaccum.accumulate_.default, ([*accums], [*grads], 0.5, zero)
            )


def test_opcheck_finalize(device):
    _native_only(device)
    accums, _ = random_pairs([3, 1023], torch.float32, torch.float32, device, seed=8)
    outs = [torch.empty_like(a, dtype=torch.bfloat16) for a in accums]
    ft = torch.tensor(0.5, device=device)
    torch.library.opcheck(torch.ops.fastaccum.finalize_.default, (accums, outs, 2.0, ft, True))
    torch.library.opcheck(torch.ops.fastaccum.finalize_.default, (accums, [], 2.0, None, False))


def test_torch_compile_fullgraph(device):
    """A compiled window (two accumulates, then finalize into .grad-like outs) equals eager."""

    def window(accums, g1, g2, outs, norm):
        r1 = fastaccum.accumulate_(accums, g1, 1.0)
        r2 = fastaccum.accumulate_(accums, g2, 1.0)
        clip = torch.clamp(1.0 / (r2.accum_sumsq.sqrt() + 1e-6), max=1.0)
        fastaccum.finalize_(accums, outs, norm, factor_tensor=clip)
        return r1.grad_sumsq + r2.grad_sumsq, r1.found_nonfinite | r2.found_nonfinite

    def run(fn):
        accums, g1 = random_pairs([33, 1025], torch.bfloat16, torch.float32, device, seed=9)
        _, g2 = random_pairs([33, 1025], torch.bfloat16, torch.float32, device, seed=10)
        accums = [torch.zeros_like(a) for a in accums]
        outs = [torch.empty_like(a) for a in accums]
        total, bad = fn(accums, g1, g2, outs, 0.5)
        return accums, outs, total, bad

    torch._dynamo.reset()
    eager = run(window)
    compiled = run(torch.compile(window, fullgraph=True))
    for e, c in zip(eager[1], compiled[1], strict=True):
        assert torch.equal(e, c)
    for a in compiled[0]:
        assert torch.count_nonzero(a).item() == 0
    assert torch.equal(eager[2], compiled[2]) and torch.equal(eager[3], compiled[3])
