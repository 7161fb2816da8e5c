"""sumsq: the native CPU kernel and the reference against float64, plus bad input, thread
counts and opcheck. On other devices sumsq always runs the reference (torch's own
multi-tensor norm); that path is covered here on every device the machine has."""

import os

import pytest
import torch

from fastaccum import _backend
from fastaccum.ops import sumsq

# f32 result of a double sum: one f32 rounding, plus the fp32 lane partials of the kernel.
RTOL = 1e-6


def _backends(device):
    names = ["reference"]
    if device.type == "cpu":
        if _backend.native_can_run(device, "sumsq"):
            names.append("native")
        elif os.environ.get("FASTACCUM_NO_EXT") != "1":
            pytest.fail("fastaccum._C has no CPU sumsq kernel; the build is broken")
    return names


def _tensors(sizes, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, generator=gen) * 3).to(dtype).to(device) for n in sizes]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sumsq_matches_float64(device, dtype):
    # Sizes around the kernel's 65536-element chunks and 16-element lanes.
    tensors = _tensors([1, 15, 17, 4097, 65535, 65537, 200_003], dtype, device)
    want = sum(t.double().square().sum().item() for t in tensors)
    for backend in _backends(device):
        got = sumsq(tensors, backend=backend)
        assert got.dtype == torch.float32 and got.shape == () and got.device == device
        assert got.item() == pytest.approx(want, rel=RTOL), backend


def test_sumsq_of_shaped_tensors_reads_every_element(device):
    tensors = [torch.ones(3, 5, 7, device=device), torch.full((2, 2), 2.0, device=device)]
    for backend in _backends(device):
        assert sumsq(tensors, backend=backend).item() == 3 * 5 * 7 + 4 * 4.0


def test_sumsq_empty_list_is_zero():
    got = sumsq([])
    assert got.item() == 0.0 and got.dtype == torch.float32


def test_sumsq_nonfinite_and_overflow(device):
    for backend in _backends(device):
        nan = sumsq(
            [torch.ones(100, device=device), torch.tensor([float("nan")], device=device)],
            backend=backend,
        )
        assert torch.isnan(nan), backend
        inf = sumsq([torch.tensor([float("inf"), 1.0], device=device)], backend=backend)
        assert torch.isinf(inf), backend
        # Every square is finite in double; the f32 result overflows to inf (as
        # accumulate_'s accum_sumsq does), which the wrapper reads as "skip the window".
        big = sumsq([torch.full((10,), 1e30, device=device)], backend=backend)
        assert torch.isinf(big), backend
        # Squares beyond f32 but a sum that fits: no spurious overflow.
        fits = sumsq([torch.full((4,), 1e18, device=device)], backend=backend)
        assert fits.item() == pytest.approx(4e36, rel=RTOL), backend


def test_sumsq_is_deterministic_across_thread_counts():
    tensors = _tensors([300_001, 5, 70_000], torch.float32, "cpu", seed=3)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            results.append(sumsq(tensors, backend=_backends(torch.device("cpu"))[-1]))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize(
    ("tensors", "exc", "match"),
    [
        (torch.ones(3), TypeError, "list or tuple"),
        ([torch.ones(3), 2.0], TypeError, r"tensors\[1\] must be a torch.Tensor"),
        ([torch.ones(3, dtype=torch.int64)], TypeError, "dtype torch.int64"),
        ([torch.ones(3), torch.ones(3, device="meta")], ValueError, "one device"),
        ([torch.ones(4, 4).t()], ValueError, "not contiguous"),
    ],
)
def test_sumsq_bad_input(tensors, exc, match):
    with pytest.raises(exc, match=match):
        sumsq(tensors)


def test_native_op_checks_its_own_input():
    if not _backend.native_can_run(torch.device("cpu"), "sumsq"):
        pytest.skip("native kernels not built (FASTACCUM_NO_EXT=1)")
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.fastaccum.sumsq([torch.ones(3, dtype=torch.float64)])
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.fastaccum.sumsq([torch.ones(4, 4).t()])


def test_opcheck_sumsq():
    if not _backend.native_can_run(torch.device("cpu"), "sumsq"):
        pytest.skip("native kernels not built (FASTACCUM_NO_EXT=1)")
    for dtype in (torch.float32, torch.bfloat16):
        tensors = _tensors([3, 1023], dtype, "cpu", seed=5)
        torch.library.opcheck(torch.ops.fastaccum.sumsq.default, (tensors,))
