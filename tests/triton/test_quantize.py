"""Triton quantize_groups / dequantize_groups (fastaccum/triton/quantize.py) against the
reference.

Without a GPU the kernels run on CPU tensors under the Triton interpreter (tests/conftest.py
sets TRITON_INTERPRET=1 before triton is imported), so the shapes stay small; a subprocess
without the interpreter compiles them for sm_80/sm_90.
"""

import json
import math

import pytest
import torch

pytest.importorskip("triton")

from fastaccum import _backend
from fastaccum.ops.quantize import (
    dequantize_groups,
    dequantize_groups_ref,
    quantize_groups,
    quantize_groups_ref,
)
from fastaccum.triton import quantize as tri
from tests.triton.test_accumulate import compile_for_gpus

# The interpreter runs the kernels in numpy, which warns about the NaN and division-by-zero
# lanes of constant, padded and non-finite groups; those lanes are masked out by design.
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SIZES = [1, 3, 1023, 4097]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Dequantized values: exact on the interpreter except its fp32 -> bf16 cast, which truncates
# (triton 3.9) where torch rounds to nearest; a GPU may fuse mn + q * scale into an fma.
DEQUANT_RTOL = {torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}


def random_input(n, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen) * 3 + 20
    x[:: max(1, n // 7)] *= -4
    return x.to(dtype).to(DEVICE)


def assert_codes_match(got, want):
    """Codes, scales and minima equal the reference's (NaN where the reference has NaN).

    On a GPU the compiler may contract (x - mn) * inv + u into an fma; a code then moves by
    one at a rounding boundary, so a few codes may differ there.
    """
    packed, scale, minimum = (t.cpu() for t in got)
    for g, w in ((scale, want.scale), (minimum, want.minimum)):
        assert torch.equal(g.isnan(), w.isnan())
        assert torch.equal(g.nan_to_num(), w.nan_to_num())
    if DEVICE.type == "cpu":
        assert torch.equal(packed, want.packed)
    else:
        assert (packed != want.packed).float().mean().item() < 1e-3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("stochastic", [True, False])
def test_triton_matches_reference(dtype, bits, stochastic):
    for n in SIZES:
        for gs in (32, 256):
            x = random_input(n, dtype, seed=n + gs)
            seed = 2**40 + n  # high seed bits in play
            want = quantize_groups_ref(x.cpu(), bits, gs, seed, stochastic)
            got = tri.quantize_groups_triton(x, bits, gs, seed, stochastic)
            assert got[0].device.type == DEVICE.type
            assert_codes_match(got, want)
            want_y = dequantize_groups_ref(want, bits, gs, n, dtype).double()
            got_y = tri.dequantize_groups_triton(*got, bits, gs, n, dtype)
            assert got_y.dtype == dtype and got_y.shape == (n,)
            err = (got_y.cpu().double() - want_y).abs()
            assert bool((err <= DEQUANT_RTOL[dtype] * want_y.abs() + 1e-30).all())


def test_triton_nonfinite_groups_are_nan():
    x = random_input(300, torch.float32)
    x[10] = math.nan
    x[200] = -math.inf
    q = tri.quantize_groups_triton(x, 4, 64, 1, True)
    want = quantize_groups_ref(x.cpu(), 4, 64, 1, True)
    assert_codes_match(q, want)
    y = tri.dequantize_groups_triton(*q, 4, 64, 300, torch.float32).cpu()
    bad = torch.zeros(300, dtype=torch.bool)
    bad[0:64] = bad[192:256] = True
    assert bool(y[bad].isnan().all()) and bool(y[~bad].isfinite().all())


def test_wrapper_routes_to_triton_and_round_trips():
    x = random_input(1000, torch.float16).view(10, 100)
    q = quantize_groups(x, 8, 64, seed=4, backend="triton")
    y = dequantize_groups(q, 8, 64, x.numel(), torch.float16, backend="triton")
    step = q.scale.cpu().repeat_interleave(64)[:1000]
    assert bool(((y.cpu().float() - x.reshape(-1).cpu().float()).abs() <= step * 1.01 + 0.02).all())


def test_triton_rejects_bad_input():
    x = random_input(64, torch.float32)
    with pytest.raises(ValueError, match="bits must be one of"):
        tri.quantize_groups_triton(x, 3, 32, 0, True)
    with pytest.raises(ValueError, match="x must be contiguous"):
        tri.quantize_groups_triton(x.view(8, 8).t(), 8, 32, 0, True)
    with pytest.raises(TypeError, match="expected one of float32"):
        tri.quantize_groups_triton(x.double(), 8, 32, 0, True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU routing")
def test_triton_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not _backend.triton_can_run(torch.device("cpu"))
    with pytest.raises(RuntimeError, match="need a CUDA device"):
        tri.quantize_groups_triton(torch.randn(64), 8, 32, 0, True)


def test_kernels_compile_for_gpus():
    """The kernels compile for sm_80 and sm_90 (no GPU needed), with correctly rounded
    divisions (div.rn) for the scale and its inverse, as the reference computes them."""
    out = compile_for_gpus(
        """
        import json
        from fastaccum.triton import quantize as tri

        found = {}
        for arch in (80, 90):
            for bits in (2, 8):
                q = ptx(tri._quantize_kernel, {
                    "x_ptr": "*bf16", "packed_ptr": "*u8", "scale_ptr": "*fp32",
                    "min_ptr": "*fp32", "numel": "i64", "groups": "i32", "seed_lo": "i64",
                    "seed_hi": "i32", "BITS": bits, "GROUP": 256, "ROWS": 16,
                    "STOCHASTIC": True}, arch)
                found[f"q{arch}-{bits}"] = "div.rn.f32" in q
            d = ptx(tri._dequantize_kernel, {
                "packed_ptr": "*u8", "scale_ptr": "*fp32", "min_ptr": "*fp32",
                "out_ptr": "*fp16", "numel": "i64", "groups": "i32", "BITS": 4, "GROUP": 256,
                "ROWS": 16}, arch)
            found[f"d{arch}"] = ".entry" in d
        print(json.dumps(found))
        """
    )
    assert all(json.loads(out).values()), out
