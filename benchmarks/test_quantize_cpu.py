"""CPU suite: quantizing one activation tensor (4M float32 values, 16 MiB) per group of 256
to 8/4/2 bits with stochastic rounding, then dequantizing it.

native:    the same job in plain PyTorch ops (``quantize_groups_ref``/``dequantize_groups_ref``,
           the reference the kernel is tested against bit for bit).
fastaccum: the C++ kernels (``quantize_groups``/``dequantize_groups``).
copy:      a float32 ``copy_`` of the activation, the bandwidth reference.

Run: ``pytest benchmarks/test_quantize_cpu.py``.
"""

import pytest
import torch

from fastaccum import _backend
from fastaccum.ops.quantize import (
    dequantize_groups,
    dequantize_groups_ref,
    quantize_groups,
    quantize_groups_ref,
    quantized_nbytes,
)

N, GROUP = 1 << 22, 256


@pytest.fixture(scope="module")
def activation():
    return torch.randn(N, generator=torch.Generator().manual_seed(0)) * 2 + 0.5


def round_trip_native(x, bits):
    q = quantize_groups_ref(x, bits, GROUP, 7, True)
    return q, dequantize_groups_ref(q, bits, GROUP, N, torch.float32)


def round_trip_fastaccum(x, bits):
    q = quantize_groups(x, bits, GROUP, seed=7, backend="native")
    return q, dequantize_groups(q, bits, GROUP, N, backend="native")


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("provider", ["native", "fastaccum"])
def test_quantize_round_trip(benchmark, activation, bits, provider):
    if provider == "fastaccum" and not _backend.native_can_run(torch.device("cpu")):
        pytest.skip("fastaccum._C is not built")
    fn = round_trip_native if provider == "native" else round_trip_fastaccum
    benchmark.group = f"quantize+dequantize {bits}-bit"
    # Read x, write the codes; read the codes, write x back.
    moved = 2 * (N * 4 + quantized_nbytes(N, bits, GROUP))
    benchmark.extra_info.update(provider=provider, bytes=moved)
    q, y = benchmark.pedantic(fn, args=(activation, bits), rounds=5, warmup_rounds=1)
    want = quantize_groups_ref(activation[: 64 * GROUP], bits, GROUP, 7, True)
    assert torch.equal(q.packed[: want.packed.numel()], want.packed)
    assert (y - activation).abs().max() <= q.scale.max() * 1.001


def test_copy_bandwidth(benchmark, activation):
    dst = torch.empty_like(activation)
    benchmark.group = "copy"
    benchmark.extra_info.update(provider="copy", bytes=2 * N * 4)
    benchmark.pedantic(dst.copy_, args=(activation,), rounds=5, warmup_rounds=1)
    assert torch.equal(dst, activation)
