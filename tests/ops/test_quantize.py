"""quantize_groups / dequantize_groups / pack_mask: the reference against analytic bounds
and the statistics of stochastic rounding, the native (C++ CPU) kernel against the
reference bit for bit, bad input, opcheck.

The Triton backend has its own file (tests/triton/test_quantize.py).
"""

import math
import os

import pytest
import torch

from fastaccum import _backend
from fastaccum.ops.quantize import (
    QuantizedGroups,
    dequantize_groups,
    dequantize_groups_ref,
    pack_mask,
    quantize_groups,
    quantize_groups_ref,
    quantized_nbytes,
    rounding_offsets,
    unpack_mask,
)

SIZES = [1, 3, 1023, 65537]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BITS = [2, 4, 8]


def random_input(n, dtype, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    # Large mean and a few outliers: groups with a wide, offset range.
    x = torch.randn(n, generator=gen) * 3 + 20
    x[:: max(1, n // 7)] *= -4
    return x.to(dtype).to(device)


def group_view(t, group_size):
    """A flat per-element tensor as [groups, group_size], padded with NaN."""
    pad = -t.numel() % group_size
    return torch.nn.functional.pad(t.double(), (0, pad), value=math.nan).view(-1, group_size)


def native_or_skip(device):
    if not _backend.native_can_run(device, "quantize_groups"):
        if os.environ.get("FASTACCUM_NO_EXT") == "1" or device.type != "cpu":
            pytest.skip(f"no native quantize_groups kernel for {device.type}")
        pytest.fail("fastaccum._C has no CPU quantize_groups kernel; the build is broken")


def assert_same(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.isnan(), b.isnan()) if a.is_floating_point() else True
    if a.is_floating_point():
        assert torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))
    else:
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- reference


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("stochastic", [True, False])
def test_reference_error_is_within_one_step(bits, stochastic):
    """Each value lands within one quantization step (half a step when rounding to nearest)
    and the per-group minimum and maximum are exact."""
    n, gs = 5000, 128
    x = random_input(n, torch.float32)
    q = quantize_groups_ref(x, bits, gs, seed=3, stochastic=stochastic)
    assert q.packed.shape == (math.ceil(n / gs) * gs * bits // 8,)
    assert q.packed.dtype == torch.uint8
    y = dequantize_groups_ref(q, bits, gs, n, torch.float32)
    err = group_view(y - x, gs).abs()
    step = q.scale.double()[:, None]
    bound = step * (1.0 if stochastic else 0.5) * (1 + 1e-5) + 1e-6
    assert bool((err.nan_to_num(0) <= bound).all())
    xs = group_view(x, gs)
    lo = xs.nan_to_num(nan=math.inf).amin(1)
    hi = xs.nan_to_num(nan=-math.inf).amax(1)
    assert torch.equal(q.minimum.double(), lo)
    assert torch.allclose(q.scale.double() * (2**bits - 1), hi - lo, rtol=1e-6)


@pytest.mark.parametrize("bits", BITS)
def test_stochastic_rounding_is_unbiased(bits):
    """Mean over 400 seeds of the dequantized values converges to x: the mean error per
    element is within 5 standard errors of 0 (its spread is at most step / 2 per draw)."""
    n, gs, draws = 512, 256, 400
    x = random_input(n, torch.float32, seed=1)
    total = torch.zeros(n, dtype=torch.float64)
    for seed in range(draws):
        q = quantize_groups_ref(x, bits, gs, seed=seed)
        total += dequantize_groups_ref(q, bits, gs, n, torch.float32).double()
    mean_err = total / draws - x.double()
    step = quantize_groups_ref(x, bits, gs).scale.double().repeat_interleave(gs)[:n]
    stderr = step / 2 / math.sqrt(draws)
    assert bool((mean_err.abs() <= 5 * stderr + 1e-7).all())
    # Round to nearest is biased on the same data: its error does not average out.
    nearest = dequantize_groups_ref(
        quantize_groups_ref(x, bits, gs, stochastic=False), bits, gs, n, torch.float32
    )
    assert (nearest.double() - x.double()).abs().mean() > 5 * mean_err.abs().mean()


def test_rounding_offsets_are_uniform_and_seeded():
    u = rounding_offsets(11, 200_000)
    assert u.dtype == torch.float32 and bool((u >= 0).all()) and bool((u < 1).all())
    hist = torch.histc(u, bins=10, min=0, max=1) / u.numel()
    assert torch.allclose(hist, torch.full_like(hist, 0.1), atol=0.005)
    assert abs(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1].item()) < 0.01
    assert torch.equal(u, rounding_offsets(11, 200_000))
    assert (u != rounding_offsets(12, 200_000)).float().mean() > 0.99
    # The high seed bits matter too.
    assert not torch.equal(rounding_offsets(2**40 + 11, 1000), u[:1000])


def test_same_seed_same_codes_other_seed_other_codes():
    x = random_input(4096, torch.float32)
    a = quantize_groups(x, 4, 256, seed=7)
    b = quantize_groups(x, 4, 256, seed=7)
    c = quantize_groups(x, 4, 256, seed=8)
    assert torch.equal(a.packed, b.packed)
    assert not torch.equal(a.packed, c.packed)


def test_nonfinite_group_dequantizes_to_nan_and_others_are_untouched():
    x = random_input(1000, torch.float32)
    x[300] = math.inf
    x[700] = math.nan
    for backend in ["reference"] + (["native"] if _backend.native_can_run(x.device) else []):
        q = quantize_groups(x, 8, 256, backend=backend)
        y = dequantize_groups(q, 8, 256, 1000, backend=backend)
        bad = torch.zeros(1000, dtype=torch.bool)
        bad[256:512] = bad[512:768] = True
        assert bool(y[bad].isnan().all())
        assert bool(y[~bad].isfinite().all())


def test_constant_group_is_exact():
    x = torch.full((300,), -2.5)
    for bits in BITS:
        q = quantize_groups(x, bits, 256)
        assert torch.equal(dequantize_groups(q, bits, 256, 300), x)


def test_quantized_nbytes_counts_codes_scales_and_minima():
    q = quantize_groups(random_input(1000, torch.float32), 4, 256)
    stored = sum(t.numel() * t.element_size() for t in q)
    assert stored == quantized_nbytes(1000, 4, 256) == 4 * (128 + 8)


# --------------------------------------------------------------------------- native vs reference


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("stochastic", [True, False])
def test_native_matches_reference_bit_for_bit(device, dtype, bits, stochastic):
    native_or_skip(device)
    for n in SIZES:
        for gs in (32, 256, 4096):
            x = random_input(n, dtype, seed=n + gs, device=device)
            seed = 2**41 + 977 * n
            want = quantize_groups_ref(x.cpu(), bits, gs, seed, stochastic)
            got = quantize_groups(x, bits, gs, seed=seed, stochastic=stochastic, backend="native")
            for w, g in zip(want, got, strict=True):
                assert_same(g.cpu(), w)
            want_y = dequantize_groups_ref(want, bits, gs, n, dtype)
            got_y = dequantize_groups(got, bits, gs, n, dtype, backend="native")
            assert_same(got_y.cpu(), want_y)


def test_native_handles_nonfinite_like_the_reference(device):
    native_or_skip(device)
    x = random_input(2000, torch.bfloat16, device=device)
    x[5], x[600], x[1999] = math.nan, math.inf, -math.inf
    want = quantize_groups_ref(x.cpu(), 2, 64, 5, True)
    got = quantize_groups(x, 2, 64, seed=5, backend="native")
    for w, g in zip(want, got, strict=True):
        assert_same(g.cpu(), w)


def test_non_contiguous_input_is_read_in_row_major_order(device):
    x = random_input(64 * 40, torch.float32, device=device).view(64, 40)
    t = x.t()  # not contiguous
    a = quantize_groups(t, 8, 64, seed=2)
    b = quantize_groups(t.contiguous(), 8, 64, seed=2)
    for u, v in zip(a, b, strict=True):
        assert_same(u, v)


def test_empty_input(device):
    x = torch.empty(0, device=device)
    for backend in ["reference"] + (["native"] if _backend.native_can_run(device) else []):
        q = quantize_groups(x, 8, 256, backend=backend)
        assert all(t.numel() == 0 for t in q)
        assert dequantize_groups(q, 8, 256, 0, backend=backend).shape == (0,)


def test_native_is_independent_of_thread_count():
    native_or_skip(torch.device("cpu"))
    x = random_input(300_000, torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = quantize_groups(x, 2, 256, seed=9, backend="native")
    finally:
        torch.set_num_threads(threads)
    many = quantize_groups(x, 2, 256, seed=9, backend="native")
    assert torch.equal(one.packed, many.packed)


# --------------------------------------------------------------------------- bad input


def test_bad_arguments_raise_clear_errors():
    x = torch.randn(100)
    with pytest.raises(ValueError, match="bits must be one of"):
        quantize_groups(x, 3)
    with pytest.raises(TypeError, match="bits must be an int"):
        quantize_groups(x, 8.0)
    with pytest.raises(ValueError, match="group_size must be a power of two"):
        quantize_groups(x, 8, 100)
    with pytest.raises(ValueError, match="seed must be in"):
        quantize_groups(x, 8, seed=-1)
    with pytest.raises(TypeError, match="expected one of float32"):
        quantize_groups(torch.arange(10), 8)
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor"):
        quantize_groups([1.0, 2.0], 8)
    q = quantize_groups(x, 8, 32)
    with pytest.raises(
        ValueError, match="packed must be a 1-D uint8 tensor of 224 bytes for 200 values"
    ):
        dequantize_groups(q, 8, 32, 200)
    with pytest.raises(ValueError, match="scale must be a 1-D float32"):
        dequantize_groups(QuantizedGroups(q.packed, q.scale.double(), q.minimum), 8, 32, 100)
    with pytest.raises(TypeError, match="dtype must be one of"):
        dequantize_groups(q, 8, 32, 100, torch.int32)


def test_native_op_rejects_bad_input_without_writing():
    native_or_skip(torch.device("cpu"))
    x = torch.randn(64, 8)
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        torch.ops.fastaccum.quantize_groups(x.t(), 8, 32, 0, True)
    with pytest.raises(RuntimeError, match="bits must be one of 2, 4, 8"):
        torch.ops.fastaccum.quantize_groups(x, 5, 32, 0, True)
    with pytest.raises(RuntimeError, match="group_size must be a power of two"):
        torch.ops.fastaccum.quantize_groups(x, 8, 48, 0, True)
    with pytest.raises(RuntimeError, match="expected one of float32"):
        torch.ops.fastaccum.quantize_groups(x.double(), 8, 32, 0, True)
    q = torch.ops.fastaccum.quantize_groups(x, 8, 32, 0, True)
    with pytest.raises(RuntimeError, match="packed must be a 1-D uint8 tensor"):
        torch.ops.fastaccum.dequantize_groups(q[0][:-1], q[1], q[2], 8, 32, 512, torch.float32)


def test_opcheck():
    native_or_skip(torch.device("cpu"))
    x = random_input(1000, torch.bfloat16)
    torch.library.opcheck(torch.ops.fastaccum.quantize_groups.default, (x, 4, 64, 3, True))
    q = torch.ops.fastaccum.quantize_groups(x, 4, 64, 3, True)
    torch.library.opcheck(
        torch.ops.fastaccum.dequantize_groups.default, (*q, 4, 64, 1000, torch.float16)
    )


# --------------------------------------------------------------------------- masks


@pytest.mark.parametrize("n", [1, 7, 8, 1023])
def test_mask_round_trip(n):
    x = torch.randn(n)
    packed = pack_mask(x)
    assert packed.dtype == torch.uint8 and packed.shape == (math.ceil(n / 8),)
    assert torch.equal(unpack_mask(packed, n, torch.float32), (x > 0).float())
    b = x > 0.5
    assert torch.equal(unpack_mask(pack_mask(b), n, torch.bool), b)
    # First element in the lowest bit.
    assert pack_mask(torch.tensor([True] + [False] * 7)).item() == 1


def test_mask_bad_input():
    with pytest.raises(ValueError, match="at least 2 bytes"):
        unpack_mask(torch.zeros(1, dtype=torch.uint8), 9, torch.float32)
    with pytest.raises(TypeError, match="real or bool"):
        pack_mask(torch.zeros(3, dtype=torch.complex64))
