"""batch_norm_stats(x, dtype=torch.float64) on every backend, against float64 truth.

A mean of 1e4 rounds to float32 with an error of up to 5e-4; AccumBatchNorm merges many
micro-batches' means, and that rounding then shows up in the merged variance, so it asks
for float64 statistics. Inputs, truth and layouts come from tests/ops/test_batchnorm.py.
"""

import pytest
import torch

from fastaccum import _backend
from fastaccum.ops import batchnorm as bn
from tests.ops.test_batchnorm import make_x, truth_stats

BACKENDS = ["native", "reference", "triton"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    name = request.param
    if name == "native" and not _backend.native_can_run(torch.device("cpu"), "bn_stats"):
        pytest.skip("fastaccum._C is not built")
    if name == "triton" and not _backend.triton_can_run(torch.device("cpu")):
        pytest.skip("Triton is not installed (its interpreter runs the kernels on the CPU)")
    return name


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("std", [1.0, 0.05])
@pytest.mark.parametrize("shape", [(5, 3), (4, 3, 9, 7)], ids=str)
def test_float64_statistics_keep_the_digits_of_a_large_mean(backend, shape, layout, std):
    x = make_x(shape, layout=layout, mean=1e4, std=std, seed=3)
    mean, m2 = bn.batch_norm_stats(x, dtype=torch.float64, backend=backend)
    assert mean.dtype == m2.dtype == torch.float64
    want_mean, want_m2 = truth_stats(x)
    spread = (want_m2 / (x.numel() // x.shape[1])).sqrt()
    # float32 could not: its nearest value to 1e4 + a fraction is up to 5e-4 away.
    assert ((mean - want_mean).abs() <= 1e-6 * spread).all(), (mean - want_mean, spread)
    assert ((m2 - want_m2).abs() <= 1e-5 * want_m2).all(), (m2, want_m2)


def test_float32_stays_the_default(backend):
    x = make_x((4, 3, 5), mean=1e4, seed=4)
    default = bn.batch_norm_stats(x, backend=backend)
    asked = bn.batch_norm_stats(x, dtype=torch.float32, backend=backend)
    wide = bn.batch_norm_stats(x, dtype=torch.float64, backend=backend)
    assert default.mean.dtype == default.m2.dtype == torch.float32
    assert torch.equal(default.mean, asked.mean) and torch.equal(default.m2, asked.m2)
    # The same statistics, rounded once more (Triton combines its programs' moments in the
    # statistics' dtype, so its float32 ones may round differently).
    if backend == "triton":
        torch.testing.assert_close(wide.mean.float(), default.mean)
        torch.testing.assert_close(wide.m2.float(), default.m2)
    else:
        assert torch.equal(wide.mean.float(), default.mean)
        assert torch.equal(wide.m2.float(), default.m2)


def test_other_statistics_dtypes_are_refused():
    x = make_x((4, 3))
    with pytest.raises(
        ValueError, match=r"must be torch\.float32 or torch\.float64, got torch\.float16"
    ):
        bn.batch_norm_stats(x, dtype=torch.float16)
    if _backend.native_can_run(torch.device("cpu"), "bn_stats"):
        with pytest.raises(RuntimeError, match="must be float32 or float64"):
            torch.ops.fastaccum.bn_stats(x, torch.float16)


def test_opcheck_with_float64_statistics():
    if not _backend.native_can_run(torch.device("cpu"), "bn_stats"):
        pytest.skip("fastaccum._C is not built")
    x = make_x((3, 4, 5, 6), layout="channels_last")
    torch.library.opcheck(torch.ops.fastaccum.bn_stats.default, (x, torch.float64))
    with torch._subclasses.fake_tensor.FakeTensorMode():
        fake = torch.empty(3, 4, 5)
        mean, m2 = torch.ops.fastaccum.bn_stats(fake, torch.float64)
    assert mean.dtype == m2.dtype == torch.float64 and mean.shape == (4,)


def test_triton_op_takes_the_dtype():
    if not _backend.triton_can_run(torch.device("cpu")):
        pytest.skip("Triton is not installed")
    import fastaccum.triton.batchnorm  # noqa: F401  (registers fastaccum::bn_stats_triton)

    x = make_x((3, 4, 5, 2), torch.bfloat16, "channels_last")
    torch.library.opcheck(
        torch.ops.fastaccum.bn_stats_triton.default,
        (x, torch.float64),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )
    mean, m2 = torch.ops.fastaccum.bn_stats_triton(x, torch.float64)
    assert mean.dtype == m2.dtype == torch.float64
