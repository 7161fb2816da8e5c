"""The CUDA kernels of ``accumulate_`` / ``finalize_`` against float64 references.

Needs a CUDA GPU and ``fastaccum._C`` built with its CUDA kernels; skips otherwise. Each
case is called both through the public wrapper (``backend="native"``) and straight through
``torch.ops.fastaccum``, whose checks live in csrc/cuda/accumulate_binding.cpp.

Error bounds: accumulators and outputs are compared as ||out - ref|| / ||ref|| with the
reference in float64; 1e-6 for fp32 results (one fp32 rounding), the dtype's eps for
bf16/fp16 results (one rounding to that dtype is at most eps/2). Sums of squares are fp32
reductions of up to millions of terms: 1e-5.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pytest
import torch

from fastaccum import _backend
from fastaccum.ops import accumulate_, finalize_
from tests.helpers import assert_close_rel

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available() or not _backend.has_cuda_kernels(),
        reason="needs a CUDA GPU and fastaccum._C built with its CUDA kernels",
    ),
]

DEVICE = "cuda"
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# (grad dtype, accum dtype) pairs the kernels accept.
PAIR_DTYPES = [(F32, F32), (BF16, F32), (F16, F32), (BF16, BF16), (F16, F16)]
SIZES = [1, 3, 1023, 65537, 3_000_017]
SUMSQ_RTOL = 1e-5


def _pair_id(pair: tuple[torch.dtype, torch.dtype]) -> str:
    return "-".join(str(d).removeprefix("torch.") for d in pair)


def _via_wrapper(accums, grads, scale, zero_grads):
    return tuple(accumulate_(accums, grads, scale, zero_grads=zero_grads, backend="native"))


def _via_ops(accums, grads, scale, zero_grads):
    return torch.ops.fastaccum.accumulate_(accums, grads, scale, zero_grads)


ACCUMULATE_CALLS = {"wrapper": _via_wrapper, "ops": _via_ops}
AccumulateCall = Callable[..., tuple[torch.Tensor, ...]]


@pytest.fixture(params=sorted(ACCUMULATE_CALLS))
def accumulate_call(request: pytest.FixtureRequest) -> AccumulateCall:
    return ACCUMULATE_CALLS[request.param]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def _randn(n: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(n, generator=gen, device=DEVICE, dtype=torch.float32).to(dtype)


def _bound(dtype: torch.dtype) -> float:
    return 1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps


class Expected:
    """float64 results of accumulate_ on copies of the inputs taken before the call."""

    def __init__(
        self, accums: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], scale: float
    ) -> None:
        self.accums = [a.double() + scale * g.double() for a, g in zip(accums, grads, strict=True)]
        self.grads = [g.detach().clone() for g in grads]
        self.per_tensor = torch.stack([g.double().square().sum() for g in grads])
        self.grad_sumsq = self.per_tensor.sum().item()
        self.nonfinite = any(not bool(torch.isfinite(g).all()) for g in grads)

    def check(
        self,
        result: Sequence[torch.Tensor],
        accums: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor],
        zero_grads: bool = False,
    ) -> None:
        grad_sumsq, per_tensor, accum_sumsq, found = result
        n = len(accums)
        assert grad_sumsq.shape == () and grad_sumsq.dtype == torch.float32
        assert per_tensor.shape == (n,) and per_tensor.dtype == torch.float32
        assert accum_sumsq.shape == () and accum_sumsq.dtype == torch.float32
        assert found.shape == () and found.dtype == torch.bool
        assert all(t.device == accums[0].device for t in result)
        assert bool(found) == self.nonfinite
        for a, ref in zip(accums, self.accums, strict=True):
            assert_close_rel(a, ref, _bound(a.dtype))
        for i, (g, before) in enumerate(zip(grads, self.grads, strict=True)):
            if zero_grads:
                assert not g.any(), f"grads[{i}] was not zeroed"
            else:
                assert torch.equal(g, before), f"grads[{i}] was modified"
        if self.nonfinite:
            return
        torch.testing.assert_close(
            per_tensor.double(), self.per_tensor, rtol=SUMSQ_RTOL, atol=0, msg="per-tensor"
        )
        assert math.isclose(grad_sumsq.item(), self.grad_sumsq, rel_tol=SUMSQ_RTOL)
        # Of the values stored (after rounding to a bf16/fp16 accumulator), as the
        # reference defines it; the stored values were checked against float64 above.
        stored_sumsq = sum(a.double().square().sum().item() for a in accums)
        assert math.isclose(accum_sumsq.item(), stored_sumsq, rel_tol=SUMSQ_RTOL)


def _pairs(
    sizes: Sequence[int], dtypes: Sequence[tuple[torch.dtype, torch.dtype]], seed: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = _gen(seed)
    accums, grads = [], []
    for i, n in enumerate(sizes):
        grad_dtype, accum_dtype = dtypes[i % len(dtypes)]
        grads.append(_randn(n, grad_dtype, gen))
        accums.append(_randn(n, accum_dtype, gen))
    return accums, grads


# --------------------------------------------------------------------------- accumulate_


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtypes", PAIR_DTYPES, ids=_pair_id)
def test_accumulate_matches_float64(
    accumulate_call: AccumulateCall, dtypes: tuple[torch.dtype, torch.dtype], size: int
) -> None:
    accums, grads = _pairs([size, size // 2 + 1], [dtypes], seed=size)
    expected = Expected(accums, grads, 0.37)
    result = accumulate_call(accums, grads, 0.37, False)
    expected.check(result, accums, grads)


def test_accumulate_odd_sizes_in_one_list(accumulate_call: AccumulateCall) -> None:
    sizes = [3, 1, 65537, 1023, 0, 3_000_017, 16384, 16385, 7]
    accums, grads = _pairs(sizes, [(F32, F32)], seed=1)
    expected = Expected(accums, grads, -1.5)
    expected.check(accumulate_call(accums, grads, -1.5, False), accums, grads)


def test_accumulate_mixed_dtypes_keep_caller_order(accumulate_call: AccumulateCall) -> None:
    # Pairs are grouped by dtype inside the binding; per-tensor results must still come
    # back in the order of the caller's list, and the totals must cover every group.
    sizes = [5000, 17, 70001, 1, 4096, 33, 65537, 1023, 2, 40000]
    accums, grads = _pairs(sizes, PAIR_DTYPES, seed=2)
    expected = Expected(accums, grads, 0.25)
    expected.check(accumulate_call(accums, grads, 0.25, False), accums, grads)


def test_accumulate_more_tensors_than_one_launch(accumulate_call: AccumulateCall) -> None:
    # The kernels carry a bounded tensor table in their arguments; 1000 tensors take
    # several launches, with sizes 0..5000 and two dtype groups.
    sizes = torch.randint(0, 5001, (1000,), generator=torch.Generator().manual_seed(3))
    accums, grads = _pairs(sizes.tolist(), [(F32, F32), (BF16, F32)], seed=3)
    expected = Expected(accums, grads, 2.0)
    expected.check(accumulate_call(accums, grads, 2.0, False), accums, grads)


# Element offsets into larger buffers: both tensors alignable at the same element, only
# one of them aligned, and never alignable together (the scalar path).
OFFSETS = [(0, 0), (1, 1), (0, 1), (1, 2), (3, 1), (5, 7), (7, 0)]


@pytest.mark.parametrize("offsets", OFFSETS, ids=lambda o: f"g{o[0]}-a{o[1]}")
@pytest.mark.parametrize("dtypes", [(F32, F32), (BF16, F32), (F16, F16)], ids=_pair_id)
@pytest.mark.parametrize("zero_grads", [False, True], ids=["keep", "zero"])
def test_accumulate_misaligned_views(
    accumulate_call: AccumulateCall,
    dtypes: tuple[torch.dtype, torch.dtype],
    offsets: tuple[int, int],
    zero_grads: bool,
) -> None:
    gen = _gen(4)
    grad_dtype, accum_dtype = dtypes
    g_off, a_off = offsets
    accums, grads, buffers = [], [], []
    for n in (65537, 3, 20000):
        gbuf = _randn(n + 16, grad_dtype, gen)
        abuf = _randn(n + 16, accum_dtype, gen)
        buffers.append((gbuf, gbuf.clone(), g_off, n))
        buffers.append((abuf, abuf.clone(), a_off, n))
        grads.append(gbuf[g_off : g_off + n])
        accums.append(abuf[a_off : a_off + n])
    expected = Expected(accums, grads, 0.5)
    expected.check(accumulate_call(accums, grads, 0.5, zero_grads), accums, grads, zero_grads)
    for buf, before, off, n in buffers:  # nothing outside the views was touched
        assert torch.equal(buf[:off], before[:off])
        assert torch.equal(buf[off + n :], before[off + n :])


@pytest.mark.parametrize("dtypes", PAIR_DTYPES, ids=_pair_id)
def test_accumulate_zero_grads(
    accumulate_call: AccumulateCall, dtypes: tuple[torch.dtype, torch.dtype]
) -> None:
    accums, grads = _pairs([1, 1023, 65537, 3], [dtypes], seed=5)
    expected = Expected(accums, grads, 1.0)
    expected.check(accumulate_call(accums, grads, 1.0, True), accums, grads, zero_grads=True)


def test_accumulate_many_micro_steps(accumulate_call: AccumulateCall) -> None:
    # The accumulation loop itself: K micro-steps of bf16 gradients into fp32 accumulators.
    gen = _gen(6)
    sizes = [65537, 1023, 3]
    accums = [torch.zeros(n, device=DEVICE) for n in sizes]
    total = [torch.zeros(n, device=DEVICE, dtype=torch.float64) for n in sizes]
    for _ in range(8):
        grads = [_randn(n, BF16, gen) for n in sizes]
        for t, g in zip(total, grads, strict=True):
            t += 0.125 * g.double()
        accumulate_call(accums, grads, 0.125, True)
    for a, t in zip(accums, total, strict=True):
        assert_close_rel(a, t, 1e-6)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["first", "last", "small"])
@pytest.mark.parametrize("grad_dtype", [F32, BF16, F16], ids=str)
def test_accumulate_flags_nonfinite(
    accumulate_call: AccumulateCall, bad: float, where: str, grad_dtype: torch.dtype
) -> None:
    accums, grads = _pairs([70001, 5, 3_000_017], [(grad_dtype, F32)], seed=7)
    target, index = {"first": (0, 0), "last": (2, -1), "small": (1, 2)}[where]
    grads[target][index] = bad
    expected = Expected(accums, grads, 0.5)
    assert expected.nonfinite
    result = accumulate_call(accums, grads, 0.5, False)
    assert bool(result[3])
    # Non-finite gradients are still accumulated; the flag is how the caller finds out.
    assert not torch.isfinite(accums[target][index])
    finite = torch.ones_like(accums[target], dtype=torch.bool)
    finite[index] = False
    ref = expected.accums[target]
    assert_close_rel(accums[target][finite], ref[finite], 1e-6)


def test_accumulate_finite_but_overflowing_is_not_flagged(
    accumulate_call: AccumulateCall,
) -> None:
    # 1e30**2 overflows fp32: the sum of squares is inf, but no gradient is non-finite.
    grads = [torch.full((1000,), 1e30, device=DEVICE)]
    accums = [torch.zeros(1000, device=DEVICE)]
    grad_sumsq, _, _, found = accumulate_call(accums, grads, 1e-30, False)
    assert not bool(found)
    assert math.isinf(grad_sumsq.item())


def test_accumulate_empty_tensors(accumulate_call: AccumulateCall) -> None:
    accums = [torch.empty(0, device=DEVICE), torch.empty(0, 3, device=DEVICE)]
    grads = [torch.empty(0, device=DEVICE), torch.empty(0, 3, device=DEVICE)]
    grad_sumsq, per_tensor, accum_sumsq, found = accumulate_call(accums, grads, 1.0, False)
    assert grad_sumsq.item() == 0 and accum_sumsq.item() == 0 and not bool(found)
    assert per_tensor.tolist() == [0.0, 0.0]


def test_accumulate_multidimensional_shapes(accumulate_call: AccumulateCall) -> None:
    gen = _gen(8)
    shapes = [(768, 2304), (3, 5, 7), (1,), ()]
    grads = [torch.randn(s, generator=gen, device=DEVICE).to(BF16) for s in shapes]
    accums = [torch.randn(s, generator=gen, device=DEVICE) for s in shapes]
    expected = Expected(accums, grads, 3.0)
    expected.check(accumulate_call(accums, grads, 3.0, False), accums, grads)


def test_accumulate_is_deterministic(accumulate_call: AccumulateCall) -> None:
    accums, grads = _pairs([3_000_017, 65537, 1023, 1, 50000], PAIR_DTYPES, seed=9)
    runs = []
    for _ in range(3):
        a = [t.clone() for t in accums]
        runs.append((accumulate_call(a, grads, 0.7, False), a))
    (first, first_accums), *rest = runs
    for result, out_accums in rest:
        for x, y in zip(first, result, strict=True):
            assert torch.equal(x, y), "sums of squares differ between identical calls"
        for x, y in zip(first_accums, out_accums, strict=True):
            assert torch.equal(x, y)


def test_accumulate_on_a_side_stream(accumulate_call: AccumulateCall) -> None:
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        accums, grads = _pairs([3_000_017, 1023], [(BF16, F32)], seed=10)
        expected = Expected(accums, grads, 0.5)
        result = accumulate_call(accums, grads, 0.5, False)
    stream.synchronize()
    expected.check(result, accums, grads)


# Invalid calls: builder of (accums, grads) and the exception the Python wrapper raises.
# The op called directly raises RuntimeError (TORCH_CHECK), as the CPU kernels do. Every
# call must raise before any tensor is modified.
def _noncontiguous_grad():
    g = torch.randn(8, 6, device=DEVICE).t()
    return [torch.randn(5, device=DEVICE), torch.randn(6, 8, device=DEVICE)], [
        torch.randn(5, device=DEVICE),
        g,
    ]


def _cpu_accum():
    return [torch.randn(5, device=DEVICE), torch.randn(5)], [
        torch.randn(5, device=DEVICE),
        torch.randn(5, device=DEVICE),
    ]


def _cpu_grad():
    return [torch.randn(5, device=DEVICE), torch.randn(5, device=DEVICE)], [
        torch.randn(5, device=DEVICE),
        torch.randn(5),
    ]


def _double_grad():
    return [torch.randn(5, device=DEVICE)], [torch.randn(5, device=DEVICE, dtype=torch.float64)]


def _half_accum_for_bf16_grad():
    return [torch.randn(5, device=DEVICE, dtype=F16)], [torch.randn(5, device=DEVICE, dtype=BF16)]


def _shape_mismatch():
    return [torch.randn(5, device=DEVICE), torch.randn(4, device=DEVICE)], [
        torch.randn(5, device=DEVICE),
        torch.randn(5, device=DEVICE),
    ]


def _length_mismatch():
    return [torch.randn(5, device=DEVICE), torch.randn(4, device=DEVICE)], [
        torch.randn(5, device=DEVICE)
    ]


INVALID = {
    "noncontiguous-grad": (_noncontiguous_grad, ValueError),
    "cpu-accum": (_cpu_accum, ValueError),
    "cpu-grad": (_cpu_grad, ValueError),
    "float64-grad": (_double_grad, TypeError),
    "fp16-accum-bf16-grad": (_half_accum_for_bf16_grad, TypeError),
    "shape-mismatch": (_shape_mismatch, ValueError),
    "length-mismatch": (_length_mismatch, ValueError),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_accumulate_rejects_invalid_input_unchanged(
    accumulate_call: AccumulateCall, case: str
) -> None:
    build, error = INVALID[case]
    accums, grads = build()
    before = [t.clone() for t in [*accums, *grads]]
    with pytest.raises(RuntimeError if accumulate_call is _via_ops else error):
        accumulate_call(accums, grads, 0.5, True)
    for t, b in zip([*accums, *grads], before, strict=True):
        assert torch.equal(t, b), "an invalid call modified its inputs"


def test_accumulate_same_tensor_rejected(accumulate_call: AccumulateCall) -> None:
    t = torch.randn(5, device=DEVICE)
    error = RuntimeError if accumulate_call is _via_ops else ValueError
    with pytest.raises(error, match="same tensor"):
        accumulate_call([t], [t], 1.0, False)


@pytest.mark.parametrize("scale", [math.nan, math.inf])
def test_accumulate_rejects_nonfinite_scale(scale: float) -> None:
    accums, grads = _pairs([5], [(F32, F32)], seed=11)
    with pytest.raises(RuntimeError, match="finite"):
        torch.ops.fastaccum.accumulate_(accums, grads, scale, False)


@pytest.mark.parametrize("zero_grads", [False, True])
def test_accumulate_opcheck(zero_grads: bool) -> None:
    accums, grads = _pairs([1023, 3, 65537, 1], PAIR_DTYPES, seed=12)
    torch.library.opcheck(torch.ops.fastaccum.accumulate_.default, (accums, grads, 0.5, zero_grads))


# ----------------------------------------------------------------------------- finalize_

OUT_DTYPES = [None, F32, BF16, F16]


def _finalize_expected(
    accums: Sequence[torch.Tensor], factor: float, factor_tensor: torch.Tensor | None
) -> list[torch.Tensor]:
    # The kernels take factor_tensor as fp32, as finalize_ref does.
    ft = 1.0 if factor_tensor is None else factor_tensor.float().double().item()
    return [a.double() * factor * ft for a in accums]


@pytest.mark.parametrize("zero_accums", [True, False], ids=["zero", "keep"])
@pytest.mark.parametrize("ft_dtype", [None, F32, BF16, torch.float64], ids=str)
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize("accum_dtype", [F32, BF16, F16], ids=str)
@pytest.mark.parametrize("via", ["wrapper", "ops"])
def test_finalize_matches_float64(
    via: str,
    accum_dtype: torch.dtype,
    out_dtype: torch.dtype | None,
    ft_dtype: torch.dtype | None,
    zero_accums: bool,
) -> None:
    gen = _gen(13)
    sizes = [1, 3, 1023, 65537, 3_000_017, 0]
    accums = [_randn(n, accum_dtype, gen) for n in sizes]
    outs = [] if out_dtype is None else [_randn(n, out_dtype, gen) for n in sizes]
    factor = 1.0 / 48
    factor_tensor = None if ft_dtype is None else torch.tensor(0.73, dtype=ft_dtype, device=DEVICE)
    expected = _finalize_expected(accums, factor, factor_tensor)
    if via == "wrapper":
        finalize_(
            accums,
            outs,
            factor,
            factor_tensor=factor_tensor,
            zero_accums=zero_accums,
            backend="native",
        )
    else:
        torch.ops.fastaccum.finalize_(accums, outs, factor, factor_tensor, zero_accums)
    for o, ref in zip(outs, expected, strict=False):  # outs may be empty
        assert_close_rel(o, ref, max(_bound(o.dtype), _bound(accum_dtype)))
    for i, (a, ref) in enumerate(zip(accums, expected, strict=True)):
        if zero_accums:
            assert not a.any(), f"accums[{i}] was not zeroed"
        else:
            assert_close_rel(a, ref, _bound(accum_dtype))


@pytest.mark.parametrize("offsets", OFFSETS, ids=lambda o: f"a{o[0]}-o{o[1]}")
@pytest.mark.parametrize("dtypes", [(F32, F32), (F32, BF16), (BF16, F32)], ids=_pair_id)
def test_finalize_misaligned_views(
    dtypes: tuple[torch.dtype, torch.dtype], offsets: tuple[int, int]
) -> None:
    gen = _gen(14)
    accum_dtype, out_dtype = dtypes
    a_off, o_off = offsets
    n = 65537
    abuf = _randn(n + 16, accum_dtype, gen)
    obuf = _randn(n + 16, out_dtype, gen)
    obefore = obuf.clone()
    accum, out = abuf[a_off : a_off + n], obuf[o_off : o_off + n]
    expected = _finalize_expected([accum], 0.5, None)[0]
    finalize_([accum], [out], 0.5, zero_accums=False, backend="native")
    assert_close_rel(out, expected, max(_bound(accum_dtype), _bound(out_dtype)))
    assert_close_rel(accum, expected, _bound(accum_dtype))
    assert torch.equal(obuf[:o_off], obefore[:o_off])
    assert torch.equal(obuf[o_off + n :], obefore[o_off + n :])


def test_finalize_more_tensors_than_one_launch() -> None:
    sizes = torch.randint(0, 3000, (1000,), generator=torch.Generator().manual_seed(15)).tolist()
    gen = _gen(15)
    accums = [_randn(n, F32 if i % 3 else BF16, gen) for i, n in enumerate(sizes)]
    outs = [_randn(n, BF16 if i % 2 else F32, gen) for i, n in enumerate(sizes)]
    expected = _finalize_expected(accums, 0.1, None)
    torch.ops.fastaccum.finalize_(accums, outs, 0.1, None, True)
    for o, a, ref in zip(outs, accums, expected, strict=True):
        assert_close_rel(o, ref, max(_bound(o.dtype), _bound(a.dtype)))
        assert not a.any()


def test_finalize_device_factor_needs_no_sync() -> None:
    # A clip coefficient computed on the device is consumed without a host round-trip.
    accums, grads = _pairs([65537, 1023], [(BF16, F32)], seed=16)
    grad_sumsq, *_ = accumulate_(accums, grads, 1.0, backend="native")
    coef = (1.0 / (grad_sumsq.sqrt() + 1e-6)).clamp(max=1.0)
    expected = [a.double() * 0.5 * coef.double().item() for a in accums]
    outs = [torch.empty_like(a, dtype=BF16) for a in accums]
    finalize_(accums, outs, 0.5, factor_tensor=coef, backend="native")
    for o, ref in zip(outs, expected, strict=True):
        assert_close_rel(o, ref, _bound(BF16))


def _finalize_invalid_cases() -> dict[str, tuple[Callable[[], tuple], type[Exception]]]:
    def ok(n: int = 5, dtype: torch.dtype = F32, device: str = DEVICE) -> torch.Tensor:
        return torch.randn(n, device=device).to(dtype)

    return {
        "noncontiguous-accum": (
            lambda: ([ok(), torch.randn(6, 8, device=DEVICE).t()], [], None),
            ValueError,
        ),
        "noncontiguous-out": (
            lambda: ([ok(), ok(48).view(6, 8)], [ok(), torch.randn(8, 6, device=DEVICE).t()], None),
            ValueError,
        ),
        "cpu-out": (lambda: ([ok(), ok()], [ok(), ok(device="cpu")], None), ValueError),
        "cpu-factor-tensor": (lambda: ([ok()], [], torch.tensor(0.5)), ValueError),
        "two-element-factor-tensor": (
            lambda: ([ok()], [], torch.ones(2, device=DEVICE)),
            ValueError,
        ),
        "int-factor-tensor": (
            lambda: ([ok()], [], torch.ones((), dtype=torch.int32, device=DEVICE)),
            ValueError,
        ),
        "shape-mismatch": (lambda: ([ok(), ok()], [ok(), ok(4)], None), ValueError),
        "length-mismatch": (lambda: ([ok(), ok()], [ok()], None), ValueError),
        "float64-accum": (lambda: ([ok(dtype=torch.float64)], [], None), TypeError),
        "int-out": (lambda: ([ok()], [ok(dtype=torch.int32)], None), TypeError),
    }


FINALIZE_INVALID = _finalize_invalid_cases()


@pytest.mark.parametrize("case", sorted(FINALIZE_INVALID))
@pytest.mark.parametrize("via", ["wrapper", "ops"])
def test_finalize_rejects_invalid_input_unchanged(via: str, case: str) -> None:
    build, error = FINALIZE_INVALID[case]
    accums, outs, factor_tensor = build()
    before = [t.clone() for t in [*accums, *outs]]
    with pytest.raises(error if via == "wrapper" else RuntimeError):
        if via == "wrapper":
            finalize_(accums, outs, 0.5, factor_tensor=factor_tensor, backend="native")
        else:
            torch.ops.fastaccum.finalize_(accums, outs, 0.5, factor_tensor, True)
    for t, b in zip([*accums, *outs], before, strict=True):
        assert torch.equal(t, b), "an invalid call modified its inputs"


@pytest.mark.parametrize("with_outs", [False, True], ids=["no-outs", "outs"])
def test_finalize_opcheck(with_outs: bool) -> None:
    gen = _gen(17)
    accums = [_randn(n, d, gen) for n, d in [(1023, F32), (3, BF16), (65537, F32), (1, F16)]]
    outs = [_randn(a.numel(), BF16, gen) for a in accums] if with_outs else []
    factor_tensor = torch.tensor(0.5, device=DEVICE)
    torch.library.opcheck(
        torch.ops.fastaccum.finalize_.default, (accums, outs, 0.25, factor_tensor, True)
    )
    torch.library.opcheck(torch.ops.fastaccum.finalize_.default, (accums, outs, 2.0, None, False))
