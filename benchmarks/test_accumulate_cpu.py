"""CPU suite: one micro-step of accumulation on the GPT-2-small parameter set.

native:    per-parameter ``add_`` into fp32 + clip_grad_norm_'s norm + GradScaler's
           non-finite check (``fastaccum.workloads.native_accumulate``).
fastaccum: the fused ``accumulate_`` pass, which yields the norm and the flag too.
copy:      a float32 ``copy_`` of the accumulators' bytes, the bandwidth reference.
rmw:       a float32 in-place ``add_`` of the same size (read 2, write 1). On CPUs a copy
           also reads its destination (write-allocate) without that read being counted, so
           read-modify-write kernels can pass 100% of "copy"; "rmw" is the fairer ceiling.

Run: ``make bench-cpu`` (or ``pytest benchmarks/test_accumulate_cpu.py``).
"""

import pytest
import torch

from fastaccum.workloads import (
    bytes_moved,
    fused_accumulate,
    gpt2_small_shapes,
    make_param_set,
    native_accumulate,
)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@pytest.fixture(scope="module", params=sorted(DTYPES))
def param_set(request):
    accums, grads = make_param_set(gpt2_small_shapes(), DTYPES[request.param], "cpu")
    return request.param, accums, grads


@pytest.mark.parametrize("provider", ["native", "fastaccum"])
def test_accumulate_micro_step(benchmark, param_set, provider):
    dtype, accums, grads = param_set
    fn = native_accumulate if provider == "native" else fused_accumulate
    benchmark.group = f"accumulate gpt2-small {dtype}"
    benchmark.extra_info.update(provider=provider, bytes=bytes_moved(grads))
    norm, _ = benchmark.pedantic(fn, args=(accums, grads, 0.125), rounds=7, warmup_rounds=1)
    expected = torch.linalg.vector_norm(torch.stack([g.double().norm() for g in grads]))
    # Sanity check that both did the job. torch's _foreach_norm reduces in the gradient's
    # dtype and drifts (seen: 8e-4 relative in fp32 on 38M elements), hence its looser bound.
    rtol = 1e-2 if provider == "native" else 1e-5
    assert abs(norm.item() - expected.item()) <= rtol * expected.item()


def test_copy_bandwidth(benchmark):
    n = sum(torch.Size(s).numel() for s in gpt2_small_shapes())
    src, dst = torch.randn(n), torch.zeros(n)
    benchmark.group = "copy"
    benchmark.extra_info.update(provider="copy", bytes=2 * src.numel() * 4)
    benchmark.pedantic(dst.copy_, args=(src,), rounds=7, warmup_rounds=1)
    assert torch.equal(dst, src)


def test_read_modify_write_bandwidth(benchmark):
    n = sum(torch.Size(s).numel() for s in gpt2_small_shapes())
    src, dst = torch.randn(n), torch.zeros(n)
    benchmark.group = "rmw"
    benchmark.extra_info.update(provider="rmw", bytes=3 * src.numel() * 4)
    benchmark.pedantic(dst.add_, args=(src,), rounds=7, warmup_rounds=1)
    assert torch.isfinite(dst).all()
