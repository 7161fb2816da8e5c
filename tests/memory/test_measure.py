"""saved_bytes against bytes counted by hand, and the pinned buffer pool (CPU side)."""

import pytest
import torch

from fastaccum.memory import ActivationPolicy, PinnedPool, saved_bytes
from fastaccum.memory.offload import _bucket
from fastaccum.ops.quantize import quantized_nbytes

N, D_IN, D_HID, D_OUT = 128, 32, 64, 16


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(D_IN, D_HID), torch.nn.ReLU(), torch.nn.Linear(D_HID, D_OUT)
    )


def test_counts_match_a_hand_count():
    """Plain PyTorch keeps the input (for dW1) and the ReLU output (saved by ReLU and by the
    second Linear: one storage), plus W2^T (a parameter, counted apart). W1^T is not saved:
    the input needs no gradient."""
    x = torch.randn(N, D_IN)
    plain = saved_bytes(model(), x)
    assert plain.total == 4 * (N * D_IN + N * D_HID)
    assert plain.parameters == 4 * D_HID * D_OUT
    assert plain.batch_size == N and plain.per_sample == plain.total / N
    assert plain.saved_tensors == 4

    policy = ActivationPolicy(bits=8, min_bytes=0, group_size=64)
    got = saved_bytes(model(), x, policy)
    expected = {
        "quantize": quantized_nbytes(N * D_IN, 8, 64) + quantized_nbytes(N * D_HID, 8, 64),
        "relu": N * D_HID // 8,
    }
    assert got.by_kind == expected
    assert got.total == sum(expected.values())
    assert got.parameters == plain.parameters


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_ratio_follows_the_format(bits):
    """For large activations the ratio is 4 bytes over bits / 8 + 8 / group_size."""
    x = torch.randn(512, D_IN)
    m = torch.nn.Sequential(torch.nn.Linear(D_IN, 256), torch.nn.GELU(), torch.nn.Linear(256, 8))
    plain = saved_bytes(m, x).total
    compressed = saved_bytes(m, x, ActivationPolicy(bits=bits, min_bytes=0)).total
    per_element = bits / 8 + 8 / 256
    assert plain / compressed == pytest.approx(4 / per_element, rel=0.02)


def test_batch_forms_and_errors():
    m = model()
    x = torch.randn(N, D_IN)
    assert saved_bytes(m, (x,)).total == saved_bytes(m, x).total
    wrapped = torch.nn.Module()
    wrapped.forward = lambda inp: m(inp)
    assert saved_bytes(wrapped, {"inp": x}).total == saved_bytes(m, x).total
    with pytest.raises(ValueError, match="no tensor with a batch dimension"):
        saved_bytes(m, (3,))
    with pytest.raises(TypeError, match="policy must be an ActivationPolicy"):
        saved_bytes(m, x, policy=8)


def test_graph_is_freed_and_nothing_is_differentiated():
    m = model()
    saved_bytes(m, torch.randn(N, D_IN))
    assert all(p.grad is None for p in m.parameters())


def test_pool_reuses_buffers_after_release():
    pool = PinnedPool(pin=False)
    a = pool.acquire(100_000)
    assert a.dtype == torch.uint8 and a.numel() == _bucket(100_000) >= 100_000
    pool.release(a)
    assert pool.idle_bytes == a.numel()
    b = pool.acquire(99_000)  # same size class
    assert b.data_ptr() == a.data_ptr()
    c = pool.acquire(99_000)  # none idle: a new one
    assert c.data_ptr() != b.data_ptr()
    assert pool.allocated_bytes == 2 * a.numel()
    pool.release(b)
    pool.release(c)
    pool.clear()
    assert pool.idle_bytes == 0 and pool.allocated_bytes == 0
    with pytest.raises(ValueError, match="nbytes must be >= 0"):
        pool.acquire(-1)


def test_size_classes_waste_at_most_a_quarter():
    for n in [1, 65_536, 65_537, 100_000, 3_000_001, 2**30 + 1]:
        size = _bucket(n)
        assert size >= n
        assert size <= max(65_536, n * 1.25)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_offload_on_gpu_matches_and_moves_bytes_to_the_host():
    dev = torch.device("cuda")
    m = torch.nn.Sequential(
        torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256)
    ).to(dev)
    x = torch.randn(512, 256, device=dev)
    pool = PinnedPool()

    def grads(policy):
        m.zero_grad()
        from fastaccum.memory import save_activations

        with save_activations(policy) as s:
            out = m(x)
        out.square().mean().backward()
        return [p.grad.clone() for p in m.parameters()], s

    exact, _ = grads(ActivationPolicy(bits=None, min_bytes=0))
    got, s = grads(ActivationPolicy(bits=None, offload=True, min_bytes=0, pool=pool))
    assert s.stats.offloaded > 0 and s.stats.stored_bytes == 0
    for g, e in zip(got, exact, strict=True):
        assert torch.equal(g, e)
    a, _ = grads(ActivationPolicy(bits=8, offload=True, min_bytes=0, seed=1, pool=pool))
    b, _ = grads(ActivationPolicy(bits=8, min_bytes=0, seed=1))
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)
    counted = saved_bytes(m, x, ActivationPolicy(bits=None, offload=True, min_bytes=0))
    assert counted.total == 0 and counted.host > 0
    torch.cuda.synchronize()
    assert pool.allocated_bytes > 0
